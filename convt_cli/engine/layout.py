"""Channels-first or channels-last, for the kernels' indexing.

The kernels keep each layout's own GEMM orientation, (c_out, c_in) @ (c_in, rows) channels-first and
(rows, c_in) @ (c_in, c_out) channels-last: transposing the data to one canonical layout would cost a copy of
every block and change how BLAS rounds. What only places the channel axis lives here instead, and the reading
of filters stored in another framework's layout (shapes.FILTER_LAYOUTS) as [*k, out, in], once, at the edge.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConvtError
from ..shapes import FILTER_LAYOUTS, filter_axes, layout_rank_problem, plan_conv_transpose
from ..shapes import filter_layout as checked_layout


def at(first: bool, box, *lead, tail=()) -> tuple:
    """The index of a spatial `box` (slices) with every channel: after `lead` (batch, say) and `tail` (phase
    axes that sit just before the channels), channels before the box when `first`, after it otherwise."""
    if first:
        return (*lead, *tail, slice(None), *box)
    return (*lead, *box, *tail, slice(None))


def shaped(first: bool, spatial, *channels) -> tuple:
    """A shape of `spatial` positions and `channels` axes: (*channels, *spatial) when `first`, else the reverse."""
    return (*channels, *spatial) if first else (*spatial, *channels)


def positions(first: bool, mat: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Columns (channels-first) or rows (channels-last) start..stop of a (channels, positions) or (positions,
    channels) matrix: the positions axis."""
    return mat[:, start:stop] if first else mat[start:stop]


def flat(first: bool, a: np.ndarray, channels: int) -> np.ndarray:
    """A block with its channels as (channels, positions) or (positions, channels)."""
    return a.reshape(channels, -1) if first else a.reshape(-1, channels)


def gemm(first: bool, weights: np.ndarray, data: np.ndarray, out=None) -> np.ndarray:
    """weights @ data channels-first, data @ weights channels-last (weights already in that orientation)."""
    if first:
        return np.matmul(weights, data, out=out)
    return np.matmul(data, weights, out=out)


def as_tf_filters(w: np.ndarray, layout: str) -> np.ndarray:
    """Filters stored in `layout` (shapes.FILTER_LAYOUTS) as (*kernel, out, in): a view, no copy."""
    perm, flipped = filter_axes(layout, w.ndim)
    w = np.transpose(w, perm)
    if flipped:
        w = w[tuple(slice(None, None, -1) if a in flipped else slice(None) for a in range(w.ndim))]
    return w


def tf_filters(op: str, w: np.ndarray, filter_layout) -> tuple[np.ndarray, str]:
    """(filters stored in filter_layout as (*kernel, out, in), a view; the layout's checked name)."""
    layout = checked_layout(op, filter_layout)
    problem = layout_rank_problem(layout, w.shape)
    if problem:
        raise ConvtError(f"{op}: {problem}")
    return as_tf_filters(w, layout), layout


def plan_with_layout(x_shape, w_shape, output_shape, strides, padding, data_format, dilations, layout: str,
                     **beyond_tf):
    """plan_conv_transpose of filters already read as (*kernel, out, in) from `layout` (a checked name); a mistake
    in them is told in the layout they were given in, too (mistakes about the filters: the messages that name
    them). `beyond_tf`: output_padding, groups."""
    try:
        return plan_conv_transpose(x_shape, w_shape, output_shape, strides, padding, data_format, dilations,
                                   **beyond_tf)
    except ConvtError as e:
        if layout == "tf" or "filters" not in str(e):
            raise
        perm, _ = filter_axes(layout, len(w_shape))
        given = tuple(w_shape[perm.index(a)] for a in range(len(w_shape)))
        raise ConvtError(f"{e} (filters given in layout {layout} {FILTER_LAYOUTS[layout][0]} with shape {given}, "
                         f"read as [*k, out, in] {tuple(w_shape)})") from None
