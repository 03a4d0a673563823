"""conv_transpose and conv on NumPy arrays: no I/O, no click.

Both work tap by tap: one BLAS matrix product per kernel tap contracts the channels of the whole batch and
all spatial positions at once, and strided slices place (conv_transpose: scatter-add) or fetch (conv: gather
from a zero-padded copy) the positions. The two are written independently on purpose: `verify` holds one
against the other, so a mistake in one must not be repeated in the other.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import ConvtError
from .shapes import Plan, plan_conv, plan_conv_transpose, tap_span

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
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def check_dtypes(op: str, x_dtype: np.dtype, w_dtype: np.dtype) -> None:
    """Both dtypes supported and equal, else ConvtError."""
    for label, dtype in (("input", x_dtype), ("filters", w_dtype)):
        if dtype.name not in COMPUTE_DTYPES:
            raise ConvtError(
                f"{op}: {label} dtype {dtype.name} is not supported: expected one of {', '.join(COMPUTE_DTYPES)}"
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


def _compute_copy(a: np.ndarray) -> np.ndarray:
    # native byte order, C order, accumulation dtype; a view when nothing needs to change, never a write
    return np.ascontiguousarray(a, dtype=COMPUTE_DTYPES[a.dtype.name])


def _check_int32_bound(op: str, x, w, terms: int) -> None:
    # int32 accumulates in int64, exactly as long as no partial sum can leave int64
    if x.dtype.name != "int32" or x.size == 0 or w.size == 0:
        return
    bound = int(np.abs(x.astype(np.int64)).max()) * int(np.abs(w.astype(np.int64)).max()) * terms
    if bound > 2**63 - 1:
        raise ConvtError(
            f"{op}: int32 input too large to accumulate exactly: max|input| * max|filters| * {terms} terms "
            f"= {bound} exceeds int64; cast to float64 instead"
        )


def _finish(op: str, out: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype.name == "int32" and out.size:
        lo, hi = int(out.min()), int(out.max())
        if lo < _INT32_MIN or hi > _INT32_MAX:
            bad = hi if hi > _INT32_MAX else lo
            where = tuple(int(v) for v in np.unravel_index(np.argmax(out == bad), out.shape))
            raise ConvtError(
                f"{op}: int32 result overflows: output{list(where)} = {bad} is outside "
                f"[{_INT32_MIN}, {_INT32_MAX}]; cast the inputs to float64 instead"
            )
    return out.astype(dtype.newbyteorder("="), copy=False)  # big-endian in, native out


def estimate_bytes(plan: Plan, dtype) -> int:
    """Peak bytes run_conv_transpose allocates for this plan beyond its input and filters (an upper bound)."""
    dtype = np.dtype(dtype)
    compute = np.dtype(COMPUTE_DTYPES[dtype.name]).itemsize
    out = math.prod(plan.output_shape)
    inp = math.prod(plan.input_shape)
    taps_w = math.prod(plan.filters_shape)
    total = out * compute + inp * compute + taps_w * compute  # accumulator and native compute copies
    total += plan.batch * math.prod(plan.input_spatial) * plan.out_channels * compute  # per-tap product buffer
    if compute != dtype.itemsize:
        total += out * dtype.itemsize  # the result cast back
    return total


def conv_transpose(
    input, filters, output_shape=None, strides=1, padding="SAME", data_format=None, dilations=None
) -> np.ndarray:
    """Transposed convolution, the same numbers as TensorFlow's tf.nn.conv_transpose.

    Args:
        input: (batch, *spatial, in_channels), or (batch, in_channels, *spatial) when data_format is
            channels-first ("NCW", "NCHW", "NCDHW", "channels_first"). Any N >= 1 spatial dims.
        filters: (*kernel, out_channels, in_channels) whatever the data_format; filters[..., -1] pairs with
            the input's channels. Not flipped.
        output_shape: None (I*s for SAME, (I-1)*s + (K-1)*d + 1 for VALID), the N spatial sizes, or the
            full N+2 shape in data_format order, as TF takes it.
        strides, dilations: an int, or a list of length 1, N or N+2 (data_format order, batch and channel
            entries 1).
        padding: "SAME", "VALID" (any case), or N (lo, hi) pairs (or N+2 with zero batch/channel pairs).
        data_format: None (channels-last), TF's strings for N <= 3, "channels_last" or "channels_first".

    Returns:
        An array of output_shape in data_format order, with the input's dtype.

    Raises:
        ConvtError: any invalid argument, with the parameter, what was expected and what was got.

    >>> conv_transpose(np.ones((2, 5, 5, 3), np.float32), np.ones((3, 3, 4, 3), np.float32), strides=2).shape
    (2, 10, 10, 4)
    """
    x, w = as_arrays("conv_transpose", input, filters)
    plan = plan_conv_transpose(x.shape, w.shape, output_shape, strides, padding, data_format, dilations)
    return run_conv_transpose(plan, x, w)


def run_conv_transpose(plan: Plan, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Execute a plan on arrays whose shapes match it (any batch size: batch elements are independent)."""
    batch = x.shape[0]
    out_shape = (batch, *plan.output_shape[1:])
    _check_int32_bound(plan.op, x, w, plan.in_channels * math.prod(plan.kernel))
    xc, wc = _compute_copy(x), _compute_copy(w)
    out = np.zeros(out_shape, dtype=xc.dtype)
    if out.size == 0 or xc.size == 0 or wc.size == 0:
        return _finish(plan.op, out, x.dtype)

    n, first = plan.spec.n, plan.spec.channels_first
    c_in, c_out, spatial = plan.in_channels, plan.out_channels, plan.input_spatial
    positions = math.prod(spatial)
    if first:
        x_mat = xc.reshape(batch, c_in, positions)  # (n, c_in, P)
        buf = np.empty((batch, c_out, positions), dtype=xc.dtype)
        y = buf.reshape(batch, c_out, *spatial)
    else:
        x_mat = xc.reshape(batch * positions, c_in)  # (n*P, c_in)
        buf = np.empty((batch * positions, c_out), dtype=xc.dtype)
        y = buf.reshape(batch, *spatial, c_out)

    for tap in np.ndindex(*plan.kernel):
        spans = [
            tap_span(spatial[j], plan.output_spatial[j], tap[j], plan.spec.strides[j], plan.spec.dilations[j],
                     plan.pads[j][0])
            for j in range(n)
        ]
        if any(span is None for span in spans):
            continue  # the tap lands wholly in the padding
        w_tap = wc[tap]  # (c_out, c_in)
        if first:
            np.matmul(w_tap, x_mat, out=buf)  # (n, c_out, P)
        else:
            np.matmul(x_mat, w_tap.T, out=buf)  # (n*P, c_out)
        src = tuple(slice(i0, i1) for i0, i1, _ in spans)
        dst = tuple(slice(o0, o0 + (i1 - i0 - 1) * s + 1, s) for (i0, i1, o0), s in zip(spans, plan.spec.strides))
        if first:
            src, dst = (slice(None), slice(None), *src), (slice(None), slice(None), *dst)
        else:
            src, dst = (slice(None), *src, slice(None)), (slice(None), *dst, slice(None))
        out[dst] += y[src]
    return _finish(plan.op, out, x.dtype)


def conv(input, filters, strides=1, padding="SAME", data_format=None, dilations=None) -> np.ndarray:
    """Forward convolution, the same numbers as tf.nn.convolution; the adjoint of conv_transpose.

    Args:
        input: (batch, *spatial, in_channels), or (batch, in_channels, *spatial) channels-first.
        filters: (*kernel, in_channels, out_channels) whatever the data_format (TF's forward layout; the same
            array that conv_transpose takes as (*kernel, out_channels, in_channels) for the reverse direction).
        strides, dilations, padding, data_format: as for conv_transpose. Unlike tf.nn.convolution, strides
            > 1 together with dilations > 1 are allowed.

    Returns:
        (batch, *out_spatial, out_channels) in data_format order, with the input's dtype, where out_spatial is
        ceil(O/s) for SAME and (O + lo + hi - (K-1)*d - 1)//s + 1 otherwise.

    Raises:
        ConvtError: any invalid argument.

    >>> conv(np.ones((2, 10, 10, 4), np.float32), np.ones((3, 3, 4, 3), np.float32), strides=2).shape
    (2, 5, 5, 3)
    """
    x, w = as_arrays("conv", input, filters)
    plan = plan_conv(x.shape, w.shape, strides, padding, data_format, dilations)
    return run_conv(plan, x, w)


def run_conv(plan: Plan, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Execute a conv plan on arrays whose shapes match it (any batch size)."""
    batch = x.shape[0]
    out_shape = (batch, *plan.output_shape[1:])
    _check_int32_bound(plan.op, x, w, plan.in_channels * math.prod(plan.kernel))
    wc = _compute_copy(w)
    out = np.zeros(out_shape, dtype=wc.dtype)
    if out.size == 0 or x.size == 0:
        return _finish(plan.op, out, x.dtype)

    first = plan.spec.channels_first
    c_in, c_out, spatial = plan.in_channels, plan.out_channels, plan.output_spatial
    positions = math.prod(spatial)
    pad_width = [(0, 0), *plan.pads, (0, 0)] if not first else [(0, 0), (0, 0), *plan.pads]
    padded = np.pad(_compute_copy(x), pad_width)  # zero padding of the forward conv
    if first:
        out_mat = out.reshape(batch, c_out, positions)
        buf = np.empty((batch, c_out, positions), dtype=wc.dtype)
    else:
        out_mat = out.reshape(batch * positions, c_out)
        buf = np.empty((batch * positions, c_out), dtype=wc.dtype)

    for tap in np.ndindex(*plan.kernel):
        window = tuple(
            slice(t * d, t * d + (size - 1) * s + 1, s)
            for t, d, s, size in zip(tap, plan.spec.dilations, plan.spec.strides, spatial)
        )
        if first:
            patch = np.ascontiguousarray(padded[(slice(None), slice(None), *window)])  # (n, c_in, *out)
            np.matmul(wc[tap].T, patch.reshape(batch, c_in, positions), out=buf)  # (n, c_out, P)
        else:
            patch = np.ascontiguousarray(padded[(slice(None), *window, slice(None))])  # (n, *out, c_in)
            np.matmul(patch.reshape(batch * positions, c_in), wc[tap], out=buf)  # (n*P, c_out)
        out_mat += buf
    return _finish(plan.op, out, x.dtype)
