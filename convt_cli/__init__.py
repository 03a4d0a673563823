"""convt: N-D transposed convolution with tf.nn.conv_transpose semantics, in NumPy."""

from .errors import ConvtError

__version__ = "0.1.0"
__all__ = ["conv_transpose", "conv", "run_files", "ConvtError", "__version__"]


def conv(input, filters, strides=1, padding="SAME", data_format=None, dilations=None, name=None, *, threads=None):
    """Forward convolution (tf.nn.convolution's arguments): `convt_cli.engine.conv`, which documents the rest;
    `name` is ignored, as TF's graph name for the op, taken so that a call written for TF runs unchanged.

    >>> import numpy as np
    >>> conv(np.ones((2, 10, 10, 4), np.float32), np.ones((3, 3, 4, 3), np.float32), 2, name="down").shape
    (2, 5, 5, 3)
    """
    from .engine import conv as forward_conv

    return forward_conv(input, filters, strides, padding, data_format, dilations, threads=threads)


def __getattr__(name):
    # the engine (and NumPy) load on first use, so that `convt --help` starts as fast as click alone
    if name == "conv_transpose":
        from . import engine

        return engine.conv_transpose
    if name == "run_files":
        from .stream import run_files

        return run_files
    raise AttributeError(f"module 'convt_cli' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
