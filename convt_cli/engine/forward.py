"""conv: the forward convolution (verify's adjoint), a gather from a zero-padded copy, tap by tap.

Written independently of conv_transpose on purpose, and importing nothing of its strategies: `verify` holds one
against the other, so a mistake in one must not be repeated in the other.
"""

from __future__ import annotations

import math

import numpy as np

from ..shapes import Plan, plan_conv
from . import runtime
from .dtypes import as_arrays, check_dtypes, check_int32_bound, chunk_of, compute_dtype, largest_magnitude, store
from .layout import at, shaped


def conv(input, filters, strides=1, padding="SAME", data_format=None, dilations=None, name=None, *,
         threads=None) -> np.ndarray:
    """Forward convolution, the same numbers as tf.nn.convolution; the adjoint of conv_transpose.

    Args:
        input: (batch, *spatial, in_channels), or (batch, in_channels, *spatial) channels-first.
        filters: (*kernel, in_channels, out_channels) whatever the data_format (TF's forward layout; the same
            array that conv_transpose takes as (*kernel, out_channels, in_channels) for the reverse direction).
        strides, dilations, padding, data_format: as for conv_transpose. Unlike tf.nn.convolution, strides
            > 1 together with dilations > 1 are allowed.
        name: ignored: TF's graph name for the op, taken so that a call written for TF runs unchanged.
        threads: how many threads (None: CONVT_NUM_THREADS, else every usable core); never changes a bit.

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
    return run_conv(plan, x, w, threads=threads)


def run_conv(plan: Plan, x: np.ndarray, w: np.ndarray, threads=None) -> np.ndarray:
    """Execute a conv plan on arrays whose shapes match it (any batch size). One GEMM per image and tap, so
    that the result is bitwise the same however the batch is split and whatever the number of threads.

    >>> run_conv(plan_conv((2, 6, 3), (3, 3, 4)), np.ones((2, 6, 3)), np.ones((3, 3, 4))).shape
    (2, 6, 4)
    """
    check_dtypes(plan.op, x.dtype, w.dtype)
    threads = runtime.resolve_threads(threads)
    batch = x.shape[0]
    first = plan.spec.channels_first
    c_in, c_out, spatial = plan.in_channels, plan.out_channels, plan.output_spatial
    if x.dtype.name == "int32":
        check_int32_bound(plan.op, x.dtype, largest_magnitude(x), largest_magnitude(w), c_in * math.prod(plan.kernel))
    result = np.zeros((batch, *plan.output_shape[1:]), dtype=x.dtype.newbyteorder("="))  # big-endian in, native out
    if result.size == 0 or x.size == 0:
        return result
    compute = compute_dtype(x.dtype)
    wc = np.ascontiguousarray(w, dtype=compute)
    positions = math.prod(spatial)
    pad_width = [(0, 0), *shaped(first, plan.pads, (0, 0))]  # zero padding of the forward conv
    padded_image = math.prod(n + lo + hi for n, (lo, hi) in zip(plan.input_spatial, plan.pads)) * c_in
    per_image = (padded_image + positions * (c_in + 2 * c_out)) * compute.itemsize

    def work(b0, b1):
        nb = b1 - b0
        padded = np.pad(chunk_of(x, b0, b1, compute), pad_width)  # (nb, *padded, c_in) or channels-first
        acc = np.zeros((nb, *shaped(first, (positions,), c_out)), dtype=compute)
        buf = np.empty_like(acc)  # (nb, c_out, P) or (nb, P, c_out)
        for tap in np.ndindex(*plan.kernel):
            box = tuple(slice(t * d, t * d + (size - 1) * s + 1, s)
                        for t, d, s, size in zip(tap, plan.spec.dilations, plan.spec.strides, spatial))
            patch = np.ascontiguousarray(padded[at(first, box, slice(None))])  # (nb, c_in, *out) or (nb, *out, c_in)
            # a GEMM per image (a stacked matmul), never one across images: BLAS rounds a row by its place
            if first:
                np.matmul(wc[tap].T, patch.reshape(nb, c_in, positions), out=buf)  # (nb, c_out, P)
            else:
                np.matmul(patch.reshape(nb, positions, c_in), wc[tap], out=buf)  # (nb, P, c_out)
            acc += buf
        store(plan.op, result[b0:b1], acc.reshape(nb, *plan.output_shape[1:]))

    runtime.over_batch(batch, per_image, work, threads)
    return result
