"""Writing a member into an existing .npz: the other entries stay, bit for bit in content, and the old file stays
exactly as it was until the new one is whole (issue #13, item 4).

Matrix: add a member (then another; a glob of inputs into one file with 'out/all.npz:{stem}'; a bare PATH is the
member `output`) × an existing member without --force (refused, file untouched) and with it (only that member
replaced, at its place) × an input that is another member of the output file, or the same one (refused) × a
failure while the member is written, while the entries after it are copied, or at the sync (old file as it was,
no temporary file) × another program replacing the file meanwhile × gzip (deflate, levels 0-9) through io.Sink,
lzf and bad levels refused × what else the zip holds (deflated members, a non-.npy entry, a folder entry, names
with '/', the archive comment, the file's mode) × existing files that are no .npz, a damaged zip, a member with a
bad CRC, an encrypted member × member names that are no relative zip path.
"""

import os
import stat
import zipfile

import numpy as np
import pytest

from convt_cli import ConvtError, io
from convt_cli.formats import npz as npz_format
from convt_cli.formats.base import WriteOptions
from conftest import error_line, invoke


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def run(*args):
    r = invoke("run", *args)
    assert r.exit_code == 0, r.output
    return r


def entries(path):
    """{entry name: (compress_type, decompressed bytes)} of a zip, and its entry names in order."""
    with zipfile.ZipFile(path) as z:
        return {i.filename: (i.compress_type, z.read(i)) for i in z.infolist()}, z.namelist()


def temporaries(folder="."):
    return [p for p in os.listdir(folder) if p.startswith(".convt")]


@pytest.fixture
def y(work):
    """conv_transpose(x, w) as convt writes it to a .npy: what each member written below must hold."""
    run("x.npy", "w.npy", "-o", "y.npy")
    return np.load("y.npy")


def test_a_second_member_is_added_beside_the_first(y):
    run("x.npy", "w.npy", "-o", "pair.npz:a")
    before, _ = entries("pair.npz")
    run("x.npy", "w.npy", "-o", "pair.npz:b")
    after, names = entries("pair.npz")
    assert names == ["a.npy", "b.npy"]
    assert after["a.npy"] == before["a.npy"]
    with np.load("pair.npz") as z:
        assert z.files == ["a", "b"]
        np.testing.assert_array_equal(z["a"], y)
        np.testing.assert_array_equal(z["b"], y)
    assert temporaries() == []


def test_an_existing_member_is_refused_without_force_and_the_file_left_alone(y):
    np.savez("pair.npz", a=np.arange(3), b=np.ones(2))
    before = open("pair.npz", "rb").read()
    r = invoke("run", "x.npy", "w.npy", "-o", "pair.npz:b")
    assert error_line(r) == "Error: OUTPUT 'pair.npz:b': member 'b' exists: pass --force to replace it"
    assert open("pair.npz", "rb").read() == before
    assert temporaries() == []


def test_force_replaces_only_that_member_at_its_place(y):
    a, b, c = np.arange(5.0), np.ones((2, 2), np.int16), np.full(3, 7, np.uint8)
    np.savez("trio.npz", a=a, b=b, c=c)
    before, _ = entries("trio.npz")
    run("x.npy", "w.npy", "-o", "trio.npz:b", "--force")
    after, names = entries("trio.npz")
    assert names == ["a.npy", "b.npy", "c.npy"]
    assert after["a.npy"] == before["a.npy"] and after["c.npy"] == before["c.npy"]
    with np.load("trio.npz") as z:
        np.testing.assert_array_equal(z["b"], y)
        np.testing.assert_array_equal(z["a"], a)
        np.testing.assert_array_equal(z["c"], c)


def test_a_glob_writes_every_item_into_one_file(work):
    x, _ = work
    os.mkdir("in")
    os.mkdir("out")
    for i, stem in enumerate(["p", "q", "r"]):
        np.save(f"in/{stem}.npy", x[:1] * (i + 1))
    r = invoke("run", "in/*.npy", "w.npy", "-o", "out/all.npz:{stem}")
    assert r.exit_code == 0, r.output
    for stem in ["p", "q", "r"]:
        run(f"in/{stem}.npy", "w.npy", "-o", f"{stem}.npy")
    with np.load("out/all.npz") as z:
        assert z.files == ["p", "q", "r"]
        for stem in z.files:
            np.testing.assert_array_equal(z[stem], np.load(f"{stem}.npy"))
    r = invoke("run", "in/*.npy", "w.npy", "-o", "out/all.npz:{stem}")  # again: each item refused, none lost
    assert r.exit_code == 2
    assert r.stderr.splitlines() == [f"Error: OUTPUT 'out/all.npz:{s}': member '{s}' exists: pass --force to "
                                     f"replace it" for s in ["p", "q", "r"]]


def test_a_bare_path_is_the_member_output(y):
    np.savez("keep.npz", a=np.arange(3))
    run("x.npy", "w.npy", "-o", "keep.npz")
    with np.load("keep.npz") as z:
        assert z.files == ["a", "output"]
        np.testing.assert_array_equal(z["output"], y)
    r = invoke("run", "x.npy", "w.npy", "-o", "keep.npz")
    assert error_line(r) == "Error: OUTPUT 'keep.npz': member 'output' exists: pass --force to replace it"


def test_the_input_may_be_another_member_of_the_output_file(y):
    run("x.npy", "w.npy", "-o", "pair.npz:a")
    w2 = np.random.default_rng(3).standard_normal((3, 3, 2, 4)).astype(np.float32)
    np.save("w2.npy", w2)
    run("y.npy", "w2.npy", "-o", "want.npy")
    before, _ = entries("pair.npz")
    run("pair.npz:a", "w2.npy", "-o", "pair.npz:b")
    after, _ = entries("pair.npz")
    assert after["a.npy"] == before["a.npy"]
    with np.load("pair.npz") as z:
        np.testing.assert_array_equal(z["b"], np.load("want.npy"))


@pytest.mark.parametrize("input_ref", ["pair.npz:a", "pair.npz", "./pair.npz:a"])
def test_the_very_member_an_input_reads_is_refused_even_with_force(y, input_ref):
    run("x.npy", "w.npy", "-o", "pair.npz:a")
    np.save("w2.npy", np.ones((3, 3, 4, 4), np.float32))
    before = open("pair.npz", "rb").read()
    r = invoke("run", input_ref, "w2.npy", "-o", "pair.npz:a", "--force")
    assert error_line(r) == (f"Error: OUTPUT 'pair.npz:a': is the same as INPUT '{input_ref}': write the output "
                             f"elsewhere")
    assert open("pair.npz", "rb").read() == before


class Full(OSError):
    def __init__(self):
        super().__init__(28, "No space left on device")


@pytest.mark.parametrize("error", [Full, KeyboardInterrupt])
def test_a_failure_while_the_member_is_written_leaves_the_file_as_it_was(y, monkeypatch, error):
    np.savez("pair.npz", a=np.arange(3), c=np.ones(4))
    before = open("pair.npz", "rb").read()
    real_put = npz_format.NpzFileWriter.put

    def failing_put(self, chunk, start):
        real_put(self, chunk[:1], start)  # some bytes of b are in the new file already
        raise error()

    monkeypatch.setattr(npz_format.NpzFileWriter, "put", failing_put)
    r = invoke("run", "x.npy", "w.npy", "-o", "pair.npz:b")
    if error is Full:
        assert error_line(r) == "Error: OUTPUT 'pair.npz:b': could not be written: No space left on device"
    else:
        assert error_line(r).startswith("Error: interrupted")
    assert open("pair.npz", "rb").read() == before
    assert temporaries() == []


def test_a_failure_while_the_entries_after_the_member_are_copied_leaves_the_file_as_it_was(y, monkeypatch):
    np.savez("trio.npz", a=np.arange(3), b=np.zeros(2), c=np.ones(4))
    before = open("trio.npz", "rb").read()
    real_copy = npz_format.NpzFileWriter._copy

    def failing_copy(self, info):
        if info.filename == "c.npy":  # copied on finish(), after the new b
            raise KeyboardInterrupt
        real_copy(self, info)

    monkeypatch.setattr(npz_format.NpzFileWriter, "_copy", failing_copy)
    r = invoke("run", "x.npy", "w.npy", "-o", "trio.npz:b", "--force")
    assert error_line(r).startswith("Error: interrupted")
    assert open("trio.npz", "rb").read() == before
    assert temporaries() == []


def test_a_failed_sync_leaves_the_file_as_it_was(monkeypatch):
    np.savez("pair.npz", a=np.arange(3))
    before = open("pair.npz", "rb").read()
    monkeypatch.setattr(io.os, "fsync", lambda fd: (_ for _ in ()).throw(Full()))
    with pytest.raises(ConvtError, match=r"^OUTPUT 'pair.npz:b': could not be written: No space left on device$"):
        io.write(io.parse_ref("OUTPUT", "pair.npz:b", must_exist=False), np.ones((2, 2)))
    assert open("pair.npz", "rb").read() == before
    assert temporaries() == []


def test_a_file_another_program_replaced_meanwhile_is_not_overwritten():
    np.savez("pair.npz", a=np.arange(3))
    ref = io.parse_ref("OUTPUT", "pair.npz:b", must_exist=False)
    io.check_output(ref, [], force=False)
    sink = io.Sink(ref, (2,), np.float64)
    sink.write(np.ones(2))
    np.savez("other.npz", z=np.zeros(1))
    os.replace("other.npz", "pair.npz")
    theirs = open("pair.npz", "rb").read()
    with pytest.raises(ConvtError, match=r"^OUTPUT 'pair.npz:b': changed while convt was writing into it \(another "
                                         r"program wrote it\): nothing was written, run again$"):
        sink.commit()
    assert open("pair.npz", "rb").read() == theirs
    assert temporaries() == []


def test_the_member_is_checked_again_when_the_write_starts():
    np.savez("pair.npz", a=np.arange(3))
    ref = io.parse_ref("OUTPUT", "pair.npz:b", must_exist=False)
    io.check_output(ref, [], force=False)
    np.savez("pair.npz", a=np.arange(3), b=np.zeros(2))  # another run wrote b meanwhile
    before = open("pair.npz", "rb").read()
    with pytest.raises(ConvtError, match=r"^OUTPUT 'pair.npz:b': member 'b' exists: pass --force to replace it$"):
        io.write(ref, np.ones(2))
    assert open("pair.npz", "rb").read() == before
    assert temporaries() == []


def _sink_write(text, a, options=WriteOptions(), force=False):
    ref = io.parse_ref("OUTPUT", text, must_exist=False)
    io.check_output(ref, [], force, options)
    sink = io.Sink(ref, a.shape, a.dtype, force=force, options=options)
    for b0 in range(0, len(a), 3):
        sink.write(a[b0 : b0 + 3])
    sink.commit()


@pytest.mark.parametrize("level", [None, 0, 1, 9])
def test_gzip_is_a_deflated_member_that_numpy_reads(level):
    a = np.tile(np.arange(100, dtype=np.float32), (8, 1))  # compressible
    _sink_write("c.npz:a", a, WriteOptions(compression="gzip", level=level))
    with zipfile.ZipFile("c.npz") as z:
        info = z.getinfo("a.npy")
        assert info.compress_type == zipfile.ZIP_DEFLATED
        if level != 0:
            assert info.compress_size < info.file_size / 4
    with np.load("c.npz") as z:
        np.testing.assert_array_equal(z["a"], a)
    np.savez_compressed("numpy.npz", a=a)
    with zipfile.ZipFile("numpy.npz") as z, zipfile.ZipFile("c.npz") as c:
        assert z.read("a.npy") == c.read("a.npy")  # what np.savez_compressed stores, byte for byte inside


def test_info_names_the_compression_of_a_member(work):
    np.savez_compressed("c.npz", a=np.zeros((2, 3)))
    _sink_write("c.npz:b", np.ones((4,)))
    r = invoke("info", "c.npz")
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == ["c.npz:a  (2, 3) float64  gzip", "c.npz:b  (4,) float64"]


def test_each_member_keeps_its_own_compression():
    a, b = np.arange(50.0), np.zeros(60)
    np.savez_compressed("mixed.npz", a=a)
    _sink_write("mixed.npz:b", b)  # stored, as np.savez
    _sink_write("mixed.npz:c", b, WriteOptions(compression="gzip", level=9))
    with zipfile.ZipFile("mixed.npz") as z:
        assert [(i.filename, i.compress_type) for i in z.infolist()] == [
            ("a.npy", zipfile.ZIP_DEFLATED), ("b.npy", zipfile.ZIP_STORED), ("c.npy", zipfile.ZIP_DEFLATED)]
    with np.load("mixed.npz") as z:
        np.testing.assert_array_equal(z["a"], a)
        np.testing.assert_array_equal(z["c"], b)


@pytest.mark.parametrize("options,message", [
    (WriteOptions(compression="lzf"),
     "--compression lzf: OUTPUT 'c.npz:a' is a .npz file, which takes only gzip; .npz outputs take gzip, .h5 outputs "
     "gzip or lzf"),
    (WriteOptions(compression="gzip", level=10), "--compression-level: expected an integer 0..9, got 10"),
    (WriteOptions(compression="gzip", level=-1), "--compression-level: expected an integer 0..9, got -1"),
])
def test_what_an_npz_cannot_store_is_refused_before_any_work(options, message):
    with pytest.raises(ConvtError) as e:
        io.check_output(io.parse_ref("OUTPUT", "c.npz:a", must_exist=False), [], False, options)
    assert str(e.value) == message
    assert os.listdir(".") == []


def test_other_entries_names_comment_and_mode_are_kept():
    with zipfile.ZipFile("odd.npz", "w") as z:
        z.comment = b"made by hand"
        z.writestr("README.txt", b"not an array" * 100, compress_type=zipfile.ZIP_BZIP2)
        z.writestr("g/", b"")  # a folder entry
        with z.open("g/a.npy", "w") as f:
            np.lib.format.write_array(f, np.arange(4))
    os.chmod("odd.npz", 0o640)
    before, names = entries("odd.npz")
    with zipfile.ZipFile("odd.npz") as z:
        dates = {i.filename: i.date_time for i in z.infolist()}
    _sink_write("odd.npz:g/b", np.ones((2, 3)))
    after, new_names = entries("odd.npz")
    assert new_names == names + ["g/b.npy"]
    assert {k: v for k, v in after.items() if k != "g/b.npy"} == before
    with zipfile.ZipFile("odd.npz") as z:
        assert z.comment == b"made by hand"
        assert z.testzip() is None
        assert {i.filename: i.date_time for i in z.infolist() if i.filename != "g/b.npy"} == dates
    assert stat.S_IMODE(os.stat("odd.npz").st_mode) == 0o640
    with np.load("odd.npz") as z:
        np.testing.assert_array_equal(z["g/b"], np.ones((2, 3)))
    assert [e["name"] for e in io.list_arrays("odd.npz")] == ["g/a", "g/b"]


def test_large_members_are_copied_a_block_at_a_time(monkeypatch):
    monkeypatch.setattr(npz_format, "COPY_BLOCK", 7)
    a = np.random.default_rng(0).standard_normal(1000)
    np.savez_compressed("big.npz", a=a, c=a[::-1])
    reads = []
    real_open = zipfile.ZipFile.open

    def watched_open(self, name, mode="r", **kw):
        f = real_open(self, name, mode, **kw)
        if mode == "r":
            real_read = f.read
            f.read = lambda n=-1: reads.append(n) or real_read(n)
        return f

    monkeypatch.setattr(zipfile.ZipFile, "open", watched_open)
    _sink_write("big.npz:b", np.ones(3))
    monkeypatch.setattr(zipfile.ZipFile, "open", real_open)
    assert reads and set(reads) == {7}
    with np.load("big.npz") as z:
        assert z.files == ["a", "c", "b"]
        np.testing.assert_array_equal(z["a"], a)
        np.testing.assert_array_equal(z["c"], a[::-1])


def _save_npy(path, a):
    with open(path, "wb") as f:  # np.save would add '.npy' to the name
        np.save(f, a)


def _corrupt_crc(path, member):
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    data = bytearray(open(path, "rb").read())
    at = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size - 1
    data[at] ^= 0xFF  # the last byte of the member's stored data
    open(path, "wb").write(bytes(data))


def _encrypted_flag(path):
    data = bytearray(open(path, "rb").read())
    at = data.find(b"PK\x01\x02")  # the central directory's first entry: flag bits at +8
    data[at + 8] |= 1
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("make,message", [
    (lambda: open("pair.npz", "w").write("plain text, no zip"),
     "Error: OUTPUT 'pair.npz:b': exists and is not an .npz file: remove it, or write the output elsewhere"),
    (lambda: _save_npy("pair.npz", np.arange(3)),  # a .npy under an .npz name
     "Error: OUTPUT 'pair.npz:b': exists and is not an .npz file: remove it, or write the output elsewhere"),
    (lambda: open("pair.npz", "wb").write(b"PK\x03\x04 cut short"),
     "Error: OUTPUT 'pair.npz:b': exists and is not a readable .npz file (File is not a zip file)"),
    (lambda: (np.savez("pair.npz", a=np.arange(3)), _encrypted_flag("pair.npz")),
     "Error: OUTPUT 'pair.npz:b': its member 'a.npy' is encrypted: convt cannot copy it into the new file"),
])
@pytest.mark.parametrize("force", [False, True])
def test_an_existing_file_that_cannot_be_kept_is_refused(work, make, message, force):
    make()
    before = open("pair.npz", "rb").read()
    r = invoke("run", "x.npy", "w.npy", "-o", "pair.npz:b", *(["--force"] if force else []))
    assert error_line(r) == message
    assert open("pair.npz", "rb").read() == before
    assert temporaries() == []


def test_a_damaged_member_is_reported_and_the_file_left_alone(work):
    np.savez("pair.npz", a=np.arange(300))
    _corrupt_crc("pair.npz", "a.npy")
    before = open("pair.npz", "rb").read()
    r = invoke("run", "x.npy", "w.npy", "-o", "pair.npz:b")
    assert error_line(r) == ("Error: OUTPUT 'pair.npz:b': its member 'a.npy' cannot be read (BadZipFile: Bad CRC-32 "
                             "for file 'a.npy'), so it cannot be kept: the file is left as it was")
    assert open("pair.npz", "rb").read() == before
    assert temporaries() == []


@pytest.mark.parametrize("name,message", [
    ("/b", "an .npz member name cannot start with '/' (zip paths are relative): name it pair.npz:b"),
    ("g//b", "the member name 'g//b' has an empty, '.' or '..' part: name it like 'y' or 'g/y'"),
    ("../b", "the member name '../b' has an empty, '.' or '..' part: name it like 'y' or 'g/y'"),
    ("g/./b", "the member name 'g/./b' has an empty, '.' or '..' part: name it like 'y' or 'g/y'"),
])
def test_member_names_are_relative_zip_paths(work, name, message):
    r = invoke("run", "x.npy", "w.npy", "-o", f"pair.npz:{name}")
    assert error_line(r) == f"Error: OUTPUT 'pair.npz:{name}': {message}"
    assert not os.path.exists("pair.npz")
