"""The interface every array format implements, and the helpers the formats share.

A format is a stateless `Format` object registered in `formats.FORMATS`; what it opens holds the state: a
`Reader` (an input read whole or a batch slice at a time) and a `Writer` (an output written a batch chunk at a
time, in order). The atomic commit around a writer (a temporary file beside the target, synced and renamed into
place) is `io.Sink`'s, the same for every format; a format that writes inside an existing file, or to stdout,
makes its output visible itself (`Format.direct_writer`).

References are `io.ArrayRef`s: `.path` (None for stdin/stdout), `.name` (a member, or None), `.fail(message)`.
"""

from __future__ import annotations

import errno
import itertools
import math
import os
import re
import shutil
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConvtError


@dataclass(frozen=True)
class WriteOptions:
    """How an output is stored, beyond its shape and dtype: what `convt run --compression/--copy-attrs` ask for.

    A format that cannot honour an option refuses it in `Format.check_options`, before any work."""

    compression: str | None = None  # None, or one of the format's `compressions` ('gzip', 'lzf')
    level: int | None = None  # the compression level, where the compression has levels (gzip: 0-9)
    chunk_batch: int | None = None  # batch elements per piece of the run: chunked formats chunk along them
    chunks: tuple[int, ...] | None = None  # a tiled run's tile, as a whole chunk shape (zarr chunks along it)
    attrs: dict = field(default_factory=dict)  # attributes copied from the input (formats with attributes)


class Format:
    """One array format. Subclasses set the class attributes and override what their files can do."""

    name = ""  # what io.sniff and io.output_format return, e.g. 'npy'
    title = ""  # how messages listing the formats name it, e.g. '.npy' or 'HDF5'
    magic = b""  # how its files start; io.sniff tells formats by these bytes (or `sniff`), never by the suffix
    suffixes: tuple[str, ...] = ()  # lower-case output suffixes that choose it (an output has no bytes yet)
    named = False  # a reference may name one array inside a file (PATH:NAME)
    groups = False  # a NAME may be a group holding many arrays (each converted, see io.expand_items)
    shares_file = False  # an output may go into an existing file beside other arrays (an input there is read whole)
    compressions: tuple[str, ...] = ()  # what WriteOptions.compression may be for its outputs
    copies_file = False  # an output into an existing file writes a new copy of it (the disk needs room for both)
    has_attributes = False  # its arrays carry attributes (HDF5 datasets): provenance, --copy-attrs
    dtypes: tuple[str, ...] | None = None  # the dtype names its outputs can hold (None: any); others refused
    folder = False  # a file of it is a folder (a zarr store), told by is_folder, never by bytes

    def sniff(self, head: bytes) -> bool:
        """Whether a file starting with `head` (its first bytes) is of this format."""
        return bool(self.magic) and head.startswith(self.magic)

    def is_folder(self, path: str) -> bool:
        """Whether the existing folder `path` is one of this format's (formats with `folder`)."""
        return False

    # Reading

    def header(self, ref) -> tuple[tuple[int, ...], np.dtype]:
        """(shape, dtype) without reading the data; every refusal a load would make from the header, made now."""
        raise NotImplementedError

    def load(self, ref) -> np.ndarray:
        """The whole array; pickles refused, bfloat16 stored as 2-byte void returned as bfloat16."""
        raise NotImplementedError

    def reader(self, ref) -> Reader:
        """A reader of batch slices; formats that cannot read a slice alone read it all (`Reader.whole`)."""
        return WholeReader(self.load(ref))

    def listing(self, ref) -> list[dict]:
        """Every array in the file, for `convt info`: name (None where a file holds one array), shape, dtype."""
        shape, dtype = self.header(ref)
        return [dict(name=None, shape=list(shape), dtype=dtype.name)]

    def attributes(self, ref) -> dict:
        """The attributes stored with the array `ref` names (for copying them to the output); {} where the
        format has none."""
        return {}

    def batch_chunk(self, ref) -> int | None:
        """Batch elements per stored chunk of the array `ref` names (None: not chunked, or not along the batch
        alone): a reader of fewer decompresses the whole chunk each time."""
        return None

    def members_under(self, ref) -> list[str] | None:
        """The arrays below the group `ref` names, relative to it; None when it names one array."""
        return None

    # Writing

    def check_options(self, ref, options: WriteOptions) -> None:
        """Refuse, before any work, what the format cannot store (io.check_output)."""
        if options.compression is not None and options.compression not in self.compressions:
            kind = "store" if self.folder else "file"
            what = "stdout (a .npy stream)" if ref.path is None else f"a {self.title} {kind}"
            cannot = f"takes only {one_of(self.compressions)}" if self.compressions else "cannot be compressed"
            raise ConvtError(f"--compression {options.compression}: OUTPUT '{ref}' is {what}, which {cannot}; .npz "
                             f"outputs take gzip, .h5 outputs gzip or lzf")

    def check_name(self, ref) -> None:
        """Refuse an output NAME this format cannot write to (io.check_output, after the folder checks)."""

    def replaces(self, ref, other) -> bool:
        """Whether writing `ref` replaces what the input `other`, in the same file, reads."""
        return True

    def check_existing(self, ref, force: bool) -> None:
        """Refuse writing `ref` into or over the existing file it names."""
        if not force:
            ref.fail("exists: pass --force to replace it")

    def direct_writer(self, ref, shape, dtype, provenance: dict, force: bool,
                      options: WriteOptions = WriteOptions()) -> Writer | None:
        """A writer that makes `ref` visible itself on finish() and undoes itself on abort() (stdout, a dataset in
        an existing file); None: write a new file, which io.Sink then renames into place."""
        return None

    def file_writer(self, ref, path: str, shape, dtype, provenance: dict,
                    options: WriteOptions = WriteOptions()) -> Writer:
        """A writer of the whole output into the new, empty file `path`."""
        raise NotImplementedError


class Reader:
    """An input opened for reading: `shape` and `dtype` known, the data read by batch slices."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def whole(self) -> bool:
        """True when the array is held in memory, whatever is read of it."""
        return False

    def read(self, b0: int, b1: int) -> np.ndarray:
        """Batch elements [b0, b1)."""
        raise NotImplementedError

    def read_box(self, b0: int, b1: int, index: tuple) -> np.ndarray:
        """Batch elements [b0, b1), only the box `index` (one slice, step 1, per axis after the batch's), as a
        new array: formats that can read it alone override this."""
        return np.ascontiguousarray(self.read(b0, b1)[(slice(None), *index)])

    def close(self) -> None:
        pass


class WholeReader(Reader):
    """An array already in memory (stdin, .npz members, or any input read whole on purpose)."""

    def __init__(self, array: np.ndarray):
        self._array = array
        self.shape, self.dtype = array.shape, array.dtype

    @property
    def whole(self) -> bool:
        return self._array is not None

    def read(self, b0: int, b1: int) -> np.ndarray:
        return self._array[b0:b1]

    def close(self) -> None:
        self._array = None


class Writer:
    """An output being written. Subclasses acquire what they write to in _open(); a failure there undoes it.
    Those with `boxes` also write any box of it in any order (put_box): the spatial tiles of a run."""

    boxes = False

    def __init__(self):
        try:
            self._open()
        except BaseException:
            self.abort()
            raise

    def _open(self) -> None:
        pass

    def put(self, chunk: np.ndarray, start: int) -> None:
        """Batch elements [start, start + len(chunk)) of a C-contiguous chunk of the output's dtype, in order."""
        raise NotImplementedError

    def put_box(self, chunk: np.ndarray, start: int, index: tuple) -> None:
        """Batch elements [start, start + len(chunk)), box `index` (a slice per axis after the batch's), of a
        C-contiguous chunk of the output's dtype; boxes come in any order, and cover the output once."""
        raise NotImplementedError

    def finish(self) -> None:
        """Complete the output: a file writer's file is then whole (still under its temporary name), a direct
        writer's output visible under its own name."""
        raise NotImplementedError

    def abort(self) -> None:
        """Release everything, quietly where a close fails, and undo what a direct writer did; the temporary
        file of a file writer is io.Sink's to remove."""
        raise NotImplementedError


class FileWriter(Writer):
    """A writer of one open file, `_file` (opened in _open): finish() closes it, abort() closes it quietly. Its
    data, C-ordered from `_data_at` bytes into the file, takes boxes by positioned writes (no memory map: its
    pages would count against the memory budget)."""

    _file = None
    _data_at = 0
    boxes = True

    def put_box(self, chunk, start, index):
        write_box(self._file, self._data_at, self.shape, chunk, start, index)

    def finish(self) -> None:
        self._file.close()

    def abort(self) -> None:
        try:
            if self._file is not None:
                self._file.close()
        except Exception:
            pass


class DirectFile:
    """A new file written start to end (write, tell, flush, fileno, close, as `open(path, "wb")`), or any byte
    range of a file at any time (write_at), its whole blocks through O_DIRECT where the filesystem takes it: the
    data goes from a staging buffer to the disk with no copy into the page cache, which on some machines costs
    more CPU than the compute it runs beside (5 s of system time per GiB written, against 0.2 s direct). What is
    not a whole block -- the end, the partial blocks at either end of a write_at, and whatever flush() pushes out
    (fileno(): a plain descriptor) -- goes through the page cache as usual. A block is never written both ways by
    writes of disjoint ranges. With truncate=False an existing file is written into (an HDF5 dataset's storage)."""

    BLOCK = 4096  # O_DIRECT's alignment of offsets, sizes and memory on Linux filesystems
    STAGE = 8 << 20  # bytes staged before a direct write

    def __init__(self, path: str, truncate: bool = True):
        import mmap

        self._plain = os.open(path, os.O_WRONLY | (os.O_CREAT | os.O_TRUNC if truncate else 0), 0o666)
        self._direct = None
        if hasattr(os, "O_DIRECT"):
            try:
                self._direct = os.open(path, os.O_WRONLY | os.O_DIRECT)
            except OSError:  # tmpfs and others: the page cache it is
                self._direct = None
        self._stage = memoryview(mmap.mmap(-1, self.STAGE))  # page-aligned, as O_DIRECT needs
        self._bytes = np.frombuffer(self._stage, np.uint8)  # NumPy copies into it without the GIL
        self._at = 0  # file offset of the stage's first byte
        self._used = 0

    def write(self, data) -> int:
        data = np.frombuffer(memoryview(data).cast("B"), np.uint8)
        n = len(data)
        while len(data):
            take = min(len(data), self.STAGE - self._used)
            self._bytes[self._used:self._used + take] = data[:take]
            self._used += take
            data = data[take:]
            if self._used == self.STAGE:
                self._drain(whole_blocks=True)
        return n

    def tell(self) -> int:
        return self._at + self._used

    def write_at(self, offset: int, data) -> None:
        """All of `data` at byte `offset`, after what write() staged: the whole blocks inside the range through the
        stage and O_DIRECT, the partial ones at its ends plainly."""
        self.flush()
        data = np.frombuffer(memoryview(data).cast("B"), np.uint8)
        n = len(data)
        done = n if self._direct is None else min(n, -offset % self.BLOCK)
        if done:
            _pwrite_all(self._plain, data[:done], offset)
        while n - done >= self.BLOCK:
            take = min(self.STAGE, (n - done) // self.BLOCK * self.BLOCK)
            self._bytes[:take] = data[done:done + take]
            _pwrite_all(self._direct, self._stage[:take], offset + done)
            done += take
        if done < n:
            _pwrite_all(self._plain, data[done:], offset + done)

    def _drain(self, whole_blocks: bool) -> None:
        """Write the staged bytes: whole blocks directly (when the stage starts on a block), the rest plainly
        unless whole_blocks; what is left stays staged."""
        done = 0
        if self._direct is not None and self._at % self.BLOCK == 0:
            done = self._used - self._used % self.BLOCK
            _pwrite_all(self._direct, self._stage[:done], self._at)
        if not whole_blocks or self._direct is None or self._at % self.BLOCK:
            _pwrite_all(self._plain, self._stage[done:self._used], self._at + done)
            done = self._used
        rest = self._used - done
        self._bytes[:rest] = self._bytes[done:self._used].copy()
        self._at += done
        self._used = rest

    def flush(self) -> None:
        self._drain(whole_blocks=False)

    def fileno(self) -> int:
        return self._plain

    def close(self) -> None:
        try:
            if self._plain is not None and self._used:
                self._drain(whole_blocks=False)
        finally:
            for fd in (self._direct, self._plain):
                if fd is not None:
                    os.close(fd)
            self._direct = self._plain = None
            self._bytes = None
            self._stage.release()


def sync_folder(folder: str) -> None:
    """Make a rename in `folder` durable; some filesystems cannot fsync a folder, and nothing is lost then."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_box(file, data_at: int, shape, chunk: np.ndarray, start: int, index: tuple) -> None:
    """Batch elements [start, start + len(chunk)), box `index`, of the C-ordered array of `shape` stored raw from
    byte `data_at` of an open file: a DirectFile's write_at, or positioned writes on a plain file's descriptor."""
    size = np.dtype(chunk.dtype).itemsize
    flat = chunk.reshape(-1).view(np.uint8)
    if isinstance(file, DirectFile):
        write = file.write_at
    else:
        file.flush()
        fd = file.fileno()

        def write(at, data):
            _pwrite_all(fd, data, at)
    at = 0
    for offset, count in box_runs(shape, (slice(start, start + len(chunk)), *index)):
        n = count * size
        write(data_at + offset * size, flat[at:at + n].data)
        at += n


def _pwrite_all(fd: int, data, offset: int) -> None:
    written = 0
    while written < len(data):
        written += os.pwrite(fd, data[written:], offset + written)


def box_runs(shape, index) -> list[tuple[int, int]]:
    """The box `index` (a slice, step 1, per axis) of a C-ordered array of `shape` as runs of contiguous elements,
    (first element's offset, count), in the box's own C order: the axes after the last one the box cuts are
    whole, and each run is a row of the box along that axis times them.

    >>> box_runs((2, 4, 3), (slice(1, 2), slice(1, 3), slice(0, 3))), box_runs((4, 3), (slice(0, 2), slice(1, 2)))
    ([(15, 6)], [(1, 1), (4, 1)])
    """
    bounds = [sl.indices(n)[:2] for sl, n in zip(index, shape)]
    strides = [math.prod(shape[j + 1:]) for j in range(len(shape))]
    cut = max((j for j, ((a, b), n) in enumerate(zip(bounds, shape)) if (a, b) != (0, n)), default=0)
    a, b = bounds[cut]
    if b <= a or any(y <= x for x, y in bounds):
        return []
    count = (b - a) * strides[cut]
    return [(sum(i * st for i, st in zip(idx, strides)) + a * strides[cut], count)
            for idx in itertools.product(*(range(x, y) for x, y in bounds[:cut]))]


def read_runs(path: str, data_at: int, dtype: np.dtype, shape, index, out: np.ndarray | None = None) -> np.ndarray:
    """The box `index` of the C-ordered array of `shape` stored raw from byte `data_at` of the file, read by
    positioned reads into a new array (or into `out`, C-contiguous, of the box's shape)."""
    size = dtype.itemsize
    box = tuple(len(range(*sl.indices(n))) for sl, n in zip(index, shape))
    out = np.empty(box, dtype) if out is None else out
    flat = out.reshape(-1).view(np.uint8)
    at = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset, count in box_runs(shape, index):
            n, done = count * size, 0
            while done < n:  # positioned reads, without the GIL
                got = os.preadv(fd, [flat[at + done:at + n].data], data_at + offset * size + done)
                if got == 0:
                    raise OSError(f"short read at byte {data_at + offset * size + done}")
                done += got
            at += n
    finally:
        os.close(fd)
    return out


def pick_member(ref, names: list[str], noun: str, shown=", ".join, listed: bool = True) -> str:
    """The member `ref` names of a file holding `names` (arrays of an .npz, tensors of a .safetensors file), or the
    file's only one; else ref.fail, with `shown(names)` in the message (and in the one for several members only if
    `listed`)."""
    if ref.name is not None:
        if ref.name not in names:
            ref.fail(f"has no {noun} '{ref.name}': it holds {shown(names) or 'nothing'}")
        return ref.name
    if len(names) != 1:
        first = names[0] if names else "NAME"
        inside = f" ({shown(names)})" if listed else ""
        ref.fail(f"holds {len(names)} {noun}s{inside}: name one, as {ref.path}:{first}")
    return names[0]


def one_of(words) -> str:
    """'a, b or c', as messages list formats and suffixes."""
    words = list(words)
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def is_bfloat16_void(dtype: np.dtype) -> bool:
    # convt's convention for bfloat16, which has no .npy or HDF5 type: a plain 2-byte void
    return dtype.kind == "V" and dtype.itemsize == 2 and dtype.names is None


def fix_dtype(a: np.ndarray) -> np.ndarray:
    if is_bfloat16_void(a.dtype):
        import ml_dtypes

        return a.view(ml_dtypes.bfloat16)
    return a


def fix_header_dtype(dtype: np.dtype) -> np.dtype:
    if is_bfloat16_void(dtype):
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return dtype


def check_plain(ref, dtype: np.dtype) -> None:
    if dtype.hasobject:
        ref.fail("holds Python objects (a pickle); convt never unpickles: save a numeric array instead")


def np_guard(ref, read):
    """read() as an array, with whatever a damaged file makes numpy, h5py or zipfile raise as one ConvtError."""
    try:
        return np.asarray(read())
    except ConvtError:
        raise
    except MemoryError:
        ref.fail("does not fit in memory")
    except Exception as e:  # numpy/h5py/zipfile raise many kinds for a damaged file
        ref.fail(f"cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")


def reason(e: OSError, folder: str | None = None, nbytes: int = 0) -> str:
    """The cause of an OSError in a few words; h5py and numpy wrap it in long texts or none."""
    text = str(e)
    if e.errno == errno.ENOSPC or "errno = 28," in text or "No space left on device" in text:
        return "No space left on device"
    if folder is not None and "requested and" in text and "written" in text:  # numpy's short-write message
        try:
            if shutil.disk_usage(folder).free < nbytes:
                return "No space left on device"
        except OSError:
            pass
    found = re.search(r"error message = '([^']+)'", text)  # HDF5's report of the system error
    if found:
        return found.group(1)
    if e.strerror:
        return e.strerror
    return text.splitlines()[0] if text else type(e).__name__


def is_terminal(stream) -> bool:
    """stream.isatty(), False for a stream a caller replaced with one that cannot tell, or closed."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
