"""The .safetensors format (Hugging Face's, how PyTorch weights are shared): named tensors after a JSON header.

Read through the safetensors package's NumPy API (`safe_open(path, framework="np")`): headers without the data,
a batch slice by `get_slice` (the file is memory-mapped; only the slice is copied), bfloat16 as ml_dtypes'. Never
a pickle: the format has none, and `.pt`/`.pth` files (pickles) are refused with the conversion (formats/__init__).

An output is a new file of one tensor (`PATH:NAME`; a bare PATH is the tensor `output`), written as the format
specifies: 8 bytes of little-endian header length, the JSON header (dtype, shape, data_offsets, and the provenance
as `__metadata__` strings) padded with spaces to 8 bytes, then the data, streamed in order. convt writes whole
files: an existing file is replaced (with --force) only when it holds no tensor but the one written.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np

from ..errors import ConvtError
from .base import FileWriter, Format, Reader, WriteOptions, one_of, pick_member

CODES = {  # the format's dtype names <-> NumPy's (bfloat16: ml_dtypes')
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16", "U32": "uint32", "I32": "int32",
    "U64": "uint64", "I64": "int64", "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
    "C64": "complex64",
}
NAMES = {v: k for k, v in CODES.items()}
DEFAULT_NAME = "output"


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _open(ref):
    """safe_open of the file, whose failures (not a safetensors file, a damaged header) are one ConvtError."""
    from safetensors import safe_open

    try:
        return safe_open(ref.path, framework="np")
    except Exception as e:  # SafetensorError, OSError
        ref.fail(f"is not a readable .safetensors file ({' '.join(str(e).split()) or type(e).__name__})")


def _tensor(ref, f) -> str:
    """The tensor `ref` names, or the file's only one."""
    return pick_member(ref, list(f.keys()), "tensor", lambda names: _shown(names, 8), listed=False)


def _shown(names: list, most: int) -> str:
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def _spec(ref, f, name: str) -> tuple[tuple[int, ...], np.dtype]:
    piece = f.get_slice(name)
    code = piece.get_dtype()
    if code not in CODES:
        ref.fail(f"tensor '{name}' has dtype {code}, which convt does not read: expected {one_of(list(CODES))}")
    return tuple(int(n) for n in piece.get_shape()), _dtype(CODES[code])


class Safetensors(Format):
    name, title, suffixes = "safetensors", ".safetensors", (".safetensors",)
    named = True
    dtypes = tuple(NAMES)  # no complex128: the format has no such type

    def sniff(self, head):
        # no magic: 8 bytes of header length, then the JSON header's '{' (no .npy, zip or HDF5 file has one there)
        return len(head) >= 9 and head[8:9] == b"{" and 2 <= struct.unpack("<Q", head[:8])[0] < 1 << 32

    def header(self, ref):
        with _open(ref) as f:
            return _spec(ref, f, _tensor(ref, f))

    def load(self, ref):
        with _open(ref) as f:
            name = _tensor(ref, f)
            shape, dtype = _spec(ref, f, name)
            try:
                a = f.get_tensor(name)
            except Exception as e:
                ref.fail(f"tensor '{name}' cannot be read ({' '.join(str(e).split()) or type(e).__name__})")
        return np.asarray(a).view(dtype).reshape(shape)

    def reader(self, ref):
        return SafetensorsReader(ref)

    def listing(self, ref):
        with _open(ref) as f:
            out = []
            for name in f.keys():
                piece = f.get_slice(name)
                code = piece.get_dtype()
                out.append(dict(name=name, shape=[int(n) for n in piece.get_shape()],
                                dtype=CODES.get(code, code)))
            return out

    # Writing

    def check_existing(self, ref, force):
        try:
            with _open(ref) as f:
                names = list(f.keys())
        except ConvtError:  # damaged or empty: nothing in it to keep
            names = []
        others = [n for n in names if n != (ref.name or DEFAULT_NAME)]
        if others:
            ref.fail(f"exists and holds other tensors ({_shown(others, 5)}): convt writes whole .safetensors files, "
                     f"so write the output to a new file")
        if not force:
            ref.fail("exists: pass --force to replace it")

    def file_writer(self, ref, path, shape, dtype, provenance, options=WriteOptions()):
        if np.dtype(dtype).name not in self.dtypes:
            ref.fail(f"a .safetensors file cannot hold {np.dtype(dtype).name}: write .npy, .npz or .h5, or cast with "
                     f"--dtype")
        return SafetensorsWriter(path, ref.name or DEFAULT_NAME, shape, dtype, provenance)


class SafetensorsReader(Reader):
    """Batch slices through get_slice: the file stays open (memory-mapped) until close()."""

    def __init__(self, ref):
        self.ref, self._file = ref, _open(ref)
        self._name = _tensor(ref, self._file)
        self.shape, self.dtype = _spec(ref, self._file, self._name)
        self._slice = self._file.get_slice(self._name)

    def read_box(self, b0, b1, index):
        box = (b1 - b0, *(len(range(*sl.indices(n))) for sl, n in zip(index, self.shape[1:])))
        if 0 in box:
            return np.zeros(box, self.dtype)
        return np.ascontiguousarray(self._slice[(slice(b0, b1), *index)]).view(self.dtype).reshape(box)

    def read(self, b0, b1):
        if not self.shape or math.prod(self.shape[1:]) == 0 or b1 <= b0:
            return np.zeros((max(0, b1 - b0), *self.shape[1:]), self.dtype)
        return np.ascontiguousarray(self._slice[b0:b1]).view(self.dtype).reshape((b1 - b0, *self.shape[1:]))

    def close(self):
        if self._file is not None:
            self._file.__exit__(None, None, None)
            self._file = self._slice = None


class SafetensorsWriter(FileWriter):
    """One tensor into a new file: the header (its size known from shape and dtype), then the data in order."""

    def __init__(self, path: str, name: str, shape, dtype, provenance: dict):
        self.path, self.name, self.shape, self.dtype = path, name, tuple(shape), np.dtype(dtype)
        self.provenance = provenance
        super().__init__()

    def _open(self):
        nbytes = math.prod(self.shape) * self.dtype.itemsize
        meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.provenance.items()}
        header = {self.name: {"dtype": NAMES[self.dtype.name], "shape": list(self.shape),
                              "data_offsets": [0, nbytes]}}
        if meta:
            header["__metadata__"] = meta
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(text)) + text)
        self._data_at = 8 + len(text)

    def put_box(self, chunk, start, index):
        super().put_box(np.ascontiguousarray(chunk, dtype=chunk.dtype.newbyteorder("<")), start, index)

    def put(self, chunk, start):
        if chunk.size:  # the format is little-endian
            little = np.ascontiguousarray(chunk, dtype=chunk.dtype.newbyteorder("<"))
            self._file.write(little.reshape(-1).view(np.uint8).data)
