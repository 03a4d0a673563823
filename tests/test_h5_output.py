"""HDF5 outputs: how they are stored, what `convt info` learns of them, and signals while they are written.

Matrix: compression (gzip at the default and a given level, lzf) × target (a new file, a dataset inside an
existing file) × dtype (float32, bfloat16, int8), written in pieces through io.Sink with WriteOptions and read
back by h5py (filters, level, shuffle, chunks, values); chunk shapes against the batch pieces (divisors, one
piece, elements larger than a chunk) and contiguous storage without compression; option refusals;
attributes copied from the input under convt's own (provenance and the bfloat16 tag win, references are left
out); the listing's keys for datasets, soft and external links, JSON-able; the size of 300 small outputs written
one Sink at a time against h5py writing them in one go; SIGINT inside h5py's weakref callbacks (a tracer sends it
there deterministically) and inside deferred() blocks and finalizers.
"""

import json
import signal
import sys

import h5py
import ml_dtypes
import numpy as np
import pytest

from convt_cli import ConvtError, interrupts, io
from convt_cli.formats.base import WriteOptions
from convt_cli.formats.h5 import CHUNK_BYTES, H5, chunk_shape, storage

PROVENANCE = {"convt_version": "0.1.0", "convt_op": "conv_transpose", "convt_input": "in.h5:/in/a",
              "convt_filters": "w.npy", "convt_parameters": {"strides": [2, 2], "padding": "SAME"}}


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _array(shape, dtype):
    return (np.arange(int(np.prod(shape))).reshape(shape) % 50 - 25).astype(dtype)


def _write(target, array, options=WriteOptions(), pieces=1, provenance=PROVENANCE):
    sink = io.Sink(io.parse_ref("OUTPUT", target, must_exist=False), array.shape, array.dtype, provenance,
                   force=True, options=options)
    for piece in np.array_split(array, pieces):
        sink.write(piece)
    sink.commit()


# ---------------------------------------------------------------------------------------------------------
# Compression and chunks


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.int8])
@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("compression, level, opts", [("gzip", None, 4), ("gzip", 9, 9), ("lzf", None, None)])
def test_compressed_outputs_round_trip(dtype, existing, compression, level, opts):
    if existing:
        with h5py.File("y.h5", "w") as f:
            f["keep"] = np.arange(3)
    y = _array((12, 6, 5, 3), dtype)
    _write("y.h5:/g/y", y, WriteOptions(compression=compression, level=level, chunk_batch=4), pieces=3)
    with h5py.File("y.h5") as f:
        d = f["g/y"]
        assert (d.compression, d.compression_opts) == (compression, opts)
        assert d.shuffle == (np.dtype(dtype).itemsize > 1)
        assert d.chunks == (4, 6, 5, 3)
        assert sorted(f) == (["g", "keep"] if existing else ["g"])
    np.testing.assert_array_equal(io.load(io.parse_ref("INPUT", "y.h5:/g/y")), y)


def test_compression_without_chunk_batch_chunks_by_batch_element():
    _write("y.h5:/y", _array((5, 4, 4, 2), np.float32), WriteOptions(compression="gzip"))
    with h5py.File("y.h5") as f:
        assert f["y"].chunks == (1, 4, 4, 2) and f["y"].compression == "gzip"


@pytest.mark.parametrize("options", [WriteOptions(), WriteOptions(attrs={"a": 1})])
def test_without_compression_the_output_stays_contiguous(options):
    _write("y.h5:/y", _array((5, 4), np.float32), options)
    with h5py.File("y.h5") as f:
        assert f["y"].chunks is None and f["y"].compression is None


def test_chunk_batch_alone_does_not_chunk():
    # a chunk index per dataset made 3,000 small uncompressed outputs 3.4 times h5py's size, for nothing
    _write("y.h5:/y", _array((10, 4), np.float32), WriteOptions(chunk_batch=5), pieces=2)
    with h5py.File("y.h5") as f:
        assert f["y"].chunks is None and f["y"].compression is None


@pytest.mark.parametrize("shape", [(0, 3, 3), (4, 0)])
def test_scalars_and_empty_arrays_stay_contiguous(shape):
    assert storage((), np.dtype("f4"), WriteOptions(compression="gzip", chunk_batch=2)) == {}
    assert storage(shape, np.dtype("f4"), WriteOptions(compression="gzip", chunk_batch=2)) == {}
    _write("y.h5:/y", np.zeros(shape, np.float32), WriteOptions(compression="gzip", chunk_batch=2))
    with h5py.File("y.h5") as f:
        assert f["y"].shape == shape and f["y"].chunks is None


@pytest.mark.parametrize("shape, itemsize, per_piece, expected", [
    ((100, 8, 8, 4), 4, 16, (16, 8, 8, 4)),  # a piece is a chunk
    ((100, 8, 8, 4), 4, 200, (100, 8, 8, 4)),  # one piece: the whole array, it fits
    ((3000, 64, 64, 4), 4, 30, (15, 64, 64, 4)),  # 30 x 64 KiB is too much: the largest divisor of 30 that fits
    ((3000, 64, 64, 4), 4, 17, (1, 64, 64, 4)),  # 17 is prime: one element per chunk, a piece still whole chunks
    ((1000, 64, 64, 4), 4, 1000, (16, 64, 64, 4)),  # one piece: as many elements as fit
    ((4, 512, 512, 64), 4, 1, (1, 8, 512, 64)),  # an element of 64 MiB: rows of 128 KiB, 8 of them
    ((2, 3, 300000, 4), 8, 1, (1, 1, 32768, 4)),  # even one row is too big: the next axis in is cut
    ((7,), 8, 3, (3,)),
    ((10**7,), 1, 10**7, (CHUNK_BYTES,)),
])
def test_chunks_follow_the_batch_pieces_within_the_size_limit(shape, itemsize, per_piece, expected):
    chunks = chunk_shape(shape, itemsize, per_piece)
    assert chunks == expected
    assert np.prod(chunks) * itemsize <= CHUNK_BYTES
    assert all(1 <= c <= n for c, n in zip(chunks, shape))


def test_chunks_never_straddle_two_pieces():
    rng = np.random.default_rng(0)
    for _ in range(300):
        shape = tuple(int(n) for n in rng.integers(1, 300, int(rng.integers(1, 5))))
        itemsize, per_piece = int(rng.choice([1, 2, 4, 8, 16])), int(rng.integers(1, 400))
        chunks = chunk_shape(shape, itemsize, per_piece)
        assert np.prod(chunks) * itemsize <= max(CHUNK_BYTES, itemsize)
        assert all(1 <= c <= n for c, n in zip(chunks, shape))
        assert per_piece >= shape[0] or per_piece % chunks[0] == 0


@pytest.mark.parametrize("options, message", [
    (WriteOptions(compression="gzip", level=10),
     "--compression-level: expected an integer from 0 (fastest) to 9 (smallest), got 10"),
    (WriteOptions(compression="gzip", level=-1),
     "--compression-level: expected an integer from 0 (fastest) to 9 (smallest), got -1"),
    (WriteOptions(compression="lzf", level=3),
     "--compression-level: only gzip has levels, and the compression is lzf: pass --compression gzip, or drop the "
     "level"),
    (WriteOptions(level=3),
     "--compression-level: only gzip has levels, and the compression is none: pass --compression gzip, or drop the "
     "level"),
    (WriteOptions(compression="szip"), "--compression"),  # formats.base words it, for every format
])
def test_options_an_h5_output_cannot_take_are_refused_before_any_work(options, message):
    with pytest.raises(ConvtError) as e:
        io.check_output(io.parse_ref("OUTPUT", "y.h5:/y", must_exist=False), [], False, options)
    assert str(e.value) == message or (message == "--compression" and str(e.value).startswith(message)
                                       and "gzip or lzf" in str(e.value))


# ---------------------------------------------------------------------------------------------------------
# Attributes


def _input_with_attributes():
    with h5py.File("in.h5", "w") as f:
        x = f.create_dataset("x", data=np.ones((2, 3), np.float32))
        x.attrs["units"] = "m/s"
        x.attrs["scale"] = np.float64(2.5)
        x.attrs["lut"] = np.arange(4, dtype=np.int16)
        x.attrs["raw"] = np.bytes_(b"bytes")  # fixed-length, read back as numpy bytes
        x.attrs["convt_op"] = "an older run"
        x.attrs["dtype"] = "bfloat16"
        axis = f.create_dataset("axis", data=np.arange(2))
        axis.make_scale("batch")
        x.dims[0].attach_scale(axis)  # DIMENSION_LIST: references into this file
    return io.parse_ref("INPUT", "in.h5:/x")


def test_attributes_of_an_input_leave_out_references():
    attrs = io.attributes(_input_with_attributes())
    assert sorted(attrs) == ["convt_op", "dtype", "lut", "raw", "scale", "units"]
    assert attrs["units"] == "m/s" and attrs["scale"] == 2.5 and attrs["raw"] == np.bytes_(b"bytes")
    np.testing.assert_array_equal(attrs["lut"], np.arange(4))


@pytest.mark.parametrize("existing", [False, True])
def test_copied_attributes_come_first_and_convt_s_own_win(existing):
    attrs = io.attributes(_input_with_attributes())
    if existing:
        with h5py.File("y.h5", "w") as f:
            f["keep"] = np.arange(3)
    _write("y.h5:/y", np.ones((2, 3), np.float32), WriteOptions(attrs=attrs))
    _write("y.h5:/b", np.ones((2, 3), ml_dtypes.bfloat16), WriteOptions(attrs=attrs))
    with h5py.File("y.h5") as f:
        y, b = f["y"].attrs, f["b"].attrs
        assert y["units"] == "m/s" and y["scale"] == 2.5 and y["raw"] == b"bytes" and list(y["lut"]) == [0, 1, 2, 3]
        assert y["convt_op"] == "conv_transpose" and json.loads(y["convt_parameters"])["strides"] == [2, 2]
        assert "dtype" not in y  # the input's bfloat16 tag does not mislabel a float32 output
        assert b["dtype"] == "bfloat16" and b["units"] == "m/s"


def test_a_copied_dtype_attribute_naming_the_output_s_dtype_stays():
    _write("y.h5:/y", np.ones(3, np.float32), WriteOptions(attrs={"dtype": "float32"}))
    _write("y.h5:/z", np.ones(3, np.float16), WriteOptions(attrs={"dtype": "float32"}))
    with h5py.File("y.h5") as f:
        assert f["y"].attrs["dtype"] == "float32" and "dtype" not in f["z"].attrs


def test_an_attribute_too_large_to_store_is_one_error_and_leaves_nothing():
    with h5py.File("y.h5", "w") as f:
        f["keep"] = np.arange(3)
    with pytest.raises(ConvtError) as e:
        _write("y.h5:/g/y", np.ones(3, np.float32), WriteOptions(attrs={"huge": np.zeros(100_000)}))
    assert str(e.value).startswith("OUTPUT 'y.h5:/g/y': the input's attribute 'huge' cannot be stored (")
    assert str(e.value).endswith("): leave out --copy-attrs")
    with h5py.File("y.h5") as f:
        names = []
        f.visit(names.append)
    assert names == ["keep"]


# ---------------------------------------------------------------------------------------------------------
# Listing


def test_listing_shows_filters_byte_order_attributes_and_links():
    with h5py.File("other.h5", "w") as f:
        f["t"] = np.arange(3)
    with h5py.File("d.h5", "w") as f:
        a = f.create_dataset("g/a", data=np.ones((4, 3), np.float32), chunks=(2, 3), compression="gzip",
                             compression_opts=6, shuffle=True)
        a.attrs.update({"s": "text", "n": np.int32(3), "v": np.arange(2.0), "b": np.bytes_(b"\xff\x01"), "c": 1 + 2j})
        f.create_dataset("big", data=np.arange(3, dtype=">i4"))
        f.create_dataset("l", data=np.ones(3), compression="lzf")
        f["g/soft"] = h5py.SoftLink("/g/a")
        f["ext"] = h5py.ExternalLink("other.h5", "/t")
    listing = {entry["name"]: entry for entry in io.list_arrays("d.h5")}
    json.dumps(listing)  # every value JSON-able
    assert listing["/g/a"] == dict(name="/g/a", shape=[4, 3], dtype="float32", chunks=[2, 3], kind="dataset",
                                   compression="gzip", compression_opts=6, shuffle=True, byteorder="<",
                                   attributes={"s": "text", "n": 3, "v": [0.0, 1.0], "b": "\\xff\x01",
                                               "c": "(1+2j)"},
                                   target=None)
    assert listing["/big"]["byteorder"] == ">" and listing["/big"]["compression"] is None
    assert (listing["/l"]["compression"], listing["/l"]["compression_opts"]) == ("lzf", None)
    assert listing["/g/soft"] == dict(name="/g/soft", shape=None, dtype=None, chunks=None, kind="soft link",
                                      compression=None, compression_opts=None, shuffle=None, byteorder=None,
                                      attributes={}, target="/g/a")
    assert listing["/ext"]["kind"] == "external link" and listing["/ext"]["target"] == "other.h5:/t"
    assert [e["name"] for e in io.list_arrays("d.h5") if e["kind"] == "dataset"] == ["/big", "/g/a", "/l"]


# ---------------------------------------------------------------------------------------------------------
# Many small outputs, one Sink each (as `convt run in.h5:/in/ w.npy -o out.h5:/out/` writes them)


def test_many_small_outputs_take_little_more_room_than_one_h5py_write():
    arrays = [_array((1, 8, 8, 2), np.float32) + i for i in range(300)]
    for i, a in enumerate(arrays):  # with the chunk_batch run_files passes
        _write(f"out.h5:/out/d{i:04d}", a, WriteOptions(chunk_batch=1),
               provenance={**PROVENANCE, "convt_input": f"in.h5:/in/d{i:04d}"})
    with h5py.File("out.h5") as src, h5py.File("plain.h5", "w") as dst:
        for name in src["out"]:
            d = dst.create_dataset(f"out/{name}", data=src["out"][name][()])
            d.attrs.update(src["out"][name].attrs)
    import os

    assert os.path.getsize("out.h5") <= 2 * os.path.getsize("plain.h5")  # it was 4.3 times


# ---------------------------------------------------------------------------------------------------------
# Signals


@pytest.fixture
def handler(monkeypatch):
    """convt's SIGINT handler installed, and interrupts' records fresh; both put back afterwards."""
    monkeypatch.setattr(interrupts, "_signalled", [])
    monkeypatch.setattr(interrupts, "_held", [], raising=False)
    previous = signal.signal(signal.SIGINT, interrupts.terminate)
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    yield unraisable
    signal.signal(signal.SIGINT, previous)


def test_deferred_holds_a_signal_until_the_block_ends(handler):
    with pytest.raises(KeyboardInterrupt):
        with interrupts.deferred():
            with interrupts.deferred():
                interrupts.terminate(signal.SIGINT, sys._getframe())
            done = True  # the inner block ends quietly: the outer one is still inside h5py work
    assert done
    with interrupts.deferred(reraise=False):
        interrupts.terminate(signal.SIGTERM, sys._getframe())
    assert interrupts._held == [signal.SIGTERM]  # held for the next check
    with pytest.raises(KeyboardInterrupt):
        interrupts.stop_if_signalled()
    assert interrupts._held == []


def test_deferred_lets_the_block_s_own_error_through(handler):
    with pytest.raises(OSError):
        with interrupts.deferred():
            interrupts.terminate(signal.SIGINT, sys._getframe())
            raise OSError("disk full")
    assert interrupts._signalled == [signal.SIGINT]


def test_a_signal_in_a_finalizer_is_held_for_the_next_check_not_printed(handler):
    ran = []

    class Finalized:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)  # the handler runs here, inside the finalizer
            ran.append("to its end")

    Finalized()
    assert ran == ["to its end"] and handler == []
    with pytest.raises(KeyboardInterrupt):
        interrupts.stop_if_signalled()


def _sigint_in_h5py_weakref_callbacks(skip=0, count=1):
    """A tracer that sends SIGINT from inside h5py's WeakValueDictionary callbacks, after `skip` of them: where
    the signal of defect 3 landed (`Exception ignored in: <function WeakValueDictionary.__init__.<locals>.remove
    ...>`)."""
    seen, sent = [], []

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code.co_name == "remove" and frame.f_code.co_filename.endswith("weakref.py"):
            seen.append(frame.f_code)
            if len(seen) > skip and len(sent) < count:
                sent.append(frame.f_code)
                signal.raise_signal(signal.SIGINT)
        return None

    return tracer, sent


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("skip", range(31))  # about 12 callbacks run while opening, 6 per write, 3-7 in the commit
def test_sigint_inside_h5py_finalizers_is_one_clean_interrupt(handler, existing, skip):
    if existing:
        with h5py.File("y.h5", "w") as f:
            f["keep"] = np.arange(3)
    tracer, sent = _sigint_in_h5py_weakref_callbacks(skip)
    committed = interrupted = False
    sys.settrace(tracer)
    try:
        sink = io.Sink(io.parse_ref("OUTPUT", "y.h5:/g/y", must_exist=False), (4, 3), np.float32, PROVENANCE,
                       options=WriteOptions(compression="gzip", chunk_batch=2))
        try:  # what run_files does
            sink.write(np.ones((2, 3), np.float32))
            interrupts.stop_if_signalled()
            sink.write(np.ones((2, 3), np.float32))
            interrupts.stop_if_signalled()
            sink.commit()
            committed = True
        except BaseException:
            sink.abort()
            raise
        finally:
            sys.settrace(None)
        interrupts.stop_if_signalled()  # the next item of a run_many, or the CLI's end
    except KeyboardInterrupt:
        interrupted = True
    if not sent:
        pytest.skip(f"fewer than {skip + 1} h5py weakref callbacks ran")
    assert interrupted
    assert handler == []  # nothing printed as 'Exception ignored'
    import os

    assert [p for p in os.listdir(".") if p.startswith(".convt")] == []
    names = []
    if os.path.exists("y.h5"):
        with h5py.File("y.h5") as f:
            f.visit(names.append)
    if committed:  # too late to undo: the output is whole
        np.testing.assert_array_equal(io.load(io.parse_ref("INPUT", "y.h5:/g/y")), np.ones((4, 3)))
    else:  # as it was: no hidden dataset, no new group
        assert names == (["keep"] if existing else [])


def test_sigint_inside_h5py_finalizers_while_reading_is_one_clean_interrupt(handler):
    with h5py.File("x.h5", "w") as f:
        f["x"] = np.ones((4, 3))
    tracer, sent = _sigint_in_h5py_weakref_callbacks(count=3)
    with pytest.raises(KeyboardInterrupt):
        sys.settrace(tracer)
        try:
            H5().listing(io.parse_ref("INPUT", "x.h5"))
            io.attributes(io.parse_ref("INPUT", "x.h5"))
        finally:
            sys.settrace(None)
    assert sent and handler == []
