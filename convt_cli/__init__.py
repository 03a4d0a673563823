"""convt: N-D transposed convolution with tf.nn.conv_transpose semantics, in NumPy."""

from .errors import ConvtError

__version__ = "0.1.0"
__all__ = ["conv_transpose", "conv", "run_files", "ConvtError", "__version__"]
_SUBMODULES = ("engine", "shapes", "stream", "io", "formats", "verify")


def __getattr__(name):
    # the engine (and NumPy) load on first use, so that `convt --help` starts as fast as click alone
    if name in ("conv_transpose", "conv"):
        from . import engine

        return getattr(engine, name)
    if name == "run_files":
        from .stream import run_files

        return run_files
    if name in _SUBMODULES:  # convt_cli.engine.prepare, convt_cli.shapes.plan_conv_transpose, as the README writes
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'convt_cli' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
