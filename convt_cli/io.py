"""Array references, and the facade over the formats: sniffing, headers, loading, listing and atomic writing.

A reference is `-` (a .npy stream on stdin or stdout), `PATH` or `PATH:NAME`, where NAME is an .npz member
or an HDF5 dataset path. Formats are told by their magic bytes (`\\x93NUMPY`, `PK`, `\\x89HDF`), the suffix
only where there are no bytes yet (an output). Pickles are never loaded.

Each format is a class in `formats/` behind one interface (`formats.base.Format`), registered in
`formats.FORMATS`; the functions here ask the registry which format a reference is and call it, so they read
the same for every format. What is the same for every format lives here: references, the checks before a run,
and the atomic commit of an output (`Sink`).

bfloat16 has no .npy or HDF5 type of its own. convt's convention, which is what `np.save` and h5py already do
with an `ml_dtypes.bfloat16` array: the raw 2-byte values as a 2-byte void type (.npy descr `'<V2'`, HDF5
opaque of size 2, tagged with the dataset attribute `dtype="bfloat16"`). Any 2-byte void array is read
back as bfloat16.

h5py is imported only when an HDF5 file is touched, so that commands on .npy files start fast.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass

import numpy as np

from . import formats
from .errors import ConvtError
from .formats import HDF5_MAGIC, NPY_MAGIC, ZIP_MAGIC  # noqa: F401  (part of io's surface)
from .formats.base import WholeReader, WriteOptions, is_terminal
from .formats.base import sync_folder as _sync_folder
from .formats.base import reason as _reason
from .formats.h5 import dataset_name
from .interrupts import deferred



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
        for suffix in formats.container_suffixes():
            at = lowered.find(suffix + ":")
            if at > 0:
                path, name = text[: at + len(suffix)], text[at + len(suffix) + 1 :]
                try:
                    name.encode("utf-8")  # .npz and HDF5 store names as UTF-8; a path may be any bytes
                except UnicodeEncodeError:
                    raise ConvtError(f"{label} {text!r}: the name after ':' is not valid UTF-8") from None
                return ArrayRef(label, text, path, name or None)
        if must_exist:
            head, colon, _ = text.rpartition(":")
            if colon and os.path.isfile(head):  # x.npy:foo, where x.npy holds one array
                formats.input_format(ArrayRef(label, text, head, None))  # unless it is no array at all (a pickle)
                raise ConvtError(f"{label} '{text}': '{head}' holds one array, with no names inside: drop the "
                                 f"':{text[len(head) + 1:]}'")
            folder = os.path.dirname(text)
            if folder and not os.path.isdir(folder):
                raise ConvtError(f"{label} '{text}': folder '{folder}' does not exist")
            raise ConvtError(f"{label} '{text}': no such file")
    return ArrayRef(label, text, text, None)


def sniff(ref: ArrayRef) -> str:
    """'npy', 'npz' or 'h5' (a registered format's name) from the magic bytes of an existing file."""
    return formats.input_format(ref).name


# ---------------------------------------------------------------------------------------------------------
# Reading


def read_header(ref: ArrayRef):
    """(shape, dtype) without reading the data. Not for stdin, which can only be read whole, once."""
    return formats.input_format(ref).header(ref)


def load(ref: ArrayRef) -> np.ndarray:
    """The whole array. Pickles are refused; bfloat16 stored as 2-byte void comes back as bfloat16."""
    return formats.input_format(ref).load(ref)


def read_whole(ref: ArrayRef) -> bool:
    """Whether the input can only be read whole (stdin, and formats without a reader of slices: .npz members)."""
    if ref.is_std:
        return True
    fmt = formats.input_format(ref)
    return type(fmt).reader is formats.Format.reader


def list_arrays(path: str) -> list[dict]:
    """Every array in a file: name (None for .npy), shape, dtype, and chunks for HDF5 datasets; for `PATH:NAME`,
    the array NAME names, or every array below the group it names."""
    ref = parse_ref("FILE", path)
    arrays = formats.input_format(ref).listing(ref)
    if ref.name is None:
        return arrays
    key = ref.name.strip("/")
    picked = [a for a in arrays if a["name"] is not None
              and (a["name"].strip("/") == key or a["name"].strip("/").startswith(key + "/") or not key)]
    if not picked:
        names = ", ".join(a["name"] for a in arrays[:5] if a["name"]) + (", ..." if len(arrays) > 5 else "")
        ref.fail(f"has no array or group '{ref.name}': it holds {names or 'nothing'}")
    return picked


def attributes(ref: ArrayRef) -> dict:
    """The attributes stored with an input array (HDF5 dataset attributes); {} for formats without them."""
    return {} if ref.is_std else formats.input_format(ref).attributes(ref)


# ---------------------------------------------------------------------------------------------------------
# Writing


def output_format(ref: ArrayRef) -> str:
    return formats.output_format(ref).name


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_output(ref: ArrayRef, inputs: list[ArrayRef], force: bool, options: WriteOptions = WriteOptions()) -> None:
    """Refuse, before any work, an output that would replace an input, exist already, land nowhere, or be stored
    in a way its format cannot."""
    fmt = formats.output_format(ref)
    fmt.check_options(ref, options)
    if ref.is_std:
        if not force and is_terminal(sys.stdout):
            ref.fail("stdout is a terminal, and the output is binary .npy data: redirect it (> y.npy) or pipe it "
                     "(| convt info -), or pass --force to write it to the terminal anyway")
        return
    if ref.name is not None and not fmt.named:
        ref.fail(f"a {fmt.title} file holds one array: drop the ':NAME'")
    folder = _folder(ref)
    if not os.path.isdir(folder):
        ref.fail(f"folder '{folder}' does not exist")
    try:  # os.access says yes to root on a read-only mount: try what the write will do
        with deferred():  # a signal between making the file and removing it would leave it behind
            os.remove(_temp_file(folder))
    except OSError as e:
        ref.fail(f"folder '{folder}' is not writable ({_reason(e)})")
    fmt.check_name(ref)
    for other in inputs:
        if other.is_std or not os.path.exists(ref.path) or not _same_file(ref.path, other.path):
            continue
        if fmt.replaces(ref, other):
            ref.fail(f"is the same as {other.label} '{other.text}': write the output elsewhere")
    if not os.path.exists(ref.path):
        return
    if os.path.isdir(ref.path) and not fmt.folder:
        ref.fail("is a folder")
    fmt.check_existing(ref, force)


def spool_folder() -> str:
    """Where an output to stdout is spooled before it is copied out whole (TMPDIR, else the system's)."""
    return tempfile.gettempdir()


def rewritten_bytes(ref: ArrayRef) -> int:
    """Bytes of the existing file an output into it copies (an .npz gaining a member), besides the output's own."""
    if ref.is_std or not formats.output_format(ref).copies_file:
        return 0
    try:
        return os.path.getsize(ref.path)
    except OSError:
        return 0


def free_space(ref: ArrayRef) -> int | None:
    """Bytes free for an unprivileged writer where the output goes (for stdout: where it is spooled); None when
    it cannot be told."""
    try:
        return shutil.disk_usage(spool_folder() if ref.is_std else _folder(ref)).free
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


def _remove(path: str | None) -> None:
    if path is None:
        return
    try:
        os.remove(path)
    except OSError:
        pass


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
        self._reader = WholeReader(load(ref)) if whole else formats.input_format(ref).reader(ref)
        self.shape, self.dtype = self._reader.shape, self._reader.dtype

    @property
    def whole(self) -> bool:
        """True when the array is held in memory whatever is read of it (stdin, .npz members)."""
        return self._reader.whole

    def read(self, b0: int, b1: int) -> np.ndarray:
        """Batch elements [b0, b1)."""
        return self._reader.read(b0, b1)

    def read_box(self, b0: int, b1: int, index: tuple) -> np.ndarray:
        """Batch elements [b0, b1), only the box `index` (a slice per axis after the batch's): an HDF5
        hyperslab, positioned reads of an .npy file."""
        return self._reader.read_box(b0, b1, index)

    def close(self) -> None:
        self._reader.close()


GLOB_CHARACTERS = "*?["


def expand_items(input_text: str, output_text: str | None):
    """[(input, output)] when INPUT names many tensors, else None.

    An HDF5 group (`data.h5:/inputs/`, or a group's path) stands for every dataset below it, written under the
    OUTPUT group with the same relative names; a glob (`'in/*.npy'`, not an existing file) for the files it
    matches, sorted, each written to the OUTPUT template with {stem}, {name} (the file name) or {index}.
    output_text None (verify without OUTPUT): every output is None.
    """
    if input_text != "-" and not os.path.exists(input_text) and any(c in input_text for c in GLOB_CHARACTERS):
        paths = expand_files(input_text)
        if not paths:
            raise ConvtError(f"INPUT '{input_text}': the pattern matches no file")
        if output_text is None:
            return [(p, None) for p in paths]
        if not _is_template(output_text):
            raise ConvtError(f"OUTPUT '{output_text}': with many inputs it must be a template holding {{stem}}, "
                             f"{{name}} or {{index}}, like 'out/{{stem}}.npy'")
        return _distinct([(p, _fill(output_text, _split_member(p)[0], i)) for i, p in enumerate(paths)],
                         output_text)
    ref = parse_ref("INPUT", input_text) if input_text != "-" else None
    if ref is None or ref.is_std or ref.name is None:
        return None  # a bare container path is its one array, as everywhere
    names = formats.input_format(ref).members_under(ref)
    if names is None:
        return None
    if not names:
        ref.fail(f"group '{ref.name}' holds no dataset")
    base = "/" + ref.name.strip("/")
    if output_text is None:
        return [(f"{ref.path}:{base.rstrip('/')}/{n}", None) for n in sorted(names)]
    if _is_template(output_text):
        return _distinct([(f"{ref.path}:{base.rstrip('/')}/{n}", _fill(output_text, n, i))
                          for i, n in enumerate(sorted(names))], output_text)
    out = parse_ref("OUTPUT", output_text, must_exist=False)
    if out.is_std or not formats.output_format(out).groups or not (out.name or "/").endswith("/"):
        ref.fail(f"'{ref.name}' is a group, not a dataset: name a dataset inside it, or give OUTPUT as a group "
                 f"(like out.h5:/outputs/) or a template with {{stem}}, {{name}} or {{index}} to convert every "
                 f"dataset in it")
    return [(f"{ref.path}:{base.rstrip('/')}/{n}", f"{out.path}:/{out.name.strip('/')}/{n}".replace("//", "/"))
            for n in sorted(names)]


def fill_template(input_text: str, output_text: str) -> str:
    """OUTPUT for one INPUT: a template ({stem}, {name}, {index}) filled as for the first of many items (index 0,
    the stem and name of the file, or of the dataset or member it names); any other OUTPUT as it is."""
    if output_text == "-" or os.path.exists(output_text) or not _is_template(output_text):
        return output_text
    if input_text == "-":
        raise ConvtError(f"OUTPUT '{output_text}': a template takes {{stem}} and {{name}} from INPUT, and stdin has "
                         f"neither: name the output")
    ref = parse_ref("INPUT", input_text)
    return _fill(output_text, ref.name if ref.name is not None else ref.path, 0)


def expand_files(text: str) -> list[str]:
    """The files a quoted glob matches (sorted, `**` reaching into subfolders), or [text] when it is not one."""
    import glob

    if text == "-" or os.path.exists(text) or not any(c in text for c in GLOB_CHARACTERS):
        return [text]
    pattern, member = _split_member(text)
    return [p + member for p in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(p)]


def _split_member(text: str) -> tuple[str, str]:
    """('m*.npz', ':p') of 'm*.npz:p': a glob over container files, each with the same NAME inside."""
    lowered = text.lower()
    for suffix in formats.container_suffixes():
        at = lowered.rfind(suffix + ":")
        if at > 0:
            return text[: at + len(suffix)], text[at + len(suffix):]
    return text, ""


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
    folders = {_folder(parse_ref("OUTPUT", target, must_exist=False)) for _, target in items}
    missing = sorted(f for f in folders if not os.path.isdir(f))
    if missing:  # once for the run, not once per item
        others = len(missing) - 1
        more = f" (nor {others} other folder{'s' if others > 1 else ''} it names)" if others else ""
        raise ConvtError(f"OUTPUT '{template}': folder '{missing[0]}' does not exist{more}")
    return items


def _identity(ref: ArrayRef):
    """What a reference names, however spelled: (device, inode) of an existing file, plus the dataset name."""
    try:
        st = os.stat(ref.path)
    except OSError:
        return (ref.path, None)
    name = dataset_name(ref.name) if ref.name is not None else None  # "g/x" and "/g/x" are one dataset
    return (st.st_dev, st.st_ino, name)


TEMPLATE_FIELDS = ("stem", "name", "index")


def _is_template(text: str) -> bool:
    """True when text holds a {stem}, {name} or {index} field (with or without a format spec like {index:03d});
    any other field, attribute or item access is refused."""
    import string

    try:
        fields = [(f, conv) for _, f, _, conv in string.Formatter().parse(text) if f is not None]
    except ValueError as e:
        raise ConvtError(f"OUTPUT '{text}': not a template convt can fill ({e}; write {{{{ and }}}} for a "
                         f"brace in a name)") from None
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
    """Both name datasets in the same existing HDF5 file (any format whose outputs share a file with other
    arrays): an input there is read whole before the output is written into the file."""
    return (not a.is_std and not b.is_std and formats.output_format(a).shares_file and os.path.exists(a.path)
            and os.path.exists(b.path) and _same_file(a.path, b.path))


class Sink:
    """An output written a batch chunk at a time, in order, and made visible only by commit().

    .npy, .npz and stdout are written sequentially (header first), HDF5 into a dataset; every file output goes to
    a temporary file beside the target (inside an existing .h5: a hidden dataset) that commit() renames (moves)
    into place and abort() removes, so that an interrupted or failed run leaves nothing half-written.
    The format writes the bytes (`formats.base.Writer`); the temporary file, its sync and rename are the same
    for every format, and are here.
    """

    def __init__(self, ref: ArrayRef, shape, dtype, provenance: dict | None = None, force: bool = False,
                 options: WriteOptions = WriteOptions()):
        self.ref, self.shape, self.dtype = ref, tuple(int(v) for v in shape), np.dtype(dtype)
        self.provenance, self.force, self.options = provenance or {}, force, options
        self._format = formats.output_format(ref)
        self.kind = self._format.name
        self.done = 0  # batch elements written so far
        self.tmp = self._writer = None
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
        args = (self.ref, self.shape, self.dtype, self.provenance)
        self._writer = self._format.direct_writer(*args, self.force, self.options)  # stdout, or an existing file
        if self._writer is None:
            with deferred():  # the name recorded before a signal can stop us: abort() removes it
                self.tmp = _temp_file(os.path.dirname(self._target()) or ".")
            self._writer = self._format.file_writer(self.ref, self.tmp, *args[1:], self.options)

    def _target(self) -> str:
        """The path renamed onto: a symbolic link's target, so that the link keeps pointing at the output."""
        return os.path.realpath(self.ref.path) if os.path.islink(self.ref.path) else self.ref.path

    def write(self, chunk: np.ndarray) -> None:
        """The next batch elements, in order."""
        chunk = np.ascontiguousarray(chunk, dtype=self.dtype)
        self._guarded(lambda: self._put(chunk), chunk.nbytes)
        self.done += len(chunk)

    @property
    def boxes(self) -> bool:
        """Whether write_box can write this output (.npy, .h5, .safetensors and stdout's spool; not .npz)."""
        return self._writer is not None and self._writer.boxes

    def write_box(self, chunk: np.ndarray, start: int, index: tuple) -> None:
        """Batch elements [start, start + len(chunk)), only the box `index` (a slice per axis after the batch's),
        in any order: the spatial tiles of a run. The boxes must cover the output once before commit()."""
        chunk = np.ascontiguousarray(chunk, dtype=self.dtype)
        self._guarded(lambda: self._writer.put_box(chunk, start, index), chunk.nbytes)

    def _guarded(self, put, nbytes: int) -> None:
        try:
            put()
        except (OSError, RuntimeError) as e:
            e = e if isinstance(e, OSError) else OSError(str(e))
            reason = _reason(e, None if self.ref.is_std else _folder(self.ref), nbytes)
            self.abort()
            self.ref.fail(f"could not be written: {reason}")
        except BaseException:
            self.abort()
            raise

    def _put(self, chunk: np.ndarray) -> None:
        self._writer.put(chunk, self.done)

    def commit(self) -> None:
        """Make the output visible, whole, under its name."""
        try:
            self._writer.finish()
            if self.tmp is not None:
                with open(self.tmp, "rb+") as f:
                    os.fsync(f.fileno())
                with deferred(reraise=False):  # once renamed it is in place: a signal now is for what comes next
                    os.replace(self.tmp, self._target())
                    self.tmp = None
                    _sync_folder(os.path.dirname(self._target()) or ".")
            self._writer = None
        except BrokenPipeError:  # the reader of stdout went away: not a mistake to report, the caller's to handle
            self.abort()
            raise
        except (OSError, RuntimeError) as e:  # h5py reports a failed flush as RuntimeError
            folder = None if self.ref.is_std else _folder(self.ref)  # stdout has no folder: a closed pipe
            reason = _reason(e, folder) if isinstance(e, OSError) else _reason(OSError(str(e)))
            self.abort()
            self.ref.fail(f"could not be written: {reason}")
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Undo: no temporary file, no hidden dataset, everything else as it was."""
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        _remove(self.tmp)
        self.tmp = None
