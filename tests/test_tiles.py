"""Spatial tiles: the per-axis tiling math of shapes.py, and tiles assembled into the whole output.

Matrix: tile_starts covers every output position exactly once; tile_window holds every input term that lands in
its tile, with a low pad >= 0 that puts each term where it lands in the whole output less the tile's start
(brute force over sizes, kernels, strides, dilations, low pads and tile bounds, no arrays); the tiles of a plan,
each run as the ordinary conv_transpose tile_plan makes, put together against the loop reference (rank 1-3,
SAME / VALID / explicit / SAME_LOWER / output_padding, groups, both data formats, float64 and int32: exact).
"""

import itertools
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import error_line, invoke
from convt_cli import engine, formats, io
from convt_cli.shapes import plan_conv_transpose, tile_plan, tile_starts, tile_window
from convt_cli.stream import plan_files, run_files
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
    assert i1 - i0 <= min(i, -(-(o1 - o0 + (k - 1) * d) // s) + 1)  # the bound the memory budget counts on
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


# ---------------------------------------------------------------------------------------------------------
# Boxes read alone and written in any order, by every format that can


@pytest.mark.parametrize("name", [n for n in formats.FORMATS])
@pytest.mark.parametrize("dtype", ["float32", "int32", "bfloat16"])
def test_boxes_are_read_alone_and_written_in_any_order(tmp_path, monkeypatch, name, dtype):
    import ml_dtypes

    monkeypatch.chdir(tmp_path)
    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    a = (np.arange(3 * 5 * 4 * 2).reshape(3, 5, 4, 2) - 7).astype(dt)
    fmt = formats.FORMATS[name]
    text = f"a{fmt.suffixes[0]}" + (":arr" if fmt.named else "")
    sink = io.Sink(io.parse_ref("OUTPUT", text, must_exist=False), a.shape, a.dtype)
    if not sink.boxes:
        assert name == "npz"  # a zip member is written start to end
        sink.abort()
        return
    boxes = [(b, (slice(r0, r1), slice(c0, c1), slice(None)))
             for b in range(3) for r0, r1 in ((3, 5), (0, 3)) for c0, c1 in ((2, 4), (0, 2))]
    for b, index in reversed(boxes):
        sink.write_box(a[(slice(b, b + 1), *index)], b, index)
    sink.commit()
    ref = io.parse_ref("INPUT", text)
    assert io.load(ref).tobytes() == a.tobytes()
    source = io.Source(ref)
    for b, index in boxes:
        got = source.read_box(b, b + 1, index)
        assert got.dtype == a.dtype and got.tobytes() == np.ascontiguousarray(a[(slice(b, b + 1), *index)]).tobytes()
    source.close()



# ---------------------------------------------------------------------------------------------------------
# run_files when one batch element does not fit the budget


@pytest.fixture
def volume(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(11)
    np.save("vol.npy", rng.standard_normal((2, 20, 18, 15, 4)).astype(np.float32))
    np.save("vw.npy", rng.standard_normal((3, 3, 3, 4, 4)).astype(np.float32))
    np.save("ivol.npy", rng.integers(-9, 10, (1, 9, 8, 7, 3)).astype(np.int32))
    np.save("iw.npy", rng.integers(-9, 10, (3, 2, 3, 2, 3)).astype(np.int32))


@pytest.mark.parametrize("output", ["t.npy", "t.h5:/y", "t.safetensors", "-"])
def test_one_element_too_large_for_the_budget_runs_in_tiles(volume, output):
    whole = run_files("vol.npy", "vw.npy", "whole.npy", strides=2)
    assert whole["tile_shape"] is None
    planned = plan_files("vol.npy", "vw.npy", strides=2, max_memory="1M")
    if output == "-":
        r = invoke("run", "vol.npy", "vw.npy", "--strides", "2", "--max-memory", "1M", "-o", "-", "--force")
        assert r.exit_code == 0, r.stderr
        import io as pyio

        got = np.load(pyio.BytesIO(r.stdout_bytes))
    else:
        info = run_files("vol.npy", "vw.npy", output, strides=2, max_memory="1M")
        assert info["tile_shape"] == planned["tile_shape"] and info["pieces"] == planned["pieces"] > 2
        got = io.load(io.parse_ref("INPUT", output))
    assert planned["memory_bytes"] <= 1 << 20 and planned["tile_shape"][0] < 40
    want = np.load("whole.npy")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert [p for p in os.listdir(".") if p.startswith(".convt")] == []


def test_tiles_are_exact_for_int32_and_the_same_bits_on_any_thread_count(volume):
    run_files("ivol.npy", "iw.npy", "iwhole.npy", strides=[2, 1, 3], padding="VALID")
    for threads in (1, 2):
        info = run_files("ivol.npy", "iw.npy", f"it{threads}.npy", strides=[2, 1, 3], padding="VALID",
                         max_memory="40K", threads=threads)
        assert info["tile_shape"] is not None
        np.testing.assert_array_equal(np.load(f"it{threads}.npy"), np.load("iwhole.npy"))
    info = run_files("vol.npy", "vw.npy", "f1.npy", strides=2, max_memory="1M", threads=1)
    run_files("vol.npy", "vw.npy", "f2.npy", strides=2, max_memory="1M", threads=2)
    assert info["tile_shape"] is not None and np.load("f1.npy").tobytes() == np.load("f2.npy").tobytes()


def test_an_output_that_cannot_take_tiles_is_refused_before_any_work(volume):
    r = invoke("run", "vol.npy", "vw.npy", "--strides", "2", "--max-memory", "1M", "-o", "t.npz")
    assert error_line(r) == ("Error: OUTPUT 't.npz': one batch element does not fit the memory budget, so it is "
                             "computed in spatial tiles, which a .npz output cannot take in place: write .npy, .h5, "
                             ".safetensors or stdout, or raise --max-memory")
    assert not [p for p in os.listdir(".") if p.startswith(("t.npz", ".convt"))]


def test_an_interrupted_tiled_run_leaves_nothing(volume):
    def stop(done, total):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_files("vol.npy", "vw.npy", "t.npy", strides=2, max_memory="1M", progress=stop)
    assert not [p for p in os.listdir(".") if p.startswith(("t.npy", ".convt"))]


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("filters", ["vw.npy", "inf.npy"])  # an inf tap sends the run to "taps": larger tiles' work
def test_a_tiled_run_allocates_within_its_budget(volume, filters):
    import tracemalloc

    w = np.load("vw.npy")
    w[1, 1, 1, 0, 0] = np.inf
    np.save("inf.npy", w)
    run_files("vol.npy", filters, "warm.npy", strides=2, max_memory="2M")  # the worker threads' first GEMMs
    tracemalloc.start()
    try:
        info = run_files("vol.npy", filters, "t.npy", strides=2, max_memory="2M", force=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info["tile_shape"] is not None and peak <= 2 << 20
    assert info["tile_shape"] == plan_files("vol.npy", filters, strides=2, max_memory="2M")["tile_shape"]


# ---------------------------------------------------------------------------------------------------------
# verify in tiles: the report a whole check makes


def _report_numbers(report):
    d = report.to_dict()
    return {k: d[k] for k in ("passed", "probes", "failing_tiles", "tolerance", "tile_count")}


@pytest.mark.parametrize("first", [False, True])
def test_checking_boxes_of_the_tile_grid_gives_the_whole_checks_report(first):
    from convt_cli.verify import AdjointCheck

    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 40, 33) if first else (2, 40, 33, 3)).astype(np.float32)
    w = rng.standard_normal((3, 4, 512, 3)).astype(np.float32)  # 512 output channels: small tiles
    fmt = "channels_first" if first else None
    plan = plan_conv_transpose(x.shape, w.shape, None, 2, "SAME", fmt)
    y = engine.run_conv_transpose(plan, x, w)
    y[(1, 5, 17, 30) if first else (1, 17, 30, 5)] += 10.0
    whole = AdjointCheck(plan, w, "float32")
    whole.add(x, y)
    boxed = AdjointCheck(plan, w, "float32", threads=1)
    assert boxed.grid[0] * boxed.grid[1] > 4, boxed.blocks  # several tiles on each axis
    tile = tuple(size * n for size, n in zip(boxed.blocks, (2, 1)))
    boxes = list(itertools.product(*(tile_starts(o, t) for o, t in zip(plan.output_spatial, tile))))
    for b in (1, 0):
        for box in reversed(boxes):
            _, window = tile_plan(plan, box)
            xs = (b, slice(None), *(slice(*s_) for s_ in window)) if first else (b, *(slice(*s_) for s_ in window))
            ys = (b, slice(None), *(slice(*s_) for s_ in box)) if first else (b, *(slice(*s_) for s_ in box))
            boxed.add(x[xs][None], y[ys][None], batch_offset=b, box=box, window=window)
    assert _report_numbers(boxed.report()) == _report_numbers(whole.report())
    assert not whole.report().passed and whole.report().failing_tiles[0].batch == 1


def test_verify_of_one_element_too_large_tiles_with_the_same_report(volume):
    rng = np.random.default_rng(12)
    np.save("big.npy", rng.standard_normal((2, 40, 36, 30, 4)).astype(np.float32))
    run_files("big.npy", "vw.npy", "y.npy", strides=2)
    y = np.load("y.npy")
    y[1, 13, 4, 9, 2] += 0.5
    np.save("bad.npy", y)
    from convt_cli.stream import verify_files

    for name in ("y.npy", "bad.npy"):
        whole = verify_files("big.npy", "vw.npy", name, strides=2)
        tiled = verify_files("big.npy", "vw.npy", name, strides=2, max_memory="9M")
        assert whole.context["tile_shape"] is None and tiled.context["tile_shape"] is not None
        assert _report_numbers(tiled) == _report_numbers(whole)
        assert tiled.passed == (name == "y.npy")
    computed = verify_files("big.npy", "vw.npy", strides=2, max_memory="12M")
    assert computed.passed and computed.context["tile_shape"] is not None


# ---------------------------------------------------------------------------------------------------------
# Reading and writing beside the compute (stream.overlapped)


def test_overlapped_keeps_the_order_and_at_most_two_pieces_on_each_side():
    import threading

    from convt_cli.stream import overlapped

    alive = {"in": 0, "out": 0, "most_in": 0, "most_out": 0}
    lock = threading.Lock()
    written = []

    def read(p):
        with lock:
            alive["in"] += 1
            alive["most_in"] = max(alive["most_in"], alive["in"])
        return np.full(3, p)

    def compute(p, x, threads):
        with lock:
            alive["in"] -= 1
            alive["out"] += 1
            alive["most_out"] = max(alive["most_out"], alive["out"])
        return x * 2

    def write(p, y):
        written.append((p, y.tolist()))
        with lock:
            alive["out"] -= 1

    overlapped(list(range(40)), read, compute, write, lambda p: None)
    assert written == [(p, [2 * p] * 3) for p in range(40)]
    assert alive["most_in"] <= 2 and alive["most_out"] <= 2
    assert not [t for t in threading.enumerate() if t.name in ("convt-reader", "convt-writer")]


def test_an_interrupted_streamed_run_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.save("x.npy", np.ones((40, 16, 16, 8), np.float32))
    np.save("w.npy", np.ones((3, 3, 8, 8), np.float32))

    def stop(done, total):
        if done >= 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_files("x.npy", "w.npy", "y.npy", strides=2, max_memory="1M", progress=stop)
    assert sorted(os.listdir(".")) == ["w.npy", "x.npy"]


def test_the_tiling_and_so_the_bits_do_not_depend_on_the_thread_count(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    np.save("x.npy", rng.standard_normal((1, 6, 20, 36, 36), dtype=np.float32))
    np.save("w.npy", rng.standard_normal((3, 3, 3, 4, 6), dtype=np.float32))
    from convt_cli.engine.runtime import usable_cores

    counts = (1, 2, usable_cores() + 2)  # more threads than cores too: the tiling is sized for the cores
    infos = [run_files("x.npy", "w.npy", f"t{n}.npy", strides=2, data_format="NCDHW", max_memory="8M", threads=n)
             for n in counts]
    assert infos[0]["tile_shape"] is not None and all(i["tile_shape"] == infos[0]["tile_shape"] for i in infos)
    assert len({np.load(f"t{n}.npy").tobytes() for n in counts}) == 1


def test_a_whole_element_that_fits_as_one_tile_is_no_tile(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    np.save("a.npy", rng.standard_normal((2, 64, 64, 32), dtype=np.float32))
    np.save("k.npy", rng.standard_normal((7, 7, 16, 32), dtype=np.float32))
    for budget in ("28M", "36M", "43M"):
        info = run_files("a.npy", "k.npy", f"o{budget}.npz", strides=2, max_memory=budget)
        assert info["tile_shape"] is None and plan_files("a.npy", "k.npy", strides=2, max_memory=budget)[
            "tile_shape"] is None


def test_a_tiled_grouped_run_allocates_within_its_budget(tmp_path, monkeypatch):
    # a grouped tile plan's prepared filters are every block's and "taps"' (engine.prepared_bytes)
    import tracemalloc

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(2)
    np.save("g.npy", rng.standard_normal((1, 30, 40, 128)).astype(np.float32))
    np.save("gw.npy", rng.standard_normal((3, 3, 1, 128)).astype(np.float32))  # depthwise, two blocks of 64
    run_files("g.npy", "gw.npy", "warm.npy", strides=2, groups=128, max_memory="3M")
    tracemalloc.start()
    try:
        info = run_files("g.npy", "gw.npy", "t.npy", strides=2, groups=128, max_memory="3M", force=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info["tile_shape"] is not None and peak <= 3 << 20
    want = conv_transpose_loop(np.load("g.npy")[..., :1], np.load("gw.npy")[..., :1], (60, 80), 2)
    np.testing.assert_allclose(np.load("t.npy")[..., :1], want, rtol=1e-5, atol=1e-5)
