"""Hostile inputs and faults, through the `convt` command line: every bad case refused cleanly, nothing lost.

Matrix: the corpus (CASES; files, dtypes, ranks and shapes, every flag, zero sizes, memory, output targets,
.h5/.npz references, stdin), each run through CliRunner and held to the same rule: exit code 2, exactly one
`Error:` line (the exact text, naming the problem), no traceback, nothing on stdout, and the working folder
exactly as it was (every file byte-identical, nothing created, no temporary file left).
"""

import errno
import gzip
import hashlib
import math
import os
import re
import shutil
import signal
import subprocess
import time
import warnings
import zipfile
from io import BytesIO

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convt_cli import cli as cli_module
from convt_cli import conv_transpose
from conftest import convt_command, invoke
from loop_reference import conv_transpose_loop


@pytest.fixture
def work(work, tmp_path):
    """conftest's folder with x.npy and w.npy, as its path: these tests look at the files in it."""
    return tmp_path


def snapshot(folder):
    """Every file under folder (hidden ones too) -> sha256 of its bytes (of a sparse giant: size, mtime, head)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.isfile(path):  # a fifo: reading it would block
                out[os.path.relpath(path, folder)] = "special"
                continue
            stat = os.stat(path)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read(64 << 20)).hexdigest()
            out[os.path.relpath(path, folder)] = digest if stat.st_size <= 64 << 20 else (
                digest, stat.st_size, stat.st_mtime_ns)
    return out


def assert_refused(r, expected):
    """Exit 2, one `Error:` line equal to `expected` (a re.Pattern: matching it), no traceback, empty stdout."""
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    if isinstance(expected, re.Pattern):
        assert expected.fullmatch(lines[0]), lines[0]
    else:
        assert lines[0] == expected
    assert r.stdout == ""


# ---------------------------------------------------------------------------------------------------------
# Files the cases are built from (in the working folder, beside x.npy (2, 5, 6, 3) and w.npy (3, 3, 4, 3))


def put(name, data: bytes):
    with open(name, "wb") as f:
        f.write(data)


def read(name) -> bytes:
    with open(name, "rb") as f:
        return f.read()


def npy_bytes(a, allow_pickle=False):
    buf = BytesIO()
    np.save(buf, a, allow_pickle=allow_pickle)
    return buf.getvalue()


def npy_header_only(name, shape, descr="<f4", size=None):
    """A .npy header claiming `shape`; the data is a sparse hole of `size` bytes (default: all of it)."""
    header = {"descr": descr, "fortran_order": False, "shape": tuple(shape)}
    with open(name, "wb") as f:
        np.lib.format.write_array_header_2_0(f, header)
        f.truncate(f.tell() + (math.prod(shape) * np.dtype(descr).itemsize if size is None else size))


class Unpickled:
    """Unpickling this writes a file named 'unpickled': the snapshot would show it."""

    def __reduce__(self):
        return (open, ("unpickled", "w"))


def pickled_npy(name):
    put(name, npy_bytes(np.array([Unpickled()] * 90, dtype=object).reshape(2, 5, 3, 3), allow_pickle=True))


def h5(name, **datasets):
    with h5py.File(name, "w") as f:
        for path, value in datasets.items():
            if value is None:
                f.create_group(path)
            else:
                f[path] = value


def x_like(dtype=np.float32, shape=(2, 5, 6, 3)):
    return np.arange(math.prod(shape)).reshape(shape).astype(dtype)


RUN = ["run", "x.npy", "w.npy", "-o", "y.npy"]


def case(id, args, expected, setup=None, stdin=None):
    return pytest.param(args, expected, setup, stdin, id=id)


CASES = [
    # --- damaged and disguised files
    case("truncated-npy", ["run", "t.npy", "w.npy", "-o", "y.npy"],
         "Error: INPUT 't.npy': is truncated: header says shape (2, 5, 6, 3) float32, needing 848 bytes, the file "
         "has 844",
         lambda: put("t.npy", read("x.npy")[:-4])),
    case("truncated-npy-header", ["run", "t.npy", "w.npy", "-o", "y.npy"],
         re.compile(r"Error: INPUT 't.npy': is not a readable .npy file \(.+\)"),
         lambda: put("t.npy", read("x.npy")[:30])),
    case("garbage-bytes", ["run", "g.npy", "w.npy", "-o", "y.npy"],
         "Error: INPUT 'g.npy': is not a .npy, .npz, HDF5 or .safetensors file or a zarr store (it starts with "
         "b'\\x00\\x01\\xfegarba')",
         lambda: put("g.npy", b"\x00\x01\xfegarbage" * 10)),
    case("empty-file", ["run", "e.npy", "w.npy", "-o", "y.npy"],
         "Error: INPUT 'e.npy': is empty, expected a .npy, .npz, HDF5 or .safetensors file "
         "or a zarr store", lambda: put("e.npy", b"")),
    case("npy-suffix-on-csv", ["run", "x.csv.npy", "w.npy", "-o", "y.npy"],
         "Error: INPUT 'x.csv.npy': is not a .npy, .npz, HDF5 or .safetensors file "
         "or a zarr store (it starts with b'1.0,2.0,')",
         lambda: put("x.csv.npy", b"1.0,2.0,3.0\n4.0,5.0,6.0\n")),
    case("npy-suffix-on-gzip", ["run", "x.gz.npy", "w.npy", "-o", "y.npy"],
         re.compile(r"Error: INPUT 'x.gz.npy': is not a .npy, .npz, HDF5 or .safetensors file or a zarr store "
                    r"\(it starts with b'\\x1f\\x8b.*'\)"),
         lambda: put("x.gz.npy", gzip.compress(read("x.npy"), mtime=0))),
    case("npy-header-negative-shape", ["run", "n.npy", "w.npy", "-o", "y.npy"],
         "Error: INPUT 'n.npy': is not a readable .npy file (its header claims the negative shape (2, -5, 6, 3))",
         lambda: npy_header_only("n.npy", (2, -5, 6, 3), size=0)),
    case("npy-header-shape-beyond-int64", ["run", "n.npy", "w.npy", "-o", "y.npy"],
         "Error: INPUT 'n.npy': is truncated: header says shape (1099511627776, 1099511627776, 1099511627776, 1) "
         "float32, needing 5316911983139663491615228241121378432 bytes, the file has 128",
         lambda: npy_header_only("n.npy", (2**40, 2**40, 2**40, 1), size=0)),
    case("npz-member-header-claims-more", ["run", "z.npz", "w.npy", "-o", "y.npy"],
         "Error: INPUT 'z.npz': is truncated: header says shape (2, 5, 6, 3) float32, needing 848 bytes, the file "
         "has 300", lambda: zipfile.ZipFile("z.npz", "w").writestr("a.npy", read("x.npy")[:300])),
    case("npz-suffix-on-garbage-zip", ["run", "z.npz", "w.npy", "-o", "y.npy"],
         re.compile(r"Error: INPUT 'z.npz': is not a readable .npz file \(.+\)"),
         lambda: put("z.npz", b"PK\x03\x04 this is no zip")),
    case("h5-suffix-on-text", ["run", "x.h5", "w.npy", "-o", "y.npy"],
         "Error: INPUT 'x.h5': is not a .npy, .npz, HDF5 or .safetensors file "
         "or a zarr store (it starts with b'not hdf5')",
         lambda: put("x.h5", b"not hdf5 at all")),
    case("h5-magic-then-junk", ["run", "x.h5", "w.npy", "-o", "y.npy"],
         re.compile(r"Error: INPUT 'x.h5': cannot be opened as HDF5 \(.+\)"),
         lambda: put("x.h5", b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)),
    case("input-missing", ["run", "nope.npy", "w.npy", "-o", "y.npy"], "Error: INPUT 'nope.npy': no such file"),
    case("input-is-a-folder", ["run", "d", "w.npy", "-o", "y.npy"],
         "Error: INPUT 'd': is a folder, expected a .npy, .npz, HDF5 or .safetensors file "
         "or a zarr store", lambda: os.mkdir("d")),
    case("input-is-a-pipe", ["run", "fifo", "w.npy", "-o", "y.npy"],
         "Error: INPUT 'fifo': is not a regular file (a pipe or a device): give a file, or - to read a .npy stream "
         "from stdin", lambda: os.mkfifo("fifo")),
    case("input-nul-byte", ["run", "x.npy\0.npy", "w.npy", "-o", "y.npy"],
         "Error: INPUT 'x.npy\\x00.npy': a path cannot hold a NUL byte"),
    case("output-nul-byte", ["run", "x.npy", "w.npy", "-o", "y\0.npy"],
         "Error: OUTPUT 'y\\x00.npy': a path cannot hold a NUL byte"),
    # --- pickles: refused, never unpickled (Unpickled would create a file the snapshot sees)
    case("pickle-npy", ["run", "p.npy", "w.npy", "-o", "y.npy"],
         "Error: INPUT 'p.npy': holds Python objects (a pickle); convt never unpickles: save a numeric array "
         "instead", lambda: pickled_npy("p.npy")),
    case("pickle-npz", ["run", "p.npz:x", "w.npy", "-o", "y.npy"],
         "Error: INPUT 'p.npz:x': holds Python objects (a pickle); convt never unpickles: save a numeric array "
         "instead", lambda: np.savez("p.npz", x=np.array([Unpickled()] * 90, dtype=object).reshape(2, 5, 3, 3))),
    case("pickle-stdin", ["run", "-", "w.npy", "-o", "y.npy"],
         "Error: INPUT '-': holds Python objects (a pickle); convt never unpickles: save a numeric array instead",
         None, npy_bytes(np.array([Unpickled()] * 90, dtype=object).reshape(2, 5, 3, 3), allow_pickle=True)),
    # --- dtypes
    case("structured-dtype", ["run", "s.npy", "w.npy", "-o", "y.npy"],
         "Error: INPUT 's.npy': dtype [('a', '<f4'), ('b', '<i4')] (structured) is not supported: expected one "
         "of float16, bfloat16, float32, float64, int32, complex64, complex128",
         lambda: np.save("s.npy", np.zeros((2, 5, 6, 3), [("a", "<f4"), ("b", "<i4")]))),
    case("string-dtype", ["run", "s.npy", "w.npy", "-o", "y.npy", "--dtype", "float32"],
         "Error: INPUT 's.npy': dtype <U21 (text) is not supported: expected one of float16, bfloat16, float32, "
         "float64, int32, complex64, complex128", lambda: np.save("s.npy", x_like(str))),
    case("bytes-dtype", ["run", "s.npy", "w.npy", "-o", "y.npy"],
         "Error: INPUT 's.npy': dtype |S21 (bytes) is not supported: expected one of float16, bfloat16, float32, "
         "float64, int32, complex64, complex128", lambda: np.save("s.npy", x_like(bytes))),
    case("h5-variable-length-strings", ["run", "d.h5:/s", "w.npy", "-o", "y.npy"],
         "Error: INPUT 'd.h5:/s': dtype |O (Python objects or variable-length data) is not supported: expected one "
         "of float16, bfloat16, float32, float64, int32, complex64, complex128",
         lambda: h5("d.h5", s=np.array(["a", "bc"] * 45, dtype=h5py.string_dtype()).reshape(2, 5, 3, 3))),
    case("bool-dtype", ["run", "b.npy", "w.npy", "-o", "y.npy"],
         "Error: INPUT 'b.npy': dtype bool is not supported: expected one of float16, bfloat16, float32, float64, "
         "int32, complex64, complex128; pass --dtype float32 (or another) to cast it",
         lambda: np.save("b.npy", x_like(bool))),
    case("int64-dtype", ["run", "i.npy", "w.npy", "-o", "y.npy"],
         "Error: INPUT 'i.npy': dtype int64 is not supported: expected one of float16, bfloat16, float32, "
         "float64, int32, complex64, complex128; pass --dtype float32 (or another) to cast it",
         lambda: np.save("i.npy", x_like(np.int64))),
    case("uint8-filters", ["run", "x.npy", "u.npy", "-o", "y.npy"],
         "Error: FILTERS 'u.npy': dtype uint8 is not supported: expected one of float16, bfloat16, float32, "
         "float64, int32, complex64, complex128; pass --dtype float32 (or another) to cast it",
         lambda: np.save("u.npy", x_like(np.uint8, (3, 3, 4, 3)))),
    case("datetime-dtype", ["run", "t.npy", "w.npy", "-o", "y.npy", "--dtype", "float64"],
         "Error: INPUT 't.npy': dtype datetime64[s] is not supported: expected one of float16, bfloat16, float32, "
         "float64, int32, complex64, complex128", lambda: np.save("t.npy", x_like("M8[s]"))),
    case("dtype-mismatch", ["run", "x.npy", "w64.npy", "-o", "y.npy"],
         "Error: INPUT is float32 but FILTERS is float64: they must share a dtype; pass --dtype float32 (or "
         "another) to cast both", lambda: np.save("w64.npy", x_like(np.float64, (3, 3, 4, 3)))),
    case("complex-cast-to-real", ["run", "c.npy", "wc.npy", "-o", "y.npy", "--dtype", "float32"],
         "Error: --dtype float32: INPUT is complex64 and casting it to a real dtype would drop the imaginary part: "
         "use --dtype complex64 or complex128",
         lambda: (np.save("c.npy", x_like(np.complex64)), np.save("wc.npy", x_like(np.complex64, (3, 3, 4, 3))))),
    case("nan-cast-to-int32", ["run", "x.npy", "wn.npy", "-o", "y.npy", "--dtype", "int32"],
         "Error: --dtype int32: FILTERS holds 1 value that is not finite or outside int32 (nan at [0, 1, 3, 0]): "
         "int32 cannot represent it", lambda: np.save("wn.npy", np.where(
             np.arange(108).reshape(3, 3, 4, 3) == 21, np.nan, 1.0).astype(np.float32))),
    case("int64-cast-to-int32-wraps", ["run", "i.npy", "wi.npy", "-o", "y.npy", "--dtype", "int32"],
         "Error: --dtype int32: INPUT holds 2 values that are not finite or outside int32 (1099511627776 at [0, 0, "
         "0, 0]): int32 cannot represent them",
         lambda: (np.save("i.npy", np.where(x_like(np.int64) < 2, 2**40, 1)), np.save("wi.npy", x_like(np.int64, (
             3, 3, 4, 3))))),
    case("int32-result-overflows", ["run", "i.npy", "wi.npy", "-o", "y.npy"],
         re.compile(r"Error: conv_transpose: int32 result overflows: .*\b4294967296\b.* outside "
                    r"\[-2147483648, 2147483647\]; cast the inputs to float64 instead"),
         lambda: (np.save("i.npy", np.full((1, 2, 2, 2), 2**30, np.int32)),
                  np.save("wi.npy", np.full((1, 1, 1, 2), 2, np.int32)))),
    # --- ranks and shapes
    case("rank-too-small", ["run", "r.npy", "w.npy", "-o", "y.npy"],
         "Error: INPUT 'r.npy': conv_transpose: input must have rank >= 3 (batch, spatial..., channels), got rank 2 "
         "with shape "
         "(5, 3)", lambda: np.save("r.npy", x_like(np.float32, (5, 3)))),
    case("rank-0", ["run", "r.npy", "w.npy", "-o", "y.npy"],
         "Error: INPUT 'r.npy': conv_transpose: input must have rank >= 3 (batch, spatial..., channels), got rank 0 "
         "with shape ()",
         lambda: np.save("r.npy", np.float32(1))),
    case("filters-rank", ["run", "x.npy", "r.npy", "-o", "y.npy"],
         "Error: INPUT 'x.npy': conv_transpose: filters must have rank 4 like the input (spatial..., out_channels, "
         "in_channels), "
         "got rank 3 with shape (3, 4, 3)", lambda: np.save("r.npy", x_like(np.float32, (3, 4, 3)))),
    case("rank-vs-data-format", RUN + ["--data-format", "NCW"],
         "Error: INPUT 'x.npy': conv_transpose: data_format='NCW' does not fit 2 spatial dims (input rank 4) (it is "
         "for 1 spatial "
         "dims): expected 'NHWC', 'NCHW', 'channels_last' or 'channels_first'"),
    case("rank-6-vs-data-format", ["run", "r.npy", "r.npy", "-o", "y.npy", "--data-format", "NDHWC"],
         "Error: INPUT 'r.npy': conv_transpose: data_format='NDHWC' does not fit 4 spatial dims (input rank 6) (it is "
         "for 3 "
         "spatial dims): expected 'channels_last' or 'channels_first'",
         lambda: np.save("r.npy", np.ones((1, 1, 1, 1, 1, 1), np.float32))),
    case("channel-mismatch", ["run", "x.npy", "w2.npy", "-o", "y.npy"],
         "Error: INPUT 'x.npy': conv_transpose: filters.shape[-1]=2 (in_channels) must equal the input's channels 3 "
         "(filters are "
         "spatial + [out_channels, in_channels]; input shape (2, 5, 6, 3), data_format NHWC)",
         lambda: np.save("w2.npy", x_like(np.float32, (3, 3, 3, 2)))),
    case("output-shape-batch", RUN + ["--output-shape", "3,5,6,4"],
         "Error: INPUT 'x.npy': conv_transpose: output_shape[0]=3 (batch) must equal the input's batch size 2"),
    case("output-shape-channels", RUN + ["--output-shape", "2,5,6,5"],
         "Error: INPUT 'x.npy': conv_transpose: output_shape[3]=5 (channels) must equal filters.shape[-2]=4 "
         "(out_channels)"),
    case("output-shape-out-of-range", RUN + ["--output-shape", "2,99,12,4", "--strides", "2"],
         "Error: INPUT 'x.npy': conv_transpose: output_shape[1]=99 is not reachable from input size 5 with kernel 3, "
         "stride 2, "
         "dilation 1, padding SAME: legal sizes are 9..10 (SAME needs (I-1)*s+1 <= O <= I*s)"),
    case("output-shape-length", RUN + ["--output-shape", "5,6,4"],
         "Error: INPUT 'x.npy': conv_transpose: output_shape must have N+2=4 entries (the full shape in data_format "
         "order) or N=2 "
         "(spatial sizes only), got 3: [5, 6, 4]"),
    case("output-shape-negative", RUN + ["--output-shape", "-5,6"],
         "Error: INPUT 'x.npy': conv_transpose: output_shape[0]=-5 must be >= 0"),
    case("output-shape-text", RUN + ["--output-shape", "5,six"],
         "Error: --output-shape: expected comma-separated integers like 8,64,64,128 (full) or 64,64 (spatial), got "
         "'5,six'"),
    # --- strides, dilations, padding, data_format
    case("strides-0", RUN + ["--strides", "0"], "Error: INPUT 'x.npy': conv_transpose: strides[0]=0 must be >= 1"),
    case("strides-negative", RUN + ["--strides", "1,-2"],
         "Error: INPUT 'x.npy': conv_transpose: strides[1]=-2 must be >= 1"),
    case("strides-length", RUN + ["--strides", "1,2,2"],
         "Error: INPUT 'x.npy': conv_transpose: strides must have length 1, N=2 or N+2=4, got length 3: [1, 2, 2]"),
    case("strides-batch-entry", RUN + ["--strides", "2,2,2,1"],
         "Error: INPUT 'x.npy': conv_transpose: strides[0]=2 is the batch entry and must be 1"),
    case("strides-float", RUN + ["--strides", "1.5"],
         "Error: --strides: expected comma-separated integers like 2 or 1,2,2,1, got '1.5'"),
    case("strides-empty", RUN + ["--strides", ""],
         "Error: --strides: expected comma-separated integers like 2 or 1,2,2,1, got ''"),
    case("dilations-0", RUN + ["--dilations", "0"],
         "Error: INPUT 'x.npy': conv_transpose: dilations[0]=0 must be >= 1"),
    case("dilations-negative", RUN + ["--dilations", "-1"],
         "Error: INPUT 'x.npy': conv_transpose: dilations[0]=-1 must be >= 1"),
    case("dilations-length", RUN + ["--dilations", "1,1,1"],
         "Error: INPUT 'x.npy': conv_transpose: dilations must have length 1, N=2 or N+2=4, got length 3: [1, 1, 1]"),
    case("dilations-text", RUN + ["--dilations", "two"],
         "Error: --dilations: expected comma-separated integers like 2 or 1,2,2,1, got 'two'"),
    case("padding-typo", RUN + ["--padding", "SAEM"],
         "Error: --padding: expected SAME, VALID, SAME_LOWER, p, lo:hi, or lo:hi per spatial axis like 0:1,1:1, got "
         "'SAEM'"),
    case("padding-count", RUN + ["--padding", "0:1,1:1,2:2"],
         "Error: INPUT 'x.npy': conv_transpose: explicit padding must have N=2 or N+2=4 (lo, hi) pairs, got 3"),
    case("padding-negative", RUN + ["--padding", "-1:0,0:0"],
         "Error: INPUT 'x.npy': conv_transpose: padding for spatial axis 0 is (-1, 0): pads must be >= 0"),
    case("data-format-typo", RUN + ["--data-format", "NHCW"],
         "Error: INPUT 'x.npy': conv_transpose: data_format='NHCW' does not fit 2 spatial dims (input rank 4): "
         "expected 'NHWC', "
         "'NCHW', 'channels_last' or 'channels_first'"),
    case("dtype-flag-typo", RUN + ["--dtype", "float"],
         "Error: Invalid value for '--dtype': 'float' is not one of 'float16', 'bfloat16', 'float32', 'float64', "
         "'int32', 'complex64', 'complex128'."),
    # --- zero sizes that no flag makes legal (the legal ones compute: test_legal_zero_sizes)
    case("zero-kernel-size", ["run", "x.npy", "wk.npy", "-o", "y.npy"],
         "Error: INPUT 'x.npy': conv_transpose: filters.shape[1]=0: kernel sizes must be >= 1 (filters shape (3, 0, "
         "4, 3))",
         lambda: np.save("wk.npy", np.zeros((3, 0, 4, 3), np.float32))),
    case("zero-spatial-no-legal-output", ["run", "x0.npy", "w.npy", "-o", "y.npy", "--padding", "2:2,0:0"],
         "Error: INPUT 'x0.npy': conv_transpose: default output size on spatial axis 0=0 is not reachable from input "
         "size 0 with "
         "kernel 3, stride 1, dilation 1, padding (2, 2): no output size is legal (explicit (lo, hi) needs "
         "(O+lo+hi-eff)//s+1 == I with eff=(K-1)*d+1)", lambda: np.save("x0.npy", np.zeros((2, 0, 6, 3), np.float32))),
    case("zero-output-size", RUN + ["--output-shape", "0,6"],
         "Error: INPUT 'x.npy': conv_transpose: output_shape[0]=0 is not reachable from input size 5 with kernel 3, "
         "stride 1, "
         "dilation 1, padding SAME: legal sizes are 5..5 (SAME needs (I-1)*s+1 <= O <= I*s)"),
    case("zero-batch-vs-output-shape", ["run", "xb.npy", "w.npy", "-o", "y.npy", "--output-shape", "2,5,6,4"],
         "Error: INPUT 'xb.npy': conv_transpose: output_shape[0]=2 (batch) must equal the input's batch size 0",
         lambda: np.save("xb.npy", np.zeros((0, 5, 6, 3), np.float32))),
    # --- output targets
    case("output-folder-missing", ["run", "x.npy", "w.npy", "-o", "nowhere/y.npy"],
         "Error: OUTPUT 'nowhere/y.npy': folder 'nowhere' does not exist"),
    case("output-folder-is-a-file", ["run", "x.npy", "w.npy", "-o", "x.npy/y.npy"],
         "Error: OUTPUT 'x.npy/y.npy': folder 'x.npy' does not exist"),
    case("output-not-writable", ["run", "x.npy", "w.npy", "-o", "/sys/convt-y.npy"],
         re.compile(r"Error: OUTPUT '/sys/convt-y.npy': folder '/sys' is not writable \((Permission denied|"
                    r"Read-only file system)\)")),
    case("output-is-input", ["run", "x.npy", "w.npy", "-o", "x.npy", "--force"],
         "Error: OUTPUT 'x.npy': is the same as INPUT 'x.npy': write the output elsewhere"),
    case("output-is-input-respelled", ["run", "x.npy", "w.npy", "-o", "./sub/../w.npy", "--force"],
         "Error: OUTPUT './sub/../w.npy': is the same as FILTERS 'w.npy': write the output elsewhere",
         lambda: os.mkdir("sub")),
    case("output-is-input-via-symlink", ["run", "x.npy", "w.npy", "-o", "link.npy", "--force"],
         "Error: OUTPUT 'link.npy': is the same as INPUT 'x.npy': write the output elsewhere",
         lambda: os.symlink("x.npy", "link.npy")),
    case("output-is-input-dataset", ["run", "d.h5:/x", "w.npy", "-o", "d.h5:x", "--force"],
         "Error: OUTPUT 'd.h5:x': is the same as INPUT 'd.h5:/x': write the output elsewhere",
         lambda: h5("d.h5", x=x_like())),
    case("output-exists", RUN, "Error: OUTPUT 'y.npy': exists: pass --force to replace it",
         lambda: put("y.npy", b"keep me")),
    case("output-is-a-folder", ["run", "x.npy", "w.npy", "-o", "y.npy", "--force"],
         "Error: OUTPUT 'y.npy': is a folder", lambda: os.mkdir("y.npy")),
    case("output-suffix-unknown", ["run", "x.npy", "w.npy", "-o", "y.csv"],
         "Error: OUTPUT 'y.csv': unknown output format '.csv': expected .npy, .npz, .h5, .hdf5, .safetensors or "
         ".zarr, or - for stdout"),
    case("output-h5-on-non-hdf5", ["run", "x.npy", "w.npy", "-o", "o.h5:/y", "--force"],
         "Error: OUTPUT 'o.h5:/y': exists and is not an HDF5 file", lambda: put("o.h5", b"plain text")),
    case("output-h5-root", ["run", "x.npy", "w.npy", "-o", "o.h5:/"],
         "Error: OUTPUT 'o.h5:/': names the root group: name a dataset, as o.h5:/output"),
    case("output-h5-group-with-force", ["run", "x.npy", "w.npy", "-o", "d.h5:/runs", "--force"],
         "Error: OUTPUT 'd.h5:/runs': '/runs' is a group: name a dataset, as d.h5:/runs/output",
         lambda: h5("d.h5", **{"runs/a": x_like(), "runs/b": x_like()})),
    case("output-h5-inside-a-dataset", ["run", "x.npy", "w.npy", "-o", "d.h5:/a/y", "--force"],
         "Error: OUTPUT 'd.h5:/a/y': '/a' is a dataset, so '/a/y' cannot be made inside it",
         lambda: h5("d.h5", a=x_like())),
    case("output-is-the-only-dataset-of-input", ["run", "d.h5", "w.npy", "-o", "d.h5:/g/x", "--force"],
         "Error: OUTPUT 'd.h5:/g/x': is the same as INPUT 'd.h5': write the output elsewhere",
         lambda: h5("d.h5", **{"g/x": x_like()})),
    case("output-name-not-utf8", ["run", "x.npy", "w.npy", "-o", "y.npz:\udcff"],
         "Error: OUTPUT 'y.npz:\\udcff': the name after ':' is not valid UTF-8"),
    # --- .h5 and .npz references
    case("h5-dataset-missing", ["run", "d.h5:/inputs/b", "w.npy", "-o", "y.npy"],
         "Error: INPUT 'd.h5:/inputs/b': has no dataset '/inputs/b'", lambda: h5("d.h5", **{"inputs/a": x_like()})),
    case("h5-path-is-group", ["run", "d.h5:/inputs", "w.npy", "-o", "y.npy"],
         "Error: INPUT 'd.h5:/inputs': '/inputs' is a group, not a dataset: name a dataset inside it, or give OUTPUT "
         "as a group (like out.h5:/outputs/) or a template with {stem}, {name} or {index} to convert every dataset "
         "in it",
         lambda: h5("d.h5", **{"inputs/a": x_like()})),
    case("h5-several-datasets-no-name", ["run", "d.h5", "w.npy", "-o", "y.npy"],
         "Error: INPUT 'd.h5': holds 2 datasets (/a, /b): name one, as d.h5:/a",
         lambda: h5("d.h5", a=x_like(), b=x_like())),
    case("h5-no-dataset", ["run", "d.h5", "w.npy", "-o", "y.npy"],
         "Error: INPUT 'd.h5': holds 0 datasets (): name one, as d.h5:/NAME", lambda: h5("d.h5", g=None)),
    case("h5-empty-dataspace", ["run", "d.h5:/e", "w.npy", "-o", "y.npy"],
         "Error: INPUT 'd.h5:/e': dataset '/e' has no data (an empty HDF5 dataspace)",
         lambda: h5("d.h5", e=h5py.Empty("f4"))),
    case("npz-several-arrays-no-name", ["run", "z.npz", "w.npy", "-o", "y.npy"],
         "Error: INPUT 'z.npz': holds 2 arrays (a, b): name one, as z.npz:a",
         lambda: np.savez("z.npz", a=x_like(), b=x_like())),
    case("npz-member-missing", ["run", "z.npz:c", "w.npy", "-o", "y.npy"],
         "Error: INPUT 'z.npz:c': has no array 'c': it holds a, b", lambda: np.savez("z.npz", a=x_like(), b=x_like())),
    case("npz-member-truncated", ["run", "z.npz", "w.npy", "-o", "y.npy"],
         re.compile(r"Error: INPUT 'z.npz': is not a readable .npz file \(.+\)"),
         lambda: (np.savez("z.npz", a=x_like()), put("z.npz", read("z.npz")[:200]))),
    # --- stdin
    case("stdin-empty", ["run", "-", "w.npy", "-o", "y.npy"],
         "Error: INPUT '-': stdin is empty: expected a .npy stream", None, b""),
    case("stdin-not-npy", ["run", "-", "w.npy", "-o", "y.npy"],
         "Error: INPUT '-': stdin is not a .npy stream (it starts with b'1,2,3\\n4,')", None, b"1,2,3\n4,5,6\n"),
    case("stdin-npz", ["run", "-", "w.npy", "-o", "y.npy"],
         "Error: INPUT '-': stdin is not a .npy stream (it starts with b'PK\\x03\\x04\\x14\\x00\\x00\\x00')", None,
         b"PK\x03\x04\x14\x00\x00\x00" + b"\x00" * 40),
    case("stdin-truncated", ["run", "-", "w.npy", "-o", "y.npy"],
         "Error: INPUT '-': is truncated: header says shape (2, 5, 6, 3) float32, needing 848 bytes, the file has "
         "300", None, npy_bytes(x_like())[:300]),
    case("stdin-for-both", ["run", "-", "-", "-o", "y.npy"],
         "Error: FILTERS '-': stdin is already the INPUT; give FILTERS as a file", None, b""),
    # --- memory: estimated from the headers, refused before any data is read or allocated
    case("max-memory-exceeded", RUN + ["--max-memory", "1K"],
         re.compile(r"Error: run needs about \d+\.\d KiB for even one batch element \(input 360 B, filters 432 B, "
                    r"output and work \d+\.\d KiB\) but --max-memory is 1\.0 KiB \(available: 16\.0 GiB\): use a "
                    r"lower-precision --dtype, smaller arrays, or a larger --max-memory")),
    # one batch element larger than memory is computed in spatial tiles: refused only for the disk
    case("enormous-header", ["run", "huge.npy", "wh.npy", "-o", "y.npy"],
         re.compile(r"Error: OUTPUT 'y\.npy': needs about 32\.0 TiB but only .* is free where it goes: free some "
                    r"space or write it elsewhere"),
         lambda: (npy_header_only("huge.npy", (2048, 1024, 1024, 1024)),
                  npy_header_only("wh.npy", (2, 2, 4096, 1024)))),
    case("enormous-output", RUN + ["--strides", "100000000000"],
         re.compile(r"Error: run needs about \d+\.\d PiB for even one batch element \(input 360 B, filters 432 B, "
                    r"output and work \d+\.\d PiB\) but only 16\.0 GiB is available: .*")),
    case("max-memory-text", RUN + ["--max-memory", "lots"],
         "Error: --max-memory: expected a size like 512M, 2G, 1.5GiB or a number of bytes, got 'lots'"),
    case("max-memory-verify", ["verify", "x.npy", "w.npy", "--max-memory", "20K"],
         re.compile(r"Error: verify needs about \d+\.\d KiB for even one batch element \(input 360 B, filters 432 B, "
                    r"output and work \d+\.\d KiB, verify's work \d+\.\d KiB\) but --max-memory is 20\.0 KiB "
                    r"\(available: 16\.0 GiB\): .*")),
    # --- the other commands
    case("shape-truncated", ["shape", "t.npy", "w.npy"],
         "Error: INPUT 't.npy': is truncated: header says shape (2, 5, 6, 3) float32, needing 848 bytes, the file "
         "has 844", lambda: put("t.npy", read("x.npy")[:-4])),
    case("info-garbage", ["info", "g.npy"],
         "Error: FILE 'g.npy': is not a .npy, .npz, HDF5 or .safetensors file "
         "or a zarr store (it starts with b'garbage!')",
         lambda: put("g.npy", b"garbage!garbage!")),
    case("verify-output-wrong-shape", ["verify", "x.npy", "w.npy", "y0.npy"],
         "Error: OUTPUT 'y0.npy': has shape (2, 4, 6, 4), which INPUT 'x.npy' cannot give under these flags: "
         "conv_transpose: output_shape[1]=4 is not reachable from input size 5 with kernel 3, stride 1, dilation 1, "
         "padding SAME: legal sizes are 5..5 (SAME needs (I-1)*s+1 <= O <= I*s)",
         lambda: np.save("y0.npy", np.zeros((2, 4, 6, 4), np.float32))),
    case("verify-stdin-twice", ["verify", "-", "w.npy", "-"],
         "Error: OUTPUT '-': stdin is already used; give OUTPUT as a file", None, b""),
]


@pytest.mark.parametrize("args,expected,setup,stdin", CASES)
def test_corpus(work, monkeypatch, args, expected, setup, stdin):
    monkeypatch.setattr(cli_module, "_available_memory", lambda: 16 << 30)
    if setup:
        setup()
    before = snapshot(work)
    r = invoke(*args, input=stdin)
    assert_refused(r, expected)
    assert snapshot(work) == before


# ---------------------------------------------------------------------------------------------------------
# The disk filling up during the write: no partial file, no half-made dataset


def h5_contents(path):
    """Every object of an HDF5 file with its data and attributes, to compare before and after."""
    out = {}
    with h5py.File(path) as f:
        def visit(name, obj):
            data = obj[()].tobytes() if isinstance(obj, h5py.Dataset) else None
            out[name] = (data, sorted((k, str(v)) for k, v in obj.attrs.items()))
        f.visititems(visit)
    return out


def _enospc():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("target", ["y.npy", "y.npz:y", "y.h5:/y", "keep.h5:/y", "keep.h5:/old"])
def test_disk_full_during_the_write_leaves_nothing_behind(work, monkeypatch, target):
    from convt_cli import io as convt_io

    h5("keep.h5", keep=np.arange(3), old=np.zeros(2))
    keep = h5_contents("keep.h5")
    before = snapshot(work)

    real_put = convt_io.Sink._put

    def half_then_full(sink, chunk):
        real_put(sink, chunk[: len(chunk) // 2])  # part of the data reaches the disk, then it is full
        raise _enospc()

    monkeypatch.setattr(convt_io.Sink, "_put", half_then_full)
    r = invoke("run", "x.npy", "w.npy", "-o", target, "--force")
    assert_refused(r, f"Error: OUTPUT '{target}': could not be written: No space left on device")
    after = snapshot(work)
    if target.startswith("keep.h5"):  # HDF5 bookkeeping may move bytes; every object must be as it was
        assert h5_contents("keep.h5") == keep
        before.pop("keep.h5"), after.pop("keep.h5")
    assert after == before


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs in tmp_path/disk, or a skip where this process may not mount one."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not shutil.which("mount"):
        pytest.skip("no mount command to make a small tmpfs with")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], check=False,
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root (CAP_SYS_ADMIN): {p.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("target", ["disk/y.npy", "disk/y.npz:y", "disk/y.h5:/y", "disk/keep.h5:/y"])
@pytest.mark.parametrize("when", ["before", "during"])
def test_a_really_full_disk_leaves_nothing_behind(work, small_disk, monkeypatch, target, when):
    from convt_cli import io as convt_io

    np.save("big.npy", np.ones((1, 64, 64, 64), np.float32))  # a 1 MiB output on a 256 KiB disk
    np.save("w1.npy", np.ones((1, 1, 64, 64), np.float32))
    h5("disk/keep.h5", keep=np.arange(3))
    keep = h5_contents("disk/keep.h5")
    before = snapshot(work)
    if when == "during":  # blind the check before the run, so that the write itself meets the full disk
        monkeypatch.setattr(convt_io, "free_space", lambda ref: None)
    r = invoke("run", "big.npy", "w1.npy", "-o", target)
    if when == "before":
        assert_refused(r, re.compile(rf"Error: OUTPUT '{target}': needs about 1\.0 MiB but only \d+\.\d KiB is free "
                                     r"where it goes: free some space or write it elsewhere"))
    else:
        assert_refused(r, f"Error: OUTPUT '{target}': could not be written: No space left on device")
    after = snapshot(work)
    assert h5_contents("disk/keep.h5") == keep
    before.pop("disk/keep.h5"), after.pop("disk/keep.h5")
    assert after == before


# ---------------------------------------------------------------------------------------------------------
# Ctrl-C in the middle of a real run


def _cpu_seconds(pid) -> float | None:
    """User + system CPU time of a process (all its threads), or None without /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_during_the_computation_leaves_nothing_behind(work, signum):
    # 80 GFLOP: over 2 CPU seconds here, where convt has used 0.3 s to start and read when stdin is taken;
    # the signal comes 0.15 CPU seconds later, inside the computation
    rng = np.random.default_rng(0)
    x = npy_bytes(rng.standard_normal((12, 64, 64, 128), dtype=np.float32))
    np.save("w7.npy", rng.standard_normal((7, 7, 128, 128), dtype=np.float32))
    before = snapshot(work)
    p = subprocess.Popen(convt_command() + ["run", "-", "w7.npy", "--strides", "2", "-o", "y.npy"],
                         stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        p.stdin.write(x)  # returns when convt, inside `run`, has read nearly all of it
        p.stdin.close()
        p.stdin = None  # for communicate()
        start = _cpu_seconds(p.pid)
        if start is None:
            time.sleep(1.0)
        while start is not None and p.poll() is None and (_cpu_seconds(p.pid) or math.inf) < start + 0.15:
            time.sleep(0.01)
        assert p.poll() is None, "convt finished before the signal: make the input bigger"
        p.send_signal(signum)
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 2, err
    assert err == b"Error: interrupted; no output was written\n" and out == b""
    assert snapshot(work) == before  # no y.npy, no .convt-* temporary file


# ---------------------------------------------------------------------------------------------------------
# Zero sizes that are legal compute, with the shape TF gives (the illegal ones are in the corpus)


@pytest.mark.parametrize(
    "x_shape,w_shape,flags,out_shape",
    [
        ((0, 5, 6, 3), (3, 3, 4, 3), ["--strides", "2"], (0, 10, 12, 4)),  # empty batch
        ((0, 3, 5, 6), (3, 3, 4, 3), ["--data-format", "NCHW"], (0, 4, 5, 6)),
        ((2, 5, 6, 0), (3, 3, 4, 0), [], (2, 5, 6, 4)),  # no input channels: every sum is empty, all zeros
        ((2, 5, 6, 3), (3, 3, 0, 3), [], (2, 5, 6, 0)),  # no output channels
        ((2, 0, 6, 3), (3, 3, 4, 3), ["--strides", "2"], (2, 0, 12, 4)),  # SAME: O = I*s = 0
        ((2, 0, 6, 3), (3, 3, 4, 3), ["--padding", "valid"], (2, 2, 8, 4)),  # VALID: O = (I-1)*s + eff, zeros
        ((2, 0, 6, 3), (3, 3, 4, 3), ["--padding", "valid", "--strides", "2", "--output-shape", "1,13"],
         (2, 1, 13, 4)),  # TF's truncating size rule admits O = 0..2 here
    ],
)
@pytest.mark.parametrize("target", ["y.npy", "y.h5:/y"])
def test_legal_zero_sizes_compute(work, x_shape, w_shape, flags, out_shape, target):
    np.save("x0.npy", np.ones(x_shape, np.float32))
    np.save("w0.npy", np.ones(w_shape, np.float32))
    r = invoke("run", "x0.npy", "w0.npy", "-o", target, *flags)
    assert r.exit_code == 0, r.output
    if target.endswith(".npy"):
        y = np.load("y.npy")
    else:
        with h5py.File("y.h5") as f:
            y = f["y"][()]
    assert y.shape == out_shape and y.dtype == np.float32
    assert not y.any()
    r = invoke("verify", "x0.npy", "w0.npy", target, *flags)
    assert r.exit_code == 0 and r.stdout.startswith("PASS"), r.output
    r = invoke("verify", "x0.npy", "w0.npy", *flags)
    assert r.exit_code == 0 and r.stdout.startswith("PASS"), r.output


# ---------------------------------------------------------------------------------------------------------
# Odd but valid layouts in files, and non-finite values: the right numbers, no error, no warning


def _load_any(target):
    if target.endswith(".npy"):
        return np.load(target)
    path, name = target.split(":")
    with h5py.File(path) as f:
        return f[name][()]


def _store(kind, name, a):
    """a in the layout `kind`; returns the reference to give convt."""
    if kind == "npy-fortran":
        np.save(f"{name}.npy", np.asfortranarray(a))
    elif kind == "npy-big-endian":
        np.save(f"{name}.npy", a.astype(a.dtype.newbyteorder(">")))
    elif kind == "npy-fortran-big-endian":
        np.save(f"{name}.npy", np.asfortranarray(a.astype(a.dtype.newbyteorder(">"))))
    elif kind == "npz-fortran-member":
        np.savez(f"{name}.npz", **{name: np.asfortranarray(a)})
        return f"{name}.npz:{name}"
    elif kind == "h5-big-endian":
        with h5py.File(f"{name}.h5", "w") as f:
            f.create_dataset(name, data=a, dtype=a.dtype.newbyteorder(">"))
        return f"{name}.h5:/{name}"
    elif kind == "h5-chunked-gzip":  # stored in scattered compressed pieces
        with h5py.File(f"{name}.h5", "w") as f:
            f.create_dataset(name, data=a, chunks=(1,) * (a.ndim - 1) + (a.shape[-1],), compression="gzip")
        return f"{name}.h5:/{name}"
    else:
        raise AssertionError(kind)
    return f"{name}.npy"


LAYOUTS = ["npy-fortran", "npy-big-endian", "npy-fortran-big-endian", "npz-fortran-member", "h5-big-endian",
           "h5-chunked-gzip"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.complex64])
@pytest.mark.parametrize("channels_first", [False, True])
def test_odd_layouts_in_files_give_the_right_numbers(work, layout, dtype, channels_first):
    rng = np.random.default_rng(7)
    x = rng.integers(-4, 5, (2, 5, 6, 3)).astype(dtype)
    w = rng.integers(-4, 5, (3, 2, 4, 3)).astype(dtype)
    if dtype == np.complex64:
        x, w = x + 1j * x[..., ::-1], w - 1j * w[..., ::-1]
    if channels_first:
        x = np.moveaxis(x, -1, 1)
    flags = ["--strides", "2", "--padding", "1:0,0:2", "--dilations", "1,2"]
    flags += ["--data-format", "channels_first"] if channels_first else []
    r = invoke("run", _store(layout, "x", x), _store(layout, "w", w), "-o", "y.npy", *flags)
    assert r.exit_code == 0 and r.stderr == "", r.output
    y = np.load("y.npy")
    assert y.dtype == np.dtype(dtype)  # native byte order out
    want = conv_transpose_loop(x, w, y.shape[2:] if channels_first else y.shape[1:-1], strides=2,
                               padding=[(1, 0), (0, 2)], channels_first=channels_first, dilations=[1, 2])
    np.testing.assert_array_equal(y, want.astype(dtype))  # small integers: exact in every dtype


def test_odd_layouts_through_stdin(work):
    x = np.random.default_rng(8).integers(-4, 5, (2, 5, 6, 3)).astype(">f8")
    w = np.asfortranarray(np.random.default_rng(9).integers(-4, 5, (3, 3, 4, 3)).astype(">f8"))
    np.save("w.npy", w)
    r = invoke("run", "-", "w.npy", "-o", "-", input=npy_bytes(np.asfortranarray(x)))
    assert r.exit_code == 0, r.stderr
    y = np.load(BytesIO(r.stdout_bytes))
    assert y.dtype == np.float64 and y.dtype.isnative
    np.testing.assert_array_equal(y, conv_transpose_loop(x, w, (5, 6)))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.complex128])
def test_nan_and_inf_propagate_without_error_and_verify_reports_them(work, dtype):
    x = np.ones((1, 5, 6, 2), dtype)
    x[0, 1, 1, 0] = np.nan
    x[0, 3, 4, 1] = np.inf
    w = np.ones((3, 3, 2, 2), dtype)
    w[2, 2, 1, 1] = -1  # inf meets +1 and -1: inf - inf = nan where both taps land, as in IEEE and TF
    np.save("xn.npy", x)
    np.save("wn.npy", w)
    with warnings.catch_warnings(record=True) as caught:  # a RuntimeWarning would be lines on stderr
        warnings.simplefilter("always")
        r = invoke("run", "xn.npy", "wn.npy", "-o", "y.npy")
    assert r.exit_code == 0 and r.stderr == "", r.output
    assert [str(c.message) for c in caught] == []
    y = np.load("y.npy")
    with np.errstate(invalid="ignore"):
        want = conv_transpose_loop(x, w, (5, 6))
    finite = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(y), finite)
    if dtype != np.complex128:  # complex nan/inf parts depend on the order of the products
        np.testing.assert_array_equal(np.isnan(y), np.isnan(want))
        np.testing.assert_array_equal(np.isposinf(y), np.isposinf(want))
        assert np.isnan(y).any() and np.isinf(y).any()
    np.testing.assert_array_equal(y[finite], want[finite].astype(dtype))
    bad = int((~np.isfinite(y)).sum())
    for args in (["y.npy"], []):  # a given OUTPUT, and convt's own
        r = invoke("verify", "xn.npy", "wn.npy", *args)
        assert r.exit_code == 1, r.output
        assert r.stdout.startswith(f"FAIL: the output holds {bad} non-finite values (inf or nan); wrong in batch "
                                   f"element 0 of 1 ({np.dtype(dtype).name} output (1, 5, 6, 2)")


# ---------------------------------------------------------------------------------------------------------
# Determinism: the same command writes the same bytes; a batch computed in pieces gives the same bits


@pytest.mark.parametrize("target", ["y.npy", "y.npz:y", "y.h5:/y", "into.h5:/y", "-"])
def test_the_same_command_twice_writes_identical_bytes(work, target):
    def once(folder):
        os.mkdir(folder)
        os.chdir(folder)
        try:
            h5("into.h5", keep=np.arange(3))
            r = invoke("run", "../x.npy", "../w.npy", "--strides", "2", "--padding", "valid", "-o", target)
            assert r.exit_code == 0, r.output
            return r.stdout_bytes if target == "-" else read(target.split(":")[0])
        finally:
            os.chdir("..")

    assert once("first") == once("second")


@pytest.mark.parametrize("shape,c_out", [((6, 9, 11, 5), 6), ((4, 20, 20, 130), 3), ((5, 33, 17, 24), 40),
                                         ((3, 8, 8, 8, 16), 8), ((9, 16, 16, 64), 32)])
@pytest.mark.parametrize("strides", [1, 2, 3])
@pytest.mark.parametrize("channels_first", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_batch_in_pieces_gives_the_same_bits(shape, c_out, strides, channels_first, dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal((3,) * (len(shape) - 2) + (c_out, shape[-1])).astype(dtype)
    flags = {"strides": strides, "data_format": "channels_first" if channels_first else None}
    if channels_first:
        x = np.ascontiguousarray(np.moveaxis(x, -1, 1))
    whole = conv_transpose(x, w, **flags)
    one_by_one = np.concatenate([conv_transpose(x[i : i + 1], w, **flags) for i in range(len(x))])
    uneven = np.concatenate([conv_transpose(x[:2], w, **flags), conv_transpose(x[2:], w, **flags)])
    assert np.array_equal(whole, one_by_one) and np.array_equal(whole, uneven)


# ---------------------------------------------------------------------------------------------------------
# Fuzzing every flag's parser with random text: an answer or one Error: line, never a traceback

ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=40)  # surrogates too: undecodable argv bytes
FLAG_TEXT = st.one_of(
    ANY_TEXT,
    st.lists(st.integers(-3, 2**70) | st.integers(0, 4), max_size=6).map(lambda v: ",".join(map(str, v))),
    st.lists(st.tuples(st.integers(-2, 6), st.integers(-2, 6)), max_size=5).map(
        lambda v: ",".join(f"{lo}:{hi}" for lo, hi in v)),
    st.sampled_from(["SAME", " valid ", "NHWC", "nchw", "channels_first", "float32", "BFloat16", "512M", "1.5GiB",
                     "0", "-1", "", " ", "1,,2", "1e3", "0x10", "١", "∞", "nan"]),
)
FLAGS = {
    "run": ["--strides", "--dilations", "--output-shape", "--padding", "--data-format", "--dtype", "--max-memory"],
    "shape": ["--strides", "--dilations", "--output-shape", "--padding", "--data-format", "--dtype"],
    "verify": ["--strides", "--padding", "--max-memory", "--probes", "--seed", "--rtol"],
}


@pytest.fixture(scope="module")
def fuzz_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    np.save(folder / "x.npy", rng.standard_normal((1, 3, 4, 2)).astype(np.float32))
    np.save(folder / "w.npy", rng.standard_normal((2, 2, 3, 2)).astype(np.float32))
    np.save(folder / "y.npy", np.zeros((1, 3, 4, 3), np.float32))
    return folder


def assert_clean(r, codes=(0, 2)):
    assert r.exit_code in codes, (r.exit_code, r.exception, r.output)
    assert isinstance(r.exception, (SystemExit, type(None))), r.exception
    assert "Traceback" not in r.output
    if r.exit_code == 2:
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr


def in_folder(folder, *args):
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        return invoke(*args)
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("command,flag", [(c, f) for c, flags in FLAGS.items() for f in flags])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=FLAG_TEXT)
def test_fuzz_flags(fuzz_folder, command, flag, text):
    files = {"run": ["x.npy", "w.npy", "-o", "y.npy", "--force"], "shape": ["x.npy", "w.npy"],
             "verify": ["x.npy", "w.npy", "y.npy"]}
    bound = [] if command == "shape" or flag == "--max-memory" else ["--max-memory", "64M"]  # legal but big: quick
    r = in_folder(fuzz_folder, command, *files[command], *bound, flag, text)
    assert_clean(r, (0, 1, 2) if command == "verify" else (0, 2))


@pytest.mark.parametrize("position", [0, 1, 2])
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(ANY_TEXT.filter(lambda t: "/" not in t),
                      st.sampled_from(["x.npy:", "x.npz:a", "w.h5:/", "w.H5:/g/x", ":", "-", "x.npy", ".", ".."]),
                      st.tuples(st.sampled_from(["y", "x.npz", "y.h5", "z.hdf5"]), ANY_TEXT).map(":".join)))
def test_fuzz_array_references(fuzz_folder, position, text):
    # OUTPUT never holds a '/': whatever is written stays in the fuzz folder
    args = ["x.npy", "w.npy", "-"]
    args[position] = text
    r = in_folder(fuzz_folder, "run", args[0], args[1], "-o", args[2], "--force", "--max-memory", "64M")
    assert_clean(r)
