"""The zarr format: a store is a folder (zarr v3, or v2 for reading); PATH:/group/array names an array inside it.

The zarr package is imported only when a store is touched, and is an optional dependency (`pip install
'convt[zarr]'`). Local stores only: what the output's atomic commit needs is a rename, which object stores lack.

Outputs are zarr v3, chunked along the run's pieces (batch elements, or the spatial tiles of one element:
WriteOptions.chunks), compressed by zarr's default codec (zstd) unless `--compression gzip` asks otherwise.
bfloat16, which zarr v3 has no type for yet, is stored as uint16 with the attribute `dtype="bfloat16"`, as HDF5
outputs tag theirs; such an array, and any 2-byte raw one, reads back as bfloat16. The provenance (`convt_*`)
goes into the array's attributes, as JSON values.

Atomic writes, as far as a folder allows:
- a new store (or, with --force, a store holding one array at its root) is built in a hidden folder beside it,
  `.convt-*.tmp`, its files synced, and renamed into place when complete;
- an array inside an existing store is built under a hidden name in its group, `.convt-partial-PID-NAME`, and its
  folder renamed to NAME when complete (an array it replaces, with --force, is set aside first and removed after).
  While it is written a reader of the store sees the hidden array (convt's own listings leave it out) and no NAME;
  after a failure or an interrupt, neither (both are removed); after SIGKILL the hidden folder is left, as the
  `.convt-*.tmp` of other formats. Consolidated metadata at the root, where there is some, is consolidated again.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

import numpy as np

from ..errors import ConvtError
from ..interrupts import deferred
from .base import Format, Reader, WriteOptions, Writer, check_plain, fix_header_dtype
from .base import sync_folder as _sync_folder

METADATA = ("zarr.json", ".zarray", ".zgroup")  # what makes a folder a store (v3, v2)
HIDDEN = ".convt-"  # the names of arrays and stores being written
CHUNK_BYTES = 64 << 20  # the most a chunk of an output holds: zarr's advice is 1 MB and more
GZIP_LEVELS = range(10)


def is_store(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, m)) for m in METADATA)


def array_path(name: str | None) -> str:
    """'group/array' of a NAME ('/group/array', 'group/array/'); '' for the store's root."""
    return "/".join(p for p in (name or "").split("/") if p)


def _zarr(ref):
    try:
        import zarr
    except ImportError:
        ref.fail("is a zarr store, and the zarr package is not installed: pip install 'convt[zarr]'")
    return zarr


def _open(ref, path: str = ""):
    """The group or array at `path` of the store ref names, read-only."""
    zarr = _zarr(ref)
    try:
        with deferred():
            return zarr.open(store=ref.path, mode="r", path=path or None)
    except FileNotFoundError:  # NodeNotFoundError is one too
        if path:
            ref.fail(f"has no array or group '{path}'")
        ref.fail("is not a zarr store")
    except (ValueError, TypeError, OSError) as e:
        ref.fail(f"cannot be opened as a zarr store ({str(e).splitlines()[0] if str(e) else type(e).__name__})")


def _is_array(node) -> bool:
    return hasattr(node, "shape") and not hasattr(node, "members")


def _arrays(group) -> list[tuple[str, object]]:
    """Every array below a group, as (path relative to it, array), sorted; hidden convt arrays left out."""
    with deferred():
        found = [(name, node) for name, node in group.members(max_depth=None) if _is_array(node)]
    return sorted((n, a) for n, a in found if not any(p.startswith(HIDDEN) for p in n.split("/")))


def find_array(ref):
    """The array ref reads: its NAME, or the store's only array."""
    path = array_path(ref.name)
    node = _open(ref, path)
    if _is_array(node):
        return node
    if ref.name is not None and path:
        ref.fail(f"'{path}' is a group, not an array: name an array inside it")
    found = _arrays(node)
    if len(found) != 1:
        listing = ", ".join("/" + n for n, _ in found[:5]) + (", ..." if len(found) > 5 else "")
        first = found[0][0] if found else "NAME"
        ref.fail(f"holds {len(found)} arrays ({listing}): name one, as {ref.path}:/{first}")
    return found[0][1]


def stored_dtype(array) -> np.dtype:
    """The dtype convt reads an array as: bfloat16 where the array is tagged so (uint16) or is 2-byte raw."""
    dtype = np.dtype(array.dtype)
    if dtype == np.uint16 and array.attrs.get("dtype") == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return fix_header_dtype(dtype)


def _as_read(data: np.ndarray, dtype: np.dtype) -> np.ndarray:
    data = np.asarray(data)
    if data.dtype != dtype:
        data = data.view(dtype) if data.dtype.itemsize == dtype.itemsize else data.astype(dtype)
    return data


def _json_value(value):
    """An attribute as JSON: NumPy scalars and arrays as numbers and lists, bytes as text; None if it has none."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return [_json_value(v) for v in value.tolist()] if value.dtype.kind not in "OSUV" else \
            [_json_value(v) for v in value.ravel().tolist()]
    if isinstance(value, np.generic):
        return _json_value(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool, dict)):
        return value
    return None


def chunks_for(shape, dtype, options: WriteOptions) -> tuple[int, ...]:
    """The output's chunks: options.chunks (a tiled run's tiles), else options.chunk_batch batch elements (the
    run's pieces), fewer where a chunk would pass CHUNK_BYTES; never 0 on any axis."""
    shape = tuple(int(n) for n in shape)
    if not shape:
        return ()
    if options.chunks is not None:
        return tuple(max(1, min(int(c), n)) for c, n in zip(options.chunks, shape))
    rest = math.prod(shape[1:]) * np.dtype(dtype).itemsize
    b = options.chunk_batch or 1
    b = max(1, min(b, shape[0], CHUNK_BYTES // max(1, rest)))
    return (b, *(max(1, n) for n in shape[1:]))


class Zarr(Format):
    name, title, suffixes = "zarr", "zarr", (".zarr",)
    named = groups = has_attributes = folder = True
    compressions = ("gzip",)

    def sniff(self, head: bytes) -> bool:
        return False  # a folder, told by is_folder

    def is_folder(self, path: str) -> bool:
        return is_store(path)

    def header(self, ref):
        a = find_array(ref)
        dtype = stored_dtype(a)
        check_plain(ref, dtype)
        return tuple(a.shape), dtype

    def load(self, ref):
        return ZarrReader(ref).read_all()

    def reader(self, ref):
        return ZarrReader(ref)

    def listing(self, ref):
        """Every array: name, kind ('array'), shape, dtype, chunks, compression (the codecs after the bytes),
        attributes."""
        root = _open(ref)
        found = [("", root)] if _is_array(root) else _arrays(root)
        out = []
        for name, a in found:
            codecs = [type(c).__name__.removesuffix("Codec").lower() for c in (*a.filters, *a.compressors)]
            out.append(dict(name=("/" + name) if name else None, kind="array", shape=list(a.shape),
                            dtype=stored_dtype(a).name, chunks=list(a.chunks), compression=",".join(codecs) or None,
                            compression_opts=None, attributes=dict(a.attrs)))
        return out

    def attributes(self, ref):
        return dict(find_array(ref).attrs)

    def batch_chunk(self, ref):
        a = find_array(ref)
        return int(a.chunks[0]) if a.ndim else None

    def members_under(self, ref):
        path = array_path(ref.name)
        if ref.name is None:
            return None
        node = _open(ref, path)
        if _is_array(node):
            return None
        return [name for name, _ in _arrays(node)]

    def check_options(self, ref, options):
        super().check_options(ref, options)
        if options.level is not None and (options.compression != "gzip" or options.level not in GZIP_LEVELS):
            raise ConvtError(f"--compression-level: expected 0..9 with --compression gzip, got {options.level!r} "
                             f"with {options.compression or 'no --compression'}")

    def check_name(self, ref):
        for part in array_path(ref.name).split("/"):
            if part in (".", "..") or part.startswith("__") or part.startswith(HIDDEN):
                ref.fail(f"'{part}' cannot name a zarr array or group (names may not be '.', '..', or start "
                         f"with '__' or '{HIDDEN}')")

    def replaces(self, ref, other):
        from . import input_format

        if not isinstance(input_format(other), Zarr):
            return True
        return array_path(ref.name) == "/".join(p for p in find_array(other).path.split("/") if p)

    def check_existing(self, ref, force):
        if not is_store(ref.path):
            ref.fail("exists and is not a zarr store" + (" (a folder without zarr.json)"
                                                         if os.path.isdir(ref.path) else ""))
        path = array_path(ref.name)
        root = _open(ref)
        if not path:
            if not _is_array(root):
                count = len(_arrays(root))
                ref.fail(f"is a zarr store of {count} array{'s' * (count != 1)}: name an array inside it, as "
                         f"{ref.path}:/output")
        else:
            if _is_array(root):
                ref.fail(f"holds one array at its root, so it has no group to hold '{path}'")
            parts = path.split("/")
            for depth in range(1, len(parts) + 1):
                above = "/".join(parts[:depth])
                try:
                    with deferred():
                        node = root[above]
                except KeyError:
                    return  # a new array (and maybe groups): nothing to replace
                if depth < len(parts) and _is_array(node):
                    ref.fail(f"'{above}' is an array, so '{path}' cannot be made inside it")
            if not _is_array(node):
                ref.fail(f"'{path}' is a group: name an array, as {ref.path}:/{path}/output")
        if not force:
            ref.fail(f"{'array ' + repr(path) + ' ' if path else ''}exists: pass --force to replace it")
        if not os.access(ref.path, os.W_OK):
            ref.fail("is not writable")

    def direct_writer(self, ref, shape, dtype, provenance, force, options=WriteOptions()):
        return ZarrWriter(ref, shape, dtype, provenance, force, options)


class ZarrReader(Reader):
    def __init__(self, ref):
        self.ref = ref
        self._array = find_array(ref)
        self.shape = tuple(self._array.shape)
        self.dtype = stored_dtype(self._array)
        check_plain(ref, self.dtype)

    def read_all(self) -> np.ndarray:
        return self._read(...)

    def read(self, b0, b1):
        return self._read(slice(b0, b1))

    def read_box(self, b0, b1, index):
        return self._read((slice(b0, b1), *index))

    def _read(self, index) -> np.ndarray:
        """The values at `index`; a chunk zarr cannot decode (damaged, truncated) as one line naming the input."""
        try:
            with deferred():
                return _as_read(self._array[index], self.dtype)
        except (ConvtError, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001 - codecs raise RuntimeError, zlib.error, ValueError, OSError...
            text = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self.ref.fail(f"cannot be read ({type(e).__name__}{': ' + text if text else ''}): a chunk of the store "
                          f"is damaged or unreadable")

    def close(self):
        self._array = None


class ZarrWriter(Writer):
    """An output array, built where no reader looks for it and moved into place on finish() (see the module's
    docstring); abort() removes what it made."""

    boxes = True
    _tmp = _hidden = _array = None
    _format = 3
    _new_groups: list[str] = []

    def __init__(self, ref, shape, dtype, provenance: dict, force: bool, options: WriteOptions = WriteOptions()):
        self.ref, self.shape, self.dtype, self.provenance, self.force = ref, tuple(shape), np.dtype(dtype), \
            provenance, force
        self.options = options
        self.path = array_path(ref.name)
        super().__init__()

    def _open(self):
        zarr = _zarr(self.ref)
        folder = os.path.abspath(os.path.dirname(self.ref.path) or ".")  # a pickled array finds it from anywhere
        if not os.path.exists(self.ref.path) or not self.path:  # a whole new store, beside
            with deferred():
                self._tmp = tempfile.mkdtemp(prefix=HIDDEN, suffix=".tmp", dir=folder)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self._tmp, 0o777 & ~umask)  # mkdtemp's is owner-only, and the rename would keep it
            if self.path:
                with deferred():
                    root = zarr.open_group(self._tmp, mode="w", zarr_format=3)
                self._array = self._create(root.create_array, self.path)
            else:
                self._array = self._create(lambda **k: zarr.create_array(store=self._tmp, zarr_format=3, **k), None)
            return
        with deferred():
            root = zarr.open_group(os.path.abspath(self.ref.path), mode="r+")
        self._format = root.metadata.zarr_format  # an array added to a v2 store is v2: zarr mixes no formats
        parent, _, leaf = self.path.rpartition("/")
        parts = parent.split("/") if parent else []
        with deferred():
            self._new_groups = [p for p in ("/".join(parts[:i]) for i in range(1, len(parts) + 1))
                                if not os.path.exists(os.path.join(self.ref.path, *p.split("/")))]
            group = root.require_group(parent) if parent else root
        self._hidden = f"{HIDDEN}partial-{os.getpid()}-{leaf}"
        self._array = self._create(group.create_array, self._hidden)
        self._hidden = f"{parent}/{self._hidden}" if parent else self._hidden

    def _create(self, create, name):
        dtype = self.dtype
        attrs = {}
        for key, value in self.options.attrs.items():
            if key == "dtype" and str(_json_value(value)) != dtype.name:
                continue  # a dtype tag (bfloat16's) names the input's values, not a cast output's
            plain = _json_value(value)
            if plain is None and value is not None:
                self.ref.fail(f"the input's attribute '{key}' cannot be stored as JSON: leave out --copy-attrs")
            attrs[key] = plain
        if dtype.name == "bfloat16":
            attrs["dtype"] = "bfloat16"
            dtype = np.dtype(np.uint16)
        attrs.update(self.provenance)
        try:
            json.dumps(attrs)
        except (TypeError, ValueError) as e:
            self.ref.fail(f"an attribute cannot be stored as JSON ({e}): leave out --copy-attrs")
        compressors = "auto"
        if self.options.compression == "gzip":
            level = 5 if self.options.level is None else int(self.options.level)
            if self._format == 2:
                from numcodecs import GZip

                compressors = [GZip(level=level)]
            else:
                from zarr.codecs import GzipCodec

                compressors = [GzipCodec(level=level)]
        keywords = dict(shape=self.shape, dtype=dtype, chunks=chunks_for(self.shape, self.dtype, self.options),
                        compressors=compressors, attributes=attrs, fill_value=0)
        with deferred():
            return create(**keywords) if name is None else create(name=name, **keywords)

    @property
    def array(self):
        """The zarr array being written (hidden until finish()): others may write its chunks too, with put(), as
        Dask's workers do; it pickles."""
        return self._array

    def put(self, chunk, start):
        put(self._array, chunk, start)

    def put_box(self, chunk, start, index):
        put(self._array, chunk, start, index)

    def finish(self):
        self._array = None
        built = self._tmp if self._tmp is not None else os.path.join(self.ref.path, *self._hidden.split("/"))
        target = self.ref.path if self._tmp is not None else os.path.join(self.ref.path, *self.path.split("/"))
        with deferred():  # an interrupt up to here leaves everything as it was (io.Sink aborts)
            _sync_tree(built)
        with deferred(reraise=False):  # once moved it is in place: too late to undo it for an interrupt
            _move_into_place(built, target)
            self._tmp = self._hidden = None
            _sync_folder(os.path.dirname(target) or ".")
            if self.path and os.path.exists(os.path.join(self.ref.path, "zarr.json")):
                _reconsolidate(self.ref.path)

    def abort(self):
        with deferred(reraise=False):
            self._array = None
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None
            if self._hidden is not None:
                shutil.rmtree(os.path.join(self.ref.path, *self._hidden.split("/")), ignore_errors=True)
                self._hidden = None
                for group in reversed(self._new_groups):
                    folder = os.path.join(self.ref.path, *group.split("/"))
                    if sorted(os.listdir(folder)) == ["zarr.json"]:
                        shutil.rmtree(folder, ignore_errors=True)


def put(array, chunk: np.ndarray, start: int, index: tuple = ()) -> None:
    """Batch elements [start, start + len(chunk)), box `index` (slices after the batch axis), into an output
    array (bfloat16 as its uint16 bits)."""
    if chunk.dtype.name == "bfloat16":
        chunk = chunk.view(np.uint16)
    with deferred():
        array[(slice(start, start + len(chunk)), *index)] = chunk


def _move_into_place(built: str, target: str) -> None:
    """Rename the folder `built` to `target`; an existing target (--force) is set aside first and comes back if
    the rename fails, and is removed after."""
    aside = None
    if os.path.lexists(target):
        head, leaf = os.path.split(target)
        aside = os.path.join(head, f"{HIDDEN}replaced-{os.getpid()}-{leaf}")
        os.rename(target, aside)
    try:
        os.rename(built, target)
    except BaseException:
        if aside is not None:
            os.rename(aside, target)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _sync_tree(folder: str) -> None:
    """fsync every file and folder below `folder`, so that the rename that follows publishes whole data."""
    for here, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(here, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _sync_folder(here)


def _reconsolidate(store: str) -> None:
    """Consolidate the metadata again where the root holds consolidated metadata: it lists the arrays, and a
    new one would be missing from it."""
    try:
        with open(os.path.join(store, "zarr.json")) as f:
            consolidated = json.load(f).get("consolidated_metadata")
    except (OSError, ValueError):
        return
    if consolidated:
        import zarr

        zarr.consolidate_metadata(store)
