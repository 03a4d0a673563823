"""Zero-size arrays: convt accepts the output shapes TensorFlow accepts, and computes what TF returns.

Matrix: every case of tests/golden/zero_size_cases.json (made by tests/golden/zero_size_tf.py with
tensorflow-cpu 2.21, float32 and float64 agreeing): N = 1, 2, 3 channels-last; zero-size batch, first spatial
axis, every spatial axis, input channels, output channels and mixes; kernels 1-3, strides 1-3; SAME, VALID and
2-D explicit pads; the empty axis's output size swept over 0 .. its legal top + 2 and 100, and another axis
off its range. Where TF returns, convt returns zeros of that shape; where TF refuses an output size, convt
refuses it naming the same output_shape entry. Where convt differs on purpose (each asserted below):
out_channels 0 (TF's CPU kernels refuse, convt returns the empty array), TF 2.21's 3-D kernels crashing
(convt returns zeros), kernel size 0 (TF's answer depends on the dtype; convt refuses). Plus `convt shape`
and `convt run` on a file with an empty axis.
"""

import json
import os

import numpy as np
import pytest

from conftest import GOLDEN_DIR, invoke, legal_range
from convt_cli import ConvtError, conv_transpose

with open(os.path.join(GOLDEN_DIR, "zero_size_cases.json")) as f:
    TF = json.load(f)

RETURNED = ("zeros", "empty")
CASES = TF["cases"]


def _id(case):
    xs, fs, out, strides, padding, verdict, _ = case
    pad = padding if isinstance(padding, str) else "x".join(f"{lo}-{hi}" for lo, hi in padding)
    return f"x{xs}-f{fs}-o{out}-s{strides[0]}-{pad}-{verdict}".replace(" ", "")


def _run(xs, fs, out, strides, padding, dtype=np.float32):
    return conv_transpose(np.ones(xs, dtype), np.ones(fs, dtype), out, strides, padding)


def test_the_tf_record_covers_each_verdict_and_rank():
    seen = {(len(c[0]) - 2, c[5]) for c in CASES}
    for n in (1, 2, 3):
        assert {(n, v) for v in ("zeros", "empty", "size", "negative", "depth")} <= seen
    assert (3, "crash") in seen and len(CASES) > 2000
    # the claim that TF takes any output_shape once an input axis is empty: TF refuses these
    refused = {(tuple(c[0]), tuple(c[2]), c[4]): c[5] for c in CASES if isinstance(c[4], str)}
    assert refused[(2, 0, 3, 3), (2, 100, 6, 4), "SAME"] == "size"
    assert refused[(2, 0, 3, 3), (2, 100, 4, 4), "VALID"] == "size"


@pytest.mark.parametrize("case", [c for c in CASES if c[5] in RETURNED], ids=_id)
def test_what_tf_returns_convt_returns_as_zeros(case):
    xs, fs, out, strides, padding, verdict, _ = case
    for dtype in (np.float32, np.float64):
        y = _run(xs, fs, out, strides, padding, dtype)
        assert y.shape == tuple(out) and y.dtype == dtype
        assert not y.any()
        assert (y.size == 0) == (verdict == "empty")


@pytest.mark.parametrize("case", [c for c in CASES if c[5] in ("size", "negative")], ids=_id)
def test_an_output_size_tf_refuses_is_refused_naming_the_same_entry(case):
    xs, fs, out, strides, padding, _, axis = case
    with pytest.raises(ConvtError) as e:
        _run(xs, fs, out, strides, padding)
    assert str(e.value).startswith(f"conv_transpose: output_shape[{axis}]={out[axis]} is not reachable from "
                                   f"input size {xs[axis]} with kernel {fs[axis - 1]}, stride {strides[0]}, "), e.value


@pytest.mark.parametrize("case", [c for c in CASES if c[5] in ("batch", "channels")], ids=_id)
def test_a_batch_or_channel_entry_tf_refuses_is_refused(case):
    xs, fs, out, strides, padding, verdict, _ = case
    entry = 0 if verdict == "batch" else len(out) - 1
    with pytest.raises(ConvtError, match=rf"^conv_transpose: output_shape\[{entry}\]={out[entry]} "):
        _run(xs, fs, out, strides, padding)


@pytest.mark.parametrize("case", [c for c in CASES if c[5] == "crash"], ids=_id)
def test_where_tf_crashes_convt_returns_zeros(case):
    # TF 2.21's 3-D CPU kernels kill the process (SIGSEGV; SIGFPE with 0 input channels) on these: empty input,
    # non-empty output of a size TF's own rule takes (1-D and 2-D return zeros for the same)
    xs, fs, out, strides, padding, _, _ = case
    y = _run(xs, fs, out, strides, padding)
    assert y.shape == tuple(out) and y.size > 0 and not y.any()


@pytest.mark.parametrize("case", [c for c in CASES if c[5] == "depth"], ids=_id)
def test_zero_output_channels_give_an_empty_array_where_tf_refuses(case):
    # TF's CPU kernels refuse filters.shape[-2] == 0 whatever the sizes ("filter depth must be strictly greated
    # than zero", a guard of its grouped-conv division); convt applies the size rule and returns (..., 0)
    xs, fs, out, strides, padding, _, _ = case
    legal = all(lo <= o <= hi for o, (lo, hi) in
                zip(out[1:-1], (legal_range(i, k, s, 1, padding) for i, k, s in zip(xs[1:-1], fs, strides))))
    if legal:
        assert _run(xs, fs, out, strides, padding).shape == tuple(out)
    else:
        with pytest.raises(ConvtError, match=r"^conv_transpose: output_shape\[\d\]=\d+ is not reachable"):
            _run(xs, fs, out, strides, padding)


@pytest.mark.parametrize("case", TF["kernel_zero"], ids=lambda c: f"x{c[0]}-f{c[1]}-o{c[2]}-{c[3]}".replace(" ", ""))
def test_a_zero_kernel_size_is_refused_where_tf_depends_on_the_dtype(case):
    xs, fs, out, padding, by_dtype = case
    assert by_dtype["float32"] != "zeros" or by_dtype["float64"] != "zeros"  # TF's record: never zeros in both
    with pytest.raises(ConvtError, match=r"^conv_transpose: filters.shape\[0\]=0: kernel sizes must be >= 1"):
        _run(xs, fs, out, [1] * (len(xs) - 2), padding)


def test_shape_lists_the_legal_sizes_of_an_empty_axis(tmp_path, monkeypatch):
    # VALID, I=0, K=3, s=2: TF's truncating division takes O = 0..2 (the "Computed output size would be
    # negative" refusal starts below 0); SAME, I=0: only 0
    monkeypatch.chdir(tmp_path)
    np.save("x.npy", np.ones((2, 0, 5, 3), np.float32))
    np.save("w.npy", np.ones((3, 3, 4, 3), np.float32))
    r = invoke("shape", "x.npy", "w.npy", "--padding", "valid", "--strides", "2", "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.output)
    assert plan["legal_output_sizes"] == [[0, 2], [11, 12]] and plan["output_shape"] == [2, 1, 11, 4]
    r = invoke("shape", "x.npy", "w.npy", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["legal_output_sizes"] == [[0, 0], [5, 5]]
    r = invoke("run", "x.npy", "w.npy", "--padding", "valid", "--strides", "2", "--output-shape", "2,0,12,4",
               "-o", "y.npy")
    assert r.exit_code == 0, r.output
    y = np.load("y.npy")
    assert y.shape == (2, 0, 12, 4)
    r = invoke("run", "x.npy", "w.npy", "--output-shape", "2,100,10,4", "-o", "z.npy")
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1] == (
        "Error: INPUT 'x.npy': conv_transpose: output_shape[1]=100 is not reachable from input size 0 with kernel "
        "3, stride 1, dilation 1, padding SAME: legal sizes are 0..0 (SAME needs (I-1)*s+1 <= O <= I*s)")
