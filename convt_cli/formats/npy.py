"""The .npy format: one array, a header then the raw bytes; also the stream on stdin/stdout and in .npz members."""

from __future__ import annotations

import math
import os

import numpy as np

from .base import (DirectFile, FileWriter, Format, Reader, WriteOptions, check_plain, fix_dtype, fix_header_dtype,
                   np_guard, read_runs)

NPY_MAGIC = b"\x93NUMPY"


def npy_header(ref, f, size: int | None):
    """(shape, dtype) of a .npy stream positioned at its start, checking that the data is all there."""
    shape, _, dtype = npy_header_as_stored(ref, f, size)
    return shape, fix_header_dtype(dtype)


def npy_header_as_stored(ref, f, size: int | None):
    """(shape, fortran_order, dtype as stored) of a checked .npy header; f is left where the data starts."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except (ValueError, OSError, EOFError, SyntaxError) as e:
        ref.fail(f"is not a readable .npy file ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    if any(n < 0 for n in shape):
        ref.fail(f"is not a readable .npy file (its header claims the negative shape {tuple(shape)})")
    check_plain(ref, dtype)
    if size is not None:
        need = f.tell() + math.prod(shape) * dtype.itemsize  # Python ints: a forged header cannot wrap around
        if size < need:
            ref.fail(f"is truncated: header says shape {shape} {dtype}, needing {need} bytes, the file has {size}")
    return tuple(shape), fortran, dtype


def np_load(ref, source) -> np.ndarray:
    return np_guard(ref, lambda: np.load(source, allow_pickle=False))


def write_npy_header(f, shape: tuple[int, ...], dtype: np.dtype) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    try:
        np.lib.format.write_array_header_1_0(f, header)
    except ValueError:  # too long for format 1.0, as np.save decides
        np.lib.format.write_array_header_2_0(f, header)


class NpyStreamWriter(FileWriter):
    """A .npy stream into an open file object: the header, then each chunk's raw bytes in order."""

    def put(self, chunk: np.ndarray, start: int) -> None:
        if chunk.size:
            self._file.write(chunk.reshape(-1).view(np.uint8).data)


class Npy(Format):
    name, title, magic, suffixes = "npy", ".npy", NPY_MAGIC, (".npy",)

    def header(self, ref):
        with open(ref.path, "rb") as f:
            return npy_header(ref, f, os.path.getsize(ref.path))

    def load(self, ref):
        self.header(ref)  # pickles and truncation, before any data is read
        return fix_dtype(np_load(ref, ref.path))

    def reader(self, ref):
        return NpyReader(ref)

    def file_writer(self, ref, path, shape, dtype, provenance, options=WriteOptions()):
        return NpyFileWriter(path, shape, dtype)


class NpyReader(Reader):
    """Batch slices by file offsets: not a memory map, whose pages would count against the memory budget
    (Fortran-ordered files excepted, whose batch elements are not contiguous)."""

    def __init__(self, ref):
        self.ref, self._mmap = ref, None
        with open(ref.path, "rb") as f:
            self.shape, fortran, self._raw_dtype = npy_header_as_stored(ref, f, os.path.getsize(ref.path))
            self._offset = f.tell()
        self.dtype = fix_header_dtype(self._raw_dtype)
        if fortran and len(self.shape) > 1:
            self._mmap = np.load(ref.path, mmap_mode="r", allow_pickle=False)

    def read_box(self, b0, b1, index):
        if self._mmap is not None:
            return super().read_box(b0, b1, index)
        box = read_runs(self.ref.path, self._offset, self._raw_dtype, self.shape, (slice(b0, b1), *index))
        return fix_dtype(box)

    def read(self, b0, b1):
        if self._mmap is not None:
            return fix_dtype(np.array(self._mmap[b0:b1]))
        per = math.prod(self.shape[1:])
        with open(self.ref.path, "rb") as f:
            f.seek(self._offset + b0 * per * self._raw_dtype.itemsize)
            data = np.fromfile(f, dtype=self._raw_dtype, count=(b1 - b0) * per)
        return fix_dtype(data.reshape((b1 - b0, *self.shape[1:])))

    def close(self):
        self._mmap = None


class NpyFileWriter(NpyStreamWriter):
    def __init__(self, path: str, shape, dtype):
        self.path, self.shape, self.dtype = path, shape, dtype
        super().__init__()

    def _open(self):
        self._file = DirectFile(self.path)
        write_npy_header(self._file, self.shape, self.dtype)
        self._data_at = self._file.tell()
