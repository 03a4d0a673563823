"""convt: N-D transposed convolution with tf.nn.conv_transpose semantics, in NumPy."""

from .engine import conv, conv_transpose
from .errors import ConvtError

__version__ = "0.1.0"
__all__ = ["conv_transpose", "conv", "ConvtError", "__version__"]
