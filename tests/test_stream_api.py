"""The file-to-file library (convt_cli.stream) from Python, without the command line.

Matrix: run_files on .npy, .npz and .h5 outputs x strides, explicit padding, dilations, channels-first and a
dtype cast, bitwise against conv_transpose of the same arrays; the summary against `convt run --json`'s; streamed
in pieces (a small max_memory) against one piece, and threads=1 against threads=2, byte for byte; each keyword's
mistake named in its ConvtError; nothing left behind after an error late in a streamed run or a KeyboardInterrupt
from the progress callback (new files and existing .h5 files); .h5 provenance; both progress forms; run_many's
summaries and error dicts; verify_files against verify_conv_transpose on the same arrays; `--threads`; and the
import boundaries: the library runs without click, `convt --help` without NumPy, the CLI's --dtype choices
are the engine's dtypes.
"""

import dataclasses
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import convt_cli
from convt_cli import ConvtError, conv_transpose, run_files
from convt_cli import stream
from convt_cli.cli import cli
from convt_cli.engine import runtime
from convt_cli.shapes import plan_conv_transpose
from convt_cli.stream import run_many, verify_files
from convt_cli.verify import verify_conv_transpose
from conftest import save_pair


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A batch of 8 (streams in pieces under a small budget), as the current folder: (x, w)."""
    monkeypatch.chdir(tmp_path)
    return save_pair(tmp_path, batch=8, seed=11)


def _read(ref):
    path, _, name = ref.partition(":")
    if path.endswith(".npz"):
        with np.load(path) as z:
            return z[name or "output"]
    if path.endswith(".h5"):
        with h5py.File(path) as f:
            return f[name or "output"][()]
    return np.load(path)


def _leftovers(folder="."):
    return [p for p in os.listdir(folder) if p.startswith(".convt")]


@pytest.mark.parametrize("target", ["y.npy", "y.npz:y", "y.h5:/g/y"])
@pytest.mark.parametrize(
    "flags",
    [
        dict(strides=2),
        dict(strides=[1, 2, 3, 1], padding="VALID"),
        dict(strides=2, padding=[(1, 0), (0, 2)], dilations=[1, 2]),
        dict(strides=2, output_shape=[9, 11]),
        dict(strides=2, dtype="float64"),
    ],
)
def test_run_files_writes_what_conv_transpose_computes(work, target, flags):
    x, w = work
    info = run_files("x.npy", "w.npy", target, **flags)
    cast = np.dtype(flags.get("dtype", "float32"))
    want = conv_transpose(x.astype(cast), w.astype(cast), **{k: v for k, v in flags.items() if k != "dtype"})
    got = _read(target)
    assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
    assert info["output_shape"] == list(want.shape) and info["output"] == target


def test_run_files_channels_first(work):
    x, w = work
    np.save("xc.npy", np.moveaxis(x, -1, 1))
    run_files("xc.npy", "w.npy", "yc.npy", strides=2, data_format="NCHW")
    want = conv_transpose(np.moveaxis(x, -1, 1), w, strides=2, data_format="NCHW")
    assert np.load("yc.npy").tobytes() == want.tobytes()


def test_the_summary_is_what_run_json_prints(work):
    info = run_files("x.npy", "w.npy", "lib.npy", strides=2, padding="valid", dilations=2)
    r = CliRunner().invoke(cli, ["run", "x.npy", "w.npy", "-o", "cli.npy", "--strides", "2", "--padding", "valid",
                                 "--dilations", "2", "--json"])
    assert r.exit_code == 0, r.output
    printed = json.loads(r.stdout)
    assert sorted(info) == sorted(printed)
    timing = ("seconds", "wall_seconds", "gflop_per_s", "output")
    assert {k: v for k, v in info.items() if k not in timing} == {k: v for k, v in printed.items() if k not in timing}
    assert np.load("lib.npy").tobytes() == np.load("cli.npy").tobytes()


@pytest.mark.parametrize("suffix", ["npy", "npz", "h5"])
def test_streamed_in_pieces_is_bitwise_the_whole(work, suffix):
    whole = run_files("x.npy", "w.npy", f"whole.{suffix}", strides=2)
    pieces = run_files("x.npy", "w.npy", f"pieces.{suffix}", strides=2, max_memory="40K")
    assert whole["batch_per_chunk"] == 8 and 1 <= pieces["batch_per_chunk"] < 8
    assert _read(f"whole.{suffix}").tobytes() == _read(f"pieces.{suffix}").tobytes()
    also = run_files("x.npy", "w.npy", f"bytes.{suffix}", strides=2, max_memory=40 * 1024)  # an int is bytes
    assert also["batch_per_chunk"] == pieces["batch_per_chunk"]


def test_threads_never_change_a_bit(work):
    x, _ = work
    np.save("big.npy", np.concatenate([x] * 4))
    one = run_files("big.npy", "w.npy", "one.npy", strides=2, threads=1)
    two = run_files("big.npy", "w.npy", "two.npy", strides=2, threads=2)
    assert one["output_shape"] == two["output_shape"]
    assert open("one.npy", "rb").read() == open("two.npy", "rb").read()


@pytest.mark.parametrize(
    "kwargs,names",
    [
        (dict(strides="x"), "strides"),
        (dict(strides=0), "strides"),
        (dict(padding="SAEM"), "padding"),
        (dict(dilations=[1, 1, 1]), "dilations"),
        (dict(output_shape=[99, 6]), "output_shape[0]=99"),
        (dict(data_format="NCW"), "data_format"),
        (dict(dtype="float8"), "dtype"),
        (dict(max_memory="lots"), "max_memory"),
        (dict(max_memory=-1), "max_memory"),
        (dict(threads=0), "threads"),
        (dict(threads=1.5), "threads"),
        (dict(progress=3), "progress"),
        (dict(max_memory="1K"), "--max-memory is 1.0 KiB"),
    ],
)
def test_a_mistake_is_a_convt_error_naming_the_parameter(work, kwargs, names):
    with pytest.raises(ConvtError, match=r"(^|\W)" + names.replace("[", r"\[").replace(".", r"\.")):
        run_files("x.npy", "w.npy", "y.npy", **kwargs)
    assert not os.path.exists("y.npy") and not _leftovers()


@pytest.mark.parametrize(
    "refs,message",
    [
        ((3, "w.npy", "y.npy"), "INPUT: expected a file reference"),
        (("x.npy", "missing.npy", "y.npy"), "FILTERS 'missing.npy': no such file"),
        (("x.npy", "w.npy", "x.npy"), "OUTPUT 'x.npy': is the same as INPUT"),
    ],
)
def test_a_bad_reference_is_named(work, refs, message):
    with pytest.raises(ConvtError, match="^" + message):
        run_files(*refs)


def _overflowing_late():
    x = np.ones((8, 2, 2, 3), np.int32)
    x[-2:] = 2**22  # only the last batch elements overflow int32: the error comes after pieces were written
    np.save("xi.npy", x)
    np.save("wi.npy", np.full((1, 1, 2, 3), 2**9, np.int32))


@pytest.mark.parametrize("target", ["late.npy", "late.npz:y", "late.h5:/y", "keep.h5:/new/y"])
def test_an_error_late_in_a_streamed_run_leaves_nothing(work, target):
    _overflowing_late()
    with h5py.File("keep.h5", "w") as f:
        f["keep"] = np.arange(3)
    i32 = np.dtype(np.int32)
    budget = sum(stream.run_needs(plan_conv_transpose((8, 2, 2, 3), (1, 1, 2, 3)), i32, i32, i32)(2).values())
    seen = []
    with pytest.raises(ConvtError, match="int32 result overflows"):
        run_files("xi.npy", "wi.npy", target, max_memory=budget, progress=lambda done, total: seen.append(done))
    assert seen and seen[-1] < 8  # pieces had been written before the error
    assert not os.path.exists(target.split(":")[0]) or target.startswith("keep")
    with h5py.File("keep.h5") as f:
        assert list(f) == ["keep"]
    assert not _leftovers()


@pytest.mark.parametrize("target", ["stop.npy", "stop.h5:/y", "keep.h5:/new/y"])
def test_a_keyboard_interrupt_from_progress_propagates_and_leaves_nothing(work, target):
    with h5py.File("keep.h5", "w") as f:
        f["keep"] = np.arange(3)

    def stop(done, total):
        if done >= 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_files("x.npy", "w.npy", target, strides=2, max_memory="40K", progress=stop)
    assert not os.path.exists("stop.npy") and not os.path.exists("stop.h5")
    with h5py.File("keep.h5") as f:
        assert list(f) == ["keep"]
    assert not _leftovers()


def test_h5_output_carries_provenance(work):
    info = run_files("x.npy", "w.npy", "p.h5:/out/y", strides=2, padding=[(1, 0), (0, 2)])
    with h5py.File("p.h5") as f:
        attrs = dict(f["out/y"].attrs)
    assert attrs["convt_version"] == convt_cli.__version__
    assert attrs["convt_op"] == "conv_transpose"
    assert attrs["convt_input"] == "x.npy" and attrs["convt_filters"] == "w.npy"
    params = json.loads(attrs["convt_parameters"])
    assert params == {k: info[k] for k in params}
    assert sorted(params) == sorted(["output_shape", "strides", "padding", "padding_given", "data_format",
                                     "dilations", "dtype", "pads", "filter_layout", "output_padding", "groups"])
    assert params["padding_given"] == [[1, 0], [0, 2]] and params["strides"] == [2, 2]


def test_progress_as_a_callable_and_as_an_object_with_update(work):
    calls, sizes = [], []

    class Bar:
        def update(self, n):
            sizes.append(n)

    info = run_files("x.npy", "w.npy", "a.npy", strides=2, max_memory="40K", progress=lambda d, t: calls.append((d, t)))
    run_files("x.npy", "w.npy", "b.npy", strides=2, max_memory="40K", progress=Bar())
    chunk = info["batch_per_chunk"]
    assert [d for d, _ in calls] == [min(8, b + chunk) for b in range(0, 8, chunk)]
    assert {t for _, t in calls} == {8}
    assert sum(sizes) == 8 and len(sizes) == len(calls)


def test_run_many_reports_a_bad_item_and_runs_the_others(work):
    x, w = work
    np.save("a.npy", x[:2])
    np.save("b.npy", np.zeros((2, 5, 6, 7), np.float32))  # 7 channels: the filters take 3
    np.save("c.npy", x[2:5])
    items = [("a.npy", "ya.npy"), ("b.npy", "yb.npy"), ("c.npy", "yc.npy")]
    results = list(run_many(items, "w.npy", strides=2))
    assert [r["input"] for r in results] == ["a.npy", "b.npy", "c.npy"]
    assert "error" not in results[0] and "error" not in results[2]
    assert results[1]["output"] == "yb.npy"
    assert results[1]["error"].startswith("INPUT 'b.npy': conv_transpose: filters.shape[-1]=3")
    assert not os.path.exists("yb.npy")
    for name, part in (("a", x[:2]), ("c", x[2:5])):
        assert np.load(f"y{name}.npy").tobytes() == conv_transpose(part, w, strides=2).tobytes()


def test_run_many_over_expanded_items(work):
    from convt_cli.io import expand_items

    x, w = work
    with h5py.File("in.h5", "w") as f:
        f["inputs/a"] = x[:3]
        f["inputs/deeper/b"] = x[3:]
    results = list(run_many(expand_items("in.h5:/inputs/", "out.h5:/outputs/"), "w.npy", strides=2))
    assert [r["output"] for r in results] == ["out.h5:/outputs/a", "out.h5:/outputs/deeper/b"]
    with h5py.File("out.h5") as f:
        assert f["outputs/deeper/b"][()].tobytes() == conv_transpose(x[3:], w, strides=2).tobytes()


@pytest.mark.parametrize("pieces", [False, True])
def test_verify_files_reports_what_the_array_check_reports(work, pieces):
    x, w = work
    f32 = np.dtype(np.float32)
    plan = plan_conv_transpose(x.shape, w.shape, strides=2)
    needs = stream.with_verify_work(stream.run_needs(plan, f32, f32, f32, (plan.output_shape, f32)), plan, f32, 5,
                                    runtime.resolve_threads())
    max_memory = sum(needs(3).values()) if pieces else None
    y = conv_transpose(x, w, strides=2)
    y[3, 4, 5, 2] += 0.01 * np.abs(y).max()
    np.save("bad.npy", y)
    done = []
    got = verify_files("x.npy", "w.npy", "bad.npy", strides=2, probes=5, seed=3, max_memory=max_memory,
                       progress=lambda d, t: done.append(d))
    assert (len(done) > 1) == pieces
    want = verify_conv_transpose(x, w, y, strides=2, probes=5, seed=3)
    assert dataclasses.replace(got, context={}, hint=None).to_dict() == want.to_dict() and not got.passed
    assert got.hint.startswith("none of the usual mix-ups explains batch element 3")  # files look for a cause
    assert got.to_dict()["input"] == "x.npy" and got.to_dict()["output"] == "bad.npy"
    computed = verify_files("x.npy", "w.npy", strides=2, threads=1)  # computes the output itself
    assert computed.passed and computed.output_shape == (8, 10, 12, 4)
    with pytest.raises(ConvtError, match="^OUTPUT 'bad.npy': has shape"):
        verify_files("x.npy", "w.npy", "bad.npy", strides=2, output_shape=[9, 12])


def test_threads_flag_on_run_and_verify(work):
    runner = CliRunner()
    for n in ("1", "2"):
        r = runner.invoke(cli, ["run", "x.npy", "w.npy", "--strides", "2", "--threads", n, "-o", f"t{n}.npy"])
        assert r.exit_code == 0, r.output
    assert open("t1.npy", "rb").read() == open("t2.npy", "rb").read()
    r = runner.invoke(cli, ["verify", "x.npy", "w.npy", "t1.npy", "--strides", "2", "--threads", "2"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["run", "x.npy", "w.npy", "--threads", "0", "-o", "t0.npy"])
    assert r.exit_code == 2
    assert r.stderr == "Error: Invalid value for '--threads': 0 is not in the range x>=1.\n"


def _fresh_python(code, cwd):
    p = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_the_library_runs_without_click(work, tmp_path):
    code = ("import sys, convt_cli\n"
            "info = convt_cli.run_files('x.npy', 'w.npy', 'y.npy', strides=2, max_memory='40K')\n"
            "from convt_cli import stream\n"
            "report = stream.verify_files('x.npy', 'w.npy', 'y.npy', strides=2)\n"
            "print(info['batch_per_chunk'] < 8, report.passed, 'click' in sys.modules)\n")
    assert _fresh_python(code, tmp_path).split() == ["True", "True", "False"]


def test_help_does_not_load_numpy(tmp_path):
    code = ("import sys\nfrom convt_cli.cli import cli\n"
            "for command in (['--help'], ['run', '--help'], ['verify', '--help']):\n"
            "    cli.main(command, standalone_mode=False)\n"
            "print('numpy' in sys.modules)\n")
    assert _fresh_python(code, tmp_path).splitlines()[-1] == "False"


def test_the_dtype_choices_are_the_engines_dtypes():
    from convt_cli import engine
    from convt_cli.dtype_names import DTYPES
    from convt_cli.verify import EPS

    assert tuple(DTYPES) == tuple(engine.DTYPES) == tuple(engine.COMPUTE_DTYPES)
    assert tuple(EPS) == tuple(DTYPES)  # verify has a tolerance for each
