"""conv_transpose and conv on NumPy arrays: no I/O, no click.

conv_transpose splits the output into stride phases (output positions with the same residue modulo the stride
on every axis); each phase is a plain correlation of the input with that phase's taps. The default strategies
("offsets", "folded", "dense", "winograd", in strategies/) pad a block of rows of one image once, read input
shifts as contiguous slices of it (grid.py), and run BLAS GEMMs over the channels; choose.py picks one by shape.
"phases" and "taps" are the earlier, simpler strategies, kept and tested. execute.py prepares the filters once
for the strategy that runs them and runs them on any number of batches; runtime.py owns the threads.
conv (forward.py) gathers from a zero-padded copy, tap by tap. The two are written independently on purpose:
`verify` holds one against the other, so a mistake in one must not be repeated in the other.

Imports point one way: execute -> choose, strategies -> grid, guards, dtypes, layout, runtime; forward ->
dtypes, layout, runtime only.
"""

from __future__ import annotations

import importlib

# name -> the module that holds it, imported on first use: importing one module of the engine (verify takes
# as_arrays from dtypes) does not load the others
_HOMES = {
    "COMPUTE_DTYPES": "dtypes", "DTYPES": "dtypes", "as_arrays": "dtypes", "check_dtypes": "dtypes",
    "choose_strategy": "choose", "STRATEGIES": "strategies",
    "Prepared": "execute", "conv_transpose": "execute", "estimate_bytes": "execute", "prepare": "execute",
    "prepared_bytes": "execute",
    "run_conv_transpose": "execute",
    "conv": "forward", "run_conv": "forward",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value  # once: later reads find it here
    return value


def __dir__():
    return sorted(set(globals()) | set(_HOMES))
