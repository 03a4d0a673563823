"""The dtypes the engine takes, what each accumulates in, and the one place results are cast back."""

from __future__ import annotations

import numpy as np

from ..dtype_names import DTYPES  # the supported names, in the order messages and help list them: one list
from ..errors import ConvtError

# dtype name -> the dtype the engine accumulates in; the result is cast back once at the end
COMPUTE_DTYPES = {
    "float16": np.float32,
    "bfloat16": np.float32,
    "float32": np.float32,
    "float64": np.float64,
    "int32": np.int64,
    "complex64": np.complex64,
    "complex128": np.complex128,
}
assert tuple(COMPUTE_DTYPES) == DTYPES, "every supported dtype needs its compute dtype"
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def check_dtypes(op: str, x_dtype: np.dtype, w_dtype: np.dtype) -> None:
    """Both dtypes supported and equal, else ConvtError."""
    for label, dtype in (("input", x_dtype), ("filters", w_dtype)):
        if dtype.name not in COMPUTE_DTYPES:
            raise ConvtError(
                f"{op}: {label} dtype {dtype.name} is not supported: expected one of {', '.join(DTYPES)}"
            )
    if x_dtype.name != w_dtype.name:
        raise ConvtError(
            f"{op}: input and filters must share a dtype, got input {x_dtype.name} and filters {w_dtype.name}"
        )


def as_arrays(op: str, input, filters):
    """Both as arrays (no copy when they already are), with supported and equal dtypes."""
    x = input if isinstance(input, np.ndarray) else np.asarray(input)
    w = filters if isinstance(filters, np.ndarray) else np.asarray(filters)
    check_dtypes(op, x.dtype, w.dtype)
    return x, w


def compute_dtype(dtype) -> np.dtype:
    """The dtype `dtype` accumulates in."""
    return np.dtype(COMPUTE_DTYPES[np.dtype(dtype).name])


def chunk_of(x: np.ndarray, b0: int, b1: int, compute: np.dtype) -> np.ndarray:
    return np.ascontiguousarray(x[b0:b1], dtype=compute)  # a view when x is already so


def largest_magnitude(a: np.ndarray) -> int:
    """max|a| of an int32 array, exactly (0 when empty); what the int32 bound needs of each side."""
    return int(np.abs(a.astype(np.int64)).max()) if a.size else 0


def check_int32_bound(op: str, dtype: np.dtype, x_max: int, w_max: int, terms: int) -> None:
    # int32 accumulates in int64, exactly as long as no partial sum can leave int64
    if dtype.name != "int32":
        return
    bound = x_max * w_max * terms
    if bound > 2**63 - 1:
        raise ConvtError(
            f"{op}: int32 input too large to accumulate exactly: max|input| * max|filters| * {terms} terms "
            f"= {bound} exceeds int64; cast to float64 instead"
        )


def store(op: str, dst: np.ndarray, src: np.ndarray) -> None:
    # the one place results are cast to the output dtype; int32 must not wrap on the way
    if dst.dtype.name == "int32" and src.size:
        lo, hi = int(src.min()), int(src.max())
        if lo < _INT32_MIN or hi > _INT32_MAX:
            bad = hi if hi > _INT32_MAX else lo
            raise ConvtError(
                f"{op}: int32 result overflows: an output element is {bad}, outside "
                f"[{_INT32_MIN}, {_INT32_MAX}]; cast the inputs to float64 instead"
            )
    dst[...] = src


def finish(op: str, out: np.ndarray, dtype: np.dtype) -> np.ndarray:
    result = np.empty(out.shape, dtype=dtype.newbyteorder("="))  # big-endian in, native out
    store(op, result, out)
    return result
