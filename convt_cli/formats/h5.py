"""The HDF5 format: datasets named by PATH:/group/dataset, read and written a batch slice at a time.

h5py is imported inside the functions that touch a file, so that commands on .npy files start fast. bfloat16
is stored as an opaque 2-byte type, tagged with the dataset attribute `dtype="bfloat16"`.
"""

from __future__ import annotations

import json
import os

from .base import (Format, Reader, WriteOptions, Writer, check_plain, fix_dtype, fix_header_dtype, np_guard,
                   reason)

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def dataset_name(name: str | None) -> str:
    """The absolute dataset path an output NAME writes ('/output' when there is none)."""
    return "/" + (name or "output").strip("/")


def open_h5(ref, mode: str = "r"):
    import h5py

    try:
        return h5py.File(ref.path, mode)
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


def create_dataset(f, name: str, shape, dtype, provenance: dict):
    # contiguous storage unless the data will come in chunks: what np.save users expect from h5py
    d = f.create_dataset(name, shape=shape, dtype=dtype)
    if dtype.name == "bfloat16":
        d.attrs["dtype"] = "bfloat16"
    for key, value in provenance.items():
        d.attrs[key] = value if isinstance(value, str) else json.dumps(value)
    return d


class H5(Format):
    name, title, magic, suffixes = "h5", "HDF5", HDF5_MAGIC, (".h5", ".hdf5")
    named = groups = shares_file = True

    def header(self, ref):
        with open_h5(ref) as f:
            d = find_dataset(ref, f)
            return tuple(d.shape), fix_header_dtype(d.dtype)

    def load(self, ref):
        with open_h5(ref) as f:
            d = find_dataset(ref, f)
            check_plain(ref, d.dtype)
            return fix_dtype(np_guard(ref, lambda: d[()]))

    def reader(self, ref):
        return H5Reader(ref)

    def listing(self, ref):
        import h5py

        out = []
        with open_h5(ref) as f:
            def visit(name, obj):
                if isinstance(obj, h5py.Dataset):
                    shape = None if obj.shape is None else list(obj.shape)  # None: an empty dataspace
                    out.append(dict(name="/" + name, shape=shape, dtype=fix_header_dtype(obj.dtype).name,
                                    chunks=list(obj.chunks) if obj.chunks else None))
            f.visititems(visit)
        return out

    def members_under(self, ref):
        if ref.name is None:
            return None  # a bare .h5 path is its one dataset, as everywhere
        import h5py

        with open_h5(ref) as f:
            group = f.get(ref.name)
            if not isinstance(group, h5py.Group):
                return None
            names: list[str] = []
            group.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        return names

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
        with open_h5(ref) as f:
            return find_dataset(ref, f).name

    def check_existing(self, ref, force):
        with open(ref.path, "rb") as f:
            if f.read(8) != HDF5_MAGIC:
                ref.fail("exists and is not an HDF5 file")
        with open_h5(ref) as f:
            check_target(ref, f, force)
        try:
            open(ref.path, "r+b").close()
        except OSError as e:
            ref.fail(f"is not writable ({reason(e)})")

    def direct_writer(self, ref, shape, dtype, provenance, force, options=WriteOptions()):
        if not os.path.exists(ref.path):
            return None
        return H5InPlaceWriter(ref, shape, dtype, provenance, force)

    def file_writer(self, ref, path, shape, dtype, provenance, options=WriteOptions()):
        return H5FileWriter(path, dataset_name(ref.name), shape, dtype, provenance)


class H5Reader(Reader):
    def __init__(self, ref):
        self.ref = ref
        self._h5 = open_h5(ref)
        try:
            self._dataset = find_dataset(ref, self._h5)
        except BaseException:
            self._h5.close()
            raise
        self.shape, self.dtype = tuple(self._dataset.shape), fix_header_dtype(self._dataset.dtype)

    def read(self, b0, b1):
        return fix_dtype(np_guard(self.ref, lambda: self._dataset[b0:b1]))

    def close(self):
        if self._h5 is not None:
            self._h5.close()
            self._h5 = self._dataset = None


class _DatasetWriter(Writer):
    _h5 = _dataset = None

    def put(self, chunk, start):
        self._dataset[start : start + len(chunk)] = chunk


class H5FileWriter(_DatasetWriter):
    """A new file holding the one dataset."""

    def __init__(self, path: str, name: str, shape, dtype, provenance: dict):
        self.path, self.name, self.shape, self.dtype, self.provenance = path, name, shape, dtype, provenance
        super().__init__()

    def _open(self):
        import h5py

        self._h5 = h5py.File(self.path, "w")
        self._dataset = create_dataset(self._h5, self.name, self.shape, self.dtype, self.provenance)

    def finish(self):
        self._h5.close()

    def abort(self):
        self._dataset = None
        if self._h5 is not None:
            try:
                self._h5.close()
            except (OSError, RuntimeError):
                pass  # a disk that is still full; the file is removed either way


class H5InPlaceWriter(_DatasetWriter):
    """A dataset inside an existing file, built under a hidden name and moved into place on finish(); abort()
    removes it and any group this run made for it, leaving every other object as it was."""

    _tmp = None
    _new_groups: list[str] = []

    def __init__(self, ref, shape, dtype, provenance: dict, force: bool):
        self.ref, self.shape, self.dtype, self.provenance, self.force = ref, shape, dtype, provenance, force
        super().__init__()

    def _open(self):
        name = dataset_name(self.ref.name)
        parent, _, leaf = name.rpartition("/")
        self._tmp = f"{parent}/.convt-partial-{os.getpid()}-{leaf}"
        self._h5 = open_h5(self.ref, "r+")
        check_target(self.ref, self._h5, self.force)
        parts = parent.strip("/").split("/") if parent.strip("/") else []
        self._new_groups = [g for g in ("/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1))
                            if g not in self._h5]  # made by this run: abort() takes them away again
        self._dataset = create_dataset(self._h5, self._tmp, self.shape, self.dtype, self.provenance)

    def finish(self):
        self._dataset = None
        self._h5.flush()  # a full disk shows here, before anything is moved into place
        replace_dataset(self.ref, self._h5, self._tmp, self.force)
        self._h5.close()
        self._h5 = None

    def abort(self):
        self._dataset = None
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
