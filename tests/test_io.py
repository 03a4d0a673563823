"""io.py: references, sniffing, headers, loading and atomic writing.

Matrix: parse_ref over plain/.npz/.h5 references and paths holding colons; sniffing by magic bytes against
misleading suffixes; header reads (truncated, pickled, bfloat16); atomic writes under a failure in the middle
(npy, npz, new .h5, dataset inside an existing .h5) and under KeyboardInterrupt: no temporary file, target
unchanged; stdout closed by its reader at commit: one ConvtError.
"""

import os
import sys

import h5py
import ml_dtypes
import numpy as np
import pytest

from convt_cli import ConvtError
from convt_cli import io


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_parse_ref_forms():
    np.save("a.npy", np.zeros(2))
    assert io.parse_ref("INPUT", "a.npy") == io.ArrayRef("INPUT", "a.npy", "a.npy", None)
    assert io.parse_ref("INPUT", "d.h5:/g/x") == io.ArrayRef("INPUT", "d.h5:/g/x", "d.h5", "/g/x")
    assert io.parse_ref("INPUT", "d.NPZ:w").name == "w"
    assert io.parse_ref("INPUT", "-").is_std
    np.save("odd:name.npy", np.zeros(2))
    assert io.parse_ref("INPUT", "odd:name.npy").path == "odd:name.npy"
    with pytest.raises(ConvtError, match="^OUTPUT 'x/y.npy': folder 'x' does not exist$"):
        io.parse_ref("OUTPUT", "x/y.npy")
    assert io.parse_ref("OUTPUT", "new.npy", must_exist=False).path == "new.npy"


def test_sniff_trusts_bytes_not_suffixes():
    np.save("real.npy", np.arange(3))
    os.rename("real.npy", "looks.h5")
    assert io.sniff(io.parse_ref("INPUT", "looks.h5")) == "npy"
    np.testing.assert_array_equal(io.load(io.parse_ref("INPUT", "looks.h5")), np.arange(3))
    with h5py.File("h.npy", "w") as f:
        f["x"] = np.arange(4)
    np.testing.assert_array_equal(io.load(io.parse_ref("INPUT", "h.npy")), np.arange(4))
    open("junk.npy", "wb").write(b"GARBAGE!")
    with pytest.raises(ConvtError, match=r"^INPUT 'junk.npy': is not a .npy, .npz, HDF5 or .safetensors file "
                                         r"or a zarr store "
                                         r"\(it starts with b'GARBAGE!'\)$"):
        io.load(io.parse_ref("INPUT", "junk.npy"))
    open("empty.npy", "wb").close()
    with pytest.raises(ConvtError, match="is empty"):
        io.read_header(io.parse_ref("INPUT", "empty.npy"))


def test_truncated_npy_is_caught_from_the_header():
    np.save("t.npy", np.zeros((10, 10), np.float32))
    data = open("t.npy", "rb").read()
    open("t.npy", "wb").write(data[:-4])
    ref = io.parse_ref("INPUT", "t.npy")
    with pytest.raises(ConvtError, match=r"^INPUT 't.npy': is truncated: header says shape \(10, 10\) float32, "
                                         r"needing 528 bytes, the file has 524$"):
        io.read_header(ref)
    with pytest.raises(ConvtError, match="is truncated"):
        io.load(ref)


def test_pickles_are_refused_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    np.save("p.npy", np.array([Boom()], dtype=object), allow_pickle=True)
    for call in (io.read_header, io.load):
        with pytest.raises(ConvtError, match="holds Python objects \\(a pickle\\); convt never unpickles"):
            call(io.parse_ref("INPUT", "p.npy"))
    np.savez("p.npz", a=np.array([Boom()], dtype=object))
    with pytest.raises(ConvtError, match="never unpickles"):
        io.load(io.parse_ref("INPUT", "p.npz"))
    assert not marker.exists()


def test_bfloat16_convention_npy_and_h5():
    a = np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)
    for target in ("b.npy", "b.h5:/g/b", "b.npz:b"):
        ref = io.parse_ref("OUTPUT", target, must_exist=False)
        io.write(ref, a)
        back = io.load(io.parse_ref("INPUT", target))
        assert back.dtype == a.dtype
        np.testing.assert_array_equal(back, a)
        assert io.read_header(io.parse_ref("INPUT", target)) == ((2, 3), a.dtype)
    assert np.load("b.npy").dtype == np.dtype("V2")


def test_h5_references():
    with h5py.File("d.h5", "w") as f:
        f["g/x"] = np.arange(3)
        f["g/y"] = np.arange(4)
    with pytest.raises(ConvtError, match=r"^INPUT 'd.h5': holds 2 datasets \(/g/x, /g/y\): name one, as d.h5:/g/x$"):
        io.load(io.parse_ref("INPUT", "d.h5"))
    with pytest.raises(ConvtError, match="^INPUT 'd.h5:/g/z': has no dataset '/g/z'$"):
        io.load(io.parse_ref("INPUT", "d.h5:/g/z"))
    assert io.read_header(io.parse_ref("INPUT", "d.h5:g/y"))[0] == (4,)
    assert [a["name"] for a in io.list_arrays("d.h5")] == ["/g/x", "/g/y"]


class Exploding(Exception):
    pass


@pytest.mark.parametrize("target", ["out.npy", "out.npz:y", "out.h5:/y"])
@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_write_leaves_nothing_behind(monkeypatch, target, error):
    ref = io.parse_ref("OUTPUT", target, must_exist=False)
    if target.endswith(".npy"):
        open("out.npy", "wb").write(b"previous")
    real_fsync = os.fsync

    def failing_fsync(fd):
        real_fsync(fd)
        raise error

    monkeypatch.setattr(io.os, "fsync", failing_fsync)
    expected = ConvtError if isinstance(error, OSError) else KeyboardInterrupt
    with pytest.raises(expected) as e:
        io.write(ref, np.ones((3, 3)), force=True)
    if expected is ConvtError:
        assert str(e.value) == f"OUTPUT '{target}': could not be written: No space left on device"
    assert [p for p in os.listdir(".") if p.startswith(".convt")] == []
    if target.endswith(".npy"):
        assert open("out.npy", "rb").read() == b"previous"
    else:
        assert not os.path.exists(ref.path)


def test_a_failed_write_into_an_existing_h5_keeps_the_file_as_it_was(monkeypatch):
    with h5py.File("d.h5", "w") as f:
        f["keep"] = np.arange(3)
        f["y"] = np.zeros(2)
    real_move = h5py.Group.move

    def failing_move(self, source, dest):
        if ".convt-partial" in source:  # the old dataset is already set aside: it must come back
            raise KeyboardInterrupt
        real_move(self, source, dest)

    monkeypatch.setattr(h5py.Group, "move", failing_move)
    with pytest.raises(KeyboardInterrupt):
        io.write(io.parse_ref("OUTPUT", "d.h5:/y"), np.ones((3, 3)), force=True)
    monkeypatch.setattr(h5py.Group, "move", real_move)
    with h5py.File("d.h5") as f:
        assert sorted(f) == ["keep", "y"]
        np.testing.assert_array_equal(f["y"][()], np.zeros(2))
        np.testing.assert_array_equal(f["keep"][()], np.arange(3))


def test_check_output_rules():
    np.save("x.npy", np.zeros(2))
    x = io.parse_ref("INPUT", "x.npy")
    with pytest.raises(ConvtError, match="is the same as INPUT 'x.npy'"):
        io.check_output(io.parse_ref("OUTPUT", "./x.npy", must_exist=False), [x], force=True)
    with pytest.raises(ConvtError, match="a .npy file holds one array"):
        io.check_output(io.ArrayRef("OUTPUT", "y.npy:z", "y.npy", "z"), [x], force=False)
    with h5py.File("d.h5", "w") as f:
        f["in"] = np.zeros(2)
    d_in = io.parse_ref("INPUT", "d.h5:/in")
    io.check_output(io.parse_ref("OUTPUT", "d.h5:/out", must_exist=False), [d_in], force=False)  # same file is fine
    with pytest.raises(ConvtError, match="is the same as INPUT 'd.h5:/in'"):
        io.check_output(io.parse_ref("OUTPUT", "d.h5:in", must_exist=False), [d_in], force=True)
    open("noth5.h5", "wb").write(b"plain text")
    with pytest.raises(ConvtError, match="exists and is not an HDF5 file"):
        io.check_output(io.parse_ref("OUTPUT", "noth5.h5:/y", must_exist=False), [x], force=True)


def test_write_resolves_dotdot_after_a_symlink_like_the_kernel(monkeypatch):
    # 'link/..' is the parent of link's target, not '.': the temporary file must be made where the target is,
    # else the rename crosses filesystems (and the writability check looks at the wrong folder)
    os.makedirs("far/away")
    os.symlink("far/away", "link")
    folders, real = [], io._temp_file
    monkeypatch.setattr(io, "_temp_file", lambda folder: folders.append(os.path.realpath(folder)) or real(folder))
    ref = io.parse_ref("OUTPUT", "link/../y.npy", must_exist=False)
    io.check_output(ref, [], force=False)
    io.write(ref, np.arange(3))
    assert folders == [os.path.realpath("far")] * 2
    np.testing.assert_array_equal(np.load("far/y.npy"), np.arange(3))
    assert not os.path.exists("y.npy")
    assert [p for p in os.listdir("far") + os.listdir(".") if p.startswith(".convt")] == []


def test_outputs_get_the_permissions_of_any_new_file():
    old = os.umask(0o022)
    try:
        for target in ("p.npy", "p.npz:y", "p.h5:/y"):
            io.write(io.parse_ref("OUTPUT", target, must_exist=False), np.ones((2, 2)))
            assert os.stat(target.split(":")[0]).st_mode & 0o777 == 0o644, target
    finally:
        os.umask(old)


def test_stdout_going_away_at_commit_is_left_to_the_caller(monkeypatch):
    class Closed:
        class buffer:
            @staticmethod
            def write(data):
                raise BrokenPipeError(32, "Broken pipe")

            flush = write

    monkeypatch.setattr(sys, "stdout", Closed)  # a reader that went away, as `convt run ... -o - | head -c1`
    sink = io.Sink(io.parse_ref("OUTPUT", "-"), (2,), "f8")
    sink.write(np.ones(2))
    with pytest.raises(BrokenPipeError):  # not a user's mistake: the CLI exits quietly, as tools in a pipe do
        sink.commit()
    assert sink.tmp is None and sink._writer is None  # the spool is gone
