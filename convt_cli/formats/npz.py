"""The .npz format: a zip of .npy members, named by PATH:NAME. A member is compressed or not: read whole.

An output member goes into the file as np.savez would name it (`NAME.npy`; a bare PATH is the member `output`,
as for HDF5 the dataset `/output`). Into an existing .npz it is added beside the other entries, which are
copied into the new file with their names, order, dates and compression (re-compressed, a block at a time);
--force replaces that one member, at its old place. The new file is renamed over the old one (io.Sink), so an
interrupted run leaves the old file exactly as it was; the price is that every member written copies the whole
file (a zip appended in place is not whole until its central directory is written again).
"""

from __future__ import annotations

import io
import os
import stat
import struct
import zipfile

import numpy as np

from ..errors import ConvtError
from .base import Format, WriteOptions, fix_dtype, np_guard, one_of, pick_member, reason
from .npy import NpyStreamWriter, npy_header, write_npy_header

ZIP_MAGIC = b"PK"
MEMBER_DATE = (1980, 1, 1, 0, 0, 0)  # a fixed time: the same bytes every run
COPY_BLOCK = 1 << 22  # bytes of a copied member held at once
GZIP_LEVELS = range(10)  # zlib's; None is zlib's default (6), as np.savez_compressed
_READABLE = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2",
             zipfile.ZIP_LZMA: "lzma"}


def npz_member(ref, names: list[str]) -> str:
    return pick_member(ref, names, "array")


def open_zip(ref):
    try:
        return zipfile.ZipFile(ref.path)
    except (zipfile.BadZipFile, OSError) as e:
        ref.fail(f"is not a readable .npz file ({e})")


def entry_name(ref) -> str:
    """The zip entry an output writes: NAME.npy, as np.savez names a keyword argument."""
    return (ref.name or "output") + ".npy"


class Npz(Format):
    name, title, magic, suffixes = "npz", ".npz", ZIP_MAGIC, (".npz",)
    named = shares_file = copies_file = True
    compressions = ("gzip",)  # zip's deflate, as np.savez_compressed

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
                    entry = dict(name=member[:-4], shape=list(shape), dtype=dtype.name)
                    kind = z.getinfo(member).compress_type
                    if kind != zipfile.ZIP_STORED:  # deflate is what --compression gzip writes, as h5py names it
                        entry["compression"] = "gzip" if kind == zipfile.ZIP_DEFLATED else _READABLE.get(kind, kind)
                    out.append(entry)
        return out

    # Writing

    def check_options(self, ref, options):
        super().check_options(ref, options)
        if options.compression is not None and options.level is not None and options.level not in GZIP_LEVELS:
            raise ConvtError(f"--compression-level: expected an integer 0..9, got {options.level}")

    def check_name(self, ref):
        name = ref.name
        if name is None:
            return
        if name.startswith("/"):
            fix = name.strip("/")
            ref.fail(f"an .npz member name cannot start with '/' (zip paths are relative): name it "
                     f"{ref.path}:{fix or 'output'}")
        if any(part in ("", ".", "..") for part in name.split("/")):
            ref.fail(f"the member name '{name}' has an empty, '.' or '..' part: name it like 'y' or 'g/y'")

    def replaces(self, ref, other):
        # two members of one file are two arrays; only the very member an input reads is off limits
        return entry_name(ref) == self._input_entry(other)

    def _input_entry(self, ref) -> str:
        """The entry an input reads, also when the reference leaves it to the file's only array."""
        from . import input_format

        if not isinstance(input_format(ref), Npz):
            return entry_name(ref)  # not a zip: the output would replace it whole (check_existing refuses)
        if ref.name is not None:
            return ref.name + ".npy"
        with open_zip(ref) as z:
            return npz_member(ref, [n[:-4] for n in z.namelist() if n.endswith(".npy")]) + ".npy"

    def check_existing(self, ref, force):
        try:
            with open(ref.path, "rb") as f:
                head = f.read(len(ZIP_MAGIC))
        except OSError as e:
            ref.fail(f"exists and cannot be read ({reason(e)})")
        if head != ZIP_MAGIC:
            ref.fail("exists and is not an .npz file: remove it, or write the output elsewhere")
        try:
            with zipfile.ZipFile(ref.path) as z:
                infos = z.infolist()
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            ref.fail(f"exists and is not a readable .npz file ({e})")
        target = entry_name(ref)
        if any(info.filename == target for info in infos) and not force:
            ref.fail(f"member '{target[:-4]}' exists: pass --force to replace it")
        for info in infos:
            if info.filename == target:
                continue
            if info.flag_bits & 0x1:
                ref.fail(f"its member '{info.filename}' is encrypted: convt cannot copy it into the new file")
            if info.compress_type not in _READABLE:
                ref.fail(f"its member '{info.filename}' is compressed with zip method {info.compress_type}: convt "
                         f"can copy {one_of(_READABLE.values())} members only")
        try:
            open(ref.path, "r+b").close()  # the file is replaced by a rename, but it was marked read-only
        except OSError as e:
            ref.fail(f"is not writable ({reason(e)})")

    def direct_writer(self, ref, shape, dtype, provenance, force, options=WriteOptions()):
        # not a writer of its own; but io.Sink asks it first, with force: the checks again, as they are now (the
        # member may have been written since io.check_output, or io.write called without it)
        if os.path.exists(ref.path):
            self.check_existing(ref, force)
        return None

    def file_writer(self, ref, path, shape, dtype, provenance, options=WriteOptions()):
        return NpzFileWriter(ref, path, shape, dtype, options)


def _without_zip64(extra: bytes) -> bytes:
    """An entry's extra field less its ZIP64 record, which zipfile writes anew where the copy needs one."""
    out, at = [], 0
    while at + 4 <= len(extra):
        kind, size = struct.unpack("<HH", extra[at : at + 4])
        if kind != 0x0001:
            out.append(extra[at : at + 4 + size])
        at += 4 + size
    return b"".join(out)


def _copy_of(info: zipfile.ZipInfo) -> zipfile.ZipInfo:
    new = zipfile.ZipInfo(info.filename, date_time=info.date_time)
    new.compress_type, new.comment, new.extra = info.compress_type, info.comment, _without_zip64(info.extra)
    new.create_system, new.external_attr, new.internal_attr = info.create_system, info.external_attr, info.internal_attr
    new.file_size = info.file_size  # zipfile decides from it whether the copy needs ZIP64
    return new


def _identity(st: os.stat_result):
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class NpzFileWriter(NpyStreamWriter):
    """One member, streamed into a new zip (ZIP64: a member may pass 4 GiB). With an existing file at the target:
    its entries before the member are copied first, those after it on finish(); the new file keeps its mode.
    A zip member is written in order, start to end: no boxes."""

    boxes = False

    _zip = _old = _old_file = _seen = None

    def __init__(self, ref, path: str, shape, dtype, options: WriteOptions = WriteOptions()):
        self.ref, self.path, self.shape, self.dtype, self.options = ref, path, shape, dtype, options
        self.member = entry_name(ref)
        self._after: list[zipfile.ZipInfo] = []
        super().__init__()

    def _open(self):
        self._zip = zipfile.ZipFile(self.path, "w", allowZip64=True)
        before = self._open_existing()
        for info in before:
            self._copy(info)
        member = zipfile.ZipInfo(self.member, date_time=MEMBER_DATE)
        if self.options.compression == "gzip":
            member.compress_type = zipfile.ZIP_DEFLATED
            member._compresslevel = self.options.level  # zipfile's only way with a ZipInfo, 3.7 on (3.13 too)
        self._file = self._zip.open(member, "w", force_zip64=True)
        write_npy_header(self._file, self.shape, self.dtype)

    def _open_existing(self) -> list[zipfile.ZipInfo]:
        """The entries to copy before the member; those after it are kept for finish()."""
        try:
            self._old_file = open(self.ref.path, "rb")
        except FileNotFoundError:
            return []  # gone since the check: a new file
        st = os.fstat(self._old_file.fileno())
        self._seen = _identity(st)
        os.chmod(self.path, stat.S_IMODE(st.st_mode))
        try:
            self._old = zipfile.ZipFile(self._old_file)
        except (zipfile.BadZipFile, ValueError) as e:
            self.ref.fail(f"exists and is not a readable .npz file ({e})")
        self._zip.comment = self._old.comment
        infos = self._old.infolist()
        at = next((i for i, info in enumerate(infos) if info.filename == self.member), len(infos))
        self._after = [info for info in infos[at:] if info.filename != self.member]
        return infos[:at]

    def _copy(self, info: zipfile.ZipInfo) -> None:
        # decompressed and compressed again a block at a time: zipfile cannot copy an entry's bytes as they are
        try:
            source = self._old.open(info)
        except (zipfile.BadZipFile, NotImplementedError, RuntimeError, ValueError) as e:
            self._unreadable(info, e)
        with source, self._zip.open(_copy_of(info), "w") as target:
            while True:
                try:
                    block = source.read(COPY_BLOCK)
                except OSError:
                    raise
                except Exception as e:  # a bad CRC, a damaged deflate stream, an entry cut short
                    self._unreadable(info, e)
                if not block:
                    break
                target.write(block)

    def _unreadable(self, info, e):
        self.ref.fail(f"its member '{info.filename}' cannot be read ({type(e).__name__}: {e}), so it cannot be "
                      f"kept: the file is left as it was")

    def finish(self):
        self._file.close()  # the member first: its size goes into the central directory
        self._file = None
        for info in self._after:
            self._copy(info)
        if self._old is not None:
            try:
                changed = _identity(os.stat(self.ref.path)) != self._seen
            except FileNotFoundError:
                changed = True
            if changed:  # another program wrote it since: renaming this file over it would lose that
                self.ref.fail("changed while convt was writing into it (another program wrote it): nothing was "
                              "written, run again")
        self._zip.close()
        self._close_existing()

    def _close_existing(self):
        for handle in (self._old, self._old_file):
            try:
                if handle is not None:
                    handle.close()
            except Exception:
                pass
        self._old = self._old_file = None

    def abort(self):
        for handle in (self._file, self._zip):
            try:
                if handle is not None:
                    handle.close()
            except Exception:
                pass
        self._close_existing()
