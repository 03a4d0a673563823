"""Channels-first or channels-last, for the kernels' indexing.

The kernels keep each layout's own GEMM orientation, (c_out, c_in) @ (c_in, rows) channels-first and
(rows, c_in) @ (c_in, c_out) channels-last: transposing the data to one canonical layout would cost a copy of
every block and change how BLAS rounds. What only places the channel axis lives here instead.
"""

from __future__ import annotations

import numpy as np


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
