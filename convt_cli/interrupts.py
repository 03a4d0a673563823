"""SIGINT and SIGTERM, stopping a run between two pieces of its work, as Ctrl-C does.

The CLI installs `terminate` for both signals. It raises KeyboardInterrupt at once; raised inside a finalizer
(h5py closes objects in weakref callbacks) that exception is swallowed, so the signal is also recorded, and
`stop_if_signalled`, called by the streaming loops between pieces and before committing an output, raises it
again. Without the handler (a Python caller's own process) nothing is ever recorded and the check costs nothing.
"""

from __future__ import annotations

_signalled: list[int] = []


def terminate(signum, frame) -> None:
    """A signal handler: schedulers send SIGTERM, and it cleans up exactly as Ctrl-C does."""
    _signalled.append(signum)
    raise KeyboardInterrupt


def stop_if_signalled() -> None:
    """Raise KeyboardInterrupt if `terminate` has run, even where its own exception was swallowed."""
    if _signalled:
        raise KeyboardInterrupt
