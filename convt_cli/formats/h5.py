"""The HDF5 format: datasets named by PATH:/group/dataset, read and written a batch slice at a time.

h5py is imported inside the functions that touch a file, so that commands on .npy files start fast. bfloat16
is stored as an opaque 2-byte type, tagged with the dataset attribute `dtype="bfloat16"`.

Every h5py call runs inside `interrupts.deferred()`: h5py releases its objects in weakref callbacks, where a
KeyboardInterrupt raised by the signal handler would be printed as `Exception ignored` and lost; a signal that
comes meanwhile is raised when the call is done (or, in cleanup, left for the next check).

Outputs are contiguous, as np.save users expect from h5py, unless WriteOptions asks for compression; then
they are chunked along the run's batch pieces (`storage`).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from ..errors import ConvtError
from ..interrupts import deferred
from ..shapes import block_sizes
from .base import (DirectFile, Format, Reader, WriteOptions, Writer, check_plain, fix_dtype, fix_header_dtype,
                   np_guard, read_runs, reason, write_box)

CHUNK_BYTES = 1 << 20  # the most a chunk holds: h5py's advice (10 KiB - 1 MiB), and HDF5's default chunk cache
GZIP_LEVELS = range(10)
RAW_BYTES = 1 << 20  # outputs this large are written raw, beside h5py (_DatasetWriter)

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def dataset_name(name: str | None) -> str:
    """The absolute dataset path an output NAME writes ('/output' when there is none)."""
    return "/" + (name or "output").strip("/")


def open_h5(ref, mode: str = "r", **kwds):
    import h5py

    try:
        with deferred():
            return h5py.File(ref.path, mode, **kwds)
    except OSError as e:
        ref.fail(f"cannot be opened as HDF5 ({str(e).splitlines()[0]})")


def find_dataset(ref, f):
    """The dataset `ref` reads: its NAME, or the file's only dataset."""
    import h5py

    if ref.name is None:
        found = []
        f.visititems(lambda path, obj: found.append(path) if isinstance(obj, h5py.Dataset) else None)
        if len(found) != 1:
            listing = ", ".join("/" + p for p in found[:5]) + (", ..." if len(found) > 5 else "")
            first = found[0] if found else "NAME"
            ref.fail(f"holds {len(found)} datasets ({listing}): name one, as {ref.path}:/{first}")
        obj = f[found[0]]
    else:
        obj = f.get(ref.name)
        if obj is None:
            ref.fail(f"has no dataset '{ref.name}'")
        if not isinstance(obj, h5py.Dataset):
            ref.fail(f"'{ref.name}' is a group, not a dataset: name a dataset inside it")
    if obj.shape is None:
        ref.fail(f"dataset '{obj.name}' has no data (an empty HDF5 dataspace)")
    return obj


def check_target(ref, f, force: bool) -> None:
    # --force replaces a dataset, never a group of them, and cannot make a dataset inside a dataset
    import h5py

    name = dataset_name(ref.name)
    parts = name.strip("/").split("/")
    for depth in range(1, len(parts)):
        above = "/" + "/".join(parts[:depth])
        if isinstance(f.get(above), h5py.Dataset):
            ref.fail(f"'{above}' is a dataset, so '{name}' cannot be made inside it")
    found = f.get(name)
    if found is None:
        return
    if not isinstance(found, h5py.Dataset):
        ref.fail(f"'{name}' is a group: name a dataset, as {ref.path}:{name.rstrip('/')}/output")
    if not force:
        ref.fail(f"dataset '{name}' exists: pass --force to replace it")


def replace_dataset(ref, f, tmp: str, force: bool) -> None:
    """Move the finished hidden dataset `tmp` to the target name; an existing dataset (with --force) is set aside
    first and comes back if the move fails, so no interruption loses it."""
    name = dataset_name(ref.name)
    parent, _, leaf = name.rpartition("/")
    backup = f"{parent}/.convt-replaced-{os.getpid()}-{leaf}"
    try:
        if name in f:
            check_target(ref, f, force)
            f.move(name, backup)
        f.move(tmp, name)
        if backup in f:
            del f[backup]
    except BaseException:
        if backup in f and name not in f:
            f.move(backup, name)
        raise


# ---------------------------------------------------------------------------------------------------------
# How an output is stored


def storage(shape, dtype, options: WriteOptions) -> dict:
    """create_dataset's layout keywords: {} (contiguous) unless options ask for compression, which needs chunks.

    The chunks follow options.chunk_batch (the run's pieces; one batch element when not given). Without
    compression chunk_batch alone does not chunk: HDF5 writes pieces into contiguous storage just as fast, and a
    chunked dataset carries a chunk index (a B-tree node of about 2 KiB even for 512 bytes of data), which made
    3,000 small outputs 3.4 times the size of h5py's write.

    gzip and lzf get the shuffle filter too, for multi-byte types: bytes of equal significance side by side.
    Measured on float32 conv_transpose outputs, gzip shrinks them 1.16x with it (1.07x without), a smooth field
    1.50x (1.09x), and it is faster; only data that is half zeros compresses better without (1.58x against
    1.80x). Every HDF5 reads it. A scalar cannot be chunked and an empty array has nothing to compress: both
    stay contiguous.
    """
    shape = tuple(int(n) for n in shape)
    if options.compression is None or not shape or 0 in shape:
        return {}
    itemsize = np.dtype(dtype).itemsize
    keywords = dict(chunks=chunk_shape(shape, itemsize, options.chunk_batch or 1), compression=options.compression,
                    shuffle=itemsize > 1)
    if options.compression == "gzip":
        keywords.update(compression_opts=4 if options.level is None else int(options.level))  # h5py's default
    return keywords


def chunk_shape(shape: tuple[int, ...], itemsize: int, batch_per_piece: int) -> tuple[int, ...]:
    """(b, *rest): b batch elements per chunk, whole elements where CHUNK_BYTES allows.

    b divides batch_per_piece (the batch elements the run writes at once), so that every piece writes whole
    chunks and no compressed chunk is ever read back to be completed. A batch element larger than CHUNK_BYTES is
    cut: its trailing axes are kept whole (rows stay contiguous) as far as they fit, the next axis is cut to fit,
    and the axes before it are 1.

    >>> chunk_shape((100, 8, 8, 4), 4, 16), chunk_shape((4, 512, 512, 64), 4, 1)
    ((16, 8, 8, 4), (1, 8, 512, 64))
    """
    n, rest = shape[0], shape[1:]
    fit = max(1, CHUNK_BYTES // max(1, math.prod(rest) * itemsize))  # batch elements a chunk can hold
    if batch_per_piece >= n:  # one piece: any split of it is written whole
        b = min(n, fit)
    else:
        b = max(d for d in _divisors(batch_per_piece) if d <= fit)
    if b > 1 or math.prod(rest) * itemsize <= CHUNK_BYTES:
        return (b, *rest)
    return (1, *block_sizes(rest, CHUNK_BYTES // itemsize))


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in small]


def create_dataset(ref, f, name: str, shape, dtype, provenance: dict, options: WriteOptions = WriteOptions()):
    """The output dataset, with the attributes copied from the input, then convt's own: the bfloat16 tag and
    the provenance (`convt_*`), which win over copied ones of the same name. Contiguous storage of RAW_BYTES or
    more is allocated at once and never filled (every element of an output is written), so that its bytes can be
    written raw (`raw_offset`); smaller outputs are left to h5py (early allocation costs many small outputs in one
    file room)."""
    keywords = storage(shape, dtype, options)
    if not keywords and math.prod(shape) * np.dtype(dtype).itemsize >= RAW_BYTES:
        from h5py import h5d, h5p

        dcpl = h5p.create(h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5d.ALLOC_TIME_EARLY)
        keywords = dict(dcpl=dcpl, fill_time="never")
    d = f.create_dataset(name, shape=shape, dtype=dtype, **keywords)
    for key, value in options.attrs.items():
        if key == "dtype" and str(_plain(value)) != dtype.name:
            continue  # a dtype tag (bfloat16's) names the input's values, not a cast output's
        try:
            d.attrs[key] = json.dumps(value) if isinstance(value, dict) else value  # a zarr attribute's object
        # too large for an object header, a type h5py cannot write
        except (TypeError, ValueError, OSError, RuntimeError) as e:
            ref.fail(f"the input's attribute '{key}' cannot be stored ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}): leave out --copy-attrs")
    if dtype.name == "bfloat16":
        d.attrs["dtype"] = "bfloat16"
    for key, value in provenance.items():
        d.attrs[key] = value if isinstance(value, str) else json.dumps(value)
    return d


# ---------------------------------------------------------------------------------------------------------
# Many outputs into one file, one open at a time
#
# Strings in attributes (the provenance) live in HDF5's global heap, in collections of at least 4 KiB. HDF5 fills
# a collection with free room only while the file stays open; a file opened once per output gets a new collection
# each time, most of it empty and lost when the file closes. Reading a string the previous output of this process
# stored in the file loads its collection, and HDF5 puts the next strings there. Metadata comes without
# aggregation blocks (meta_block_size=0) for the same reason: what a block leaves unused is lost on close.

_last_output: dict[tuple[int, int], str] = {}  # (st_dev, st_ino) of a file -> the dataset convt wrote last


def _identity(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _reuse_string_heap(f, key) -> None:
    """Load the global heap collection of the output this process wrote last into the file, if any."""
    import h5py

    if key not in _last_output:
        return
    try:  # only room saved: nothing here may fail a write
        d = f.get(_last_output[key])
        if not isinstance(d, h5py.Dataset):
            return
        for name in d.attrs:
            info = h5py.check_string_dtype(d.attrs.get_id(name).dtype)
            if info is not None and info.length is None:  # a variable-length string, in the global heap
                d.attrs[name]  # reading it loads its collection, which HDF5 then fills further
                return
    except (OSError, KeyError, TypeError, ValueError, RuntimeError):
        pass


# ---------------------------------------------------------------------------------------------------------
# Listing and attributes, JSON-able


def _plain(value):
    """An attribute value as JSON holds it: numbers, strings (bytes decoded), lists; None for an empty one."""
    import h5py

    if isinstance(value, h5py.Empty):
        return None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    return str(value)  # complex, references


def _holds_reference(dtype: np.dtype) -> bool:
    import h5py

    if dtype.names:
        return any(_holds_reference(dtype.fields[n][0]) for n in dtype.names)
    if dtype.subdtype is not None:
        return _holds_reference(dtype.subdtype[0])
    vlen = h5py.check_dtype(vlen=dtype)
    if vlen is not None and vlen not in (str, bytes):
        return _holds_reference(np.dtype(vlen))
    return h5py.check_dtype(ref=dtype) is not None


def _filters(d) -> dict:
    """compression (h5py's name, or the filter's own for one h5py does not know), compression_opts, shuffle."""
    from h5py import h5z

    compression, opts = d.compression, d.compression_opts
    if compression is None:
        plist = d.id.get_create_plist()
        for i in range(plist.get_nfilters()):
            code, _, values, name = plist.get_filter(i)
            if code not in (h5z.FILTER_SHUFFLE, h5z.FILTER_FLETCHER32, h5z.FILTER_NBIT, h5z.FILTER_SCALEOFFSET):
                compression = name.decode("utf-8", "replace") or f"filter {code}"
                opts = list(values) or None
                break
    return dict(compression=compression, compression_opts=_plain(opts), shuffle=bool(d.shuffle))


class H5(Format):
    name, title, magic, suffixes = "h5", "HDF5", HDF5_MAGIC, (".h5", ".hdf5")
    named = groups = shares_file = has_attributes = True
    compressions = ("gzip", "lzf")

    def header(self, ref):
        with deferred(), open_h5(ref) as f:
            d = find_dataset(ref, f)
            return tuple(d.shape), fix_header_dtype(d.dtype)

    def load(self, ref):
        with deferred(), open_h5(ref) as f:
            d = find_dataset(ref, f)
            check_plain(ref, d.dtype)
            return fix_dtype(np_guard(ref, lambda: d[()]))

    def reader(self, ref):
        return H5Reader(ref)

    def listing(self, ref):
        """Every dataset, as `h5ls -rv` shows it: name, kind ('dataset'), shape, dtype, chunks, compression,
        compression_opts (gzip's level), shuffle, byteorder ('<', '>' or '|'), attributes (name -> JSON-able
        value), target (None); and every soft or external link: name, kind ('soft link' or 'external link'),
        target ('/path', or 'file.h5:/path'), the other keys None."""
        import h5py

        out = []
        with deferred(), open_h5(ref) as f:
            groups = [f]

            def visit(name, obj):
                if isinstance(obj, h5py.Group):
                    groups.append(obj)
                if not isinstance(obj, h5py.Dataset):
                    return
                shape = None if obj.shape is None else list(obj.shape)  # None: an empty dataspace
                out.append(dict(name="/" + name, shape=shape, dtype=fix_header_dtype(obj.dtype).name,
                                chunks=list(obj.chunks) if obj.chunks else None, kind="dataset", **_filters(obj),
                                byteorder=obj.dtype.str[0], attributes=_attributes(obj), target=None))

            f.visititems(visit)
            for group in groups:
                for name in group:
                    link = group.get(name, getlink=True)
                    if isinstance(link, h5py.SoftLink):
                        kind, target = "soft link", link.path
                    elif isinstance(link, h5py.ExternalLink):
                        kind, target = "external link", f"{link.filename}:{link.path}"
                    else:
                        continue
                    out.append(dict(name=group.name.rstrip("/") + "/" + name, shape=None, dtype=None, chunks=None,
                                    kind=kind, compression=None, compression_opts=None, shuffle=None,
                                    byteorder=None, attributes={}, target=target))
        return out

    def attributes(self, ref):
        """The dataset's attributes as h5py reads them (str, numpy scalars and arrays), but for those that cannot
        be copied to another file: object references (dimension scales' DIMENSION_LIST, REFERENCE_LIST) and
        empty ones."""
        import h5py

        out = {}
        with deferred(), open_h5(ref) as f:
            d = find_dataset(ref, f)
            for key in d.attrs:
                try:
                    if _holds_reference(d.attrs.get_id(key).dtype):
                        continue
                    value = d.attrs[key]
                except (OSError, TypeError, ValueError):  # a type h5py cannot read
                    continue
                if not isinstance(value, h5py.Empty):
                    out[key] = value
        return out

    def members_under(self, ref):
        if ref.name is None:
            return None  # a bare .h5 path is its one dataset, as everywhere
        import h5py

        with deferred(), open_h5(ref) as f:
            group = f.get(ref.name)
            if not isinstance(group, h5py.Group):
                return None
            names: list[str] = []
            group.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        return names

    def check_options(self, ref, options):
        super().check_options(ref, options)
        if options.level is not None:
            if options.compression != "gzip":
                raise ConvtError(f"--compression-level: only gzip has levels, and the compression is "
                                 f"{options.compression or 'none'}: pass --compression gzip, or drop the level")
            level = options.level
            if isinstance(level, bool) or not isinstance(level, int) or level not in GZIP_LEVELS:
                raise ConvtError(f"--compression-level: expected an integer from 0 (fastest) to 9 (smallest), got "
                                 f"{options.level!r}")
        if options.chunk_batch is not None and (not isinstance(options.chunk_batch, int) or options.chunk_batch < 1):
            raise ConvtError(f"chunk_batch: expected a positive number of batch elements, got {options.chunk_batch!r}")

    def check_name(self, ref):
        if dataset_name(ref.name) == "/":
            ref.fail(f"names the root group: name a dataset, as {ref.path}:/output")

    def replaces(self, ref, other):
        # two datasets of one file are two arrays; only the very dataset an input reads is off limits
        return dataset_name(ref.name) == self._input_dataset(other)

    def _input_dataset(self, ref) -> str:
        """The dataset an input reads, also when the reference leaves it to the file's only dataset."""
        from . import input_format

        if ref.name is not None or not isinstance(input_format(ref), H5):
            return dataset_name(ref.name)
        with deferred(), open_h5(ref) as f:
            return find_dataset(ref, f).name

    def check_existing(self, ref, force):
        with open(ref.path, "rb") as f:
            if f.read(8) != HDF5_MAGIC:
                ref.fail("exists and is not an HDF5 file")
        with deferred(), open_h5(ref) as f:
            check_target(ref, f, force)
        try:
            open(ref.path, "r+b").close()
        except OSError as e:
            ref.fail(f"is not writable ({reason(e)})")

    def direct_writer(self, ref, shape, dtype, provenance, force, options=WriteOptions()):
        if not os.path.exists(ref.path):
            return None
        return H5InPlaceWriter(ref, shape, dtype, provenance, force, options)

    def file_writer(self, ref, path, shape, dtype, provenance, options=WriteOptions()):
        return H5FileWriter(ref, path, shape, dtype, provenance, options)


def _attributes(d) -> dict:
    out = {}
    for key in d.attrs:
        try:
            out[key] = _plain(d.attrs[key])
        except (OSError, TypeError, ValueError) as e:  # a type h5py cannot read
            out[key] = f"<unreadable: {type(e).__name__}>"
    return out


class H5Reader(Reader):
    """Hyperslabs through h5py, or, for a dataset stored raw (raw_offset: contiguous; or chunked without filters,
    each chunk whole batch elements), by positioned reads of its file (read_runs), which need not hold the GIL
    as h5py does through every read. A chunk never written (its fill value) is read through h5py."""

    def __init__(self, ref):
        self.ref = ref
        self._chunks: dict[int, int | None] = {}  # first batch element of a chunk -> its byte offset
        with deferred():
            self._h5 = open_h5(ref)
            try:
                self._dataset = find_dataset(ref, self._h5)
                d = self._dataset
                self.shape, self.dtype = tuple(d.shape), fix_header_dtype(d.dtype)
                self._path, self._at = d.file.filename, raw_offset(d)
                self._per_chunk = d.chunks[0] if _whole_elements(d) else None
            except BaseException:
                self._h5.close()
                raise

    def read(self, b0, b1):
        return self.read_box(b0, b1, tuple(slice(0, n) for n in self.shape[1:]))

    def read_box(self, b0, b1, index):  # a hyperslab
        full = (slice(b0, b1), *index)
        try:
            if self._at is not None:
                return fix_dtype(read_runs(self._path, self._at, self._dataset.dtype, self.shape, full))
            raw = self._read_chunks(b0, b1, index) if self._per_chunk is not None and b1 > b0 else None
            if raw is not None:
                return raw
        except OSError as e:
            self.ref.fail(f"cannot be read ({reason(e)})")
        with deferred():
            return fix_dtype(np_guard(self.ref, lambda: self._dataset[full]))

    def _read_chunks(self, b0, b1, index):
        """The box from the chunks' bytes; None when one of them was never written (h5py gives its fill value)."""
        c, dtype = self._per_chunk, self._dataset.dtype
        rest = self.shape[1:]
        offsets = [(first, self._chunk_at(first)) for first in range(b0 - b0 % c, b1, c)]
        if any(at is None for _, at in offsets):
            return None
        box = tuple(len(range(*sl.indices(n))) for sl, n in zip(index, rest))
        out = np.empty((b1 - b0, *box), dtype)
        for first, at in offsets:
            lo, hi = max(b0, first), min(b1, first + c)
            read_runs(self._path, at, dtype, (c, *rest), (slice(lo - first, hi - first), *index),
                      out=out[lo - b0:hi - b0])
        return fix_dtype(out)

    def _chunk_at(self, first: int) -> int | None:
        if first not in self._chunks:
            with deferred():
                info = self._dataset.id.get_chunk_info_by_coord((first,) + (0,) * (len(self.shape) - 1))
            self._chunks[first] = info.byte_offset if info.size else None
        return self._chunks[first]

    def close(self):
        with deferred(reraise=False):  # cleanup, also after the output is in place: a signal waits for the next check
            if self._h5 is not None:
                self._h5.close()
                self._h5 = self._dataset = None


def raw_offset(d) -> int | None:
    """The byte offset in its file of a dataset's elements stored raw: contiguous, allocated, no filter, and a
    file type whose bytes are the NumPy array's own (a native numeric type, bool, or bfloat16's opaque 2 bytes);
    else None."""
    if d.chunks is not None or d.is_virtual or d.external or not d.shape or not _raw_type(d):
        return None
    return d.id.get_offset()


def _whole_elements(d) -> bool:
    """Whether a chunked dataset's chunks are whole batch elements with no filter, their bytes the NumPy array's
    (as raw_offset asks of contiguous ones)."""
    return (d.chunks is not None and tuple(d.chunks[1:]) == tuple(d.shape[1:]) and _raw_type(d)
            and d.id.get_create_plist().get_nfilters() == 0 and not d.is_virtual)


def _raw_type(d) -> bool:
    import h5py

    dtype = d.dtype
    if dtype.kind not in "biufcV" or dtype.names or dtype.subdtype or (dtype.kind == "V" and dtype.itemsize != 2):
        return False
    return dtype.isnative and d.id.get_type().get_size() == dtype.itemsize and h5py.check_dtype(enum=dtype) is None


class _DatasetWriter(Writer):
    """Writes through h5py, or, for a dataset stored raw (raw_offset), by positioned writes of its bytes into the
    file beside HDF5 (a DirectFile: whole blocks with O_DIRECT): h5py holds the GIL through every write, which
    stalls the compute threads, and writes through the page cache. HDF5 never caches a dataset's raw data, and
    the file is flushed by HDF5 only after the last write."""

    _h5 = _dataset = _raw = None
    _raw_at = 0
    boxes = True

    def _writes_raw(self, path: str) -> None:
        at = raw_offset(self._dataset)
        if at is not None:
            self._raw, self._raw_at = DirectFile(path, truncate=False), at

    def _close_raw(self, quietly: bool = False) -> None:
        """Close the raw writes' file; quietly (in abort) a failing close is let go: the output goes anyway."""
        if self._raw is not None:
            raw, self._raw = self._raw, None
            try:
                raw.close()
            except OSError:  # a disk that is still full
                if not quietly:
                    raise

    def put(self, chunk, start):
        if self._raw is not None:
            row = math.prod(self.shape[1:]) * chunk.dtype.itemsize
            self._raw.write_at(self._raw_at + start * row, np.ascontiguousarray(chunk).reshape(-1).view(np.uint8))
            return
        with deferred():
            self._dataset[start : start + len(chunk)] = chunk

    def put_box(self, chunk, start, index):  # a hyperslab
        if self._raw is not None:
            write_box(self._raw, self._raw_at, self.shape, np.ascontiguousarray(chunk), start, index)
            return
        with deferred():
            self._dataset[(slice(start, start + len(chunk)), *index)] = chunk


class H5FileWriter(_DatasetWriter):
    """A new file holding the one dataset."""

    def __init__(self, ref, path: str, shape, dtype, provenance: dict, options: WriteOptions = WriteOptions()):
        self.ref, self.path, self.name = ref, path, dataset_name(ref.name)
        self.shape, self.dtype, self.provenance, self.options = shape, dtype, provenance, options
        super().__init__()

    def _open(self):
        import h5py

        with deferred():
            self._h5 = h5py.File(self.path, "w")
            self._dataset = create_dataset(self.ref, self._h5, self.name, self.shape, self.dtype, self.provenance,
                                           self.options)
            self._writes_raw(self.path)

    def finish(self):
        self._close_raw()
        with deferred():  # before io.Sink renames the file: an interrupt here still leaves nothing behind
            self._dataset = None
            self._h5.close()
            self._h5 = None
            _last_output[_identity(self.path)] = self.name  # the rename keeps the inode

    def abort(self):
        with deferred(reraise=False):
            self._dataset = None
            self._close_raw(quietly=True)
            if self._h5 is not None:
                try:
                    self._h5.close()
                except (OSError, RuntimeError):
                    pass  # a disk that is still full; the file is removed either way
                self._h5 = None


class H5InPlaceWriter(_DatasetWriter):
    """A dataset inside an existing file, built under a hidden name and moved into place on finish(); abort()
    removes it and any group this run made for it, leaving every other object as it was."""

    _tmp = None
    _new_groups: list[str] = []

    def __init__(self, ref, shape, dtype, provenance: dict, force: bool, options: WriteOptions = WriteOptions()):
        self.ref, self.shape, self.dtype, self.provenance, self.force = ref, shape, dtype, provenance, force
        self.options = options
        super().__init__()

    def _open(self):
        name = dataset_name(self.ref.name)
        parent, _, leaf = name.rpartition("/")
        with deferred():
            self._key = _identity(self.ref.path)
            self._h5 = open_h5(self.ref, "r+", meta_block_size=0)
            check_target(self.ref, self._h5, self.force)
            parts = parent.strip("/").split("/") if parent.strip("/") else []
            self._new_groups = [g for g in ("/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1))
                                if g not in self._h5]  # made by this run: abort() takes them away again
            self._tmp = f"{parent}/.convt-partial-{os.getpid()}-{leaf}"
            _reuse_string_heap(self._h5, self._key)
            self._dataset = create_dataset(self.ref, self._h5, self._tmp, self.shape, self.dtype, self.provenance,
                                           self.options)
            self._writes_raw(self.ref.path)

    def finish(self):
        self._close_raw()
        with deferred():  # an interrupt up to here leaves the file as it was (io.Sink aborts)
            self._dataset = None
            self._h5.flush()  # a full disk shows here, before anything is moved into place
        with deferred(reraise=False):  # the output is in place once moved: too late to undo it for an interrupt
            replace_dataset(self.ref, self._h5, self._tmp, self.force)
            _last_output[self._key] = dataset_name(self.ref.name)
            self._h5.close()
            self._h5 = None

    def abort(self):
        with deferred(reraise=False):  # io.Sink's cleanup after this must run too
            self._dataset = None
            self._close_raw(quietly=True)
            if self._h5 is None:
                return
            try:
                if self._tmp is not None and self._tmp in self._h5:
                    del self._h5[self._tmp]
                for group in reversed(self._new_groups):
                    if group in self._h5 and len(self._h5[group]) == 0:
                        del self._h5[group]
            finally:
                try:
                    self._h5.close()
                except (OSError, RuntimeError):
                    pass  # a disk that is still full; the hidden dataset is unlinked either way
                self._h5 = None
