"""Groups (--groups, groups=) and output_padding (--output-padding, output_padding=), PyTorch's and ONNX's meaning.

Matrix: groups 2, 3, depthwise (G = in_channels, multiplier 1 and 2) x rank 1-3 x both data formats x every
strategy forced and the one chosen x float32, float64, int32 against a loop reference run group by group; inputs
holding inf or nan (computed without summing across groups); output_padding below the stride, and at or above it
when the dilation is larger (positions no input reaches are zero), against the output size written out from
PyTorch's and ONNX's formulas; verify on grouped and output-padded outputs (passes, and catches a wrong value);
the memory estimate against tracemalloc; the errors, exact.
"""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import invoke
from convt_cli import ConvtError, conv_transpose, engine
from convt_cli.shapes import plan_conv_transpose
from convt_cli.verify import verify_conv_transpose
from loop_reference import conv_transpose_loop


def grouped_loop(x, w, out_spatial, groups, strides, padding, first, dilations=1):
    """Group g's input channels through its filters (*k, out/G, in) slice, into its output channels."""
    ci, co = x.shape[1 if first else -1] // groups, w.shape[-2]
    parts = []
    for g in range(groups):
        xs = x[:, g * ci:(g + 1) * ci] if first else x[..., g * ci:(g + 1) * ci]
        parts.append(conv_transpose_loop(xs, w[..., g * ci:(g + 1) * ci], out_spatial, strides, padding, first,
                                         dilations))
    assert all(p.shape[1 if first else -1] == co for p in parts)
    return np.concatenate(parts, axis=1 if first else -1)


CASES = [  # (rank, first, in_channels, out_per_group, groups, strides)
    (1, False, 6, 2, 3, 2),
    (2, False, 8, 3, 2, 2),
    (2, True, 8, 3, 2, [1, 2]),
    (2, False, 8, 1, 8, 2),  # depthwise
    (2, True, 6, 2, 6, 3),  # depthwise, multiplier 2
    (3, False, 4, 2, 2, 2),
    (3, True, 4, 1, 4, 1),
]


@pytest.mark.parametrize("strategy", [None, *engine.STRATEGIES])
@pytest.mark.parametrize("rank, first, c_in, co, groups, strides", CASES)
@pytest.mark.parametrize("dtype", ["float32", "float64", "int32"])
def test_groups_give_the_loop_reference_group_by_group(strategy, rank, first, c_in, co, groups, strides, dtype):
    rng = np.random.default_rng([rank, c_in, groups])
    spatial = (6, 5, 4)[:rank]
    shape = (2, c_in, *spatial) if first else (2, *spatial, c_in)
    if dtype == "int32":
        x, w = rng.integers(-9, 10, shape).astype(dtype), rng.integers(-9, 10, (*(3, 2, 3)[:rank], co, c_in))
        w = w.astype(dtype)
    else:
        x, w = rng.standard_normal(shape).astype(dtype), rng.standard_normal((*(3, 2, 3)[:rank], co, c_in))
        w = w.astype(dtype)
    plan = plan_conv_transpose(x.shape, w.shape, None, strides, "SAME", "channels_first" if first else None,
                               groups=groups)
    assert plan.out_channels == co * groups and plan.filters_shape == w.shape
    got = engine.run_conv_transpose(plan, x, w, strategy=strategy)
    want = grouped_loop(x, w, plan.output_spatial, groups, strides, "SAME", first)
    if dtype == "int32":
        np.testing.assert_array_equal(got, want)
    else:
        tol = 1e-5 if dtype == "float32" else 1e-12
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("groups", [2, 8])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_an_inf_in_one_group_never_reaches_another(first, groups, dtype):
    # the blocks of merged groups hold zeros between groups; 0 * inf would be nan where PyTorch has a number
    import ml_dtypes

    dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(groups)
    x = rng.standard_normal((2, 8, 5, 5) if first else (2, 5, 5, 8)).astype(dtype)
    w = rng.standard_normal((3, 3, 2, 8)).astype(dtype)
    x[(0, 0, 2, 2) if first else (0, 2, 2, 0)] = np.inf
    x[(1, 7, 1, 1) if first else (1, 1, 1, 7)] = np.nan
    fmt = "channels_first" if first else None
    with np.errstate(all="ignore"):
        got = conv_transpose(x, w, strides=2, data_format=fmt, groups=groups)
        want = grouped_loop(x.astype(np.float64), w.astype(np.float64), (10, 10), groups, 2, "SAME", first)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    ok = np.isfinite(want)
    tol = 1e-5 if dtype == np.float32 else 5e-2
    np.testing.assert_allclose(got[ok].astype(np.float64), want[ok], rtol=tol, atol=tol)
    channel = (slice(None), slice(2, None)) if first else (..., slice(2, None))
    assert np.isfinite(got[0][channel[1:]] if first else got[0][..., 2:]).all()  # group 0's inf stays in group 0


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_an_image_that_is_not_finite_leaves_the_others_bits_as_they_are_alone():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 8, 8, 64)).astype(np.float32)
    w = rng.standard_normal((3, 3, 32, 64)).astype(np.float32)
    x[1, 0, 0, 0] = np.inf
    prepared = engine.prepare(plan_conv_transpose(x.shape, w.shape, None, 2, groups=2), w)
    whole = prepared.run(x)
    for b in range(3):
        assert whole[b].tobytes() == prepared.run(x[b:b + 1])[0].tobytes()


def test_many_narrow_groups_run_in_blocks_with_the_bits_of_each_block_alone():
    # 16 depthwise groups of 1 channel run as blocks of 64 groups' worth of channels or fewer: with 128
    # channels that is two blocks, each the bits of conv_transpose on its channels with block-diagonal filters
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 6, 6, 128)).astype(np.float32)
    w = rng.standard_normal((3, 3, 1, 128)).astype(np.float32)
    got = conv_transpose(x, w, strides=2, groups=128)
    assert engine.execute.merged_groups(plan_conv_transpose(x.shape, w.shape, None, 2, groups=128)) == 64
    for j in range(2):
        block = np.zeros((3, 3, 64, 64), np.float32)
        block[..., np.arange(64), np.arange(64)] = w[..., 0, 64 * j:64 * (j + 1)]
        alone = conv_transpose(np.ascontiguousarray(x[..., 64 * j:64 * (j + 1)]), block, strides=2)
        assert got[..., 64 * j:64 * (j + 1)].tobytes() == alone.tobytes()


def test_block_diagonal_filters_check_as_groups():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 7, 6)).astype(np.float64)
    w = rng.standard_normal((3, 2, 6))
    full = np.zeros((3, 6, 6))
    for g in range(3):
        full[:, 2 * g:2 * g + 2, 2 * g:2 * g + 2] = w[..., 2 * g:2 * g + 2]
    y = conv_transpose(x, full, strides=2)
    assert verify_conv_transpose(x, w, y, strides=2, groups=3).passed
    y[1, 5, 3] += 1e-6 * np.abs(y).max()
    assert not verify_conv_transpose(x, w, y, strides=2, groups=3).passed


def pytorch_size(i, k, s, d, p, op):
    """PyTorch's ConvTranspose output size, as its documentation writes it."""
    return (i - 1) * s - 2 * p + d * (k - 1) + op + 1


@pytest.mark.parametrize("i, k, s, d, p, op", [
    (12, 1, 1, 2, 0, 1),  # the case: op >= s because d > s
    (5, 3, 2, 1, 1, 1),
    (4, 2, 1, 3, 0, 2),
    (6, 3, 2, 3, 2, 2),
    (3, 4, 3, 1, 1, 2),
    (1, 1, 1, 4, 0, 3),
])
@pytest.mark.parametrize("first", [False, True])
def test_output_padding_gives_pytorchs_size_and_zeros_where_nothing_lands(i, k, s, d, p, op, first):
    rng = np.random.default_rng([i, k, s, d, p, op])
    x = rng.standard_normal((2, 3, i) if first else (2, i, 3))
    w = rng.standard_normal((k, 2, 3))
    o = pytorch_size(i, k, s, d, p, op)
    got = conv_transpose(x, w, None, s, p, "NCW" if first else "NWC", d, output_padding=op)
    assert got.shape == ((2, 2, o) if first else (2, o, 2))
    want = conv_transpose_loop(x, w, (o,), s, [(p, p)], first, d)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert verify_conv_transpose(x, w, got, s, p, "NCW" if first else "NWC", d, output_padding=op).passed


@pytest.mark.parametrize("padding, lower", [("SAME_UPPER", False), ("SAME", False), ("SAME_LOWER", True)])
@pytest.mark.parametrize("op", [0, 1])
def test_output_padding_with_same_splits_as_onnx_does(padding, lower, op):
    # ONNX: output I*s; total pad (I-1)*s + op + eff - I*s, its odd unit at the end (UPPER) or the start (LOWER)
    i, k, s = 5, 4, 2
    rng = np.random.default_rng(op)
    x, w = rng.standard_normal((1, i, 2)), rng.standard_normal((k, 3, 2))
    total = (i - 1) * s + op + k - i * s
    lo = total - total // 2 if lower else total // 2
    got = conv_transpose(x, w, None, s, padding, output_padding=op)
    np.testing.assert_allclose(got, conv_transpose_loop(x, w, (i * s,), s, [(lo, total - lo)]), rtol=1e-12)


def test_output_padding_zero_keeps_tfs_sizes():
    x, w = np.ones((1, 5, 5, 2)), np.ones((3, 3, 4, 2))
    for padding in ("SAME", "VALID", [(1, 2), (0, 1)]):
        assert (conv_transpose(x, w, None, 2, padding, output_padding=0).shape
                == conv_transpose(x, w, None, 2, padding).shape)


def test_output_padding_and_groups_through_the_cli(work):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 8, 6, 6)).astype(np.float32)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)  # PyTorch's [in, out/groups, kh, kw]
    np.save("xg.npy", x)
    np.save("wg.npy", w)
    flags = ["--data-format", "NCHW", "--filter-layout", "torch", "--groups", "4", "--strides", "2", "--padding",
             "1", "--output-padding", "1"]
    r = invoke("run", "xg.npy", "wg.npy", "-o", "yg.npy", "--json", *flags)
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["groups"] == 4 and info["output_padding"] == [1, 1] and info["output_shape"] == [2, 12, 12, 12]
    assert info["pads"] == [[1, 0], [1, 0]]
    want = grouped_loop(x, np.transpose(w, (2, 3, 1, 0)), (12, 12), 4, 2, [(1, 1), (1, 1)], True)
    np.testing.assert_allclose(np.load("yg.npy"), want, rtol=1e-5, atol=1e-5)
    assert invoke("verify", "xg.npy", "wg.npy", "yg.npy", *flags).exit_code == 0
    shape = invoke("shape", "xg.npy", "wg.npy", *flags)
    assert "groups        4 (filters (3, 3, 3, 8) as [*k, out/groups, in])" in shape.stdout


@pytest.mark.parametrize("kwargs, message", [
    (dict(groups=3), "conv_transpose: groups=3 must divide the input's 8 channels"),
    (dict(groups=0), "conv_transpose: groups=0 must be >= 1"),
    (dict(groups=2.0), "conv_transpose: groups must be an integer, got 2.0"),
    (dict(output_padding=2), "conv_transpose: output_padding=2 on spatial axis 0 must be >= 0 and smaller than "
                             "the stride 2 or the dilation 1"),
    (dict(output_padding=[1, 0, 1]), "conv_transpose: output_padding must be an integer or have length N=2, got "
                                     "length 3: [1, 0, 1]"),
    (dict(output_padding=1, output_shape=[11, 11]),
     "conv_transpose: output_shape[0]=11 disagrees with output_padding[0]=1, which makes the output 8 on spatial "
     "axis 0: give one or the other"),
    (dict(output_padding=[0, 1], padding=6), "conv_transpose: the output on spatial axis 0 would have size -3: "
                                             "padding (6, 6) with output_padding 0 removes more than input size 4, "
                                             "kernel 3, stride 2, dilation 1 make"),
])
def test_mistakes_name_the_parameter(kwargs, message):
    x, w = np.ones((1, 4, 4, 8), np.float32), np.ones((3, 3, 2, 8), np.float32)
    with pytest.raises(ConvtError) as e:
        conv_transpose(x, w, strides=2, **kwargs)
    assert str(e.value) == message


def test_cli_mistakes_are_one_line(work):
    np.save("x8.npy", np.ones((1, 4, 4, 8), np.float32))
    np.save("w8.npy", np.ones((3, 3, 2, 8), np.float32))
    r = invoke("run", "x8.npy", "w8.npy", "--groups", "3", "-o", "y8.npy")
    assert r.exit_code == 2 and r.stderr == ("Error: INPUT 'x8.npy': conv_transpose: groups=3 must divide the "
                                             "input's 8 channels\n")
    r = invoke("run", "x8.npy", "w8.npy", "--groups", "0", "-o", "y8.npy")
    assert r.exit_code == 2 and "Invalid value for '--groups'" in r.stderr
    r = invoke("run", "x8.npy", "w8.npy", "--output-padding", "1,x", "-o", "y8.npy")
    assert r.exit_code == 2 and "expected comma-separated integers like 1 or 1,0, got '1,x'" in r.stderr


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # inf - inf, on the worker threads
@pytest.mark.parametrize("x_shape, w_shape, groups", [
    ((3, 12, 12, 128), (4, 4, 16, 128), 2),
    ((3, 12, 12, 128), (4, 4, 1, 128), 128),
    ((3, 12, 12, 16), (4, 4, 8, 16), 4),
    ((1, 1, 1, 1024), (7, 7, 16, 1024), 64),  # many blocks, each holding little: their filters dominate
    ((1, 1, 1, 2048), (5, 5, 8, 2048), 256),
    ((2, 2, 2, 512), (5, 5, 16, 512), 32),
])
def test_estimate_bytes_bounds_what_grouped_runs_allocate(x_shape, w_shape, groups):
    import tracemalloc

    rng = np.random.default_rng(6)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    plan = plan_conv_transpose(x.shape, w.shape, None, 2, groups=groups)
    some = x.copy()
    some[0, 0, 0, 0] = np.inf
    for values in (x, some):  # the blocks, and "taps" beside them for an image that is not finite
        with np.errstate(all="ignore"):
            engine.run_conv_transpose(plan, values, w, threads=2)
            tracemalloc.start()
            try:
                engine.run_conv_transpose(plan, values, w, threads=2)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
        assert peak <= engine.estimate_bytes(plan, np.float32, threads=2)


@settings(max_examples=200, deadline=None)
@given(i=st.integers(1, 6), k=st.integers(1, 4), s=st.integers(1, 4), d=st.integers(1, 4), lo=st.integers(0, 4),
       hi=st.integers(0, 4), data=st.data())
def test_output_padding_is_pytorchs_on_any_axis(i, k, s, d, lo, hi, data):
    op = data.draw(st.integers(0, max(s, d) - 1))
    o = (i - 1) * s + (k - 1) * d + 1 - lo - hi + op  # ONNX's formula with pads (lo, hi)
    rng = np.random.default_rng([i, k, s, d, lo, hi, op])
    x, w = rng.standard_normal((1, i, 2)), rng.standard_normal((k, 2, 2))
    if o < 0:
        with pytest.raises(ConvtError, match="would have size"):
            conv_transpose(x, w, None, s, [(lo, hi)], dilations=d, output_padding=op)
        return
    got = conv_transpose(x, w, None, s, [(lo, hi)], dilations=d, output_padding=op)
    np.testing.assert_allclose(got, conv_transpose_loop(x, w, (o,), s, [(lo, hi)], False, d), rtol=1e-12, atol=1e-12)
