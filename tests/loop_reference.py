"""A slow, obvious reference for the tests: loops over every input position and kernel tap.

It shares no code with convt_cli: the padding rule is written out again here from TF's definition
(conv_grad_shape_utils.cc / kernel_shape_util.cc), and the layouts are handled by moving axes.
"""

import itertools

import numpy as np


def _as_list(value, n):
    if isinstance(value, int):
        return [value] * n
    value = list(value)
    return value * n if len(value) == 1 else value


def pads_lo(in_sizes, out_sizes, kernel, strides, dilations, padding):
    """Low pad per axis of the forward conv from an input of size O to an output of size I."""
    if isinstance(padding, str) and padding.upper() == "VALID":
        return [0] * len(kernel)
    if isinstance(padding, str):  # SAME
        lows = []
        for i, o, k, s, d in zip(in_sizes, out_sizes, kernel, strides, dilations):
            total = max(0, (i - 1) * s + (k - 1) * d + 1 - o)
            lows.append(total // 2)
        return lows
    return [lo for lo, _ in padding]


def conv_transpose_loop(x, w, out_spatial, strides=1, padding="SAME", channels_first=False, dilations=1):
    """x (n, *I, c_in) or channels-first; w (*K, c_out, c_in) -> (n, *O, c_out) in x's layout, float64/complex."""
    if channels_first:
        x = np.moveaxis(x, 1, -1)
    n_sp = x.ndim - 2
    strides, dilations = _as_list(strides, n_sp), _as_list(dilations, n_sp)
    in_sizes, kernel = x.shape[1:-1], w.shape[:n_sp]
    lows = pads_lo(in_sizes, out_spatial, kernel, strides, dilations, padding)
    acc = np.complex128 if np.iscomplexobj(x) else np.float64
    out = np.zeros((x.shape[0], *out_spatial, w.shape[-2]), dtype=acc)
    for i in itertools.product(*map(range, in_sizes)):
        for k in itertools.product(*map(range, kernel)):
            o = [ij * s + kj * d - lo for ij, kj, s, d, lo in zip(i, k, strides, dilations, lows)]
            if all(0 <= oj < size for oj, size in zip(o, out_spatial)):
                # (n, c_in) @ (c_in, c_out)
                out[(slice(None), *o)] += x[(slice(None), *i)].astype(acc) @ w[k].astype(acc).T
    return np.moveaxis(out, -1, 1) if channels_first else out


def conv_loop(x, w, strides=1, padding="SAME", channels_first=False, dilations=1):
    """x (n, *O, c_in) or channels-first; w (*K, c_in, c_out) -> forward convolution, float64/complex."""
    if channels_first:
        x = np.moveaxis(x, 1, -1)
    n_sp = x.ndim - 2
    strides, dilations = _as_list(strides, n_sp), _as_list(dilations, n_sp)
    in_sizes, kernel = x.shape[1:-1], w.shape[:n_sp]
    out_sizes = []
    for o, k, s, d in zip(in_sizes, kernel, strides, dilations):
        eff = (k - 1) * d + 1
        if isinstance(padding, str) and padding.upper() == "SAME":
            out_sizes.append(-(-o // s))
        else:
            p = 0 if isinstance(padding, str) else sum(padding[len(out_sizes)])
            out_sizes.append(max(0, (o + p - eff) // s + 1))
    lows = pads_lo(out_sizes, in_sizes, kernel, strides, dilations, padding)
    acc = np.complex128 if np.iscomplexobj(x) else np.float64
    out = np.zeros((x.shape[0], *out_sizes, w.shape[-1]), dtype=acc)
    for i in itertools.product(*map(range, out_sizes)):
        for k in itertools.product(*map(range, kernel)):
            src = [ij * s + kj * d - lo for ij, kj, s, d, lo in zip(i, k, strides, dilations, lows)]
            if all(0 <= sj < size for sj, size in zip(src, in_sizes)):
                out[(slice(None), *i)] += x[(slice(None), *src)].astype(acc) @ w[k].astype(acc)
    return np.moveaxis(out, -1, 1) if channels_first else out
