"""Which numbers "dense" and "winograd" sum exactly as a direct sum would: the "tame" checks and their limits."""

from __future__ import annotations

import numpy as np


def tame_limit(compute: np.dtype, strategy: str):
    """The largest magnitude "dense" or "winograd" takes: both are direct sums only for tame numbers. "dense"
    multiplies its zero weights by every input (inf * 0 is NaN): finite numbers only. "winograd" adds and
    subtracts inputs, and taps, before multiplying (inf - inf; overflow near the largest float): below
    2**(e/2 - 16), e the largest exponent, so that nothing overflows that the direct sum would not. Integers:
    no limit for "dense"; "winograd" is not used for them (None)."""
    if compute.kind == "i":
        return np.inf if strategy == "dense" else None
    if strategy == "dense":
        return float(np.finfo(compute).max)
    return 2.0 ** ((np.finfo(compute).maxexp - 1) // 2 - 16)


def tame(a: np.ndarray, limit) -> bool:
    """Every |element| at most limit (False for any NaN, and for limit None)."""
    if limit is None:
        return False
    if a.size == 0 or a.dtype.kind == "i":
        return True
    if a.dtype.kind == "c":
        return bool(np.abs(a).max() <= limit)
    return bool(a.max() <= limit and a.min() >= -limit)  # a NaN fails both


def finite_taps(w: np.ndarray) -> bool:
    """No inf or NaN tap (integers always): every strategy but "taps" multiplies the padding's zeros by the taps,
    which makes NaN where TF's direct sum, over the input only, makes inf or nothing."""
    return w.dtype.kind not in "fc" or bool(np.isfinite(w).all())
