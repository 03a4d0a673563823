"""The `convt` command line through click's CliRunner, and a few real subprocess pipes.

Matrix: run / shape / info x .npy, .npz, .h5, stdin/stdout x every flag (output-shape full and spatial,
strides, padding SAME/VALID/explicit, data-format, dilations, dtype, force, json); the exact `Error:` line
for each kind of mistake; provenance on .h5 outputs; help texts carry an example.
"""

import hashlib
import io
import json
import re
import os
import shutil
import subprocess

import h5py
import ml_dtypes
import numpy as np
import pytest

from convt_cli import ConvtError
from conftest import convt_command, error_line, invoke
from loop_reference import conv_transpose_loop

SAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "samples")


def reference(x, w, out_spatial, **flags):
    return conv_transpose_loop(x.astype(np.float64), w.astype(np.float64), out_spatial, **flags)


def test_run_npy_default_same(work):
    x, w = work
    r = invoke("run", "x.npy", "w.npy", "--strides", "2", "-o", "y.npy")
    assert r.exit_code == 0, r.output
    assert r.stdout == "" and r.stderr == ""
    y = np.load("y.npy")
    assert y.shape == (2, 10, 12, 4) and y.dtype == np.float32
    np.testing.assert_allclose(y, reference(x, w, (10, 12), strides=2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "flags,out_spatial,ref_flags",
    [
        (["--output-shape", "2,9,11,4", "--strides", "2"], (9, 11), dict(strides=2)),
        (["--output-shape", "9,12", "--strides", "1,2,2,1"], (9, 12), dict(strides=2)),
        (["--padding", "valid", "--strides", "2,3"], (11, 18), dict(strides=[2, 3], padding="VALID")),
        (["--padding", "1:0,0:2", "--strides", "2"], (10, 11), dict(strides=2, padding=[(1, 0), (0, 2)])),
        (["--dilations", "2", "--padding", "VALID"], (9, 10), dict(dilations=2, padding="VALID")),
    ],
)
def test_run_flags(work, flags, out_spatial, ref_flags):
    x, w = work
    r = invoke("run", "x.npy", "w.npy", "-o", "y.npy", *flags)
    assert r.exit_code == 0, r.output
    np.testing.assert_allclose(np.load("y.npy"), reference(x, w, out_spatial, **ref_flags), rtol=1e-5, atol=1e-5)


def test_run_channels_first(work):
    x, w = work
    np.save("xc.npy", np.moveaxis(x, -1, 1))
    r = invoke("run", "xc.npy", "w.npy", "--data-format", "NCHW", "--strides", "1,1,2,2", "-o", "yc.npy")
    assert r.exit_code == 0, r.output
    want = reference(np.moveaxis(x, -1, 1), w, (10, 12), strides=2, channels_first=True)
    np.testing.assert_allclose(np.load("yc.npy"), want, rtol=1e-5, atol=1e-5)


def test_run_dtype_cast_and_mismatch(work):
    x, w = work
    np.save("w64.npy", w.astype(np.float64))
    r = invoke("run", "x.npy", "w64.npy", "-o", "y.npy")
    assert error_line(r) == ("Error: INPUT is float32 but FILTERS is float64: they must share a dtype; "
                             "pass --dtype float32 (or another) to cast both")
    assert not os.path.exists("y.npy")
    r = invoke("run", "x.npy", "w64.npy", "--dtype", "float64", "-o", "y.npy")
    assert r.exit_code == 0, r.output
    assert np.load("y.npy").dtype == np.float64


def test_run_bfloat16_round_trips_through_npy_and_h5(work):
    x, w = work
    r = invoke("run", "x.npy", "w.npy", "--dtype", "bfloat16", "-o", "y.npy")
    assert r.exit_code == 0, r.output
    raw = np.load("y.npy")
    assert raw.dtype == np.dtype("V2")  # the convention: 2-byte void holding bfloat16 bits
    y = raw.view(ml_dtypes.bfloat16)
    want = reference(x.astype(ml_dtypes.bfloat16), w.astype(ml_dtypes.bfloat16), (5, 6))
    np.testing.assert_allclose(y.astype(np.float64), want, rtol=2e-2, atol=2e-2 * np.abs(want).max())
    # bfloat16 files are read back as bfloat16, from .npy and .h5, with no --dtype
    r = invoke("run", "x.npy", "w.npy", "--dtype", "bfloat16", "-o", "y.h5:/y")
    assert r.exit_code == 0, r.output
    with h5py.File("y.h5") as f:
        assert f["y"].attrs["dtype"] == "bfloat16"
    np.save("wb.npy", np.ones((1, 1, 2, 4), ml_dtypes.bfloat16))
    for source in ("y.npy", "y.h5:/y"):
        r = invoke("run", source, "wb.npy", "-o", "z.npy", "--force")
        assert r.exit_code == 0, r.output
        z = np.load("z.npy").view(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(z, y.astype(np.float32).sum(-1, keepdims=True).repeat(2, -1)
                                      .astype(ml_dtypes.bfloat16))
    r = invoke("info", "y.h5", "y.npy")
    assert r.stdout.splitlines() == ["y.h5:/y  (2, 5, 6, 4) bfloat16  attributes convt_filters, convt_input, "
                                     "convt_op, convt_parameters, convt_version, dtype",
                                     "y.npy  (2, 5, 6, 4) bfloat16"]


def test_run_npz_in_and_out(work):
    x, w = work
    np.savez("both.npz", x=x, w=w)
    r = invoke("run", "both.npz:x", "both.npz:w", "-o", "y.npz:result")
    assert r.exit_code == 0, r.output
    with np.load("y.npz") as z:
        assert z.files == ["result"]
        np.testing.assert_allclose(z["result"], reference(x, w, (5, 6)), rtol=1e-5, atol=1e-5)
    r = invoke("run", "both.npz", "w.npy", "-o", "y2.npy")
    assert error_line(r) == "Error: INPUT 'both.npz': holds 2 arrays (x, w): name one, as both.npz:x"
    r = invoke("run", "both.npz:q", "w.npy", "-o", "y2.npy")
    assert error_line(r) == "Error: INPUT 'both.npz:q': has no array 'q': it holds x, w"


def test_run_h5_in_and_out_keeps_other_datasets_and_records_provenance(work):
    x, w = work
    with h5py.File("data.h5", "w") as f:
        f["inputs/a"] = x
        f["keep/me"] = np.arange(5)
    r = invoke("run", "data.h5:/inputs/a", "w.npy", "--strides", "2", "-o", "data.h5:/outputs/a")
    assert r.exit_code == 0, r.output
    with h5py.File("data.h5") as f:
        np.testing.assert_array_equal(f["keep/me"][()], np.arange(5))
        np.testing.assert_array_equal(f["inputs/a"][()], x)
        y = f["outputs/a"]
        np.testing.assert_allclose(y[()], reference(x, w, (10, 12), strides=2), rtol=1e-5, atol=1e-5)
        assert y.attrs["convt_input"] == "data.h5:/inputs/a"
        assert y.attrs["convt_filters"] == "w.npy"
        params = json.loads(y.attrs["convt_parameters"])
        assert params["strides"] == [2, 2] and params["output_shape"] == [2, 10, 12, 4]
        assert y.attrs["convt_version"]
        assert not [k for k in f["outputs"] if k.startswith(".convt")]
    r = invoke("run", "data.h5:/inputs/a", "w.npy", "-o", "data.h5:/outputs/a")
    assert error_line(r) == ("Error: OUTPUT 'data.h5:/outputs/a': dataset '/outputs/a' exists: pass --force to "
                             "replace it")
    r = invoke("run", "data.h5:/inputs/a", "w.npy", "-o", "data.h5:/outputs/a", "--force")
    assert r.exit_code == 0, r.output
    with h5py.File("data.h5") as f:
        assert f["outputs/a"].shape == (2, 5, 6, 4)
        assert sorted(f) == ["inputs", "keep", "outputs"]


def test_run_h5_single_dataset_and_new_file(work):
    x, w = work
    with h5py.File("one.h5", "w") as f:
        f["deep/inside/x"] = x
    r = invoke("run", "one.h5", "w.npy", "-o", "new.hdf5")
    assert r.exit_code == 0, r.output
    with h5py.File("new.hdf5") as f:
        assert list(f) == ["output"]


def test_run_refuses_to_write_onto_an_input(work):
    before = hashlib.sha256(open("x.npy", "rb").read()).hexdigest()
    r = invoke("run", "x.npy", "w.npy", "-o", "x.npy", "--force")
    assert error_line(r) == "Error: OUTPUT 'x.npy': is the same as INPUT 'x.npy': write the output elsewhere"
    assert hashlib.sha256(open("x.npy", "rb").read()).hexdigest() == before


def test_run_refuses_existing_output_without_force(work):
    open("y.npy", "wb").write(b"keep")
    r = invoke("run", "x.npy", "w.npy", "-o", "y.npy")
    assert error_line(r) == "Error: OUTPUT 'y.npy': exists: pass --force to replace it"
    assert open("y.npy", "rb").read() == b"keep"


def test_run_json_summary(work):
    r = invoke("run", "x.npy", "w.npy", "--strides", "2", "-o", "y.npy", "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["output_shape"] == [2, 10, 12, 4]
    assert info["pads"] == [[0, 1], [0, 1]]
    assert info["flops"] == 2 * 2 * 5 * 6 * 9 * 4 * 3
    assert info["seconds"] >= 0 and "gflop_per_s" in info
    assert info["output"] == "y.npy" and info["dtype"] == "float32"


def test_run_stdin_to_stdout_with_json_on_stderr(work):
    x, w = work
    r = invoke("run", "-", "w.npy", "-o", "-", "--json", input=open("x.npy", "rb").read())
    assert r.exit_code == 0, r.stderr
    import io

    y = np.load(io.BytesIO(r.stdout_bytes))
    np.testing.assert_allclose(y, reference(x, w, (5, 6)), rtol=1e-5, atol=1e-5)
    assert json.loads(r.stderr)["output"] == "-"


@pytest.mark.parametrize(
    "args,stdin,message",
    [
        (["run", "-", "w.npy", "-o", "y.npy"], b"", "Error: INPUT '-': stdin is empty: expected a .npy stream"),
        (["run", "-", "w.npy", "-o", "y.npy"], b"hello", "Error: INPUT '-': stdin is not a .npy stream (it starts "
                                                         "with b'hello')"),
        (["run", "-", "-", "-o", "y.npy"], b"", "Error: FILTERS '-': stdin is already the INPUT; give FILTERS as a "
                                                "file"),
        (["run", "missing.npy", "w.npy", "-o", "y.npy"], None, "Error: INPUT 'missing.npy': no such file"),
        (["run", "x.npy", "w.npy", "-o", "nowhere/y.npy"], None, "Error: OUTPUT 'nowhere/y.npy': folder 'nowhere' "
                                                                 "does not exist"),
        (["run", "x.npy", "w.npy", "-o", "y.txt"], None, "Error: OUTPUT 'y.txt': unknown output format '.txt': "
                                                         "expected .npy, .npz, .h5, .hdf5, .safetensors or .zarr, or - "
                                                         "for stdout"),
        (["run", "x.npy", "w.npy", "-o", "y.npy", "--strides", "2,x"], None,
         "Error: --strides: expected comma-separated integers like 2 or 1,2,2,1, got '2,x'"),
        (["run", "x.npy", "w.npy", "-o", "y.npy", "--padding", "0:1,1"], None,
         "Error: --padding: expected SAME, VALID, SAME_LOWER, p, lo:hi, or lo:hi per spatial axis like 0:1,1:1, "
         "got '0:1,1'"),
        (["run", "x.npy", "w.npy", "-o", "y.npy", "--output-shape", "2,99,12,4", "--strides", "2"], None,
         "Error: INPUT 'x.npy': conv_transpose: output_shape[1]=99 is not reachable from input size 5 with kernel 3, "
         "stride 2, dilation 1, padding SAME: legal sizes are 9..10 (SAME needs (I-1)*s+1 <= O <= I*s)"),
        (["run", "x.npy", "w.npy", "-o", "y.npy", "--data-format", "NCW"], None,
         "Error: INPUT 'x.npy': conv_transpose: data_format='NCW' does not fit 2 spatial dims (input rank 4) (it is "
         "for 1 spatial dims): expected 'NHWC', 'NCHW', 'channels_last' or 'channels_first'"),
        (["run", "x.npy", "w.npy", "-o", "y.npy", "--dtype", "float8"], None,
         "Error: Invalid value for '--dtype': 'float8' is not one of 'float16', 'bfloat16', 'float32', 'float64', "
         "'int32', 'complex64', 'complex128'."),
        (["run", "x.npy", "-o", "y.npy"], None, "Error: Missing argument 'FILTERS'."),
        (["run", "x.npy", "w.npy"], None, "Error: Missing option '-o' / '--output'."),
        (["frobnicate"], None, "Error: No such command 'frobnicate'."),
    ],
)
def test_mistakes_give_one_error_line_and_exit_2(work, args, stdin, message):
    r = invoke(*args, input=stdin)
    assert error_line(r) == message
    assert not os.path.exists("y.npy")


def test_unsupported_dtype_suggests_cast(work):
    np.save("xi.npy", np.zeros((1, 3, 3), np.int64))
    np.save("wi.npy", np.zeros((1, 3, 3), np.int64))
    r = invoke("run", "xi.npy", "wi.npy", "-o", "y.npy")
    assert error_line(r) == ("Error: INPUT 'xi.npy': dtype int64 is not supported: expected one of float16, "
                             "bfloat16, float32, float64, int32, complex64, complex128; pass --dtype float32 "
                             "(or another) to cast it")
    r = invoke("run", "xi.npy", "wi.npy", "-o", "y.npy", "--dtype", "int32", "--padding", "valid")
    assert r.exit_code == 0, r.output
    assert np.load("y.npy").dtype == np.int32


def test_shape_reads_headers_only(work):
    r = invoke("shape", "x.npy", "w.npy", "--strides", "2", "--padding", "valid")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[:5] == [
        "output shape  (2, 11, 13, 4) float32 (NHWC)",
        "legal sizes   11..12, 13..14 (per spatial axis)",
        "pads          0:0, 0:0 (lo:hi of the forward convolution)",
        f"flops         {2 * 2 * 5 * 6 * 9 * 4 * 3:,}",
        f"output bytes  {2 * 11 * 13 * 4 * 4:,}",
    ]
    assert re.fullmatch(r"memory        [\d,]+ bytes at once, in one piece", lines[5]) and len(lines) == 6
    r = invoke("shape", "x.npy", "w.npy", "--json", "--output-shape", "9,12", "--strides", "2")
    info = json.loads(r.stdout)
    assert info["output_shape"] == [2, 9, 12, 4] and info["legal_output_sizes"] == [[9, 10], [11, 12]]


def test_shape_does_not_read_the_data(work):
    # a 64 GB array: only its header exists on disk (a sparse file), and shape answers at once
    shape = (64, 256, 256, 4096)
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1,), np.float32))
    header["shape"] = shape
    with open("huge.npy", "wb") as f:
        np.lib.format.write_array_header_2_0(f, header)
        f.truncate(f.tell() + int(np.prod(shape)) * 4)
    np.save("wh.npy", np.zeros((2, 2, 8, 4096), np.float32))
    r = invoke("shape", "huge.npy", "wh.npy", "--strides", "2", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["output_shape"] == [64, 512, 512, 8]


def test_info_lists_every_array(work):
    x, w = work
    np.savez("z.npz", a=x, b=w)
    with h5py.File("d.h5", "w") as f:
        f.create_dataset("g/c", data=x, chunks=(1, 5, 6, 3))
    r = invoke("info", "x.npy", "z.npz", "d.h5")
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == [
        "x.npy  (2, 5, 6, 3) float32",
        "z.npz:a  (2, 5, 6, 3) float32",
        "z.npz:b  (3, 3, 4, 3) float32",
        "d.h5:/g/c  (2, 5, 6, 3) float32  chunks (1, 5, 6, 3)",
    ]
    r = invoke("info", "d.h5", "--json")
    assert json.loads(r.stdout) == {"file": "d.h5", "arrays": [
        {"name": "/g/c", "shape": [2, 5, 6, 3], "dtype": "float32", "chunks": [1, 5, 6, 3], "kind": "dataset",
         "compression": None, "compression_opts": None, "shuffle": False, "byteorder": "<", "attributes": {},
         "target": None}]}


def test_info_shows_what_h5ls_v_shows(work):
    x, _ = work
    with h5py.File("d.h5", "w") as f:
        d = f.create_dataset("g/c", data=x.astype(">f4"), chunks=(1, 5, 6, 3), compression="gzip",
                             compression_opts=7, shuffle=True)
        d.attrs["units"] = "K"
        d.attrs["scale"] = 2.5
        f["soft"] = h5py.SoftLink("/g/c")
        f["ext"] = h5py.ExternalLink("other.h5", "/x")
    r = invoke("info", "d.h5")
    assert r.exit_code == 0, r.output
    assert sorted(r.stdout.splitlines()) == [
        "d.h5:/ext  -> other.h5:/x (external link)",
        "d.h5:/g/c  (2, 5, 6, 3) float32  big-endian  chunks (1, 5, 6, 3)  gzip level 7 shuffle  attributes scale, "
        "units",
        "d.h5:/soft  -> /g/c (soft link)",
    ]
    listed = {a["name"]: a for a in json.loads(invoke("info", "d.h5", "--json").stdout)["arrays"]}
    assert listed["/g/c"]["attributes"] == {"units": "K", "scale": 2.5} and listed["/g/c"]["byteorder"] == ">"


def test_info_shows_an_empty_dataspace(work):
    with h5py.File("e.h5", "w") as f:
        f["e"] = h5py.Empty("f4")
    r = invoke("info", "e.h5")
    assert r.exit_code == 0, r.output
    assert r.stdout == "e.h5:/e  (empty dataspace) float32\n"
    r = invoke("info", "e.h5", "--json")
    assert json.loads(r.stdout)["arrays"][0]["shape"] is None


@pytest.mark.parametrize("command", ["run", "shape", "info", "verify"])
def test_help_has_an_example(command):
    r = invoke(command, "--help")
    assert r.exit_code == 0
    assert "Example" in r.stdout and "convt " + command in r.stdout


def test_version():
    r = invoke("--version")
    assert r.exit_code == 0 and r.stdout.startswith("convt, version ")


def test_real_pipe_through_the_installed_command(tmp_path):
    cmd = " ".join(convt_command())
    shutil.copy(os.path.join(SAMPLES, "input.npy"), tmp_path)
    shutil.copy(os.path.join(SAMPLES, "filters.npy"), tmp_path)
    p = subprocess.run(f"{cmd} run - filters.npy --strides 2 -o - < input.npy | {cmd} run - filters.npy -o "
                       f"- --output-shape 31,32 --strides 2 --dtype float32 2>/dev/null | {cmd} info -",
                       shell=True, cwd=tmp_path, capture_output=True, text=True)
    # the second stage's filters have 16 input channels but its input has 8: a clean error, not a traceback
    assert "Traceback" not in p.stderr
    p = subprocess.run(f"{cmd} run - filters.npy --strides 2 -o - < input.npy | {cmd} info -", shell=True,
                       cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "-  (2, 16, 16, 8) float32\n"


def test_real_h5_in_and_out_and_error_exit_code(tmp_path):
    shutil.copy(os.path.join(SAMPLES, "batch.h5"), tmp_path)
    p = subprocess.run(convt_command() + ["run", "batch.h5:/inputs/b", "batch.h5:/filters/w", "--strides", "2", "-o",
                                   "out.h5:/b"], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout == "" and p.stderr == ""
    with h5py.File(tmp_path / "out.h5") as f:
        assert f["b"].shape == (1, 16, 16, 8)
    p = subprocess.run(convt_command() + ["run", "batch.h5:/inputs", "batch.h5:/filters/w", "-o", "o.npy"],
                       cwd=tmp_path,
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr == ("Error: INPUT 'batch.h5:/inputs': '/inputs' is a group, not a dataset: name a dataset "
                        "inside it, or give OUTPUT as a group (like out.h5:/outputs/) or a template with {stem}, "
                        "{name} or {index} to convert every dataset in it\n")


def test_verify_passes_fails_and_reports(work):
    x, w = work
    assert invoke("run", "x.npy", "w.npy", "--strides", "2", "-o", "y.npy").exit_code == 0
    r = invoke("verify", "x.npy", "w.npy", "y.npy", "--strides", "2")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("PASS: max residual ") and r.stdout.endswith(
        "(8 probes, float32 output (2, 10, 12, 4), seed 0)\n")
    y = np.load("y.npy")
    y[1, 4, 5, 2] += 0.01 * np.abs(y).max()
    np.save("bad.npy", y)
    r = invoke("verify", "x.npy", "w.npy", "bad.npy", "--strides", "2", "--json", "--probes", "5", "--seed", "3")
    assert r.exit_code == 1, r.output
    report = json.loads(r.stdout)
    assert report["passed"] is False and report["probe_count"] == 5 and report["seed"] == 3
    assert len(report["probes"]) == 5 and report["max_residual"] > report["tolerance"]
    r = invoke("verify", "x.npy", "w.npy", "bad.npy", "--strides", "2", "--rtol", "1")
    assert r.exit_code == 0, r.output
    y[0, 0, 0, 0] = np.nan
    np.save("nan.npy", y)
    r = invoke("verify", "x.npy", "w.npy", "nan.npy", "--strides", "2")
    assert r.exit_code == 1 and r.stdout.startswith("FAIL: the output holds 1 non-finite value (inf or nan)")


def test_verify_without_output_checks_convt_itself(work):
    r = invoke("verify", "x.npy", "w.npy", "--strides", "2", "--padding", "valid", "--dilations", "2")
    assert r.exit_code == 0, r.output
    assert "float32 output (2, 13, 15, 4)" in r.stdout


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--strides", "3"], "Error: OUTPUT 'y.npy': has shape (2, 10, 12, 4), which INPUT 'x.npy' cannot give under "
                             "these flags: conv_transpose: output_shape[1]=10 is not reachable from input size 5 with "
                             "kernel 3, stride 3, dilation 1, padding SAME: legal sizes are 13..15"),
        (["--strides", "2", "--output-shape", "9,12"], "Error: OUTPUT 'y.npy': has shape (2, 10, 12, 4) but "
                                                       "--output-shape asks for (2, 9, 12, 4)"),
        (["--strides", "2", "--dtype", "float64"], "Error: OUTPUT 'y.npy': has dtype float32 but INPUT and FILTERS "
                                                   "compute in float64: pass --dtype float32 to compute in its dtype"),
        (["--strides", "2", "--probes", "0"], "Error: Invalid value for '--probes': 0 is not in the range x>=1."),
    ],
)
def test_verify_mistakes(work, extra, message):
    assert invoke("run", "x.npy", "w.npy", "--strides", "2", "-o", "y.npy").exit_code == 0
    r = invoke("verify", "x.npy", "w.npy", "y.npy", *extra)
    assert error_line(r).startswith(message)


@pytest.mark.parametrize("text,size", [("100", 100), ("100B", 100), ("1K", 1024), ("512M", 512 << 20), ("2G", 2 << 30),
                                       ("2gb", 2 << 30), ("1.5GiB", 3 << 29), (" 0.5 t ", 1 << 39), (".5K", 512),
                                       ("1" * 30, int("1" * 30))])
def test_max_memory_sizes(text, size):
    from convt_cli.stream import parse_size

    assert parse_size("--max-memory", text) == size


@pytest.mark.parametrize("text", ["", "lots", "-1G", "1e9", "1.2.3", "1X", "1 iB", "G", "nan", "inf"])
def test_max_memory_refuses_other_text(text):
    from convt_cli.stream import parse_size

    with pytest.raises(ConvtError, match="^--max-memory: expected a size like 512M, 2G, 1.5GiB or a number of bytes"):
        parse_size("--max-memory", text)


def test_a_run_over_the_memory_budget_streams_and_writes_the_same_bytes(work, monkeypatch):
    from convt_cli import cli as cli_module
    from convt_cli import stream
    from convt_cli.shapes import plan_conv_transpose

    x = np.random.default_rng(3).standard_normal((8, 5, 6, 3)).astype(np.float32)
    np.save("x8.npy", x)
    f32 = np.dtype(np.float32)
    needs = stream.run_needs(plan_conv_transpose(x.shape, (3, 3, 4, 3), strides=2), f32, f32, f32, overlap=True)
    limit = sum(needs(3).values())
    monkeypatch.setattr(cli_module, "_available_memory", lambda: 1 << 40)
    for target in ("whole.npy", "whole.h5:/y", "whole.npz:y"):
        r = invoke("run", "x8.npy", "w.npy", "--strides", "2", "-o", target, "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["batch_per_chunk"] == 8
        r = invoke("run", "x8.npy", "w.npy", "--strides", "2", "-o", "pieces." + target.split(".", 1)[1],
                   "--max-memory", limit, "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["batch_per_chunk"] == 3  # what the check itself accepts
    assert open("whole.npy", "rb").read() == open("pieces.npy", "rb").read()
    assert open("whole.npz", "rb").read() == open("pieces.npz", "rb").read()
    with h5py.File("whole.h5") as a, h5py.File("pieces.h5") as b:
        assert a["y"][()].tobytes() == b["y"][()].tobytes()
    plan = plan_conv_transpose(x.shape, (3, 3, 4, 3), strides=2)
    from convt_cli.engine import runtime

    verify_needs = stream.with_verify_work(stream.run_needs(plan, f32, f32, f32, (plan.output_shape, f32)),
                                           plan, f32, None, runtime.resolve_threads())
    r = invoke("verify", "x8.npy", "w.npy", "pieces.npy", "--strides", "2", "--max-memory",
               sum(verify_needs(3).values()), "--json")
    assert r.exit_code == 0, r.output
    r2 = invoke("verify", "x8.npy", "w.npy", "pieces.npy", "--strides", "2", "--json")
    how = ("wall_seconds", "batch_per_chunk", "pieces")  # how the check ran; the rest, its findings, is the same
    pieces, whole = ({k: v for k, v in json.loads(out).items() if k not in how} for out in (r.stdout, r2.stdout))
    assert pieces == whole  # probes drawn per batch element: chunking is invisible
    assert json.loads(r.stdout)["batch_per_chunk"] == 3 and json.loads(r2.stdout)["batch_per_chunk"] == 8


def test_memory_check_without_a_known_limit_lets_the_run_go(work, monkeypatch):
    from convt_cli import cli as cli_module

    monkeypatch.setattr(cli_module, "_available_memory", lambda: None)
    r = invoke("run", "x.npy", "w.npy", "-o", "y.npy")
    assert r.exit_code == 0, r.output


def test_running_out_of_memory_anyway_is_one_error_line(work, monkeypatch):
    import convt_cli.engine

    def no_memory(self, x, threads=None):
        raise MemoryError

    # every way into the engine runs prepared filters: run_conv_transpose, and a streamed run's pieces
    monkeypatch.setattr(convt_cli.engine.Prepared, "run", no_memory)
    r = invoke("run", "x.npy", "w.npy", "-o", "y.npy")
    assert error_line(r) == ("Error: out of memory; no output was written: pass a smaller --max-memory to work in "
                             "smaller pieces, or use a lower-precision --dtype")
    assert sorted(os.listdir(".")) == ["w.npy", "x.npy"]


def _many(work):
    x, w = work
    os.mkdir("in")
    os.mkdir("out")
    rng = np.random.default_rng(5)
    inputs = {name: rng.standard_normal((2, 5, 6, 3)).astype(np.float32) for name in ("a", "b", "c")}
    for name, a in inputs.items():
        np.save(f"in/{name}.npy", a)
    return inputs, w


def test_many_files_by_glob_and_template(work):
    inputs, w = _many(work)
    r = invoke("run", "in/*.npy", "w.npy", "--strides", "2", "-o", "out/{stem}_up.npy", "--json")
    assert r.exit_code == 0, r.output
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(i["input"], i["output"]) for i in lines] == [(f"in/{n}.npy", f"out/{n}_up.npy") for n in "abc"]
    for name, a in inputs.items():
        np.testing.assert_allclose(np.load(f"out/{name}_up.npy"), reference(a, w, (10, 12), strides=2),
                                   rtol=1e-5, atol=1e-5)


def test_many_tensors_one_bad_item_is_reported_and_the_others_run(work):
    inputs, w = _many(work)
    np.save("in/b.npy", np.zeros((2, 5, 6, 7), np.float32))  # wrong channels
    r = invoke("run", "in/*.npy", "w.npy", "-o", "out/{stem}.npy", "--json")
    assert r.exit_code == 2
    assert r.stderr.splitlines() == ["Error: INPUT 'in/b.npy': conv_transpose: filters.shape[-1]=3 (in_channels) "
                                     "must equal the input's channels 7 (filters are spatial + [out_channels, "
                                     "in_channels]; input shape (2, 5, 6, 7), data_format NHWC)"]
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [("error" in i) for i in lines] == [False, True, False]
    assert sorted(os.listdir("out")) == ["a.npy", "c.npy"]
    r = invoke("run", "in/*.npy", "w.npy", "-o", "out/{stem}.npy", "--force", "--fail-fast")
    assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1
    assert np.load("out/c.npy").shape == (2, 5, 6, 4)  # written by the first call; --fail-fast stopped before it


def test_every_dataset_of_an_h5_group(work):
    x, w = work
    with h5py.File("data.h5", "w") as f:
        f["inputs/a"] = x
        f["inputs/deeper/b"] = x[:1]
        f["other/c"] = x
    r = invoke("run", "data.h5:/inputs/", "w.npy", "--strides", "2", "-o", "out.h5:/outputs/")
    assert r.exit_code == 0, r.output
    with h5py.File("out.h5") as f:
        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        assert sorted(names) == ["outputs/a", "outputs/deeper/b"]
        np.testing.assert_allclose(f["outputs/deeper/b"][()], reference(x[:1], w, (10, 12), strides=2),
                                   rtol=1e-5, atol=1e-5)
        assert f["outputs/a"].attrs["convt_input"] == "data.h5:/inputs/a"


@pytest.mark.parametrize(
    "args,message",
    [
        (["run", "in/*.npy", "w.npy", "-o", "out/y.npy"], "Error: OUTPUT 'out/y.npy': with many inputs it must be a "
                                                          "template holding {stem}, {name} or {index}, like "
                                                          "'out/{stem}.npy'"),
        (["run", "nothing/*.npy", "w.npy", "-o", "out/{stem}.npy"], "Error: INPUT 'nothing/*.npy': the pattern "
                                                                    "matches no file"),
        (["run", "g.h5:/inputs", "w.npy", "-o", "o.npy"], "Error: INPUT 'g.h5:/inputs': '/inputs' is a group, not a "
                                                          "dataset: name a dataset inside it, or give OUTPUT as a "
                                                          "group (like out.h5:/outputs/) or a template with {stem}, "
                                                          "{name} or {index} to convert every dataset in it"),
        (["run", "g.h5:/empty/", "w.npy", "-o", "o.h5:/o/"], "Error: INPUT 'g.h5:/empty/': group '/empty/' holds no "
                                                             "dataset"),
    ],
)
def test_many_tensors_mistakes(work, args, message):
    _many(work)
    with h5py.File("g.h5", "w") as f:
        f["inputs/a"] = np.zeros((1, 2, 2, 3), np.float32)
        f.create_group("empty")
    r = invoke(*args)
    assert error_line(r) == message


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal_and_only_in_pieces(monkeypatch):
    from convt_cli import cli as cli_module

    for total, chunk, quiet, terminal, shown in [(8, 3, False, True, True), (8, 8, False, True, False),
                                                 (8, 3, True, True, False), (8, 3, False, False, False)]:
        err = _Terminal() if terminal else io.StringIO()
        monkeypatch.setattr(cli_module.sys, "stderr", err)
        with cli_module._progress(total, chunk, quiet, "convt run") as bar:
            for done in (3, 3, 2):
                bar.update(done)
        assert ("convt run" in err.getvalue()) == shown, (total, chunk, quiet, terminal)


def test_a_template_that_sends_two_inputs_to_one_output_is_refused(work):
    _many(work)
    os.mkdir("in/sub")
    np.save("in/sub/a.npy", np.zeros((1, 5, 6, 3), np.float32))
    r = invoke("run", "in/**/a.npy", "w.npy", "-o", "out/{name}")
    assert error_line(r) == ("Error: OUTPUT 'out/{name}': 'in/a.npy' and 'in/sub/a.npy' would both be written to "
                             "'out/a.npy': use {index}, or {stem} with distinct names")
    assert os.listdir("out") == []


def _overflowing_late(tmp_batch=8):
    x = np.ones((tmp_batch, 2, 2, 3), np.int32)
    x[-2:] = 2**22  # only the last batch elements overflow int32
    np.save("xi.npy", x)
    np.save("wi.npy", np.full((1, 1, 2, 3), 2**9, np.int32))


def test_a_failure_late_in_a_streamed_run_puts_nothing_on_stdout(work):
    _overflowing_late()
    r = invoke("run", "xi.npy", "wi.npy", "-o", "-", "--max-memory", "20K")
    assert error_line(r).startswith("Error: conv_transpose: int32 result overflows")
    assert r.stdout_bytes == b""


def test_a_failed_write_into_an_existing_h5_takes_away_the_groups_it_made(work):
    _overflowing_late()
    with h5py.File("k.h5", "w") as f:
        f["keep"] = np.arange(3)
    r = invoke("run", "xi.npy", "wi.npy", "-o", "k.h5:/new/deeper/y", "--max-memory", "20K")
    assert error_line(r).startswith("Error: conv_transpose: int32 result overflows")
    with h5py.File("k.h5") as f:
        assert list(f) == ["keep"]


@pytest.mark.parametrize(
    "template,message",
    [
        ("out/{stem.upper}.npy", "Error: OUTPUT 'out/{stem.upper}.npy': '{stem.upper}' is not a template field: use "
                                 "{stem}, {name} or {index} (a format spec such as {index:03d} is fine)"),
        ("out/{index[0]}.npy", "Error: OUTPUT 'out/{index[0]}.npy': '{index[0]}' is not a template field: use "
                               "{stem}, {name} or {index} (a format spec such as {index:03d} is fine)"),
        ("out/{stem:d}.npy", "Error: OUTPUT 'out/{stem:d}.npy': not a template convt can fill (Unknown format code "
                             "'d' for object of type 'str')"),
        ("in/{stem}_up.npy", "Error: OUTPUT 'in/{stem}_up.npy': 'in/a.npy' would be written to 'in/a_up.npy', which "
                             "is the input 'in/a_up.npy': write the outputs elsewhere"),
    ],
)
def test_bad_templates_are_refused_before_anything_runs(work, template, message):
    _many(work)
    np.save("in/a_up.npy", np.zeros((1, 5, 6, 3), np.float32))
    before = {p: open(os.path.join("in", p), "rb").read() for p in os.listdir("in")}
    r = invoke("run", "in/*.npy", "w.npy", "-o", template, "--force")
    assert error_line(r) == message
    assert {p: open(os.path.join("in", p), "rb").read() for p in os.listdir("in")} == before
    assert os.listdir("out") == []


def test_format_specs_in_templates(work):
    _many(work)
    r = invoke("run", "in/*.npy", "w.npy", "-o", "out/{index:03d}_{stem}.npy")
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir("out")) == ["000_a.npy", "001_b.npy", "002_c.npy"]


def test_a_bad_cast_names_its_place_in_the_whole_batch_when_streaming(work):
    x = np.zeros((8, 2, 2, 3))
    x[6, 1, 0, 1] = 1e12
    np.save("xf.npy", x)
    np.save("wf.npy", np.ones((1, 1, 2, 3)))
    r = invoke("run", "xf.npy", "wf.npy", "--dtype", "int32", "-o", "y.npy", "--max-memory", "2K")
    assert error_line(r).startswith("Error: --dtype int32: INPUT holds 1 value in batch elements 6..")
    assert "(1000000000000.0 at [6, 1, 0, 1])" in r.stderr
