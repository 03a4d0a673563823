"""conv_transpose and conv on arrays, against oracles that share no code with the engine.

Matrix:
- TF goldens (tests/golden/*.npz, made by tests/golden/make_golden.py): every committed case, both ops.
- loop reference (tests/loop_reference.py): 160 seeded random configs over rank 1-4 x layout x
  SAME/VALID/explicit x strides 1-4 x dilations 1-3 x output size at either end of the legal range, both ops.
- adjoint identity <conv_transpose(y, W), x> = <y, conv(x, W)>: hypothesis over rank 1-3 and every flag.
- dtypes: float16, bfloat16, float32, float64, int32 (exact, overflow refused), complex64, complex128.
- array layouts: non-contiguous, Fortran order, big-endian, lists; inputs never modified; zero sizes.
- every strategy forced, in blocks of one row, and prepared once then run on pieces of the batch: bitwise the
  same as one run; estimate_bytes against tracemalloc's peak for the chosen and for each forced strategy.
"""

import glob
import json
import os

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convt_cli import ConvtError, conv, conv_transpose, engine
from convt_cli.engine import grid, runtime
from convt_cli.engine.strategies import dense, folded, offsets, phases, taps, winograd
from convt_cli.shapes import plan_conv_transpose
from conftest import legal_range, load_golden, random_arrays
from loop_reference import conv_loop, conv_transpose_loop

GOLDEN = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "golden", "*.npz")))
TF_FORMATS = {1: ("NWC", "NCW"), 2: ("NHWC", "NCHW"), 3: ("NDHWC", "NCDHW")}
# relative to max|expected|: float32 accumulation order differs from oneDNN's; half types round once
GOLDEN_RTOL = {"float64": 1e-12, "float32": 2e-5, "float16": 2e-3, "bfloat16": 2e-2}


@pytest.mark.parametrize("path", GOLDEN, ids=[os.path.basename(p)[:-4] for p in GOLDEN])
def test_matches_tensorflow_golden(path):
    params, a = load_golden(path)
    padding = params["padding"]
    flags = dict(strides=params["strides"], padding=padding, data_format=params["data_format"],
                 dilations=params["dilations"])
    if params["op"] == "conv_transpose":
        got = [conv_transpose(a["input"], a["filters"], params["output_shape"], **flags)]
        plan = plan_conv_transpose(a["input"].shape, a["filters"].shape, params["output_shape"], **flags)
        got += [engine.run_conv_transpose(plan, a["input"], a["filters"], strategy=s) for s in engine.STRATEGIES]
    else:
        got = [conv(a["input"], a["filters"], **flags)]
    want = a["output"]
    scale = float(np.abs(want.astype(np.float64)).max()) if want.size else 0.0
    rtol = GOLDEN_RTOL[params["dtype"]]
    for g in got:
        assert g.shape == want.shape
        assert g.dtype == want.dtype
        np.testing.assert_allclose(g.astype(np.float64), want.astype(np.float64), rtol=rtol, atol=rtol * scale)


def test_golden_suite_is_large_enough():
    ops = [json.loads(str(np.load(p)["params"]))["op"] for p in GOLDEN]
    assert ops.count("conv_transpose") >= 150
    assert ops.count("conv") >= 50


@pytest.mark.parametrize("strategy", engine.STRATEGIES)
@pytest.mark.parametrize("seed", range(160))
def test_conv_transpose_matches_loop_reference(seed, strategy):
    x, w, out_sizes, first, flags = random_arrays(seed)
    plan = plan_conv_transpose(x.shape, w.shape, out_sizes, data_format="channels_first" if first else None, **flags)
    got = engine.run_conv_transpose(plan, x, w, strategy=strategy)
    want = conv_transpose_loop(x, w, out_sizes, channels_first=first, **flags)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def _winograd_seeds(count):
    seeds = []
    for seed in range(1000):
        x, w, out_sizes, first, flags = random_arrays(seed)
        plan = plan_conv_transpose(x.shape, w.shape, out_sizes, data_format="channels_first" if first else None,
                                   **flags)
        if winograd.winograd_ok(plan):
            seeds.append(seed)
    return seeds[:count]


@pytest.mark.parametrize("m", [2, 3])
@pytest.mark.parametrize("seed", _winograd_seeds(80))
def test_winograd_tiles_of_two_and_three_match_loop_reference(monkeypatch, seed, m):
    # which tile size a shape gets depends on its memory (_winograd_m): here both, on every layout
    monkeypatch.setattr(winograd, "winograd_m", lambda plan, itemsize: m)
    x, w, out_sizes, first, flags = random_arrays(seed)
    plan = plan_conv_transpose(x.shape, w.shape, out_sizes, data_format="channels_first" if first else None, **flags)
    got = engine.run_conv_transpose(plan, x, w, strategy="winograd")
    want = conv_transpose_loop(x, w, out_sizes, channels_first=first, **flags)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(160, 220))
@pytest.mark.parametrize("strategy", ["offsets", "folded", "dense", "winograd"])
def test_offsets_in_blocks_of_one_row_match_loop_reference(monkeypatch, seed, strategy):
    # the loop-reference images are too small for "offsets" to cut them into blocks of rows by default
    monkeypatch.setattr(grid, "ROW_MIN", 1)
    monkeypatch.setattr(grid, "BLOCK_BYTES", 1)
    x, w, out_sizes, first, flags = random_arrays(seed)
    plan = plan_conv_transpose(x.shape, w.shape, out_sizes, data_format="channels_first" if first else None, **flags)
    got = engine.run_conv_transpose(plan, x, w, strategy=strategy)
    want = conv_transpose_loop(x, w, out_sizes, channels_first=first, **flags)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("strategy", ["offsets", "folded", "dense"])
@pytest.mark.parametrize("first", [False, True])
def test_shift_used_by_unevenly_spaced_phases(strategy, first):
    # stride 5, dilation 2, kernel 4: taps land on residues 0, 2, 4, 1 with shifts 0, 0, 0, 1, so shift 0 is
    # used by phases 0, 2, 3 of 4 and cannot be added as one box
    plan = plan_conv_transpose((2, 4, 3) if first else (2, 3, 4), (4, 3, 4), None, 5, "VALID",
                               "channels_first" if first else None, 2)
    axes = grid.grid(plan).axes
    assert grid.region(axes, (0,)) is None
    rng = np.random.default_rng(5)
    x = rng.standard_normal(plan.input_shape)
    w = rng.standard_normal(plan.filters_shape)
    got = engine.run_conv_transpose(plan, x, w, strategy=strategy)
    want = conv_transpose_loop(x, w, plan.output_spatial, strides=5, padding="VALID", dilations=2,
                               channels_first=first)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int32])
@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("dilation", [1, 2])
def test_folded_into_the_output_or_through_its_accumulator(monkeypatch, dtype, first, dilation):
    # stride 1 in 2-D: in float32 the GEMMs write straight into the output, block by block; float16 and int32
    # (summed in float32 and int64) go through the accumulator and the stores
    monkeypatch.setattr(grid, "ROW_MIN", 1)
    monkeypatch.setattr(grid, "BLOCK_BYTES", 1)  # a block per row: every block is a window of the output
    rng = np.random.default_rng(21)
    x = rng.integers(-4, 5, (2, 5, 7, 6) if first else (2, 7, 6, 5)).astype(dtype)
    w = rng.integers(-4, 5, (3, 3, 4, 5)).astype(dtype)
    plan = plan_conv_transpose(x.shape, w.shape, None, 1, "SAME", "NCHW" if first else "NHWC", dilation)
    assert folded.folded_ok(plan)
    got = engine.run_conv_transpose(plan, x, w, strategy="folded")
    want = conv_transpose_loop(x.astype(np.float64), w.astype(np.float64), plan.output_spatial, strides=1,
                               padding="SAME", dilations=dilation, channels_first=first)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got.astype(np.float64), want)  # small integers: every sum is exact


@pytest.mark.parametrize("strategy", engine.STRATEGIES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("first", [False, True])
def test_batch_chunking_is_bitwise_invisible(monkeypatch, strategy, dtype, first):
    rng = np.random.default_rng(17)
    x = rng.standard_normal((5, 6, 7, 9) if not first else (5, 9, 6, 7)).astype(dtype)
    w = rng.standard_normal((3, 4, 5, 9)).astype(dtype)
    plan = plan_conv_transpose(x.shape, w.shape, None, [2, 3], "SAME", "NCHW" if first else "NHWC")
    whole = engine.run_conv_transpose(plan, x, w, strategy=strategy)
    monkeypatch.setattr(runtime, "WORK_BYTES", 1)  # one batch element per chunk
    chunked = engine.run_conv_transpose(plan, x, w, strategy=strategy)
    sliced = np.concatenate([engine.run_conv_transpose(plan, x[i:i + 2], w, strategy=strategy) for i in (0, 2, 4)])
    assert whole.tobytes() == chunked.tobytes() == sliced.tobytes()


@pytest.mark.parametrize("seed", range(160))
def test_conv_matches_loop_reference(seed):
    # conv's input is conv_transpose's output: the same configs, read the other way
    y, w, out_sizes, first, flags = random_arrays(seed)
    batch, c_out = y.shape[0], w.shape[-2]
    rng = np.random.default_rng(seed + 10_000)
    x = rng.standard_normal((batch, c_out, *out_sizes) if first else (batch, *out_sizes, c_out))
    got = conv(x, w, data_format="channels_first" if first else None, **flags)
    want = conv_loop(x, w, channels_first=first, **flags)
    assert got.shape == y.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@st.composite
def adjoint_cases(draw):
    n = draw(st.integers(1, 3))
    first = draw(st.booleans())
    strides = draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
    dilations = draw(st.lists(st.integers(1, 3), min_size=n, max_size=n))
    kernel = draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
    in_sizes = draw(st.lists(st.integers(0, 6), min_size=n, max_size=n))
    kind = draw(st.sampled_from(["SAME", "VALID", "explicit"]))
    pads = draw(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=n, max_size=n))
    padding = pads if kind == "explicit" else draw(st.sampled_from([kind, kind.lower()]))
    out_sizes = []
    for j in range(n):
        pad = padding[j] if kind == "explicit" else kind
        lo, hi = legal_range(in_sizes[j], kernel[j], strides[j], dilations[j], pad)
        if in_sizes[j] == 0 or hi < max(lo, 0):
            in_sizes[j] = max(1, in_sizes[j])
            pads[j] = (0, 0)
            if kind == "explicit":
                padding[j] = (0, 0)
                pad = (0, 0)
            lo, hi = legal_range(in_sizes[j], kernel[j], strides[j], dilations[j], pad)
        out_sizes.append(draw(st.integers(max(lo, 0), hi)))
    batch, c_in, c_out = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**32 - 1))
    return n, first, strides, dilations, kernel, in_sizes, padding, out_sizes, batch, c_in, c_out, seed


@settings(max_examples=300, deadline=None)
@given(adjoint_cases())
def test_adjoint_identity(case):
    n, first, strides, dilations, kernel, in_sizes, padding, out_sizes, batch, c_in, c_out, seed = case
    rng = np.random.default_rng(seed)
    y = rng.standard_normal((batch, c_in, *in_sizes) if first else (batch, *in_sizes, c_in))
    w = rng.standard_normal((*kernel, c_out, c_in))
    x = rng.standard_normal((batch, c_out, *out_sizes) if first else (batch, *out_sizes, c_out))
    flags = dict(strides=strides, padding=padding, dilations=dilations,
                 data_format=TF_FORMATS[n][first])
    ct = conv_transpose(y, w, out_sizes, **flags)
    cx = conv(x, w, **flags)
    assert ct.shape == x.shape and cx.shape == y.shape
    a, b = np.vdot(ct, x), np.vdot(y, cx)
    scale = np.sqrt(np.vdot(ct, ct) * np.vdot(x, x)) + 1e-300
    assert abs(a - b) <= 1e-12 * scale


def _small_case(dtype, seed=0, first=False):
    rng = np.random.default_rng(seed)
    shape = (2, 3, 4, 5) if first else (2, 4, 5, 3)
    x = rng.standard_normal(shape)
    w = rng.standard_normal((3, 2, 4, 3))
    return x, w, dict(strides=[2, 3], padding="SAME", data_format="NCHW" if first else "NHWC", dilations=[1, 2])


@pytest.mark.parametrize(
    "dtype,rtol",
    [(np.float64, 1e-13), (np.float32, 1e-5), (np.float16, 2e-3), (ml_dtypes.bfloat16, 1e-2)],
)
@pytest.mark.parametrize("first", [False, True])
def test_float_dtypes_keep_dtype_and_round_once(dtype, rtol, first):
    x, w, flags = _small_case(dtype, first=first)
    x, w = x.astype(dtype), w.astype(dtype)
    got = conv_transpose(x, w, **flags)
    assert got.dtype == np.dtype(dtype)
    out_spatial = got.shape[2:] if first else got.shape[1:-1]
    exact = conv_transpose_loop(x.astype(np.float64), w.astype(np.float64), out_spatial,
                                channels_first=first, strides=flags["strides"], padding="SAME",
                                dilations=flags["dilations"])
    # rounding the float64 result once to the dtype is the best possible answer; accumulating in float32
    # may differ from it by at most one unit in the last place of the half type
    np.testing.assert_allclose(got.astype(np.float64), exact, rtol=rtol, atol=rtol * np.abs(exact).max())
    back = conv(got, w, **flags)
    assert back.dtype == np.dtype(dtype) and back.shape == x.shape


def test_float16_accumulates_in_float32():
    # 4096 terms of 1 + 2**-11: float16 accumulation would stall at 2048; float32 gets 4100 -> fp16 4100
    x = np.full((1, 1, 4096), 1.0, np.float16)
    w = np.full((1, 1, 4096), 1 + 2**-10, np.float16)
    got = conv_transpose(x, w, [1], padding="VALID")
    assert got.dtype == np.float16
    assert float(got[0, 0, 0]) == float(np.float16(4096 * (1 + 2**-10)))


def test_int32_is_exact():
    rng = np.random.default_rng(3)
    x = rng.integers(-1000, 1000, (2, 5, 6, 3)).astype(np.int32)
    w = rng.integers(-1000, 1000, (3, 3, 4, 3)).astype(np.int32)
    got = conv_transpose(x, w, strides=2, padding="VALID")
    want = conv_transpose_loop(x.astype(np.int64), w.astype(np.int64), got.shape[1:-1], strides=2,
                               padding="VALID")
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want.astype(np.int64))
    probe = rng.integers(-1000, 1000, got.shape).astype(np.int32)
    y = conv(probe, w, strides=2, padding="VALID")
    assert y.dtype == np.int32
    np.testing.assert_array_equal(y, conv_loop(probe.astype(np.int64), w.astype(np.int64), strides=2,
                                               padding="VALID"))


def test_int32_overflow_is_refused():
    x = np.full((1, 2, 2), 2**20, np.int32)
    w = np.full((1, 1, 2), 2**11, np.int32)
    with pytest.raises(ConvtError, match=r"int32 result overflows: an output element is 4294967296, outside"):
        conv_transpose(x, w, padding="VALID")
    # one below the limit computes
    w = np.full((1, 1, 2), 2**10 - 1, np.int32)
    assert conv_transpose(x, w, padding="VALID")[0, 0, 0] == 2 * 2**20 * (2**10 - 1)


def test_int32_partial_sums_beyond_int64_are_refused():
    x = np.full((1, 1, 3), 2**31 - 1, np.int32)
    w = np.full((1, 1, 3), -(2**31), np.int32)
    with pytest.raises(ConvtError, match="int32 input too large to accumulate exactly"):
        conv_transpose(x, w, padding="VALID")


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_complex_is_bilinear(dtype):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((2, 4, 3)) + 1j * rng.standard_normal((2, 4, 3))).astype(dtype)
    w = (rng.standard_normal((3, 2, 3)) + 1j * rng.standard_normal((3, 2, 3))).astype(dtype)
    got = conv_transpose(x, w, strides=2)
    assert got.dtype == dtype
    want = conv_transpose_loop(x, w, got.shape[1:-1], strides=2)
    np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == np.complex64 else 1e-12, atol=1e-5)
    probe = (rng.standard_normal(got.shape) + 1j * rng.standard_normal(got.shape)).astype(dtype)
    # the bilinear pairing (no conjugation) is the one for which conv is the transpose
    np.testing.assert_allclose(np.sum(got * probe), np.sum(x * conv(probe, w, strides=2)), rtol=1e-5)


def test_any_array_layout_gives_the_same_numbers_and_inputs_stay_untouched():
    x, w, flags = _small_case(np.float64, seed=7)
    want = conv_transpose(x, w, **flags)
    variants = [
        (np.asfortranarray(x), np.asfortranarray(w)),
        (x.astype(">f8"), w.astype(">f8")),
        (np.repeat(x, 2, axis=2)[:, :, ::2], w[::-1][::-1]),
        (x.tolist(), w.tolist()),
    ]
    for xv, wv in variants:
        before = (np.array(xv, copy=True), np.array(wv, copy=True))
        got = conv_transpose(xv, wv, **flags)
        np.testing.assert_array_equal(got, want)
        assert got.dtype.isnative
        np.testing.assert_array_equal(np.asarray(xv), before[0])
        np.testing.assert_array_equal(np.asarray(wv), before[1])
    back = conv(want.astype(">f8"), np.asfortranarray(w), **flags)
    np.testing.assert_array_equal(back, conv(want, w, **flags))


def test_results_do_not_depend_on_the_batch_slice():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((6, 5, 7, 8)).astype(np.float32)
    w = rng.standard_normal((3, 3, 4, 8)).astype(np.float32)
    whole = conv_transpose(x, w, strides=2)
    parts = np.concatenate([conv_transpose(x[i:i + 2], w, strides=2) for i in range(0, 6, 2)])
    np.testing.assert_allclose(parts, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("first", [False, True])
def test_zero_batch_gives_empty_output_of_the_right_shape(first):
    x = np.zeros((0, 3, 4, 5) if first else (0, 4, 5, 3), np.float32)
    w = np.ones((3, 3, 2, 3), np.float32)
    fmt = "NCHW" if first else "NHWC"
    got = conv_transpose(x, w, strides=2, data_format=fmt)
    assert got.shape == ((0, 2, 8, 10) if first else (0, 8, 10, 2))
    assert conv(got, w, strides=2, data_format=fmt).shape == x.shape


def test_zero_size_spatial_input_gives_zeros():
    # VALID, I=0, K=3, s=2: O=1 is legal (TF: forward size trunc((1-3+2)/2) = 0)
    x = np.ones((2, 0, 3), np.float64)
    w = np.ones((3, 4, 3), np.float64)
    got = conv_transpose(x, w, [2, 1, 4], strides=2, padding="VALID")
    assert got.shape == (2, 1, 4)
    assert not got.any()
    assert conv(np.ones((2, 1, 4)), w, strides=2, padding="VALID").shape == (2, 0, 3)


def test_zero_channels():
    assert not conv_transpose(np.ones((1, 3, 0)), np.ones((2, 4, 0)), strides=2).any()
    assert conv_transpose(np.ones((1, 3, 2)), np.ones((2, 0, 2)), strides=2).shape == (1, 6, 0)


def test_rank_five_spatial_four_channels_first():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 2, 2, 3, 2, 2))
    w = rng.standard_normal((2, 1, 2, 2, 3, 2))
    got = conv_transpose(x, w, strides=[1, 2, 2, 1], padding="VALID", data_format="channels_first")
    want = conv_transpose_loop(x, w, got.shape[2:], strides=[1, 2, 2, 1], padding="VALID", channels_first=True)
    assert got.shape == (1, 3, 3, 5, 4, 3)
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize(
    "x_dtype,w_dtype,message",
    [
        (np.float32, np.float64, "conv_transpose: input and filters must share a dtype, got input float32 and "
                                 "filters float64"),
        (np.int64, np.int64, "conv_transpose: input dtype int64 is not supported: expected one of float16, "
                             "bfloat16, float32, float64, int32, complex64, complex128"),
        (np.float32, np.bool_, "conv_transpose: filters dtype bool is not supported"),
    ],
)
def test_dtype_errors(x_dtype, w_dtype, message):
    with pytest.raises(ConvtError) as e:
        conv_transpose(np.zeros((1, 2, 3), x_dtype), np.zeros((1, 3, 3), w_dtype))
    assert str(e.value).startswith(message)


def test_object_and_string_arrays_are_refused():
    with pytest.raises(ConvtError, match="input dtype object is not supported"):
        conv(np.array([[[None]]], dtype=object), np.zeros((1, 1, 1)))
    with pytest.raises(ConvtError, match="input dtype str"):
        conv(np.array([[["a"]]]), np.zeros((1, 1, 1)))


def test_convt_error_is_a_value_error():
    with pytest.raises(ValueError):
        conv_transpose(np.zeros((1, 2, 3)), np.zeros((1, 3, 4)))


DETERMINISM = [((6, 9, 11, 5), 6), ((4, 20, 20, 130), 3), ((5, 33, 17, 24), 40), ((3, 8, 8, 8, 16), 8),
               ((9, 16, 16, 64), 32)]


@pytest.mark.parametrize("shape,c_out", DETERMINISM, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple)
                         else str(v))
@pytest.mark.parametrize("strides", [1, 2, 3])
@pytest.mark.parametrize("channels_first", [False, True], ids=["last", "first"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_bitwise_identical_whatever_the_slicing_chunking_or_threads(monkeypatch, shape, c_out, strides,
                                                                    channels_first, dtype):
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    n = len(shape) - 2
    x = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal((3,) * n + (c_out, shape[-1])).astype(dtype)
    flags = {"strides": strides}
    if channels_first:
        x, flags["data_format"] = np.ascontiguousarray(np.moveaxis(x, -1, 1)), "channels_first"
    whole = conv_transpose(x, w, **flags)
    b = x.shape[0]
    failures = []
    for name, pieces in (("one by one", [(i, i + 1) for i in range(b)]), ("2 + rest", [(0, 2), (2, b)])):
        if not np.array_equal(whole, np.concatenate([conv_transpose(x[i:j], w, **flags) for i, j in pieces])):
            failures.append(f"batch sliced {name}")
    for value in (1, 1 << 40):
        with monkeypatch.context() as m:
            m.setattr(runtime, "WORK_BYTES", value)
            if not np.array_equal(whole, conv_transpose(x, w, **flags)):
                failures.append(f"WORK_BYTES={value}")
    for threads in (1, 3):
        if not np.array_equal(whole, conv_transpose(x, w, **flags, threads=threads)):
            failures.append(f"threads={threads}")
    for threads in (1, 2):  # whatever BLAS was set to outside
        with threadpool_limits(threads):
            if not np.array_equal(whole, conv_transpose(x, w, **flags)):
                failures.append(f"{threads} BLAS thread(s) outside")
    assert failures == []


@pytest.mark.parametrize("x_shape,w_shape,strides,dilations,data_format", [
    ((3, 20, 20, 64), (4, 4, 32, 64), 2, 1, "NHWC"),  # winograd
    ((3, 64, 20, 20), (4, 4, 32, 64), 2, 1, "NCHW"),  # winograd, channels-first
    ((2, 24, 24, 48), (3, 3, 40, 48), 1, 2, "NHWC"),  # folded, into the output
    ((2, 48, 24, 24), (3, 3, 40, 48), 1, 2, "NCHW"),  # offsets
    ((2, 24, 24, 48), (3, 3, 40, 48), 2, 1, "NHWC"),  # folded, with an accumulator
    ((4, 40, 40, 3), (3, 3, 3, 3), 2, 1, "NHWC"),  # dense
    ((2, 3000, 64), (16, 32, 64), 8, 1, "NWC"),  # dense, every residue with all its taps
    ((2, 9, 9, 9, 32), (3, 3, 3, 16, 32), 2, 1, "NDHWC"),  # folded, 3-D
    ((2, 32, 9, 9, 9), (3, 3, 3, 16, 32), 2, 1, "NCDHW"),  # offsets, 3-D
    ((2, 50, 3, 5), (7, 7, 4, 5), 1, 3, "NHWC"),  # phases: rows mostly junk
    ((1, 9, 3, 29), (5, 5, 256, 29), [3, 4], [3, 3], "NHWC"),  # dense, weights 10x the filters
    ((1, 23, 6, 4, 1), (3, 4, 2, 128, 23), [2, 2, 4], [3, 3, 3], "NCDHW"),  # dense, channels-first
])
def test_estimate_bytes_bounds_what_the_engine_allocates(x_shape, w_shape, strides, dilations, data_format):
    _check_estimate(x_shape, w_shape, strides, dilations, data_format, np.float32)


@pytest.mark.parametrize("dtype", [np.float16, np.int32])
@pytest.mark.parametrize("strides", [1, 2])
def test_estimate_bytes_bounds_the_prepared_filters_of_a_converted_dtype(dtype, strides):
    # one 1x5 kernel's taps make one GEMM's filters: built in place, they take no third filter-sized array
    # next to the converted filters (float16 and int32 are summed in float32 and int64)
    _check_estimate((1, 1, 8, 512), (1, 5, 512, 512), strides, 1, "NHWC", dtype)


def _check_estimate(x_shape, w_shape, strides, dilations, data_format, dtype):
    import tracemalloc

    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    padding = "VALID" if w.shape[-2] > 100 else "SAME"
    plan = plan_conv_transpose(x.shape, w.shape, None, strides, padding, data_format, dilations)
    conv_transpose(x[:1], w, strides=strides, padding=padding, data_format=data_format, dilations=dilations)
    tracemalloc.start()  # after the threads' first GEMMs, which happen once per process
    try:
        conv_transpose(x, w, strides=strides, padding=padding, data_format=data_format, dilations=dilations)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= engine.estimate_bytes(plan, dtype), (engine.choose_strategy(plan), peak)


def _convt_in_child(queue):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((4, 30, 30, 8)).astype(np.float32)
    w = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    queue.put(conv_transpose(x, w, strides=2).tobytes())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_threads_of_its_own():
    # the worker threads are kept for the process; a child forked after they started must not wait on them
    import multiprocessing

    rng = np.random.default_rng(8)
    x = rng.standard_normal((4, 30, 30, 8)).astype(np.float32)
    w = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    want = conv_transpose(x, w, strides=2).tobytes()  # starts the threads here
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_convt_in_child, args=(queue,))
    child.start()
    try:
        got = queue.get(timeout=60)
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    assert got == want


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf is the point
@pytest.mark.parametrize("strategy", [None, *engine.STRATEGIES])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape,w_shape,strides", [((4, 9, 9, 3), (3, 3, 2, 3), 2),  # dense by default
                                                   ((4, 9, 9, 16), (4, 4, 8, 16), 2),  # winograd
                                                   ((4, 12, 12, 40), (3, 3, 8, 40), 1)])  # offsets
def test_inf_and_nan_spread_as_in_a_direct_sum(strategy, dtype, shape, w_shape, strides):
    # "dense" multiplies zero weights by every input and "winograd" subtracts inputs from each other: an inf
    # there would make NaN where a direct sum gives inf or 0. Such images take the direct path, the others not.
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    x[1, 4, 4, 0] = np.inf
    x[2, 2, 5, 1] = np.nan
    plan = plan_conv_transpose(x.shape, w.shape, None, strides)
    got = engine.run_conv_transpose(plan, x, w, strategy=strategy)
    with np.errstate(invalid="ignore"):
        want = conv_transpose_loop(x.astype(np.float64), w.astype(np.float64), plan.output_spatial, strides=strides)
    for image in (1, 2):
        assert np.array_equal(np.isnan(got[image]), np.isnan(want[image]))
        assert np.array_equal(np.isposinf(got[image]), np.isposinf(want[image]))
        assert np.array_equal(np.isneginf(got[image]), np.isneginf(want[image]))
    alone = [engine.run_conv_transpose(plan, x[i:i + 1], w, strategy=strategy) for i in (0, 3)]
    assert got[0].tobytes() == alone[0].tobytes() and got[3].tobytes() == alone[1].tobytes()
    assert np.isfinite(got[[0, 3]]).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # inf - inf and inf * 0 are the point
@pytest.mark.parametrize("strategy", [None, *engine.STRATEGIES])
@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("strides,first", [(1, False), (1, True), (2, False), ([1, 3], True)])
def test_a_nonfinite_tap_spreads_as_in_a_direct_sum_over_the_input(strategy, value, strides, first):
    # TF sums over the input only: where an inf tap falls on the padding it adds nothing, where a strategy that
    # pads multiplies it by zero and makes NaN (TF 2.21 gives inf there, like the loop reference)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 3, 6, 5) if first else (2, 6, 5, 3))
    w = rng.standard_normal((3, 3, 2, 3))
    w[0, 0, 1, 2] = value
    w[2, 1, 0, 0] = value
    plan = plan_conv_transpose(x.shape, w.shape, None, strides, "SAME", "NCHW" if first else "NHWC")
    got = engine.run_conv_transpose(plan, x, w, strategy=strategy)
    want = conv_transpose_loop(x, w, plan.output_spatial, strides=strides, channels_first=first)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.array_equal(np.isposinf(got), np.isposinf(want))
    assert np.array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-12, atol=1e-12)


def test_winograd_does_not_overflow_where_the_direct_sum_does_not():
    x = np.zeros((1, 8, 8, 16), np.float32)
    x[0, 3, 3:5, 0] = [3e38, -3e38]  # d0 - d1 would be -inf
    w = np.full((4, 4, 2, 16), 1e-3, np.float32)
    got = conv_transpose(x, w, strides=2)
    assert np.isfinite(got).all()
    want = conv_transpose_loop(x.astype(np.float64), w.astype(np.float64), got.shape[1:-1], strides=2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e30)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # inf - inf, and the direct sum overflowing: the point
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_winograd_channels_first_reroutes_inf_and_nan_and_sums_large_values(dtype):
    # channels-first takes F(3, 2). Images with an inf, a NaN or a magnitude past tame_limit are done again by
    # "offsets" (1, 2 and, in float32, 3); the others go through F(3, 2)'s transforms, which add inputs
    # (d1 + d2) and sum three products per axis: image 4 with values just under the limit must not overflow
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 16, 9, 9)).astype(dtype)
    w = rng.standard_normal((4, 4, 8, 16)).astype(dtype)
    x[1, 0, 4, 4] = np.inf
    x[2, 1, 2, 5] = np.nan
    x[3, 0, 3, 3:5] = [6e4, 6e4] if dtype == np.float16 else [3e38, 3e38]  # float16: via F(3, 2), in float32
    if dtype == np.float32:
        x[4, :, 3:5, 3:5] = 2.0**46  # under the 2**47 limit: through F(3, 2), products near 2**48
    plan = plan_conv_transpose(x.shape, w.shape, None, 2, "SAME", "NCHW")
    assert engine.choose_strategy(plan) == "winograd" and winograd.winograd_m(plan, 4) == 3
    got = engine.run_conv_transpose(plan, x, w)
    with np.errstate(invalid="ignore", over="ignore"):
        want = conv_transpose_loop(x.astype(np.float64), w.astype(np.float64), plan.output_spatial, strides=2,
                                   channels_first=True)
    for image in (1, 2):
        assert np.array_equal(np.isnan(got[image]), np.isnan(want[image]))
        assert np.array_equal(np.isposinf(got[image]), np.isposinf(want[image]))
        assert np.array_equal(np.isneginf(got[image]), np.isneginf(want[image]))
    if dtype == np.float32:  # past the limit, image 3 is summed directly, as "offsets" sums it alone
        alone = engine.run_conv_transpose(plan, x[3:4], w, strategy="offsets")
        assert got[3:4].tobytes() == alone.tobytes()
    else:  # through F(3, 2) in float32, overflowing float16 where the direct sum does
        assert np.array_equal(np.isinf(got[3]), np.isinf(want[3].astype(np.float16)))
    for image in (0, 4) if dtype == np.float32 else (0,):  # float16's image 3 overflows the output, as in TF
        assert np.isfinite(got[image]).all()
        scale = float(np.abs(want[image].astype(np.float64)).max())
        np.testing.assert_allclose(got[image].astype(np.float64), want[image].astype(np.float64), rtol=2e-3,
                                   atol=2e-3 * scale)


def test_no_channels_at_all():
    plan = plan_conv_transpose((2, 8, 0), (1, 0, 0), None, 3)
    assert engine.estimate_bytes(plan, np.float32, threads=1) < 1 << 10  # an empty output, no workspace to speak of
    assert conv_transpose(np.zeros((2, 8, 0), np.float32), np.zeros((1, 0, 0), np.float32), strides=3).shape == \
        (2, 24, 0)


def test_an_error_in_one_job_stops_the_others(monkeypatch):
    # int32 overflow in the first image: the threads stop taking jobs instead of computing all 60 images
    x = np.ones((60, 24, 24, 40), np.int32)
    x[0] = 2**20
    w = np.full((3, 3, 8, 40), 2**9, np.int32)
    stores = []
    for module in (phases, taps, offsets, folded, dense, winograd):  # store, where each strategy reads it
        real = module.store
        monkeypatch.setattr(module, "store", lambda op, dst, src, real=real: (stores.append(1), real(op, dst, src)))
    with pytest.raises(ConvtError, match="overflows"):
        conv_transpose(x, w, strides=1)
    assert len(stores) < 20  # blocks of a few images at most, not 60 images' worth


def test_an_error_is_not_chained_to_the_thread_fallback():
    with pytest.raises(ConvtError) as caught:
        conv_transpose(np.full((1, 2, 2), 2**20, np.int32), np.full((1, 1, 2), 2**11, np.int32), padding="VALID")
    assert caught.value.__context__ is None


def test_calls_from_several_threads_leave_blas_threads_as_they_were():
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_info

    def blas_threads():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    before = blas_threads()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 20, 20, 16)).astype(np.float32)
    w = rng.standard_normal((4, 4, 8, 16)).astype(np.float32)
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda _: conv_transpose(x, w, strides=2), range(30)))
    assert blas_threads() == before


@pytest.mark.parametrize("strategy", engine.STRATEGIES)
@pytest.mark.parametrize("x_shape,w_shape,strides,data_format", [
    ((1, 40, 40, 32), (4, 4, 16, 32), 2, "NHWC"),  # one image, several blocks: every thread has one
    ((2, 32, 24, 24), (4, 4, 16, 32), 2, "NCHW"),
    ((2, 9, 9, 9, 8), (3, 3, 3, 8, 8), 2, "NDHWC"),
])
def test_estimate_bytes_bounds_each_strategy_forced(strategy, x_shape, w_shape, strides, data_format):
    import tracemalloc

    rng = np.random.default_rng(1)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    plan = plan_conv_transpose(x.shape, w.shape, None, strides, "SAME", data_format)
    engine.run_conv_transpose(plan, x, w, strategy=strategy, threads=2)  # the worker threads' first GEMMs
    tracemalloc.start()
    try:
        engine.run_conv_transpose(plan, x, w, strategy=strategy, threads=2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= engine.estimate_bytes(plan, np.float32, threads=2, strategy=strategy)


@pytest.mark.parametrize("strategy", [None, *engine.STRATEGIES])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int32])
@pytest.mark.parametrize("first", [False, True])
def test_prepared_once_and_run_on_pieces_gives_the_bits_of_one_run(strategy, dtype, first):
    rng = np.random.default_rng(9)
    x = rng.integers(-3, 4, (5, 20, 11, 6) if not first else (5, 6, 20, 11)).astype(dtype)
    w = rng.standard_normal((4, 3, 7, 6)).astype(dtype) if dtype != np.int32 else \
        rng.integers(-3, 4, (4, 3, 7, 6)).astype(dtype)
    plan = plan_conv_transpose(x.shape, w.shape, None, [2, 1], "SAME", "NCHW" if first else "NHWC")
    whole = engine.run_conv_transpose(plan, x, w, strategy=strategy)
    prepared = engine.prepare(plan, w, strategy)
    pieces = np.concatenate([prepared.run(x[b0:b1], threads=t) for (b0, b1), t in (((0, 2), 1), ((2, 3), 2),
                                                                                   ((3, 5), 3))])
    assert prepared.strategy in engine.STRATEGIES and (strategy is None or prepared.strategy == strategy or
                                                       strategy in ("winograd", "folded"))
    assert pieces.tobytes() == whole.tobytes()
    want = conv_transpose_loop(x.astype(np.float64), w.astype(np.float64), plan.output_spatial, strides=[2, 1],
                               channels_first=first)
    np.testing.assert_allclose(whole.astype(np.float64), want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_a_prepared_run_refuses_an_input_of_another_shape_or_dtype():
    plan = plan_conv_transpose((2, 5, 3), (3, 4, 3), None, 2)
    prepared = engine.prepare(plan, np.ones((3, 4, 3)))
    assert prepared.run(np.ones((7, 5, 3))).shape == (7, 10, 4)
    with pytest.raises(ConvtError, match=r"input shape \(2, 5, 4\) does not match the plan's \(batch, 5, 3\)"):
        prepared.run(np.ones((2, 5, 4)))
    with pytest.raises(ConvtError, match="input and filters must share a dtype, got input float32"):
        prepared.run(np.ones((2, 5, 3), np.float32))


@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv_is_bitwise_the_same_whatever_the_batch_split_or_threads(monkeypatch, first, dtype):
    rng = np.random.default_rng(12)
    x = rng.standard_normal((7, 9, 31, 23) if first else (7, 31, 23, 9)).astype(dtype)
    w = rng.standard_normal((3, 3, 9, 5)).astype(dtype)
    flags = dict(strides=2, data_format="NCHW" if first else "NHWC", dilations=[1, 2])
    whole = conv(x, w, **flags, threads=1)
    assert conv(x, w, **flags, threads=3).tobytes() == whole.tobytes()
    pieces = np.concatenate([conv(x[i:i + 3], w, **flags, threads=2) for i in range(0, 7, 3)])
    assert pieces.tobytes() == whole.tobytes()
    monkeypatch.setattr(runtime, "WORK_BYTES", 1)  # a chunk per image
    assert conv(x, w, **flags).tobytes() == whole.tobytes()
