"""Array references, format sniffing, .npy/.npz/.h5 reading and atomic writing, stdin/stdout.

A reference is `-` (a .npy stream on stdin or stdout), `PATH` or `PATH:NAME`, where NAME is an .npz member
or an HDF5 dataset path. Formats are told by their magic bytes (`\\x93NUMPY`, `PK`, `\\x89HDF`), the suffix
only where there are no bytes yet (an output). Pickles are never loaded.

bfloat16 has no .npy or HDF5 type of its own. convt's convention, which is what `np.save` and h5py already do
with an `ml_dtypes.bfloat16` array: the raw 2-byte values as a 2-byte void type (.npy descr `'<V2'`, HDF5
opaque of size 2, tagged with the dataset attribute `dtype="bfloat16"`). Any 2-byte void array is read
back as bfloat16.

h5py is imported only when an HDF5 file is touched, so that commands on .npy files start fast.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass

import numpy as np

from .errors import ConvtError

NPY_MAGIC, ZIP_MAGIC, HDF5_MAGIC = b"\x93NUMPY", b"PK", b"\x89HDF\r\n\x1a\n"
CONTAINER_SUFFIXES = (".npz", ".h5", ".hdf5")
SUFFIX_FORMATS = {".npy": "npy", ".npz": "npz", ".h5": "h5", ".hdf5": "h5"}


@dataclass(frozen=True)
class ArrayRef:
    """A parsed reference; `label` names the parameter (INPUT, FILTERS, OUTPUT) in messages."""

    label: str
    text: str
    path: str | None  # None: stdin / stdout
    name: str | None  # .npz member or HDF5 dataset path

    @property
    def is_std(self) -> bool:
        return self.path is None

    def __str__(self) -> str:
        return self.text

    def fail(self, message: str):
        raise ConvtError(f"{self.label} '{self.text}': {message}")


def parse_ref(label: str, text: str, must_exist: bool = True) -> ArrayRef:
    """Split PATH[:NAME]; the whole text wins when it names an existing file (paths may hold colons)."""
    if text == "-":
        return ArrayRef(label, text, None, None)
    if not text:
        raise ConvtError(f"{label}: expected a file reference like x.npy, x.npz:name or x.h5:/group/data, got ''")
    if "\0" in text:
        raise ConvtError(f"{label} {text!r}: a path cannot hold a NUL byte")
    if not os.path.exists(text):
        lowered = text.lower()
        for suffix in CONTAINER_SUFFIXES:
            at = lowered.find(suffix + ":")
            if at > 0:
                path, name = text[: at + len(suffix)], text[at + len(suffix) + 1 :]
                try:
                    name.encode("utf-8")  # .npz and HDF5 store names as UTF-8; a path may be any bytes
                except UnicodeEncodeError:
                    raise ConvtError(f"{label} {text!r}: the name after ':' is not valid UTF-8") from None
                return ArrayRef(label, text, path, name or None)
        if must_exist:
            folder = os.path.dirname(text)
            if folder and not os.path.isdir(folder):
                raise ConvtError(f"{label} '{text}': folder '{folder}' does not exist")
            raise ConvtError(f"{label} '{text}': no such file")
    return ArrayRef(label, text, text, None)


def sniff(ref: ArrayRef) -> str:
    """'npy', 'npz' or 'h5' from the magic bytes of an existing file."""
    if os.path.isdir(ref.path):
        ref.fail("is a folder, expected a .npy, .npz or HDF5 file")
    if os.path.exists(ref.path) and not os.path.isfile(ref.path):
        # a pipe or device would be consumed by the sniff and could not be read again
        ref.fail("is not a regular file (a pipe or a device): give a file, or - to read a .npy stream from stdin")
    try:
        with open(ref.path, "rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        ref.fail("no such file")
    except OSError as e:
        ref.fail(f"cannot be read: {e.strerror}")
    return _format_of(ref, head)


def _format_of(ref: ArrayRef, head: bytes) -> str:
    if head.startswith(NPY_MAGIC):
        return "npy"
    if head.startswith(ZIP_MAGIC):
        return "npz"
    if head.startswith(HDF5_MAGIC):
        return "h5"
    if not head:
        ref.fail("is empty, expected a .npy, .npz or HDF5 file")
    ref.fail(f"is not a .npy, .npz or HDF5 file (it starts with {head[:8]!r})")


# ---------------------------------------------------------------------------------------------------------
# Reading


def _fix_dtype(a: np.ndarray) -> np.ndarray:
    if a.dtype.kind == "V" and a.dtype.itemsize == 2 and a.dtype.names is None:
        import ml_dtypes

        return a.view(ml_dtypes.bfloat16)
    return a


def _fix_header_dtype(dtype: np.dtype) -> np.dtype:
    if dtype.kind == "V" and dtype.itemsize == 2 and dtype.names is None:
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return dtype


def _check_plain(ref: ArrayRef, dtype: np.dtype) -> None:
    if dtype.hasobject:
        ref.fail("holds Python objects (a pickle); convt never unpickles: save a numeric array instead")


def _npy_header(ref: ArrayRef, f, size: int | None):
    """(shape, dtype) of a .npy stream positioned at its start, checking that the data is all there."""
    shape, _, dtype = _npy_header_as_stored(ref, f, size)
    return shape, _fix_header_dtype(dtype)


def _npy_header_as_stored(ref: ArrayRef, f, size: int | None):
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
    _check_plain(ref, dtype)
    if size is not None:
        need = f.tell() + math.prod(shape) * dtype.itemsize  # Python ints: a forged header cannot wrap around
        if size < need:
            ref.fail(f"is truncated: header says shape {shape} {dtype}, needing {need} bytes, the file has {size}")
    return tuple(shape), fortran, dtype


def _npz_member(ref: ArrayRef, names: list[str]) -> str:
    if ref.name is not None:
        if ref.name not in names:
            ref.fail(f"has no array '{ref.name}': it holds {', '.join(names) or 'nothing'}")
        return ref.name
    if len(names) != 1:
        first = names[0] if names else "NAME"
        ref.fail(f"holds {len(names)} arrays ({', '.join(names)}): name one, as {ref.path}:{first}")
    return names[0]


def _h5_dataset(ref: ArrayRef, f):
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


def _open_h5(ref: ArrayRef, mode: str = "r"):
    import h5py

    try:
        return h5py.File(ref.path, mode)
    except OSError as e:
        ref.fail(f"cannot be opened as HDF5 ({str(e).splitlines()[0]})")


def read_header(ref: ArrayRef):
    """(shape, dtype) without reading the data. Not for stdin, which can only be read whole, once."""
    kind = sniff(ref)
    if kind == "npy":
        with open(ref.path, "rb") as f:
            return _npy_header(ref, f, os.path.getsize(ref.path))
    if kind == "npz":
        with _open_zip(ref) as z:
            names = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
            member = _npz_member(ref, names)
            info = z.getinfo(member + ".npy")
            with z.open(info) as f:
                return _npy_header(ref, io.BufferedReader(f), info.file_size)
    with _open_h5(ref) as f:
        d = _h5_dataset(ref, f)
        return tuple(d.shape), _fix_header_dtype(d.dtype)


def _open_zip(ref: ArrayRef):
    try:
        return zipfile.ZipFile(ref.path)
    except (zipfile.BadZipFile, OSError) as e:
        ref.fail(f"is not a readable .npz file ({e})")


def _read_stdin(ref: ArrayRef) -> bytes:
    # a pipe cannot seek: buffer it whole before np.load
    data = sys.stdin.buffer.read()
    if not data:
        ref.fail("stdin is empty: expected a .npy stream")
    if not data.startswith(NPY_MAGIC):
        ref.fail(f"stdin is not a .npy stream (it starts with {data[:8]!r})")
    return data


def load(ref: ArrayRef) -> np.ndarray:
    """The whole array. Pickles are refused; bfloat16 stored as 2-byte void comes back as bfloat16."""
    if ref.is_std:
        data = _read_stdin(ref)
        _npy_header(ref, io.BytesIO(data), len(data))
        return _fix_dtype(_np_load(ref, io.BytesIO(data)))
    kind = sniff(ref)
    if kind == "npy":
        with open(ref.path, "rb") as f:
            _npy_header(ref, f, os.path.getsize(ref.path))
        return _fix_dtype(_np_load(ref, ref.path))
    if kind == "npz":
        read_header(ref)  # member choice, pickles and truncation, before any data is read
        with np.load(ref.path, allow_pickle=False) as z:
            return _fix_dtype(_np_guard(ref, lambda: z[_npz_member(ref, list(z.files))]))
    with _open_h5(ref) as f:
        d = _h5_dataset(ref, f)
        _check_plain(ref, d.dtype)
        return _fix_dtype(_np_guard(ref, lambda: d[()]))


def _np_load(ref: ArrayRef, source) -> np.ndarray:
    return _np_guard(ref, lambda: np.load(source, allow_pickle=False))


def _np_guard(ref: ArrayRef, read):
    try:
        return np.asarray(read())
    except ConvtError:
        raise
    except MemoryError:
        ref.fail("does not fit in memory")
    except Exception as e:  # numpy/h5py/zipfile raise many kinds for a damaged file
        ref.fail(f"cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")


def list_arrays(path: str) -> list[dict]:
    """Every array in a file: name (None for .npy), shape, dtype, and chunks for HDF5 datasets."""
    ref = parse_ref("FILE", path)
    if ref.is_std:
        a = load(ref)
        return [dict(name=None, shape=list(a.shape), dtype=a.dtype.name)]
    kind = sniff(ref)
    if kind == "npy":
        shape, dtype = read_header(ref)
        return [dict(name=None, shape=list(shape), dtype=dtype.name)]
    if kind == "npz":
        out = []
        with _open_zip(ref) as z:
            for member in z.namelist():
                if member.endswith(".npy"):
                    with z.open(member) as f:
                        shape, dtype = _npy_header(ref, io.BufferedReader(f), None)
                    out.append(dict(name=member[:-4], shape=list(shape), dtype=dtype.name))
        return out
    import h5py

    out = []
    with _open_h5(ref) as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                shape = None if obj.shape is None else list(obj.shape)  # None: an empty dataspace
                out.append(dict(name="/" + name, shape=shape, dtype=_fix_header_dtype(obj.dtype).name,
                                chunks=list(obj.chunks) if obj.chunks else None))
        f.visititems(visit)
    return out


# ---------------------------------------------------------------------------------------------------------
# Writing


def output_format(ref: ArrayRef) -> str:
    if ref.is_std:
        return "npy"
    suffix = os.path.splitext(ref.path)[1].lower()
    if suffix not in SUFFIX_FORMATS:
        ref.fail(
            f"unknown output format '{suffix or '(no suffix)'}': expected .npy, .npz, .h5 or .hdf5, or - for stdout"
        )
    return SUFFIX_FORMATS[suffix]


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _h5_name(name: str | None) -> str:
    return "/" + (name or "output").strip("/")


def _h5_input_name(ref: ArrayRef) -> str:
    """The dataset an HDF5 INPUT reads, also when the reference leaves it to the file's only dataset."""
    if ref.name is not None or sniff(ref) != "h5":
        return _h5_name(ref.name)
    with _open_h5(ref) as f:
        return _h5_dataset(ref, f).name


def _check_h5_target(ref: ArrayRef, f, force: bool) -> None:
    # --force replaces a dataset, never a group of them, and cannot make a dataset inside a dataset
    import h5py

    name = _h5_name(ref.name)
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


def check_output(ref: ArrayRef, inputs: list[ArrayRef], force: bool) -> None:
    """Refuse, before any work, an output that would replace an input, exist already, or land nowhere."""
    kind = output_format(ref)
    if ref.is_std:
        return
    if kind == "npy" and ref.name is not None:
        ref.fail("a .npy file holds one array: drop the ':NAME'")
    folder = _folder(ref)
    if not os.path.isdir(folder):
        ref.fail(f"folder '{folder}' does not exist")
    try:  # os.access says yes to root on a read-only mount: try what the write will do
        os.remove(_temp_file(folder))
    except OSError as e:
        ref.fail(f"folder '{folder}' is not writable ({_reason(e)})")
    if kind == "h5" and _h5_name(ref.name) == "/":
        ref.fail(f"names the root group: name a dataset, as {ref.path}:/output")
    for other in inputs:
        if other.is_std or not os.path.exists(ref.path) or not _same_file(ref.path, other.path):
            continue
        if kind != "h5" or _h5_name(ref.name) == _h5_input_name(other):
            ref.fail(f"is the same as {other.label} '{other.text}': write the output elsewhere")
    if not os.path.exists(ref.path):
        return
    if os.path.isdir(ref.path):
        ref.fail("is a folder")
    if kind == "h5":
        with open(ref.path, "rb") as f:
            if f.read(8) != HDF5_MAGIC:
                ref.fail("exists and is not an HDF5 file")
        with _open_h5(ref) as f:
            _check_h5_target(ref, f, force)
        try:
            open(ref.path, "r+b").close()
        except OSError as e:
            ref.fail(f"is not writable ({_reason(e)})")
    elif not force:
        ref.fail("exists: pass --force to replace it")


def free_space(ref: ArrayRef) -> int | None:
    """Bytes free for an unprivileged writer where the output goes; None for stdout or when it cannot be told."""
    if ref.is_std:
        return None
    try:
        return shutil.disk_usage(_folder(ref)).free
    except OSError:
        return None


def write(ref: ArrayRef, array: np.ndarray, provenance: dict | None = None, force: bool = False) -> None:
    """Write atomically: a temporary file beside the target (or a hidden dataset inside an existing .h5),
    renamed into place only when complete."""
    sink = Sink(ref, array.shape, array.dtype, provenance, force)
    sink.write(array)
    sink.commit()


def _folder(ref: ArrayRef) -> str:
    # not os.path.abspath: it resolves 'link/..' by text, the kernel by following the link
    return os.path.dirname(ref.path) or "."


def _temp_file(folder: str) -> str:
    """A new empty file beside the target, hidden, named so that a leftover is recognisable, with the
    permissions any new file gets (mkstemp's are owner-only, and the rename would keep them)."""
    fd, path = tempfile.mkstemp(prefix=".convt-", suffix=".tmp", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
    finally:
        os.close(fd)
    return path


def _sync_folder(folder: str) -> None:
    # make the rename itself durable; some filesystems cannot fsync a folder, and nothing is lost then
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _reason(e: OSError, folder: str | None = None, nbytes: int = 0) -> str:
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


def _remove(path: str | None) -> None:
    if path is None:
        return
    try:
        os.remove(path)
    except OSError:
        pass


def _replace_dataset(ref: ArrayRef, f, tmp: str, force: bool) -> None:
    """Move the finished hidden dataset `tmp` to the target name; an existing dataset (with --force) is set aside
    first and comes back if the move fails, so no interruption loses it."""
    name = _h5_name(ref.name)
    parent, _, leaf = name.rpartition("/")
    backup = f"{parent}/.convt-replaced-{os.getpid()}-{leaf}"
    try:
        if name in f:
            _check_h5_target(ref, f, force)
            f.move(name, backup)
        f.move(tmp, name)
        if backup in f:
            del f[backup]
    except BaseException:
        if backup in f and name not in f:
            f.move(backup, name)
        raise


# ---------------------------------------------------------------------------------------------------------
# Batch-chunked reading and writing: inputs and outputs larger than memory


class Source:
    """An input read a batch chunk at a time: .npy by file offsets (not a memory map, whose pages would count
    against the memory budget; Fortran-ordered .npy files excepted), HDF5 by dataset slices. .npz members and
    stdin are read whole, and so is everything when `whole` (an HDF5 input in the file the output goes into,
    which cannot stay open for reading while it is written). `shape` and `dtype` are known before any data is
    read, but for those."""

    def __init__(self, ref: ArrayRef, whole: bool = False):
        self.ref = ref
        self._array = self._h5 = self._dataset = self._mmap = None
        if ref.is_std or whole:
            self._array = load(ref)
            self.shape, self.dtype = self._array.shape, self._array.dtype
            return
        kind = sniff(ref)
        if kind == "npy":
            with open(ref.path, "rb") as f:
                self.shape, fortran, self._raw_dtype = _npy_header_as_stored(ref, f, os.path.getsize(ref.path))
                self._offset = f.tell()
            self.dtype = _fix_header_dtype(self._raw_dtype)
            if fortran and len(self.shape) > 1:
                self._mmap = np.load(ref.path, mmap_mode="r", allow_pickle=False)
        elif kind == "npz":
            self._array = load(ref)
            self.shape, self.dtype = self._array.shape, self._array.dtype
        else:
            self._h5 = _open_h5(ref)
            self._dataset = _h5_dataset(ref, self._h5)
            self.shape, self.dtype = tuple(self._dataset.shape), _fix_header_dtype(self._dataset.dtype)

    @property
    def whole(self) -> bool:
        """True when the array is held in memory whatever is read of it (stdin, .npz members)."""
        return self._array is not None

    def read(self, b0: int, b1: int) -> np.ndarray:
        """Batch elements [b0, b1)."""
        if self._array is not None:
            return self._array[b0:b1]
        if self._dataset is not None:
            return _fix_dtype(_np_guard(self.ref, lambda: self._dataset[b0:b1]))
        if self._mmap is not None:
            return _fix_dtype(np.array(self._mmap[b0:b1]))
        per = math.prod(self.shape[1:])
        with open(self.ref.path, "rb") as f:
            f.seek(self._offset + b0 * per * self._raw_dtype.itemsize)
            data = np.fromfile(f, dtype=self._raw_dtype, count=(b1 - b0) * per)
        return _fix_dtype(data.reshape((b1 - b0, *self.shape[1:])))

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = self._dataset = None
        self._mmap = self._array = None


GLOB_CHARACTERS = "*?["


def expand_items(input_text: str, output_text: str):
    """[(input, output)] when INPUT names many tensors, else None.

    An HDF5 group (`data.h5:/inputs/`, or a group's path) stands for every dataset below it, written under the
    OUTPUT group with the same relative names; a glob (`'in/*.npy'`, not an existing file) for the files it
    matches, sorted, each written to the OUTPUT template with {stem}, {name} (the file name) or {index}.
    """
    import glob

    if input_text != "-" and not os.path.exists(input_text) and any(c in input_text for c in GLOB_CHARACTERS):
        paths = sorted(p for p in glob.glob(input_text, recursive=True) if os.path.isfile(p))
        if not paths:
            raise ConvtError(f"INPUT '{input_text}': the pattern matches no file")
        if not _is_template(output_text):
            raise ConvtError(f"OUTPUT '{output_text}': with many inputs it must be a template holding {{stem}}, "
                             f"{{name}} or {{index}}, like 'out/{{stem}}.npy'")
        return _distinct([(p, _fill(output_text, p, i)) for i, p in enumerate(paths)], output_text)
    ref = parse_ref("INPUT", input_text) if input_text != "-" else None
    if ref is None or ref.is_std or ref.name is None or sniff(ref) != "h5":
        return None  # a bare .h5 path is its one dataset, as everywhere
    import h5py

    with _open_h5(ref) as f:
        group = f.get(ref.name)
        if not isinstance(group, h5py.Group):
            return None
        names: list[str] = []
        group.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    if not names:
        ref.fail(f"group '{ref.name}' holds no dataset")
    base = "/" + ref.name.strip("/")
    if _is_template(output_text):
        return _distinct([(f"{ref.path}:{base.rstrip('/')}/{n}", _fill(output_text, n, i))
                          for i, n in enumerate(sorted(names))], output_text)
    out = parse_ref("OUTPUT", output_text, must_exist=False)
    if out.is_std or output_format(out) != "h5" or not (out.name or "/").endswith("/"):
        ref.fail(f"'{ref.name}' is a group, not a dataset: name a dataset inside it, or give OUTPUT as a group "
                 f"(like out.h5:/outputs/) or a template with {{stem}}, {{name}} or {{index}} to convert every "
                 f"dataset in it")
    return [(f"{ref.path}:{base.rstrip('/')}/{n}", f"{out.path}:/{out.name.strip('/')}/{n}".replace("//", "/"))
            for n in sorted(names)]


def _distinct(items: list, template: str) -> list:
    """Refuse outputs that collide: two inputs sent to one output (the second would replace the first), or an
    output that is another item's input (it would be replaced before it is read, with --force)."""
    seen: dict[str, str] = {}
    inputs = {_identity(parse_ref("INPUT", source)): source for source, _ in items}
    for source, target in items:
        if target in seen:
            raise ConvtError(f"OUTPUT '{template}': '{seen[target]}' and '{source}' would both be written to "
                             f"'{target}': use {{index}}, or {{stem}} with distinct names")
        seen[target] = source
        other = inputs.get(_identity(parse_ref("OUTPUT", target, must_exist=False)))
        if other is not None:
            raise ConvtError(f"OUTPUT '{template}': '{source}' would be written to '{target}', which is the input "
                             f"'{other}': write the outputs elsewhere")
    return items


def _identity(ref: ArrayRef):
    """What a reference names, however spelled: (device, inode) of an existing file, plus the dataset name."""
    try:
        st = os.stat(ref.path)
    except OSError:
        return (ref.path, None)
    name = _h5_name(ref.name) if ref.name is not None else None
    return (st.st_dev, st.st_ino, name)


TEMPLATE_FIELDS = ("stem", "name", "index")


def _is_template(text: str) -> bool:
    """True when text holds a {stem}, {name} or {index} field (with or without a format spec like {index:03d});
    any other field, attribute or item access is refused."""
    import string

    try:
        fields = [(f, conv) for _, f, _, conv in string.Formatter().parse(text) if f is not None]
    except ValueError as e:
        raise ConvtError(f"OUTPUT '{text}': not a template convt can fill ({e})") from None
    for field, conversion in fields:
        if field not in TEMPLATE_FIELDS or conversion is not None:
            raise ConvtError(f"OUTPUT '{text}': '{{{field}}}' is not a template field: use {{stem}}, {{name}} or "
                             f"{{index}} (a format spec such as {{index:03d}} is fine)")
    return bool(fields)


def _fill(template: str, source: str, index: int) -> str:
    name = os.path.basename(source.rstrip("/"))
    stem = name[: -len(os.path.splitext(name)[1])] if os.path.splitext(name)[1] else name
    try:
        return template.format(stem=stem, name=name, index=index)
    except (ValueError, TypeError) as e:  # a format spec that does not fit the value, as {stem:d}
        raise ConvtError(f"OUTPUT '{template}': not a template convt can fill ({e})") from None


def same_h5_file(a: ArrayRef, b: ArrayRef) -> bool:
    """Both name datasets in the same existing HDF5 file."""
    return (not a.is_std and not b.is_std and output_format(a) == "h5" and os.path.exists(a.path)
            and os.path.exists(b.path) and _same_file(a.path, b.path))


class Sink:
    """An output written a batch chunk at a time, in order, and made visible only by commit().

    .npy, .npz and stdout are written sequentially (header first), HDF5 into a dataset; every file output goes to
    a temporary file beside the target (inside an existing .h5: a hidden dataset) that commit() renames (moves)
    into place and abort() removes, so that an interrupted or failed run leaves nothing half-written.
    """

    def __init__(self, ref: ArrayRef, shape, dtype, provenance: dict | None = None, force: bool = False):
        self.ref, self.shape, self.dtype = ref, tuple(int(v) for v in shape), np.dtype(dtype)
        self.provenance, self.force = provenance or {}, force
        self.kind = output_format(ref)
        self.done = 0  # batch elements written so far
        self.tmp = self._file = self._zip = self._h5 = self._dataset = self._h5_tmp = None
        self._new_groups: list[str] = []
        try:
            self._open()
        except OSError as e:
            reason = _reason(e, None if ref.is_std else _folder(ref))
            self.abort()
            ref.fail(f"could not be written: {reason}")
        except BaseException:
            self.abort()
            raise

    def _open(self) -> None:
        if self.ref.is_std:
            # spooled to an unnamed temporary file: a failure half-way must put nothing on stdout
            self._file = tempfile.TemporaryFile(prefix=".convt-")
            self._header(self._file)
            return
        if self.kind == "h5" and os.path.exists(self.ref.path):
            name = _h5_name(self.ref.name)
            parent, _, leaf = name.rpartition("/")
            self._h5_tmp = f"{parent}/.convt-partial-{os.getpid()}-{leaf}"
            self._h5 = _open_h5(self.ref, "r+")
            _check_h5_target(self.ref, self._h5, self.force)
            parts = parent.strip("/").split("/") if parent.strip("/") else []
            self._new_groups = [g for g in ("/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1))
                                if g not in self._h5]  # made by this run: abort() takes them away again
            self._dataset = self._create(self._h5, self._h5_tmp)
            return
        self.tmp = _temp_file(_folder(self.ref))
        if self.kind == "npy":
            self._file = open(self.tmp, "wb")
            self._header(self._file)
        elif self.kind == "npz":
            self._zip = zipfile.ZipFile(self.tmp, "w", allowZip64=True)
            member = zipfile.ZipInfo((self.ref.name or "output") + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            self._file = self._zip.open(member, "w", force_zip64=True)  # a fixed time: the same bytes every run
            self._header(self._file)
        else:
            import h5py

            self._h5 = h5py.File(self.tmp, "w")
            self._dataset = self._create(self._h5, _h5_name(self.ref.name))

    def _header(self, f) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        try:
            np.lib.format.write_array_header_1_0(f, header)
        except ValueError:  # too long for format 1.0, as np.save decides
            np.lib.format.write_array_header_2_0(f, header)

    def _create(self, f, name: str):
        # contiguous storage unless the data will come in chunks: what np.save users expect from h5py
        d = f.create_dataset(name, shape=self.shape, dtype=self.dtype)
        if self.dtype.name == "bfloat16":
            d.attrs["dtype"] = "bfloat16"
        for key, value in self.provenance.items():
            d.attrs[key] = value if isinstance(value, str) else json.dumps(value)
        return d

    def write(self, chunk: np.ndarray) -> None:
        """The next batch elements, in order."""
        chunk = np.ascontiguousarray(chunk, dtype=self.dtype)
        try:
            self._put(chunk)
        except (OSError, RuntimeError) as e:
            e = e if isinstance(e, OSError) else OSError(str(e))
            reason = _reason(e, None if self.ref.is_std else _folder(self.ref), chunk.nbytes)
            self.abort()
            self.ref.fail(f"could not be written: {reason}")
        except BaseException:
            self.abort()
            raise
        self.done += len(chunk)

    def _put(self, chunk: np.ndarray) -> None:
        if self._dataset is not None:
            self._dataset[self.done : self.done + len(chunk)] = chunk
        elif chunk.size:
            self._file.write(chunk.reshape(-1).view(np.uint8).data)

    def commit(self) -> None:
        """Make the output visible, whole, under its name."""
        try:
            if self.ref.is_std:
                self._file.seek(0)
                shutil.copyfileobj(self._file, sys.stdout.buffer, 1 << 20)
                sys.stdout.buffer.flush()
                self._file.close()
                self._file = None
                return
            if self._h5_tmp is not None:
                self._dataset = None
                self._h5.flush()  # a full disk shows here, before anything is moved into place
                _replace_dataset(self.ref, self._h5, self._h5_tmp, self.force)
                self._h5.close()
                self._h5 = None
                return
            for handle in (self._file, self._zip, self._h5):
                if handle is not None:
                    handle.close()
            self._file = self._zip = self._h5 = None
            with open(self.tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(self.tmp, self.ref.path)
            self.tmp = None
            _sync_folder(_folder(self.ref))
        except (OSError, RuntimeError) as e:  # h5py reports a failed flush as RuntimeError
            reason = _reason(e, _folder(self.ref)) if isinstance(e, OSError) else _reason(OSError(str(e)))
            self.abort()
            self.ref.fail(f"could not be written: {reason}")
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Undo: no temporary file, no hidden dataset, everything else as it was."""
        if self.ref.is_std:
            if self._file is not None:
                self._file.close()  # the spool vanishes; stdout saw nothing
                self._file = None
            return
        for handle in (self._file, self._zip):
            try:
                if handle is not None:
                    handle.close()
            except Exception:
                pass
        self._dataset = None
        if self._h5 is not None:
            try:
                if self._h5_tmp is not None and self._h5_tmp in self._h5:
                    del self._h5[self._h5_tmp]
                for group in reversed(self._new_groups):
                    if group in self._h5 and len(self._h5[group]) == 0:
                        del self._h5[group]
            finally:
                try:
                    self._h5.close()
                except (OSError, RuntimeError):
                    pass  # a disk that is still full; the hidden dataset is unlinked either way
        self._file = self._zip = self._h5 = None
        _remove(self.tmp)
        self.tmp = None
