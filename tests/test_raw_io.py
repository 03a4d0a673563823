"""Raw reads and writes beside the libraries, and pieces computed side by side.

Matrix: DirectFile's sequential writes and write_at (offsets and lengths on and off the 4 KiB blocks, on a disk file
system that takes O_DIRECT and on tmpfs, which refuses it) against the bytes written plainly; .h5 outputs large
enough to be written raw (RAW_BYTES) x dtype (float16, float32, float64, bfloat16, int32, complex64) x target (a new file, a
dataset inside an existing file, a file with a user block) x pieces or tiles, read back by h5py; .h5 inputs read
raw (contiguous; chunks of whole batch elements, also one never written) or through h5py (chunks that cut an
element, compression, big-endian), batch slices and boxes, against h5py's own slicing; `overlapped` with several
threads: order, the pieces alive at once, the compute on one thread per piece, failures on any side.
"""

import os
import threading
import time

import h5py
import ml_dtypes
import numpy as np
import pytest

from convt_cli import io
from convt_cli.formats.base import DirectFile, WriteOptions
from convt_cli.formats.h5 import RAW_BYTES, raw_offset
from convt_cli.stream import overlapped, run_files

PROVENANCE = {"convt_version": "0.1.0", "convt_op": "conv_transpose"}


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# DirectFile.write_at


@pytest.fixture(params=["tmp", "/dev/shm"])  # a disk file system takes O_DIRECT; tmpfs refuses it
def scratch(request, tmp_path):
    """A path for a new file, on a disk file system or on tmpfs; removed afterwards."""
    folder = request.param if os.path.isdir(request.param) else "tmp"
    path = str(tmp_path / "d.bin") if folder == "tmp" else os.path.join(folder, f"convt-test-{os.getpid()}.bin")
    yield path
    if os.path.exists(path):
        os.remove(path)


def test_direct_writes_give_the_same_bytes_as_plain_ones(scratch):
    rng = np.random.default_rng(1)
    parts = [rng.integers(0, 256, n, dtype=np.uint8) for n in (128, 5000, DirectFile.STAGE + 7, 4096, 3, 70000)]
    f = DirectFile(scratch)
    for part in parts:
        assert f.write(part.data) == len(part)
    assert f.tell() == sum(map(len, parts))
    f.flush()  # what positioned writes then see
    os.pwrite(f.fileno(), b"XY", 10)
    f.close()
    want = bytearray(b"".join(p.tobytes() for p in parts))
    want[10:12] = b"XY"
    assert open(scratch, "rb").read() == bytes(want)


def test_positioned_direct_writes_give_the_bytes_of_plain_ones(scratch):
    rng = np.random.default_rng(3)
    size = 3 * DirectFile.STAGE + 12345
    want = bytearray(size)
    # disjoint ranges in a random order: inside one block, across blocks, longer than the stage, at the very end
    cuts = sorted(set(rng.integers(1, size, 40).tolist()) | {4095, 4096, 8192, DirectFile.STAGE + 1})
    ranges = list(zip([0, *cuts], [*cuts, size]))
    rng.shuffle(ranges)
    f = DirectFile(scratch)
    f.write(b"HEAD")  # staged by write(), pushed out before the first positioned write
    for a, b in ranges:
        a = max(a, 4)
        data = rng.integers(0, 256, b - a, dtype=np.uint8)
        f.write_at(a, data)
        want[a:b] = data.tobytes()
    f.close()
    want[:4] = b"HEAD"
    assert open(scratch, "rb").read() == bytes(want)
    g = DirectFile(scratch, truncate=False)  # into an existing file: the rest stays
    g.write_at(5000, b"xyz")
    g.close()
    want[5000:5003] = b"xyz"
    assert open(scratch, "rb").read() == bytes(want)


# ---------------------------------------------------------------------------------------------------------
# .h5 outputs written raw


def _values(shape, dtype):
    rng = np.random.default_rng(5)
    a = rng.standard_normal(shape) * 40
    if np.dtype(dtype).kind == "c":
        a = a + 1j * rng.standard_normal(shape)
    return a.astype(dtype)


DTYPES = [np.float16, np.float32, np.float64, ml_dtypes.bfloat16, np.int32, np.complex64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", ["new", "existing", "userblock"])
def test_large_h5_outputs_are_written_raw_and_read_back_by_h5py(dtype, target):
    shape = (6, 40, 30, 512 // np.dtype(dtype).itemsize + 37)  # rows of odd lengths: pieces cut blocks
    y = _values(shape, dtype)
    assert y.nbytes >= RAW_BYTES
    if target != "new":
        with h5py.File("y.h5", "w", **({"userblock_size": 512} if target == "userblock" else {})) as f:
            f["keep"] = np.arange(1000)
    sink = io.Sink(io.parse_ref("OUTPUT", "y.h5:/g/y", must_exist=False), shape, y.dtype, PROVENANCE, force=True)
    assert sink._writer._raw is not None  # the bytes go beside h5py
    for piece in np.array_split(y, 4):
        sink.write(piece)
    sink.commit()
    with h5py.File("y.h5") as f:
        d = f["g/y"]
        got = d[()]
        if dtype is ml_dtypes.bfloat16:
            assert d.attrs["dtype"] == "bfloat16"
            got = got.view(ml_dtypes.bfloat16)
        assert got.tobytes() == y.tobytes() and d.chunks is None
        assert d.attrs["convt_op"] == "conv_transpose"
        if target != "new":
            assert f["keep"][()].tolist() == list(range(1000))
    assert sorted(os.listdir(".")) == ["y.h5"]


@pytest.mark.parametrize("existing", [False, True])
def test_h5_output_boxes_are_written_raw_in_any_order(existing):
    shape = (2, 50, 70, 40)
    y = _values(shape, np.float32)
    if existing:
        with h5py.File("y.h5", "w") as f:
            f["keep"] = np.ones(7)
    sink = io.Sink(io.parse_ref("OUTPUT", "y.h5:/y", must_exist=False), shape, y.dtype, PROVENANCE, force=True)
    assert sink.boxes and sink._writer._raw is not None
    boxes = [(b, (slice(r, min(50, r + 13)), slice(c, min(70, c + 31)))) for b in (1, 0) for r in range(0, 50, 13)
             for c in range(0, 70, 31)]
    for b, index in reversed(boxes):
        sink.write_box(np.ascontiguousarray(y[(slice(b, b + 1), *index)]), b, index)
    sink.commit()
    with h5py.File("y.h5") as f:
        assert f["y"][()].tobytes() == y.tobytes()


def test_small_and_compressed_h5_outputs_stay_with_h5py():
    small = _values((2, 4, 4, 3), np.float32)
    big = _values((8, 64, 64, 16), np.float32)
    for target, a, options in (("s.h5:/s", small, WriteOptions()), ("c.h5:/c", big, WriteOptions(compression="gzip"))):
        sink = io.Sink(io.parse_ref("OUTPUT", target, must_exist=False), a.shape, a.dtype, PROVENANCE, force=True,
                       options=options)
        assert sink._writer._raw is None
        sink.write(a)
        sink.commit()
        with h5py.File(target.split(":")[0]) as f:
            assert f[target.split(":")[1]][()].tobytes() == a.tobytes()


def test_an_aborted_raw_h5_output_leaves_the_file_as_it_was():
    with h5py.File("y.h5", "w") as f:
        f["keep"] = np.arange(5)
    before = open("y.h5", "rb").read()
    y = _values((4, 64, 64, 32), np.float32)
    sink = io.Sink(io.parse_ref("OUTPUT", "y.h5:/g/y", must_exist=False), y.shape, y.dtype, PROVENANCE, force=True)
    sink.write(y[:2])
    sink.abort()
    with h5py.File("y.h5") as f:
        names = []
        f.visit(names.append)
        assert names == ["keep"] and f["keep"][()].tolist() == list(range(5))
    assert len(open("y.h5", "rb").read()) >= len(before)


# ---------------------------------------------------------------------------------------------------------
# .h5 inputs read raw


def _input(layout):
    x = _values((7, 12, 10, 6), np.float32)
    with h5py.File("x.h5", "w") as f:
        if layout == "contiguous":
            f["x"] = x
        elif layout == "element chunks":
            f.create_dataset("x", data=x, chunks=(3, 12, 10, 6))
        elif layout == "a chunk never written":
            d = f.create_dataset("x", shape=x.shape, dtype=x.dtype, chunks=(2, 12, 10, 6), fillvalue=-1.5)
            d[:2] = x[:2]
            d[4:] = x[4:]
            x[2:4] = -1.5
        elif layout == "chunks cut an element":
            f.create_dataset("x", data=x, chunks=(1, 5, 10, 6))
        elif layout == "gzip":
            f.create_dataset("x", data=x, chunks=(1, 12, 10, 6), compression="gzip")
        elif layout == "big-endian":
            f.create_dataset("x", data=x.astype(">f4"))
    return x


@pytest.mark.parametrize("layout", ["contiguous", "element chunks", "a chunk never written",
                                    "chunks cut an element", "gzip", "big-endian"])
def test_h5_inputs_read_raw_or_through_h5py_give_h5pys_values(layout):
    x = _input(layout)
    source = io.Source(io.parse_ref("INPUT", "x.h5:/x"))
    reader = source._reader
    raw = layout in ("contiguous", "element chunks", "a chunk never written")
    assert (reader._at is not None or reader._per_chunk is not None) == raw
    with h5py.File("x.h5") as f:
        stored = f["x"][()]  # h5py's own values and dtype (big-endian stays so)
    assert np.array_equal(stored, x)
    try:
        for b0, b1 in ((0, 7), (1, 5), (2, 4), (6, 7), (3, 3)):
            got = source.read(b0, b1)
            assert got.dtype == stored.dtype and got.tobytes() == stored[b0:b1].tobytes()
        for b0, b1, index in ((0, 7, (slice(2, 9), slice(0, 10))), (2, 6, (slice(0, 12), slice(3, 4))),
                              (5, 6, (slice(11, 12), slice(9, 10)))):
            got = reader.read_box(b0, b1, (*index, slice(0, 6)))
            assert got.tobytes() == np.ascontiguousarray(stored[(slice(b0, b1), *index)]).tobytes()
    finally:
        source.close()


def test_raw_offset_refuses_what_is_not_a_plain_array():
    with h5py.File("k.h5", "w") as f:
        f["contiguous"] = np.ones((3, 4), np.float32)
        f["big_endian"] = np.ones((3, 4), ">f8")
        f["chunked"] = f.create_dataset("c", data=np.ones((3, 4)), chunks=(1, 4))[()]
        f.create_dataset("chunked_too", data=np.ones((3, 4)), chunks=(1, 4))
        f["scalar"] = 1.0
        f["strings"] = np.array([b"ab", b"cd"])
        assert raw_offset(f["contiguous"]) is not None
        assert [raw_offset(f[k]) for k in ("big_endian", "chunked_too", "scalar", "strings")] == [None] * 4


def test_a_run_from_h5_to_h5_gives_the_bits_of_npy_to_npy():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((24, 20, 20, 16), dtype=np.float32)
    np.save("x.npy", x)
    np.save("w.npy", rng.standard_normal((3, 3, 16, 16), dtype=np.float32))
    with h5py.File("x.h5", "w") as f:
        f.create_dataset("x", data=x, chunks=(1, 20, 20, 16))
    run_files("x.npy", "w.npy", "y.npy", strides=2, max_memory="16M", threads=2)
    run_files("x.h5:/x", "w.npy", "y.h5:/y", strides=2, max_memory="16M", threads=2)
    with h5py.File("y.h5") as f:
        assert f["y"].chunks is None and f["y"][()].tobytes() == np.load("y.npy").tobytes()


# ---------------------------------------------------------------------------------------------------------
# Pieces side by side


@pytest.mark.parametrize("threads", [2, 3])
def test_pieces_side_by_side_are_written_in_order_within_their_slots(threads):
    lock = threading.Lock()
    alive = {"in": 0, "out": 0, "computing": 0}
    most = dict.fromkeys(alive, 0)
    given, written, told = [], [], []
    rng = np.random.default_rng(threads)
    pauses = rng.uniform(0, 0.004, 60)

    def count(key, step):
        with lock:
            alive[key] += step
            most[key] = max(most[key], alive[key])

    def read(p):
        count("in", 1)
        return np.full(3, p)

    def compute(p, x, n):
        given.append(n)
        count("computing", 1)
        time.sleep(pauses[p])  # pieces of uneven length: later ones finish first
        count("computing", -1)
        count("in", -1)
        count("out", 1)
        return x * 2

    def write(p, y):
        written.append((p, y.tolist()))
        count("out", -1)

    overlapped(list(range(60)), read, compute, write, told.append, threads=threads)
    assert written == [(p, [2 * p] * 3) for p in range(60)] and told == list(range(60))
    assert set(given) == {1}  # each piece on one thread
    assert most["in"] <= threads + 1 and most["out"] <= threads + 1
    assert most["computing"] >= 2
    assert not [t for t in threading.enumerate() if t.name in ("convt-reader", "convt-writer")]


def test_without_room_ahead_the_pieces_are_computed_one_at_a_time_on_every_thread():
    given = []
    overlapped(list(range(5)), lambda p: p, lambda p, x, n: given.append(n) or x, lambda p, y: None,
               lambda p: None, ahead=0, threads=2)
    assert given == [2] * 5


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("where", ["read", "compute", "write", "done"])
def test_a_failure_on_any_side_stops_every_thread_and_is_raised(where, threads):
    def boom(name, p):
        if where == name and p == 7:
            raise ValueError(f"{name} failed")

    with pytest.raises(ValueError, match=f"{where} failed"):
        overlapped(list(range(30)), lambda p: boom("read", p) or p, lambda p, x, n: boom("compute", p) or x,
                   lambda p, y: boom("write", p), lambda p: boom("done", p), threads=threads)
    assert not [t for t in threading.enumerate() if t.name in ("convt-reader", "convt-writer")]
