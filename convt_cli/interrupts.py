"""SIGINT and SIGTERM, stopping a run between two pieces of its work, as Ctrl-C does.

The CLI installs `terminate` for both signals. It raises KeyboardInterrupt where that is safe, and only there:
Python runs a signal handler between any two bytecodes of the main thread, also inside a finalizer (h5py closes
its objects in weakref callbacks), where an exception cannot propagate: Python swallows it and prints
`Exception ignored in: ...` with a traceback. So

- inside `deferred()` (h5py work in formats/h5.py) the signal is held and raised when the block ends, where
  the format's own state is whole again; `deferred(reraise=False)` holds it past the block (cleanup that must
  run to its end, or a step after which the output is already in place);
- inside a finalizer anywhere else (a `__del__`, a weakref callback: an h5py object the garbage collector
  frees) it is held too, never printed;
- inside an import (NumPy and threadpoolctl load lazily, on first use) it is held too: raised there, it would
  leave a module half made, or come out wrapped in another exception (Python wraps what a class body's
  `__set_name__` raises in a RuntimeError), or be printed from importlib's own weakref callback.

Every signal is also recorded: `stop_if_signalled`, called by the streaming loops between pieces and before
committing an output, raises a held one, as the end of the next deferred() block does. (Delivering it again
from inside the handler, `_thread.interrupt_main`, would run the handler again inside the same finalizer, and
again: a recursion.) Without the handler (a Python caller's own process) nothing is ever recorded and the
checks cost nothing.
"""

from __future__ import annotations

import contextlib
import os
import threading

_signalled: list[int] = []  # every signal terminate has seen
_held: list[int] = []  # signals seen inside deferred() or a finalizer, not raised yet
_depth = 0  # deferred() blocks the main thread is inside

_FINALIZER_FILES = tuple(os.sep + name for name in ("weakref.py", "_weakrefset.py"))
_IMPORT_FILES = ("<frozen importlib._bootstrap", "<frozen importlib._bootstrap_external")


class Interrupted(KeyboardInterrupt):
    """A KeyboardInterrupt that says what had been written when it came (`written`), for the CLI's message."""

    def __init__(self, written: str):
        super().__init__(written)
        self.written = written


def install() -> None:
    """Make SIGINT and SIGTERM call `terminate`: what the `convt` command does first, before it imports click or
    NumPy. A library never calls this: the process's signals are its caller's."""
    import signal

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)


def caused_by_signal(error: BaseException) -> bool:
    """Whether `error` came of a signal `terminate` saw: a KeyboardInterrupt in its chain of causes and contexts
    (threading's Condition.wait, interrupted while it re-acquires its lock, raises a RuntimeError over it)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return bool(_signalled)
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def terminate(signum, frame) -> None:
    """A signal handler: schedulers send SIGTERM, and it cleans up exactly as Ctrl-C does."""
    _signalled.append(signum)
    if _depth or _in_finalizer(frame):
        _held.append(signum)
        return
    _held.clear()
    raise KeyboardInterrupt


def _in_finalizer(frame) -> bool:
    """Whether `frame` runs inside a finalizer, where a raised exception would be printed and swallowed."""
    while frame is not None:
        code = frame.f_code
        if (code.co_name == "__del__" or code.co_filename.endswith(_FINALIZER_FILES)
                or code.co_filename.startswith(_IMPORT_FILES)):
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def deferred(reraise: bool = True):
    """Hold SIGINT and SIGTERM while the block runs; raise KeyboardInterrupt when it ends normally if one came
    (and reraise), else leave it held for the next check. Blocks nest; only the outermost raises. Threads other
    than the main one, which signals never interrupt, pass straight through."""
    global _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    if reraise and not _depth and _held:
        _held.clear()
        raise KeyboardInterrupt


def stop_if_signalled() -> None:
    """Raise KeyboardInterrupt if `terminate` has run, even where its own exception was held or swallowed."""
    if _signalled:
        _held.clear()
        raise KeyboardInterrupt
