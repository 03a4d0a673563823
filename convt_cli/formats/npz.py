"""The .npz format: a zip of .npy members, named by PATH:NAME. A member is compressed or not: read whole."""

from __future__ import annotations

import io
import zipfile

import numpy as np

from .base import Format, WriteOptions, fix_dtype, np_guard
from .npy import NpyStreamWriter, npy_header, write_npy_header

ZIP_MAGIC = b"PK"


def npz_member(ref, names: list[str]) -> str:
    if ref.name is not None:
        if ref.name not in names:
            ref.fail(f"has no array '{ref.name}': it holds {', '.join(names) or 'nothing'}")
        return ref.name
    if len(names) != 1:
        first = names[0] if names else "NAME"
        ref.fail(f"holds {len(names)} arrays ({', '.join(names)}): name one, as {ref.path}:{first}")
    return names[0]


def open_zip(ref):
    try:
        return zipfile.ZipFile(ref.path)
    except (zipfile.BadZipFile, OSError) as e:
        ref.fail(f"is not a readable .npz file ({e})")


class Npz(Format):
    name, title, magic, suffixes = "npz", ".npz", ZIP_MAGIC, (".npz",)
    named = True

    def header(self, ref):
        with open_zip(ref) as z:
            names = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
            member = npz_member(ref, names)
            info = z.getinfo(member + ".npy")
            with z.open(info) as f:
                return npy_header(ref, io.BufferedReader(f), info.file_size)

    def load(self, ref):
        self.header(ref)  # member choice, pickles and truncation, before any data is read
        with np.load(ref.path, allow_pickle=False) as z:
            return fix_dtype(np_guard(ref, lambda: z[npz_member(ref, list(z.files))]))

    def listing(self, ref):
        out = []
        with open_zip(ref) as z:
            for member in z.namelist():
                if member.endswith(".npy"):
                    with z.open(member) as f:
                        shape, dtype = npy_header(ref, io.BufferedReader(f), None)
                    out.append(dict(name=member[:-4], shape=list(shape), dtype=dtype.name))
        return out

    def file_writer(self, ref, path, shape, dtype, provenance, options=WriteOptions()):
        return NpzFileWriter(path, ref.name or "output", shape, dtype)


class NpzFileWriter(NpyStreamWriter):
    """One member, streamed into a new zip (ZIP64: a member may pass 4 GiB)."""

    _zip = None

    def __init__(self, path: str, member: str, shape, dtype):
        self.path, self.member, self.shape, self.dtype = path, member, shape, dtype
        super().__init__()

    def _open(self):
        self._zip = zipfile.ZipFile(self.path, "w", allowZip64=True)
        member = zipfile.ZipInfo(self.member + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
        self._file = self._zip.open(member, "w", force_zip64=True)  # a fixed time: the same bytes every run
        write_npy_header(self._file, self.shape, self.dtype)

    def finish(self):
        for handle in (self._file, self._zip):  # the member first: its size goes into the central directory
            if handle is not None:
                handle.close()

    def abort(self):
        for handle in (self._file, self._zip):
            try:
                if handle is not None:
                    handle.close()
            except Exception:
                pass
