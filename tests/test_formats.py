"""The format interface: every registered format held to one contract, and a new format picked up from the table.

Matrix: every format in formats.FORMATS (and stdin/stdout) × dtypes (float32, float64, int32, complex64,
bfloat16) × shapes (batch of 5, batch of 1, empty batch, rank 1): sniffed by its bytes and chosen by its suffix,
header = what was written, whole load, every batch slice through io.Source, written in chunks through io.Sink and
committed, aborted (nothing left), listed; formats whose outputs share a file: a second array written into it
leaves the first as it was, and an abort there too. A toy format registered in a test: sniff, output_format,
messages, the same contract, and `convt run`/`convt info` on it, with no other code touched. h5py stays
unimported by work on .npy files.
"""

import io as pyio
import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

from convt_cli import ConvtError, formats
from convt_cli import io
from convt_cli.formats.base import Format, Writer

DTYPES = [np.float32, np.float64, np.int32, np.complex64, ml_dtypes.bfloat16]
SHAPES = [(5, 3, 2), (1, 4), (0, 3), (7,)]


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _array(shape, dtype):
    a = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape) * 1.5 - 4
    return (a.astype(np.complex128) * (1 - 2j)).astype(dtype) if np.dtype(dtype).kind == "c" else a.astype(dtype)


def _folder():
    return {p: open(p, "rb").read() for p in sorted(os.listdir(".")) if os.path.isfile(p)}


def _target(fmt, stem="x", name="arr"):
    return f"{stem}{fmt.suffixes[0]}" + (f":{name}" if fmt.named else "")


def _written(text, a, chunk):
    sink = io.Sink(io.parse_ref("OUTPUT", text, must_exist=False), a.shape, a.dtype, {"by": "test"})
    for b0 in range(0, max(len(a), 1), chunk):
        sink.write(a[b0 : b0 + chunk])
    assert sink.done == len(a)
    sink.commit()


def check_contract(fmt, a):
    """What every format must do, through io's public functions only."""
    text = _target(fmt)
    ref = io.parse_ref("OUTPUT", text, must_exist=False)
    assert io.output_format(ref) == fmt.name
    io.check_output(ref, [], force=False)
    _written(text, a, chunk=2)
    assert [p for p in os.listdir(".") if p.startswith(".convt")] == []

    ref = io.parse_ref("INPUT", text)
    assert io.sniff(ref) == fmt.name  # by the bytes written, not the suffix
    os.rename(ref.path, "renamed.bin")
    assert io.sniff(io.parse_ref("INPUT", "renamed.bin")) == fmt.name
    os.rename("renamed.bin", ref.path)
    assert io.read_header(ref) == (a.shape, a.dtype)
    back = io.load(ref)
    assert back.dtype == a.dtype and back.shape == a.shape
    np.testing.assert_array_equal(back, a)

    source = io.Source(ref)
    assert (tuple(source.shape), source.dtype) == (a.shape, a.dtype)
    for b0 in range(len(a) + 1):
        for b1 in range(b0, len(a) + 1):
            np.testing.assert_array_equal(source.read(b0, b1), a[b0:b1])
            assert source.read(b0, b1).dtype == a.dtype
    source.close()

    listed = io.list_arrays(ref.path)
    assert len(listed) == 1
    assert (listed[0]["shape"], listed[0]["dtype"]) == (list(a.shape), a.dtype.name)
    assert (listed[0]["name"] or "").strip("/") == ("arr" if fmt.named else "")

    with pytest.raises(ConvtError, match="exists: pass --force to replace it$"):
        io.check_output(io.parse_ref("OUTPUT", text, must_exist=False), [], force=False)
    with pytest.raises(ConvtError, match="write the output elsewhere$"):
        io.check_output(io.parse_ref("OUTPUT", text, must_exist=False), [ref], force=True)

    before = _folder()
    sink = io.Sink(io.parse_ref("OUTPUT", text, must_exist=False), a.shape, a.dtype, force=True)
    sink.write(a[:1])
    sink.abort()
    assert _folder() == before or fmt.shares_file  # HDF5 may move bytes; its objects are checked below
    np.testing.assert_array_equal(io.load(ref), a)
    assert [p for p in os.listdir(".") if p.startswith(".convt")] == []


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", list(formats.FORMATS))
def test_every_format_keeps_the_contract(name, shape, dtype):
    fmt = formats.FORMATS[name]
    if fmt.dtypes is None or np.dtype(dtype).name in fmt.dtypes:
        check_contract(fmt, _array(shape, dtype))
        return
    with pytest.raises(ConvtError, match=f"cannot hold {np.dtype(dtype).name}: write "):  # before any byte
        _written(_target(fmt), _array(shape, dtype), chunk=2)
    assert os.listdir(".") == []


@pytest.mark.parametrize("name", [n for n, f in formats.FORMATS.items() if f.dtypes is not None])
def test_a_format_that_holds_fewer_dtypes_still_holds_every_one_convt_computes_in_but_complex128(name):
    from convt_cli.dtype_names import DTYPES as COMPUTED

    assert set(COMPUTED) - set(formats.FORMATS[name].dtypes) <= {"complex128"}


@pytest.mark.parametrize("name", [n for n, f in formats.FORMATS.items() if f.shares_file])
def test_a_second_array_in_a_shared_file_leaves_the_first(name):
    fmt = formats.FORMATS[name]
    first, second = _array((3, 2), np.float32), _array((4,), np.int32)
    _written(_target(fmt, name="first"), first, chunk=2)
    out = io.parse_ref("OUTPUT", _target(fmt, name="g/second"), must_exist=False)
    inp = io.parse_ref("INPUT", _target(fmt, name="first"))
    io.check_output(out, [inp], force=False)  # another array of the same file is not the input
    assert io.same_h5_file(out, inp)

    sink = io.Sink(out, second.shape, second.dtype)
    sink.write(second[:2])
    sink.abort()
    assert [(e["name"].strip("/"), e["shape"]) for e in io.list_arrays(out.path)] == [("first", [3, 2])]

    _written(out.text, second, chunk=3)
    np.testing.assert_array_equal(io.load(inp), first)
    np.testing.assert_array_equal(io.load(io.parse_ref("INPUT", out.text)), second)
    assert sorted(e["name"].strip("/") for e in io.list_arrays(out.path)) == ["first", "g/second"]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_stdin_and_stdout_keep_the_contract(monkeypatch, dtype):
    a = _array((5, 3), dtype)

    class Std:
        buffer = pyio.BytesIO()

    monkeypatch.setattr(sys, "stdout", Std)
    ref = io.parse_ref("OUTPUT", "-")
    assert io.output_format(ref) == "npy"
    io.check_output(ref, [], force=False)
    sink = io.Sink(ref, a.shape, a.dtype)
    sink.write(a[:2])
    assert Std.buffer.getvalue() == b""  # spooled: nothing reaches stdout before commit
    sink.write(a[2:])
    sink.commit()
    data = Std.buffer.getvalue()
    back = np.load(pyio.BytesIO(data))
    assert back.shape == a.shape
    np.testing.assert_array_equal(back.view(a.dtype), a)  # bfloat16 comes back from np.load as 2-byte void

    Std.buffer = pyio.BytesIO()
    sink = io.Sink(ref, a.shape, a.dtype)
    sink.write(a[:2])
    sink.abort()
    assert Std.buffer.getvalue() == b""

    class In:
        buffer = pyio.BytesIO(data)

    monkeypatch.setattr(sys, "stdin", In)
    source = io.Source(io.parse_ref("INPUT", "-"))
    assert source.whole and (source.shape, source.dtype) == (a.shape, a.dtype)
    np.testing.assert_array_equal(source.read(1, 4), a[1:4])


def test_the_registry_is_consistent():
    suffixes = [s for f in formats.FORMATS.values() for s in f.suffixes]
    assert len(suffixes) == len(set(suffixes)) and all(s == s.lower() and s.startswith(".") for s in suffixes)
    for name, fmt in formats.FORMATS.items():
        assert fmt.name == name and fmt.title
        _written(_target(fmt, stem=name), _array((2, 3), np.float32), chunk=1)
        if fmt.folder:  # a store: told by what the folder holds, and no other format claims a folder
            assert fmt.is_folder(f"{name}{fmt.suffixes[0]}") and not fmt.sniff(b"")
            assert not any(o.is_folder(f"{name}{fmt.suffixes[0]}") for o in formats.FORMATS.values() if o is not fmt)
            continue
        with open(f"{name}{fmt.suffixes[0]}", "rb") as f:
            head = f.read(16)
        assert fmt.sniff(head) and (not fmt.magic or head.startswith(fmt.magic)), name
        others = [o for o in formats.FORMATS.values() if o is not fmt]
        assert not any(o.sniff(head) for o in others), name  # no two formats claim the same bytes
    for length in (0x4B50, 0x4B50 + (0x0403 << 16)):  # a .safetensors header whose length starts "PK" or "PK\3\4"
        assert formats.input_format(io.parse_ref("INPUT", _safetensors_head(length))).name == "safetensors"


def _safetensors_head(length: int) -> str:
    with open("pk.safetensors", "wb") as f:
        f.write(length.to_bytes(8, "little") + b'{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}')
    return "pk.safetensors"


# ---------------------------------------------------------------------------------------------------------
# A format added by a test: one class, one entry in the table


TOY_MAGIC = b"TOYARRAY"


class Toy(Format):
    """Magic, one JSON line {"shape", "descr"}, the raw bytes: nothing io.py or the CLI knows of."""

    name, title, magic, suffixes = "toy", "toy", TOY_MAGIC, (".toy",)

    def header(self, ref):
        with open(ref.path, "rb") as f:
            f.read(len(TOY_MAGIC))
            head = json.loads(f.readline())
        return tuple(head["shape"]), np.dtype(head["descr"])

    def load(self, ref):
        shape, dtype = self.header(ref)
        with open(ref.path, "rb") as f:
            f.read(len(TOY_MAGIC))
            f.readline()
            return np.frombuffer(f.read(), dtype=dtype).reshape(shape)

    def file_writer(self, ref, path, shape, dtype, provenance, options):
        return ToyWriter(path, shape, dtype)


class ToyWriter(Writer):
    _file = None

    def __init__(self, path, shape, dtype):
        self.path, self.shape, self.dtype = path, shape, dtype
        super().__init__()

    def _open(self):
        self._file = open(self.path, "wb")
        self._file.write(TOY_MAGIC + json.dumps(dict(shape=self.shape, descr=self.dtype.str)).encode() + b"\n")

    def put(self, chunk, start):
        self._file.write(chunk.tobytes())

    def finish(self):
        self._file.close()

    def abort(self):
        if self._file is not None:
            self._file.close()


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(formats.FORMATS, "toy", Toy())


def test_a_new_format_is_one_class_in_the_table(toy):
    ref = io.parse_ref("OUTPUT", "y.toy", must_exist=False)
    assert io.output_format(ref) == "toy"
    with pytest.raises(ConvtError, match=r"^OUTPUT 'y.txt': unknown output format '.txt': expected .npy, .npz, "
                                         r".h5, .hdf5, .safetensors, .zarr or .toy, or - for stdout$"):
        io.output_format(io.parse_ref("OUTPUT", "y.txt", must_exist=False))
    open("junk", "wb").write(b"junk")
    with pytest.raises(ConvtError, match=r"^INPUT 'junk': is not a .npy, .npz, HDF5, .safetensors or toy file"):
        io.sniff(io.parse_ref("INPUT", "junk"))
    for shape in SHAPES:
        for p in os.listdir("."):
            os.remove(p)
        check_contract(Toy(), _array(shape, np.float32))


def test_a_new_format_is_sniffed_by_its_bytes_whatever_the_suffix(toy):
    io.write(io.parse_ref("OUTPUT", "y.toy", must_exist=False), np.arange(3.0))
    os.rename("y.toy", "looks.npy")
    assert io.sniff(io.parse_ref("INPUT", "looks.npy")) == "toy"
    np.testing.assert_array_equal(io.load(io.parse_ref("INPUT", "looks.npy")), np.arange(3.0))


def test_the_cli_runs_on_a_new_format_untouched(toy):
    from convt_cli.cli import cli

    x = np.arange(2 * 4 * 3, dtype=np.float64).reshape(2, 4, 3)
    w = np.ones((3, 5, 3))  # (k, c_out, c_in)
    io.write(io.parse_ref("OUTPUT", "x.toy", must_exist=False), x)
    np.save("w.npy", w)
    r = CliRunner().invoke(cli, ["run", "x.toy", "w.npy", "-o", "y.toy"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["run", "x.toy", "w.npy", "-o", "y.npy"])
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(io.load(io.parse_ref("INPUT", "y.toy")), np.load("y.npy"))
    r = CliRunner().invoke(cli, ["info", "y.toy"])
    assert r.exit_code == 0, r.output
    assert f"{np.load('y.npy').shape} float64" in r.output, r.output


# ---------------------------------------------------------------------------------------------------------
# Start-up cost


def test_work_on_npy_files_leaves_h5py_unimported(tmp_path):
    script = (
        "import sys, numpy as np\n"
        "from convt_cli import io\n"
        "np.save('a.npy', np.arange(6.).reshape(2, 3))\n"
        "ref = io.parse_ref('INPUT', 'a.npy')\n"
        "io.sniff(ref); io.read_header(ref); io.load(ref); io.list_arrays('a.npy')\n"
        "s = io.Source(ref); s.read(0, 1); s.close()\n"
        "out = io.parse_ref('OUTPUT', 'b.npy', must_exist=False)\n"
        "io.check_output(out, [ref], force=False); io.write(out, np.ones(3))\n"
        "io.expand_items('a.npy', 'c.npy')\n"
        "before = 'h5py' in sys.modules\n"
        "io.write(io.parse_ref('OUTPUT', 'c.h5', must_exist=False), np.ones(3))\n"
        "print(before, 'h5py' in sys.modules)\n"
    )
    p = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["False", "True"]  # the probe sees h5py once an .h5 file is written
