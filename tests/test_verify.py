"""verify_conv_transpose: the adjoint check, judged by what it passes and what it catches.

Matrix:
- passes, 100 of 100 seeds: TF's outputs and convt's, on 6 goldens each of float16, bfloat16, float32, float64
  (tests/golden/ct_*.npz); convt's outputs on 40 random configs (rank 1-3 x layout x SAME/VALID/explicit x
  strides 1-3 x dilations 1-3 x output size at either end of the legal range) in float64 and complex128;
  complex64, complex128 and int32; zero sizes.
- catches, with the default 8 probes: one element of a 524,288-element float32 output off by 1% of max|output|
  (at least 99 of 100 seeds); always (every seed tried): the output shifted one position along each spatial
  axis either way, the filter's channel axes swapped, the filter flipped (all axes or one), SAME's odd pad on
  the wrong side (from a loop), channels-first data read as channels-last (and back), in float32, float64,
  float16, bfloat16; a conjugated complex output, an off-by-one int32 element.
- the math: the documented probe stream rebuilt by hand gives the same a and b (b through the engine's conv);
  <OUT, x> = <IN, conv(x, conj W)> for complex data, and not without the conj; verify never calls
  conv_transpose; residuals do not depend on the data's scale or the problem's size; chunking does not change
  the result.
- the report: fields, the default tolerance formula, rtol, to_dict() through strict JSON, summary(),
  non-finite outputs counted and failed; errors (illegal output shape, output rank, dtypes, probes, seed, rtol).
"""

import glob
import json
import math
import os

import ml_dtypes
import numpy as np
import pytest

import convt_cli.verify as verify_module
from convt_cli import ConvtError, conv, conv_transpose
from convt_cli.shapes import plan_conv_transpose
from convt_cli.verify import VerifyReport, verify_conv_transpose
from conftest import GOLDEN_DIR, load_golden, random_shapes
from loop_reference import conv_transpose_loop

DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float64": np.float64}


def _golden_sample(dtype, count=6):
    """`count` conv_transpose goldens of one dtype with non-empty arrays, spread over the sorted list."""
    paths = sorted(glob.glob(os.path.join(GOLDEN_DIR, f"ct_*_{dtype}.npz")))
    usable = []
    for p in paths:
        with np.load(p, allow_pickle=False) as z:
            if json.loads(str(z["params"]))["op"] == "conv_transpose" and z["input"].size and z["output"].size:
                usable.append(p)
    if len(usable) <= count:
        return usable
    return [usable[round(j * (len(usable) - 1) / (count - 1))] for j in range(count)]


GOLDEN = [p for dtype in DTYPES for p in _golden_sample(dtype)]


def _normal(rng, shape, dtype):
    if np.dtype(dtype).kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def _passes(x, w, y, seeds, **flags):
    return sum(verify_conv_transpose(x, w, y, seed=seed, **flags).passed for seed in seeds)


# ---------------------------------------------------------------------------------------------------------
# Bar 1: right outputs pass.


@pytest.mark.parametrize("path", GOLDEN, ids=[os.path.basename(p)[:-4] for p in GOLDEN])
def test_tensorflow_and_convt_outputs_pass_every_seed(path):
    params, a = load_golden(path)
    flags = dict(strides=params["strides"], padding=params["padding"], data_format=params["data_format"],
                 dilations=params["dilations"])
    ours = conv_transpose(a["input"], a["filters"], a["output"].shape, **flags)
    assert _passes(a["input"], a["filters"], a["output"], range(100), **flags) == 100
    assert _passes(a["input"], a["filters"], ours, range(100), **flags) == 100


def test_golden_sample_covers_every_dtype():
    for dtype in DTYPES:
        assert len(_golden_sample(dtype)) >= 4, dtype


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("dtype", ["float64", "complex128"])
def test_convt_outputs_pass_and_a_wrong_element_fails(seed, dtype):
    x_shape, w_shape, out_sizes, flags = random_shapes(seed)
    rng = np.random.default_rng(seed)
    x, w = _normal(rng, x_shape, dtype), _normal(rng, w_shape, dtype)
    y = conv_transpose(x, w, out_sizes, **flags)
    assert _passes(x, w, y, range(5), **flags) == 5
    if y.size and np.abs(y).max() > 0:
        y.flat[int(rng.integers(y.size))] += 1e-3 * np.abs(y).max()
        assert _passes(x, w, y, range(5), **flags) == 0


@pytest.mark.parametrize("dtype", ["complex64", "complex128"])
def test_complex_outputs_pass_and_conjugated_or_imaginary_errors_fail(dtype):
    rng = np.random.default_rng(3)
    x, w = _normal(rng, (2, 3, 7, 6), dtype), _normal(rng, (3, 2, 5, 6), dtype)
    flags = dict(strides=(2, 1), padding="SAME")
    y = conv_transpose(x, w, **flags)
    assert _passes(x, w, y, range(100), **flags) == 100
    assert _passes(x, w, np.conj(y), range(20), **flags) == 0
    bad = y.copy()
    bad[1, 2, 3, 4] += 0.01j * np.abs(y).max()
    assert _passes(x, w, bad, range(20), **flags) == 0


def test_int32_exact_output_passes_and_off_by_one_fails():
    rng = np.random.default_rng(4)
    x = rng.integers(-9, 10, (2, 6, 6, 3)).astype(np.int32)
    w = rng.integers(-9, 10, (3, 3, 4, 3)).astype(np.int32)
    y = conv_transpose(x, w, strides=2)
    assert y.dtype == np.int32
    assert _passes(x, w, y, range(20), strides=2) == 20
    y[1, 5, 7, 2] += 1
    assert _passes(x, w, y, range(20), strides=2) == 0


def test_zero_sizes():
    x = np.zeros((0, 4, 3), np.float32)
    w = np.ones((3, 2, 3), np.float32)
    assert verify_conv_transpose(x, w, np.zeros((0, 8, 2), np.float32), strides=2).passed
    # input size 0 with VALID: the one legal output size is 2, and it must be all zeros
    x = np.ones((1, 0, 3), np.float32)
    report = verify_conv_transpose(x, w, np.zeros((1, 2, 2), np.float32), padding="VALID")
    assert report.passed and report.max_residual == 0
    assert not verify_conv_transpose(x, w, np.ones((1, 2, 2), np.float32), padding="VALID").passed


# ---------------------------------------------------------------------------------------------------------
# Bar 2: one element off by 1% of max|output| in half a million.


def test_one_element_off_by_one_percent_is_caught_in_99_of_100_seeds():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 32, 32, 32)).astype(np.float32)
    w = rng.standard_normal((3, 3, 64, 32)).astype(np.float32)
    y = conv_transpose(x, w, strides=2)
    assert y.size >= 500_000
    delta = np.float32(0.01 * np.abs(y).max())
    caught = 0
    for seed in range(100):
        j = int(np.random.default_rng([99, seed]).integers(y.size))
        right = y.flat[j]
        y.flat[j] = right + delta
        caught += not verify_conv_transpose(x, w, y, strides=2, seed=seed).passed
        y.flat[j] = right
    assert caught >= 99
    assert _passes(x, w, y, range(3), strides=2) == 3


# ---------------------------------------------------------------------------------------------------------
# Bar 3: systematic errors, always.

SYSTEMATIC = {
    "1d_nwc_s2_same": ((2, 9, 4), (3, 5, 4), dict(strides=2, padding="SAME")),
    "2d_nchw_s2x1_valid": ((2, 4, 6, 5), (3, 2, 5, 4), dict(strides=(2, 1), padding="VALID", data_format="NCHW")),
    "3d_ndhwc_d1x2x1_same": ((1, 3, 4, 3, 3), (2, 2, 3, 4, 3), dict(padding="SAME", dilations=(1, 2, 1))),
}
SEEDS = range(10)


def _systematic_case(name, dtype, seed=0):
    x_shape, w_shape, flags = SYSTEMATIC[name]
    rng = np.random.default_rng([11, seed])
    x, w = _normal(rng, x_shape, DTYPES[dtype]), _normal(rng, w_shape, DTYPES[dtype])
    return x, w, flags, conv_transpose(x, w, **flags)


def _shift(y, axis, step):
    """y moved `step` positions along `axis`, zero-filled."""
    out = np.zeros_like(y)
    src = [slice(None)] * y.ndim
    dst = [slice(None)] * y.ndim
    src[axis] = slice(0, y.shape[axis] - step) if step > 0 else slice(-step, None)
    dst[axis] = slice(step, None) if step > 0 else slice(0, y.shape[axis] + step)
    out[tuple(dst)] = y[tuple(src)]
    return out


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(SYSTEMATIC))
def test_shifted_output_is_always_caught(name, dtype):
    x, w, flags, y = _systematic_case(name, dtype)
    assert _passes(x, w, y, SEEDS, **flags) == len(SEEDS)
    first = flags.get("data_format", "").startswith("NC")
    spatial = range(2, y.ndim) if first else range(1, y.ndim - 1)
    for axis in spatial:
        for step in (1, -1):
            assert _passes(x, w, _shift(y, axis, step), SEEDS, **flags) == 0, (axis, step)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_swapped_filter_channels_are_always_caught(dtype):
    rng = np.random.default_rng(5)
    x, w = _normal(rng, (2, 5, 6, 4), DTYPES[dtype]), _normal(rng, (3, 3, 4, 4), DTYPES[dtype])
    y_bad = conv_transpose(x, np.swapaxes(w, -1, -2), strides=2)
    assert _passes(x, w, conv_transpose(x, w, strides=2), SEEDS, strides=2) == len(SEEDS)
    assert _passes(x, w, y_bad, SEEDS, strides=2) == 0


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(SYSTEMATIC))
def test_flipped_filter_is_always_caught(name, dtype):
    x, w, flags, _ = _systematic_case(name, dtype)
    n = w.ndim - 2
    flips = [tuple(range(n))] + [(j,) for j in range(n) if w.shape[j] > 1]
    for axes in flips:
        y_bad = conv_transpose(x, np.flip(w, axis=axes), **flags)
        assert _passes(x, w, y_bad, SEEDS, **flags) == 0, axes


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("first", [False, True])
def test_same_padding_split_on_the_wrong_side_is_always_caught(first, dtype):
    rng = np.random.default_rng(6)
    in_sizes, kernel, strides = (5, 4), (3, 2), (2, 1)
    x_shape = (2, 3, *in_sizes) if first else (2, *in_sizes, 3)
    x, w = _normal(rng, x_shape, DTYPES[dtype]), _normal(rng, (*kernel, 4, 3), DTYPES[dtype])
    out_sizes = [i * s for i, s in zip(in_sizes, strides)]
    # TF: total = (I-1)*s + K - O, lo = total // 2 (odd extra on the high side); here the extra goes low
    totals = [max(0, (i - 1) * s + k - o) for i, k, s, o in zip(in_sizes, kernel, strides, out_sizes)]
    assert all(t % 2 == 1 for t in totals)
    wrong = [(t - t // 2, t // 2) for t in totals]
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    y_bad = conv_transpose_loop(x64, w64, out_sizes, strides, wrong, channels_first=first).astype(x.dtype)
    y_right = conv_transpose_loop(x64, w64, out_sizes, strides, "SAME", channels_first=first).astype(x.dtype)
    flags = dict(strides=strides, padding="SAME", data_format="channels_first" if first else None)
    assert _passes(x, w, y_right, SEEDS, **flags) == len(SEEDS)
    assert _passes(x, w, y_bad, SEEDS, **flags) == 0


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("stride", [1, 2])
def test_channels_first_read_as_channels_last_is_always_caught(stride, n, dtype):
    # every spatial size equals the input channels c and out_channels = stride * c, so both readings of the
    # array are legal and give outputs of the same shape
    c = 4 if n < 3 else 3
    rng = np.random.default_rng([8, n, stride])
    x = _normal(rng, (2, *([c] * (n + 1))), DTYPES[dtype])
    w = _normal(rng, (*([2] * n), stride * c, c), DTYPES[dtype])
    for right_format, wrong_format in (("channels_first", "channels_last"), ("channels_last", "channels_first")):
        flags = dict(strides=stride, data_format=right_format)
        y_right = conv_transpose(x, w, **flags)
        y_bad = conv_transpose(x, w, strides=stride, data_format=wrong_format)
        assert y_bad.shape == y_right.shape
        assert _passes(x, w, y_right, SEEDS, **flags) == len(SEEDS)
        assert _passes(x, w, y_bad, SEEDS, **flags) == 0, right_format


# ---------------------------------------------------------------------------------------------------------
# The math.


def _splitmix_words(parts, n):
    """The documented stream, in plain Python ints: key = 0, key = mix(key + (part + 1) * G) per part; word j =
    mix(key + (j + 1) * G), all mod 2**64."""
    mask, golden = (1 << 64) - 1, 0x9E3779B97F4A7C15

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    key = 0
    for part in parts:
        key = mix((key + (part + 1) * golden) & mask)
    return [mix((key + (j + 1) * golden) & mask) for j in range(n)]


def _hand_normals(parts, count, complex_probes):
    n = count * (2 if complex_probes else 1)
    words = _splitmix_words(parts, 2 * n)
    u = [((word >> 11) + 0.5) / 2**53 for word in words]
    g = [math.sqrt(-2 * math.log(u[2 * j])) * math.cos(2 * math.pi * u[2 * j + 1]) for j in range(n)]
    return g if not complex_probes else [(g[2 * j] + 1j * g[2 * j + 1]) / math.sqrt(2) for j in range(count)]


def _hand_signs(parts, count, complex_probes):
    n = count * (2 if complex_probes else 1)
    words = _splitmix_words(parts, -(-n // 64))
    bits = [(words[j // 64] >> (j % 64)) & 1 for j in range(n)]
    if not complex_probes:
        return [1 - 2 * bit for bit in bits]
    return [(1, -1, 1j, -1j)[bits[2 * j] + 2 * bits[2 * j + 1]] for j in range(count)]


@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64", "complex128"])
def test_documented_probe_stream_rebuilt_by_hand(dtype, first, monkeypatch):
    """v from the normals of stream (seed, 0), u of tile m of batch element b from the signs of (seed, 1, b, m),
    rebuilt in plain Python; each tile's a, b and S^2 from the whole probe restricted to the tile."""
    rng = np.random.default_rng(9)
    flags = dict(strides=(2, 3), padding=[(1, 0), (2, 1)], dilations=(1, 2),
                 data_format="NCHW" if first else "NHWC")
    x = _normal(rng, (3, 2, 4, 3) if first else (3, 4, 3, 2), dtype)
    w = _normal(rng, (2, 3, 5, 2), dtype)
    y = conv_transpose(x, w, **flags)
    out_spatial = y.shape[2:] if first else y.shape[1:-1]
    seed, k = 17, 3
    monkeypatch.setattr(verify_module, "TILE_VALUES", 5 * 6)  # 6 positions of 5 channels: several tiles
    report = verify_conv_transpose(x, w, y, probes=k, seed=seed, **flags)
    plan = plan_conv_transpose(x.shape, w.shape, y.shape, **flags)
    blocks = verify_module.tile_sizes(plan, k)
    grid = [-(-n // size) for n, size in zip(out_spatial, blocks)]
    assert math.prod(grid) > 1 and report.tile_count == 3 * math.prod(grid)

    cplx = dtype.startswith("complex")
    v = np.array(_hand_normals([seed, 0], k * 5, cplx)).reshape(k, 5)
    if dtype == "float32":
        v = v.astype(np.float32).astype(np.float64)
    u = np.zeros((3, k, *out_spatial), complex if cplx else float)  # (batch, K, *out_spatial)
    for b in range(3):
        for m, where in enumerate(np.ndindex(*grid)):
            box = tuple(slice(j * size, min((j + 1) * size, n)) for j, size, n in zip(where, blocks, out_spatial))
            shape = tuple(sl.stop - sl.start for sl in box)
            u[(b, slice(None), *box)] = np.array(_hand_signs([seed, 1, b, m], k * math.prod(shape), cplx)
                                                 ).reshape(k, *shape)
    q = conv_transpose(np.abs(x).astype(np.float64) ** 2, np.abs(w).astype(np.float64) ** 2, y.shape, **flags)
    x64, w64, y64 = (a.astype(np.complex128 if cplx else np.float64) for a in (x, w, y))
    for j, probe in enumerate(report.probes):
        if first:
            probe_field = u[:, j][:, None] * v[j][None, :, None, None]
        else:
            probe_field = u[:, j][..., None] * v[j]
        a = np.vdot(y64, probe_field)
        b = np.vdot(x64, conv(probe_field, np.conj(w64), **flags))
        scale = math.sqrt(np.sum(np.abs(probe_field) ** 2 * (np.abs(y64) ** 2 + q)))
        rel = 1e-5 if dtype == "float32" else 1e-12
        assert probe.a == pytest.approx(a, rel=rel, abs=rel * scale)
        assert probe.b == pytest.approx(b, rel=rel, abs=rel * scale)
        assert probe.scale == pytest.approx(scale, rel=1e-5)
        assert probe.residual == abs(probe.a - probe.b) / probe.scale


def test_complex_adjoint_identity_needs_the_conjugated_filter():
    rng = np.random.default_rng(10)
    flags = dict(strides=2, padding="SAME")
    x, w = _normal(rng, (2, 5, 5, 3), np.complex128), _normal(rng, (3, 3, 4, 3), np.complex128)
    y = conv_transpose(x, w, **flags)
    probe = _normal(rng, y.shape, np.complex128)
    a = np.vdot(y, probe)  # <p, q> = sum(conj(p) * q)
    assert np.vdot(x, conv(probe, np.conj(w), **flags)) == pytest.approx(a, rel=1e-12)
    assert abs(np.vdot(x, conv(probe, w, **flags)) - a) > 0.1 * abs(a)


def test_residual_does_not_depend_on_scale():
    rng = np.random.default_rng(13)
    x, w = _normal(rng, (2, 6, 6, 3), np.float64), _normal(rng, (3, 3, 4, 3), np.float64)
    y_bad = conv_transpose(x, w, strides=2) * (1 + 1e-6)
    base = verify_conv_transpose(x, w, y_bad, strides=2)
    scaled = verify_conv_transpose(x * 1e3, w * 1e-5, y_bad * 1e-2, strides=2)
    for p, q in zip(base.probes, scaled.probes):
        assert q.residual == pytest.approx(p.residual, rel=1e-6)


def test_residual_does_not_depend_on_size():
    # every element off by a random 1e-6 relative error: the residual stays near 1e-6 / sqrt(2) at any size
    medians = []
    for shape in ((1, 8, 8, 4), (16, 32, 32, 4)):
        rng = np.random.default_rng(14)
        x, w = _normal(rng, shape, np.float64), _normal(rng, (3, 3, 4, 4), np.float64)
        y = conv_transpose(x, w, strides=2)
        y *= 1 + 1e-6 * rng.standard_normal(y.shape)
        residuals = [p.residual for seed in range(10) for p in verify_conv_transpose(x, w, y, seed=seed,
                                                                                    strides=2).probes]
        medians.append(np.median(residuals))
    assert all(2e-7 < m < 1.5e-6 for m in medians), medians
    assert 0.5 < medians[0] / medians[1] < 2


def test_cancelling_terms_do_not_fail_a_right_output():
    # the two input channels nearly cancel, so |OUT| is ~1e-3 of its terms and float32 rounding, relative to
    # |OUT|, is ~1e-4: the scale's Q term (the terms' own size) keeps that within tolerance
    rng = np.random.default_rng(22)
    x0 = rng.standard_normal((2, 16, 16, 1))
    x = np.concatenate([x0, x0 + 1e-3 * rng.standard_normal(x0.shape)], axis=-1).astype(np.float32)
    w0 = rng.standard_normal((3, 3, 8, 1))
    w = np.concatenate([w0, -w0], axis=-1).astype(np.float32)
    y = conv_transpose(x, w, strides=2)
    report = verify_conv_transpose(x, w, y, strides=2)
    assert report.passed, report.summary()
    relative = np.abs(y - conv_transpose(x.astype(np.float64), w.astype(np.float64), strides=2))
    assert np.median(relative / np.abs(y)) > 10 * report.tolerance  # the output itself is that inexact


def test_chunks_their_order_and_threads_do_not_change_a_bit(monkeypatch):
    from convt_cli.shapes import plan_conv_transpose
    from convt_cli.verify import AdjointCheck

    rng = np.random.default_rng(15)
    flags = dict(strides=2, padding="SAME", data_format="NCHW")
    x, w = _normal(rng, (5, 3, 6, 7), np.float64), _normal(rng, (3, 2, 4, 3), np.float64)
    y = conv_transpose(x, w, **flags)
    y[3, 1, 4, 5] += 1e-9  # a failing tile too
    whole = verify_conv_transpose(x, w, y, seed=1, threads=1, **flags)
    plan = plan_conv_transpose(x.shape, w.shape, y.shape, **flags)
    check = AdjointCheck(plan, w, "float64", seed=1, threads=2)
    for b in (3, 0, 4, 1, 2):
        check.add(x[b : b + 1], y[b : b + 1], batch_offset=b)
    pieces = check.report()
    assert pieces.probes == whole.probes and pieces.failing_tiles == whole.failing_tiles
    assert whole.failing_tiles and not whole.passed
    monkeypatch.setattr(verify_module, "PRODUCT_VALUES", 1)  # one kernel row per GEMM: other sums, same value
    rows = verify_conv_transpose(x, w, y, seed=1, **flags)
    for p, q in zip(whole.probes, rows.probes):
        assert q.a == p.a and q.b == pytest.approx(p.b, rel=1e-13)


def test_seed_reproduces_and_changes_the_probes():
    rng = np.random.default_rng(16)
    x, w = _normal(rng, (2, 5, 3), np.float32), _normal(rng, (3, 4, 3), np.float32)
    y = conv_transpose(x, w)
    assert verify_conv_transpose(x, w, y, seed=5) == verify_conv_transpose(x, w, y, seed=5)
    assert verify_conv_transpose(x, w, y, seed=5).probes != verify_conv_transpose(x, w, y, seed=6).probes


# ---------------------------------------------------------------------------------------------------------
# The report.


def _float32_case():
    rng = np.random.default_rng(20)
    x, w = _normal(rng, (2, 5, 5, 6), np.float32), _normal(rng, (4, 3, 7, 6), np.float32)
    return x, w, conv_transpose(x, w, strides=(2, 3), padding="VALID")


def test_report_fields_and_default_tolerance():
    x, w, y = _float32_case()
    report = verify_conv_transpose(x, w, y, strides=(2, 3), padding="VALID", seed=3)
    assert isinstance(report, VerifyReport)
    assert report.passed
    assert report.seed == 3
    assert report.dtype == "float32"
    assert report.probe_count == len(report.probes) == 8
    assert report.nonfinite_output == 0
    assert report.output_shape == y.shape == (2, 12, 15, 7)
    assert report.tolerance_is_default
    # per output element: 6 channels x ceil(4/2) x ceil(3/3) taps
    assert report.terms_per_output == 12
    eps = 2.0**-23
    assert report.tolerance == pytest.approx(4 * (eps + eps * math.sqrt(12) + 2.0**-52 * math.sqrt(7)))
    for p in report.probes:
        assert isinstance(p.a, float) and isinstance(p.b, float)
        assert p.scale > 0 and p.residual == abs(p.a - p.b) / p.scale
        assert 0 <= p.residual <= report.tolerance
    assert report.max_residual == max(p.residual for p in report.probes)
    with pytest.raises(AttributeError):
        report.passed = False  # frozen


@pytest.mark.parametrize("dtype, eps_out, eps_acc", [
    ("float16", 2.0**-10, 2.0**-23), ("bfloat16", 2.0**-7, 2.0**-23), ("float64", 2.0**-52, 2.0**-52),
    ("int32", 0.0, 2.0**-52), ("complex64", 2.0**-23, 2.0**-23),
])
def test_default_tolerance_per_dtype(dtype, eps_out, eps_acc):
    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    x, w = np.ones((1, 4, 4, 5), dt), np.ones((3, 3, 2, 5), dt)
    y = conv_transpose(x, w, strides=1)
    report = verify_conv_transpose(x, w, y)
    assert report.terms_per_output == 45
    assert report.tolerance == pytest.approx(4 * (eps_out + eps_acc * math.sqrt(45) + 2.0**-52 * math.sqrt(2)))
    assert report.passed


def test_rtol_overrides_the_tolerance():
    x, w, y = _float32_case()
    flags = dict(strides=(2, 3), padding="VALID")
    y_bad = y.copy()
    y_bad[0, 3, 4, 5] += 0.05 * np.abs(y).max()
    assert not verify_conv_transpose(x, w, y_bad, **flags).passed
    loose = verify_conv_transpose(x, w, y_bad, rtol=10.0, **flags)
    assert loose.passed and loose.tolerance == 10.0 and not loose.tolerance_is_default
    exact = verify_conv_transpose(x, w, y_bad, rtol=0, **flags)
    assert not exact.passed and exact.tolerance == 0.0
    for bad in (-1e-3, math.nan, math.inf, "1e-3", True):
        with pytest.raises(ConvtError, match="rtol must be a finite number >= 0"):
            verify_conv_transpose(x, w, y, rtol=bad, **flags)


@pytest.mark.parametrize("dtype", ["float32", "complex64"])
def test_to_dict_is_strict_json(dtype):
    rng = np.random.default_rng(21)
    x, w = _normal(rng, (1, 4, 3), dtype), _normal(rng, (2, 2, 3), dtype)
    y = conv_transpose(x, w)
    report = verify_conv_transpose(x, w, y, probes=3)
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert d["passed"] is True
    assert d["dtype"] == dtype and d["seed"] == 0 and d["probe_count"] == 3 and d["nonfinite_output"] == 0
    assert d["output_shape"] == [1, 4, 2]
    assert d["tolerance"] == report.tolerance and d["max_residual"] == report.max_residual
    assert [p["residual"] for p in d["probes"]] == [p.residual for p in report.probes]
    assert [p["scale"] for p in d["probes"]] == [p.scale for p in report.probes]
    if dtype == "complex64":
        assert d["probes"][0]["a"] == [report.probes[0].a.real, report.probes[0].a.imag]
    else:
        assert d["probes"][0]["b"] == report.probes[0].b


def test_nonfinite_output_is_counted_and_fails():
    x, w, y = _float32_case()
    flags = dict(strides=(2, 3), padding="VALID")
    y[0, 0, 0, 0], y[1, 2, 3, 4], y[1, 11, 14, 6] = np.nan, np.inf, -np.inf
    report = verify_conv_transpose(x, w, y, **flags)
    assert not report.passed
    assert report.nonfinite_output == 3
    assert report.probes == ()
    assert report.summary().startswith("FAIL: the output holds 3 non-finite values (inf or nan); wrong in batch "
                                       "elements 0 and 1 of 2")
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert d["nonfinite_output"] == 3 and d["max_residual"] is None and d["probes"] == []
    assert d["tile_count"] == 2 and [t["batch"] for t in d["failing_tiles"]] == [0, 1]


def test_nonfinite_values_are_located_by_tile(monkeypatch):
    monkeypatch.setattr(verify_module, "TILE_VALUES", 7 * 12)  # 12 positions of 7 channels
    x, w, y = _float32_case()
    flags = dict(strides=(2, 3), padding="VALID")
    y[1, 9, 13, 2] = np.nan
    report = verify_conv_transpose(x, w, y, **flags)
    assert report.nonfinite_output == 1 and report.tile_count > 2
    [tile] = report.failing_tiles
    assert tile.batch == 1 and all(lo <= p < hi for p, (lo, hi) in zip((9, 13), tile.box)), tile


def test_outputs_in_the_subnormal_range_pass_when_right():
    """Below the dtype's smallest normal value rounding is a fixed step, not a relative one: S counts every value
    as at least that size. Outputs rounded exactly from float64, and convt's own, pass; a wrong one fails."""
    for dtype, size in (("float16", 2e-6), ("float16", 3e-5), ("float32", 3e-40), ("float32", 3e-39)):
        for seed in range(10):
            rng = np.random.default_rng([31, seed])
            x = rng.standard_normal((2, 8, 8, 4)).astype(dtype)
            w64 = rng.standard_normal((3, 3, 3, 4))
            w64 *= size / np.abs(conv_transpose(x.astype(np.float64), w64, strides=2)).max()
            w = w64.astype(dtype)
            exact = conv_transpose(x.astype(np.float64), w.astype(np.float64), strides=2).astype(dtype)
            for y in (exact, conv_transpose(x, w, strides=2)):
                report = verify_conv_transpose(x, w, y, strides=2, seed=seed)
                assert report.passed, (dtype, size, seed, report.summary())
            bad = exact.copy()
            bad[1, 3, 3, 1] = 4 * np.abs(exact).max()
            assert not verify_conv_transpose(x, w, bad, strides=2, seed=seed).passed


def test_float16_overflow_is_reported_as_nonfinite():
    x, w = np.full((1, 3, 2), 200, np.float16), np.full((3, 1, 2), 100, np.float16)
    with np.errstate(over="ignore"):
        y = conv_transpose(x, w)  # 200 * 100 * 2 channels * up to 3 taps > 65504
    report = verify_conv_transpose(x, w, y)
    assert not report.passed and report.nonfinite_output == np.count_nonzero(np.isinf(y)) > 0


def test_summary_lines():
    x, w, y = _float32_case()
    flags = dict(strides=(2, 3), padding="VALID")
    good = verify_conv_transpose(x, w, y, **flags).summary()
    assert good.startswith("PASS: max residual ") and "(8 probes, float32 output (2, 12, 15, 7), seed 0)" in good
    bad = verify_conv_transpose(x, w, -y, **flags).summary()
    assert bad.startswith("FAIL: max residual ") and "in 8 of 8 probes" in bad
    assert "\n" not in good + bad


# ---------------------------------------------------------------------------------------------------------
# Errors.


def test_illegal_output_shape_raises_naming_output_shape():
    x, w = np.ones((1, 5, 5, 2), np.float32), np.ones((3, 3, 3, 2), np.float32)
    with pytest.raises(ConvtError, match=r"output_shape\[1\]=11 is not reachable .* legal sizes are 9\.\.10"):
        verify_conv_transpose(x, w, np.zeros((1, 11, 10, 3), np.float32), strides=2)
    with pytest.raises(ConvtError, match=r"output_shape\[3\]=4 \(channels\) must equal filters.shape\[-2\]=3"):
        verify_conv_transpose(x, w, np.zeros((1, 10, 10, 4), np.float32), strides=2)
    with pytest.raises(ConvtError, match=r"verify: output_shape \(10, 10\) must have rank 4 like the input"):
        verify_conv_transpose(x, w, np.zeros((10, 10), np.float32), strides=2)


def test_dtype_mismatch_raises():
    x, w = np.ones((1, 5, 5, 2), np.float32), np.ones((3, 3, 3, 2), np.float32)
    y = np.zeros((1, 10, 10, 3), np.float32)
    with pytest.raises(ConvtError, match="verify: output dtype float64 must match the input and filters dtype "
                                         "float32"):
        verify_conv_transpose(x, w, y.astype(np.float64), strides=2)
    with pytest.raises(ConvtError, match="input and filters must share a dtype"):
        verify_conv_transpose(x, w.astype(np.float16), y, strides=2)
    with pytest.raises(ConvtError, match="input dtype uint8 is not supported"):
        verify_conv_transpose(x.astype(np.uint8), w, y, strides=2)


def test_bad_probes_and_seed_raise():
    x, w, y = _float32_case()
    flags = dict(strides=(2, 3), padding="VALID")
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ConvtError, match="verify: probes must be an integer >= 1"):
            verify_conv_transpose(x, w, y, probes=bad, **flags)
    for bad in (-1, 1.5, None):
        with pytest.raises(ConvtError, match="verify: seed must be an integer >= 0"):
            verify_conv_transpose(x, w, y, seed=bad, **flags)
    assert len(verify_conv_transpose(x, w, y, probes=1, **flags).probes) == 1


def test_chunked_check_equals_the_whole_check_exactly():
    from convt_cli.shapes import plan_conv_transpose
    from convt_cli.verify import AdjointCheck

    rng = np.random.default_rng(8)
    x = rng.standard_normal((7, 5, 6, 4)).astype(np.float32)
    w = rng.standard_normal((3, 3, 5, 4)).astype(np.float32)
    y = conv_transpose(x, w, strides=2)
    whole = verify_conv_transpose(x, w, y, strides=2, seed=11)
    plan = plan_conv_transpose(x.shape, w.shape, y.shape, strides=2)
    check = AdjointCheck(plan, w, "float32", seed=11)
    for b0 in (4, 0, 3):  # out of order, uneven
        b1 = {4: 7, 0: 3, 3: 4}[b0]
        check.add(x[b0:b1], y[b0:b1], batch_offset=b0)
    chunked = check.report()
    assert whole.passed and chunked == whole
    y[5, 2, 3, 1] += 0.05 * np.abs(y).max()
    check = AdjointCheck(plan, w, "float32", seed=11)
    check.add(x[:5], y[:5])
    check.add(x[5:], y[5:], batch_offset=5)
    assert not check.report().passed


@pytest.mark.parametrize("dtype, exponent", [(d, e) for d in ("float32", "complex64") for e in (-120, -60, 0, 60, 118)]
                         + [("float64", e) for e in (-1000, -300, 0, 300, 1000)])
def test_data_near_the_ends_of_its_dtype_is_checked_as_well(dtype, exponent):
    """Values scaled by 2**exponent (exactly): sums of squares that would overflow or underflow in float32 send the
    tile down the careful path (scaled, and float64 where float32 cannot hold it); the verdicts stay the same."""
    rng = np.random.default_rng(30)
    x = (_normal(rng, (2, 9, 9, 3), dtype) * 2.0**exponent).astype(dtype)
    w = _normal(rng, (3, 3, 4, 3), dtype)
    y = conv_transpose(x, w, strides=2)
    assert np.isfinite(y).all() and np.abs(y).max() > 0
    report = verify_conv_transpose(x, w, y, strides=2)
    assert report.passed, report.summary()
    bad = y.copy()
    bad[1, 7, 3, 2] += 0.01 * np.abs(y).max()
    report = verify_conv_transpose(x, w, bad, strides=2)
    assert not report.passed and [t.batch for t in report.failing_tiles] == [1], report.summary()


@pytest.mark.parametrize("case", ["inf and -inf", "1.5e308", "big input, tiny filters", "tiny input, big filters",
                                  "float64 subnormal", "float32 filters 2**166 wide"])
def test_values_at_the_edges_give_a_verdict_not_a_crash(case, monkeypatch):
    """Each found by a review: a correct output passes (or, with inf - inf, fails as nan) and one wrong value
    fails."""
    x, w, flags = np.full((1, 8, 1), 1e155), np.full((3, 2, 1), 1e-155), dict(strides=1)
    if case == "inf and -inf":
        x = np.ones((2, 8, 1))
        x[0, 1], x[1, 1] = np.inf, -np.inf
        report = verify_conv_transpose(x, np.ones((1, 1, 1)), np.ones((2, 8, 1)), padding="VALID")
        assert not report.passed and "residual is nan" in report.summary()
        return
    if case == "1.5e308":
        x = np.full((2, 8, 1), 1.5e308)
        x[1] *= -1
        w, flags = np.ones((1, 1, 1)), dict(padding="VALID")
    elif case == "tiny input, big filters":
        x, w = np.full((1, 8, 3), 1e-155), np.full((3, 2, 3), 1e155)
    elif case == "float64 subnormal":
        rng = np.random.default_rng(0)
        x, w = rng.standard_normal((1, 16, 4)) * 2.0**-1000, rng.standard_normal((3, 4, 4)) * 2.0**-60
        flags = dict(strides=2)
    elif case == "float32 filters 2**166 wide":
        monkeypatch.setattr(verify_module, "TILE_VALUES", 4)
        x = np.zeros((1, 8, 2), np.float32)
        x[0, :4, 0], x[0, :, 1] = 1, 1
        w = np.zeros((1, 1, 2), np.float32)
        w[0, 0, 0], w[0, 0, 1] = 1e30, 1e-20
        flags = dict(padding="VALID")
    y = conv_transpose(x, w, **flags) if case != "1.5e308" else x.copy()
    report = verify_conv_transpose(x, w, y, **flags)
    assert report.passed, report.summary()
    bad = y.copy()
    bad[0, 3, 0] = bad[0, 3, 0] * 1.01 if bad[0, 3, 0] else 1e-300
    assert not verify_conv_transpose(x, w, bad, **flags).passed


def test_the_working_space_stays_within_its_estimate_for_a_large_kernel():
    """A 3-D image with a 5x5x5 kernel: a tile's arrays, not a mask per tap and window position, and nothing kept
    from one tile to the next (tracemalloc counts NumPy's allocations)."""
    import tracemalloc

    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 40, 40, 40, 1)).astype(np.float32)
    w = rng.standard_normal((5, 5, 5, 1, 1)).astype(np.float32)
    y = conv_transpose(x, w)
    plan = plan_conv_transpose(x.shape, w.shape, y.shape)
    tracemalloc.start()
    try:
        check = verify_module.AdjointCheck(plan, w, "float32", threads=1)
        check.add(x, y)
        _, peak = tracemalloc.get_traced_memory()
        kept, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert check.report().passed
    assert peak <= 1.5 * verify_module.work_bytes(plan, "float32", threads=1), peak
    assert kept < 1 << 20, kept
