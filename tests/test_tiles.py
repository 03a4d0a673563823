"""Spatial tiles: the per-axis tiling math of shapes.py, and tiles assembled into the whole output.

Matrix: tile_starts covers every output position exactly once; tile_window holds every input term that lands in
its tile, with a low pad >= 0 that puts each term where it lands in the whole output less the tile's start
(brute force over sizes, kernels, strides, dilations, low pads and tile bounds, no arrays); the tiles of a plan,
each run as the ordinary conv_transpose tile_plan makes, put together against the loop reference (rank 1-3,
SAME / VALID / explicit / SAME_LOWER / output_padding, groups, both data formats, float64 and int32: exact).
"""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convt_cli import engine
from convt_cli.shapes import plan_conv_transpose, tile_plan, tile_starts, tile_window
from loop_reference import conv_transpose_loop


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 40), st.integers(1, 12))
def test_tiles_cover_every_output_position_once(o, size):
    seen = [0] * o
    for o0, o1 in tile_starts(o, size):
        assert 0 <= o0 < o1 <= o and o1 - o0 <= size
        for j in range(o0, o1):
            seen[j] += 1
    assert seen == [1] * o


@settings(max_examples=2000, deadline=None)
@given(i=st.integers(0, 12), k=st.integers(1, 5), s=st.integers(1, 5), d=st.integers(1, 4), lo=st.integers(0, 12),
       data=st.data())
def test_a_window_holds_every_term_that_lands_in_its_tile_where_it_lands(i, k, s, d, lo, data):
    o = data.draw(st.integers(1, 40))
    o0 = data.draw(st.integers(0, o - 1))
    o1 = data.draw(st.integers(o0 + 1, o))
    i0, i1, lo_t = tile_window(o0, o1, i, k, s, d, lo)
    assert lo_t >= 0 and 0 <= i0 <= i1 and i1 <= max(i, i0)
    for j, t in itertools.product(range(i), range(k)):
        where = j * s + t * d - lo  # in the whole output
        if o0 <= where < o1:
            assert i0 <= j < i1
            assert (j - i0) * s + t * d - lo_t == where - o0  # the same place in the tile


CASES = [  # (rank, first, strides, dilations, padding, output_padding, groups, tile)
    (1, False, 2, 1, "SAME", None, 1, (5,)),
    (1, True, 3, 2, "VALID", None, 1, (4,)),
    (1, False, 1, 3, [(4, 0)], None, 1, (3,)),
    (2, False, 2, 1, "SAME", None, 1, (3, 4)),
    (2, True, [2, 3], [1, 2], "SAME_LOWER", None, 1, (4, 7)),
    (2, False, 2, 3, 1, 2, 1, (2, 5)),  # output_padding past the stride: a zero tail
    (2, False, 2, 1, "VALID", None, 2, (5, 3)),
    (3, False, 2, 1, "SAME", None, 1, (3, 4, 5)),
    (3, True, [1, 2, 3], 1, [(1, 0), (0, 2), (2, 1)], None, 1, (2, 3, 4)),
]


def _tiled(plan, x, w, tile, strategy=None):
    """Each tile of batch element b run alone on its window, written into its box of the whole output."""
    first = plan.spec.channels_first
    out = np.zeros(plan.output_shape, dtype=x.dtype)
    boxes = itertools.product(*(tile_starts(o, t) for o, t in zip(plan.output_spatial, tile)))
    for box in boxes:
        sub, window = tile_plan(plan, box)
        for b in range(plan.batch):
            src = (b, slice(None), *(slice(*w_) for w_ in window)) if first else \
                (b, *(slice(*w_) for w_ in window), slice(None))
            dst = (b, slice(None), *(slice(*o_) for o_ in box)) if first else \
                (b, *(slice(*o_) for o_ in box), slice(None))
            out[dst] = engine.run_conv_transpose(sub, x[src][None], w, strategy=strategy)[0]
    return out


@pytest.mark.parametrize("rank, first, strides, dilations, padding, output_padding, groups, tile", CASES)
@pytest.mark.parametrize("dtype", ["float64", "int32"])
def test_tiles_put_together_are_the_whole_output(rank, first, strides, dilations, padding, output_padding, groups,
                                                  tile, dtype):
    rng = np.random.default_rng([rank, groups, len(tile)])
    spatial = (7, 6, 5)[:rank]
    c_in = 2 * groups
    shape = (2, c_in, *spatial) if first else (2, *spatial, c_in)
    x = rng.integers(-5, 6, shape).astype(dtype)
    w = rng.integers(-5, 6, (*(3, 2, 3)[:rank], 2, c_in)).astype(dtype)
    plan = plan_conv_transpose(x.shape, w.shape, None, strides, padding, "channels_first" if first else None,
                               dilations, output_padding=output_padding, groups=groups)
    got = _tiled(plan, x, w, tile)
    whole = engine.run_conv_transpose(plan, x, w)
    np.testing.assert_array_equal(got, whole)  # small integers: every order of summing gives the same numbers
    if groups == 1:
        lows = [(lo, 0) for lo, _ in plan.pads]
        want = conv_transpose_loop(x, w, plan.output_spatial, strides, lows, first, dilations)
        np.testing.assert_array_equal(got, want.astype(dtype))


@pytest.mark.parametrize("strategy", engine.STRATEGIES)
def test_every_strategy_runs_a_tile_plan(strategy):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 9, 8, 4))
    w = rng.standard_normal((4, 3, 5, 4))
    plan = plan_conv_transpose(x.shape, w.shape, None, 2, "SAME")
    got = _tiled(plan, x, w, (5, 6), strategy)
    want = conv_transpose_loop(x, w, plan.output_spatial, 2, [(lo, 0) for lo, _ in plan.pads])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
