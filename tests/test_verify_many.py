"""`convt verify` over many tensors, as `run` makes them: a glob with an OUTPUT template, an HDF5 group to an
HDF5 group, and either without OUTPUT (computed and checked). Matrix: all pass (exit 0), one corrupted (exit 1,
the others still reported), one missing (exit 2 over 1), --json lines, Ctrl-C between items."""

import json
import os

import h5py
import numpy as np
import pytest

from conftest import invoke


@pytest.fixture
def made(work):
    """in/a.npy, in/b.npy, in/c.npy and their outputs out/{stem}.npy, made by `convt run` at stride 2."""
    rng = np.random.default_rng(5)
    os.mkdir("in")
    os.mkdir("out")
    for stem in "abc":
        np.save(f"in/{stem}.npy", rng.standard_normal((2, 5, 6, 3)).astype(np.float32))
    assert invoke("run", "in/*.npy", "w.npy", "--strides", "2", "-o", "out/{stem}.npy").exit_code == 0


def _corrupt(path):
    y = np.load(path)
    y[1, 3, 4, 2] += 0.05 * np.abs(y).max()
    np.save(path, y)


def test_every_item_passes(made):
    r = invoke("verify", "in/*.npy", "w.npy", "out/{stem}.npy", "--strides", "2")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert [line.split(": ")[0] for line in lines] == ["out/a.npy", "out/b.npy", "out/c.npy"]
    assert all(line.split(": ")[1].startswith("PASS") for line in lines)


def test_a_corrupted_item_fails_and_the_others_are_still_reported(made):
    _corrupt("out/b.npy")
    r = invoke("verify", "in/*.npy", "w.npy", "out/{stem}.npy", "--strides", "2")
    assert r.exit_code == 1 and r.stderr == ""
    verdicts = [line.split(": ")[1][:4] for line in r.stdout.splitlines()]
    assert verdicts == ["PASS", "FAIL", "PASS"]


def test_trouble_with_one_item_is_exit_2_even_when_another_fails(made):
    _corrupt("out/a.npy")
    os.remove("out/c.npy")
    r = invoke("verify", "in/*.npy", "w.npy", "out/{stem}.npy", "--strides", "2", "--json")
    assert r.exit_code == 2
    assert r.stderr == "Error: OUTPUT 'out/c.npy': no such file\n"
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(d["input"], d.get("passed")) for d in lines] == [("in/a.npy", False), ("in/b.npy", True),
                                                               ("in/c.npy", None)]
    assert lines[2] == {"input": "in/c.npy", "output": "out/c.npy", "error": "OUTPUT 'out/c.npy': no such file"}
    assert lines[0]["output"] == "out/a.npy" and lines[0]["summary"].startswith("FAIL")


def test_without_output_each_item_is_computed_and_checked(made):
    r = invoke("verify", "in/*.npy", "w.npy", "--strides", "2")
    assert r.exit_code == 0, r.output
    assert [line.split(": ")[0] for line in r.stdout.splitlines()] == [
        "in/a.npy (computed)", "in/b.npy (computed)", "in/c.npy (computed)"]


def test_an_h5_group_against_an_h5_group(made):
    with h5py.File("data.h5", "w") as f:
        for stem in "ab":
            f[f"in/{stem}"] = np.load(f"in/{stem}.npy")
    assert invoke("run", "data.h5:/in/", "w.npy", "--strides", "2", "-o", "res.h5:/out/").exit_code == 0
    with h5py.File("res.h5", "r+") as f:
        f["out/b"][0, 0, 0, 0] += 1.0
    r = invoke("verify", "data.h5:/in/", "w.npy", "res.h5:/out/", "--strides", "2")
    assert r.exit_code == 1
    assert [line.split(": ")[0] + ": " + line.split(": ")[1][:4] for line in r.stdout.splitlines()] == [
        "res.h5:/out/a: PASS", "res.h5:/out/b: FAIL"]


def test_ctrl_c_between_items_says_how_many_were_checked(made, monkeypatch):
    from convt_cli import stream

    real, calls = stream.verify_files, []

    def verify_files(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(stream, "verify_files", verify_files)
    r = invoke("verify", "in/*.npy", "w.npy", "out/{stem}.npy", "--strides", "2")
    assert (r.exit_code, r.stderr) == (2, "Error: interrupted; 1 of 3 items were checked\n")
    assert len(r.stdout.splitlines()) == 1


# ---------------------------------------------------------------------------------------------------------
# The verdict line, for a person


def _report(residuals, tolerance=2.4e-6, nonfinite=0):
    from convt_cli.verify import Probe, VerifyReport

    probes = tuple(Probe(1.0, 1.0, 1.0, r) for r in residuals)
    passed = not nonfinite and all(r <= tolerance for r in residuals)
    return VerifyReport(passed=passed, probes=probes if not nonfinite else (), tolerance=tolerance,
                        tolerance_is_default=True, seed=0, dtype="float32", probe_count=len(residuals) or 8,
                        nonfinite_output=nonfinite, terms_per_output=27, output_shape=(2, 16, 16, 4))


@pytest.mark.parametrize("residuals,tolerance,nonfinite,line", [
    ([6.3e-8, 1e-8], 2.4e-6, 0, "PASS: max residual 6.3e-08, 38x below the tolerance 2.4e-06 (2 probes, float32 "
                                "output (2, 16, 16, 4), seed 0)"),
    ([1.6e-6], 2.4e-6, 0, "PASS: max residual 1.6e-06, 1.5x below the tolerance 2.4e-06 (1 probe, float32 output "
                          "(2, 16, 16, 4), seed 0)"),
    ([0.0, 0.0], 0.0, 0, "PASS: max residual 0 (exact), within the tolerance 0.0e+00 (2 probes, float32 output "
                         "(2, 16, 16, 4), seed 0)"),
    ([4.6e-3, 1e-9], 2.4e-6, 0, "FAIL: max residual 4.6e-03, 1,917x the tolerance 2.4e-06, in 1 of 2 probes "
                                "(float32 output (2, 16, 16, 4), seed 0)"),
    ([5e-6], 2.4e-6, 0, "FAIL: max residual 5.0e-06, 2.1x the tolerance 2.4e-06, in 1 of 1 probe (float32 output "
                        "(2, 16, 16, 4), seed 0)"),
    ([], 2.4e-6, 1, "FAIL: the output holds 1 non-finite value (inf or nan) (float32 output (2, 16, 16, 4), seed 0)"),
])
def test_the_verdict_reads_without_the_maths(residuals, tolerance, nonfinite, line):
    assert _report(residuals, tolerance, nonfinite).summary() == line


# ---------------------------------------------------------------------------------------------------------
# Where it is wrong: every batch element checked on its own


def _decoder():
    from convt_cli import conv_transpose

    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 8, 8, 8)).astype(np.float32)
    w = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    return x, w, conv_transpose(x, w, strides=2)  # (256, 16, 16, 8): 524,288 elements


def test_an_error_too_small_for_the_whole_output_is_caught_in_its_batch_element():
    from convt_cli.verify import verify_conv_transpose

    x, w, y = _decoder()
    bad = y.copy()
    bad[77, 5, 9, 3] += 2e-4 * np.abs(y).max()
    whole_alone_passes = 0
    for seed in range(10):
        assert verify_conv_transpose(x, w, y, strides=2, seed=seed).passed
        report = verify_conv_transpose(x, w, bad, strides=2, seed=seed)
        assert not report.passed and report.tile_count == 256
        assert [(t.batch, t.box) for t in report.failing_tiles] == [(77, ((0, 16), (0, 16)))]
        whole_alone_passes += all(p.residual <= report.tolerance for p in report.probes)
        assert report.summary().startswith("FAIL: max residual ")
        assert "; wrong in batch element 77 of 256 (float32 output (256, 16, 16, 8)" in report.summary()
    assert whole_alone_passes >= 5  # what the one global inner product alone would have let through


def test_the_failing_elements_are_the_same_whatever_the_pieces(work):
    from convt_cli.stream import verify_files

    x, w, y = _decoder()
    y[3, 0, 0, 0] += 0.01 * np.abs(y).max()
    y[200, 15, 15, 7] -= 0.01 * np.abs(y).max()
    np.save("xd.npy", x)
    np.save("wd.npy", w)
    np.save("yd.npy", y)
    whole = verify_files("xd.npy", "wd.npy", "yd.npy", strides=2)
    from convt_cli import stream
    from convt_cli.engine import runtime
    from convt_cli.shapes import plan_conv_transpose

    plan, f32 = plan_conv_transpose(x.shape, w.shape, y.shape, strides=2), np.dtype(np.float32)
    needs = stream.with_verify_work(stream.run_needs(plan, f32, f32, f32, (y.shape, f32)), plan, f32, None,
                                    runtime.resolve_threads())
    pieces = verify_files("xd.npy", "wd.npy", "yd.npy", strides=2, max_memory=sum(needs(100).values()))
    assert 1 <= pieces.context["batch_per_chunk"] <= 100  # and no more than run's pieces under that budget
    assert [t.batch for t in whole.failing_tiles] == [t.batch for t in pieces.failing_tiles] == [3, 200]
    r = invoke("verify", "xd.npy", "wd.npy", "yd.npy", "--strides", "2", "--json")
    report = json.loads(r.stdout)
    assert r.exit_code == 1 and report["tile_count"] == 256
    assert [(t["batch"], t["box"]) for t in report["failing_tiles"]] == [(3, [[0, 16], [0, 16]]),
                                                                         (200, [[0, 16], [0, 16]])]
    assert "; wrong in batch elements 3 and 200 of 256" in report["summary"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_correct_outputs_pass_in_every_batch_element(dtype):
    """Many small tiles are many more chances for rounding to look like an error: all-positive data (no
    cancellation to hide it), 256 elements, five seeds."""
    import ml_dtypes

    from convt_cli import conv_transpose
    from convt_cli.verify import verify_conv_transpose

    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(2)
    x = np.abs(rng.standard_normal((256, 6, 6, 16))).astype(dt)
    w = np.abs(rng.standard_normal((3, 3, 16, 16))).astype(dt)
    y = conv_transpose(x, w, strides=2)
    for seed in range(5):
        report = verify_conv_transpose(x, w, y, strides=2, seed=seed)
        assert report.passed and report.failing_tiles == (), report.summary()


# ---------------------------------------------------------------------------------------------------------
# Spatial tiles: each a part of one image, its own a, b and S^2


@pytest.mark.parametrize("seed", range(40))
def test_with_tiny_tiles_a_correct_output_passes_in_every_tile_and_an_error_is_boxed(seed, monkeypatch):
    """Random configurations (rank 1-3, strides, dilations, every padding, both layouts) cut into tiles of a few
    values: a tile's b gathers exactly the terms that land in it, so a correct output passes everywhere, and one
    wrong value fails in the tile whose box holds it."""
    from conftest import random_shapes

    from convt_cli import conv_transpose, verify

    monkeypatch.setattr(verify, "TILE_VALUES", 6)
    monkeypatch.setattr(verify, "PRODUCT_VALUES", 1 + seed % 3 * 50)  # and the taps a GEMM at a time
    x_shape, w_shape, out_sizes, flags = random_shapes(seed)
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    y = conv_transpose(x, w, out_sizes, **flags)
    report = verify.verify_conv_transpose(x, w, y, **flags)
    assert report.passed, report.summary()
    first = flags["data_format"] == "channels_first"
    spatial = y.shape[2:] if first else y.shape[1:-1]
    if 0 in y.shape:
        return
    where = tuple(int(rng.integers(n)) for n in y.shape)
    bad = y.copy()
    bad[where] += 1.0 + abs(y).max()
    report = verify.verify_conv_transpose(x, w, bad, **flags)
    pos = where[2:] if first else where[1:-1]
    assert not report.passed
    assert report.failing_tiles, report.summary()
    assert all(t.batch == where[0] and all(lo <= p < hi for p, (lo, hi) in zip(pos, t.box))
               for t in report.failing_tiles), (where, report.failing_tiles)
    assert report.tile_count >= len(spatial) and len(report.failing_tiles) == 1


@pytest.mark.parametrize("spatial, channels, strides", [((128, 128), 64, 2), ((512, 512, 512), 16, 1), ((7,), 3, 1),
                                                        ((1000, 3), 1000, 1), ((64, 64), 1, 3), ((9, 4000), 8, 1)])
def test_a_tile_is_near_a_cube_within_the_budgets(spatial, channels, strides):
    from convt_cli.shapes import plan_conv_transpose
    from convt_cli.verify import PROBE_VALUES, TILE_VALUES, tile_sizes

    x_shape = (1, *(-(-n // strides) for n in spatial), channels)
    plan = plan_conv_transpose(x_shape, (*(3,) * len(spatial), channels, channels), None, strides, "SAME")
    sizes, spatial = tile_sizes(plan), plan.output_spatial
    assert all(1 <= s <= n for s, n in zip(sizes, spatial))
    positions = int(np.prod(sizes))
    assert positions * channels <= max(TILE_VALUES, channels) and positions * 8 <= PROBE_VALUES
    halved = [s for s, n in zip(sizes, spatial) if s < n]  # a cut axis is never much thinner than another
    assert not halved or max(sizes) <= 2 * min(halved) + 1, sizes


def test_one_wrong_value_in_a_large_image_is_caught_and_boxed():
    """2,097,152 values in one image, one of them off by 1% of max|output|: the one inner product over the whole
    output is diluted, its 8,192-position tile (64 x 128, a quarter of the image) is not."""
    from convt_cli import conv_transpose
    from convt_cli.verify import verify_conv_transpose

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 128, 128, 32)).astype(np.float32)
    w = rng.standard_normal((4, 4, 32, 32)).astype(np.float32)
    y = conv_transpose(x, w, strides=2)
    y[0, 200, 17, 5] += 0.01 * np.abs(y).max()
    for seed in range(5):
        report = verify_conv_transpose(x, w, y, strides=2, seed=seed)
        assert [(t.batch, t.box) for t in report.failing_tiles] == [(0, ((192, 256), (0, 128)))]
        assert report.tile_count == 8
        assert report.summary().endswith("; wrong in batch element 0 of 1, first at [192:256, 0:128] of element 0 "
                                         f"(float32 output (1, 256, 256, 32), seed {seed})")


# ---------------------------------------------------------------------------------------------------------
# What a failing output matches instead


@pytest.mark.parametrize("made,hint", [
    ("flipped", "batch element 0 matches with the kernel flipped (a correlation where a convolution was meant, or "
                "the reverse)"),
    ("swapped", "batch element 0 matches with the filters' last two axes swapped ([*k, in, out] read as [*k, out, "
                "in])"),
    ("other side", "batch element 0 matches with the padding split the other way (--padding 1:0,1:0)"),
    ("one value", "none of the usual mix-ups explains batch element 2 (tried: the kernel flipped, the filters' "
                  "last two axes swapped, the padding split the other way)"),
    ("nan input", "INPUT's batch element 1 holds values that are not finite (inf or nan)"),
    ("inf filters", "FILTERS hold values that are not finite (inf or nan)"),
])
def test_a_fail_says_which_usual_mix_up_it_matches(work, made, hint):
    from convt_cli import conv_transpose

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 8, 8, 6)).astype(np.float32)
    w = rng.standard_normal((3, 3, 6, 6)).astype(np.float32)
    if made == "flipped":
        y = conv_transpose(x, w[::-1, ::-1], strides=2)
    elif made == "swapped":
        y = conv_transpose(x, np.swapaxes(w, -1, -2), strides=2)
    elif made == "other side":
        y = conv_transpose(x, w, [16, 16], strides=2, padding=[(1, 0), (1, 0)])
    else:
        y = conv_transpose(x, w, strides=2)
        y[2, 3, 3, 1] += 1.0
    if made == "nan input":
        x[1, 2, 2, 0] = np.nan
    elif made == "inf filters":
        w[1, 1, 0, 0] = np.inf
    np.save("hx.npy", x)
    np.save("hw.npy", w)
    np.save("hy.npy", y)
    r = invoke("verify", "hx.npy", "hw.npy", "hy.npy", "--strides", "2")
    assert r.exit_code == 1 and r.stdout.rstrip("\n").endswith(f"seed 0); {hint}")
    assert json.loads(invoke("verify", "hx.npy", "hw.npy", "hy.npy", "--strides", "2", "--json").stdout)["hint"] == hint
    if "nan" in made or "inf" in made:
        return
    assert json.loads(invoke("run", "hx.npy", "hw.npy", "--strides", "2", "-o", "ok.npy").stdout or "{}") == {}
    assert json.loads(invoke("verify", "hx.npy", "hw.npy", "ok.npy", "--strides", "2", "--json").stdout)["hint"] is None
