"""Array formats, one class each behind the interface in `base.Format`, and the one table that registers them.

A new format is a module with its `Format` subclass (magic bytes, output suffixes, header, load, reader, listing,
writer) plus one entry in FORMATS; tests/test_formats.py runs every registered format through the same contract.
io.py is the facade the rest of convt calls; it asks this table, never a format by name.
"""

from __future__ import annotations

import os

from .base import Format, Reader, WholeReader, WriteOptions, Writer, one_of
from .h5 import H5, HDF5_MAGIC
from .npy import NPY_MAGIC, Npy
from .npz import ZIP_MAGIC, Npz
from .safetensors import Safetensors
from .std import Std
from .zarr import Zarr

FORMATS: dict[str, Format] = {f.name: f for f in (Npy(), Npz(), H5(), Safetensors(), Zarr())}
# sniffed .safetensors first: it has no magic bytes, and its header's length may start with npz's "PK"
SNIFF_ORDER = ("safetensors", "npy", "npz", "h5")
STDIO: Format = Std()  # the reference `-`, whatever its bytes or suffix

__all__ = ["FORMATS", "STDIO", "Format", "Reader", "WholeReader", "WriteOptions", "Writer", "NPY_MAGIC", "ZIP_MAGIC",
           "HDF5_MAGIC", "input_format", "output_format", "container_suffixes", "suffix_formats"]


PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLE_ADVICE = ("is a pickle (as torch.save writes .pt, .pth and .bin files), which convt never loads: unpickling "
                 "runs code. Convert its tensors to safetensors once, where PyTorch is installed: python -c \"import "
                 "torch; from safetensors.torch import save_file; t = torch.load('{path}', weights_only=True); "
                 "save_file({{k: v.contiguous() for k, v in (t if isinstance(t, dict) else {{'weight': t}}).items()}}, "
                 "'{target}')\", then pass {target}:NAME (convt info lists the names)")


def titles() -> str:
    """'.npy, .npz or HDF5 file': the formats, as messages list them (folder formats last: 'or a zarr store')."""
    files = one_of(f.title for f in FORMATS.values() if not f.folder) + " file"
    folders = [f"a {f.title} store" for f in FORMATS.values() if f.folder]
    return " or ".join([files, *folders]) if len(folders) < 2 else f"{files}, {', '.join(folders)}"


def container_suffixes() -> tuple[str, ...]:
    """Suffixes after which a reference may go on with ':NAME'."""
    return tuple(s for f in FORMATS.values() if f.named for s in f.suffixes)


def suffix_formats() -> dict[str, Format]:
    return {s: f for f in FORMATS.values() for s in f.suffixes}


def input_format(ref) -> Format:
    """The format of an existing input, from its magic bytes (never its suffix)."""
    if ref.is_std:
        return STDIO
    if os.path.isdir(ref.path):
        for fmt in FORMATS.values():
            if fmt.folder and fmt.is_folder(ref.path):
                return fmt
        ref.fail(f"is a folder, expected a {titles()}")
    if os.path.exists(ref.path) and not os.path.isfile(ref.path):
        # a pipe or device would be consumed by the sniff and could not be read again
        ref.fail("is not a regular file (a pipe or a device): give a file, or - to read a .npy stream from stdin")
    if os.path.splitext(ref.path)[1].lower() in PICKLE_SUFFIXES:
        _refuse_pickle(ref)
    try:
        with open(ref.path, "rb") as f:
            head = f.read(max([16] + [len(fmt.magic) for fmt in FORMATS.values()]))
    except FileNotFoundError:
        ref.fail("no such file")
    except OSError as e:
        ref.fail(f"cannot be read: {e.strerror}")
    # a pickle starts with its PROTO opcode and protocol 2-5, then an opcode (a .safetensors header length has 0s)
    pickle = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05") and head[2:3] not in (b"", b"\0")
    order = [FORMATS[name] for name in SNIFF_ORDER if name in FORMATS]
    for fmt in order + [fmt for fmt in FORMATS.values() if fmt not in order]:
        if fmt.sniff(head):
            pickle = fmt.magic == ZIP_MAGIC and _torch_zip(ref.path)
            if not pickle:
                return fmt
            break
    if pickle:
        _refuse_pickle(ref)
    if not head:
        ref.fail(f"is empty, expected a {titles()}")
    ref.fail(f"is not a {titles()} (it starts with {head[:8]!r})")


def _refuse_pickle(ref):
    stem, suffix = os.path.splitext(ref.path)
    target = stem + ("-converted" if suffix.lower() == ".safetensors" else "") + ".safetensors"
    ref.fail(PICKLE_ADVICE.format(path=ref.path, target=target))


def _torch_zip(path: str) -> bool:
    """Whether a zip is torch.save's (a pickle, data.pkl, beside its tensors' bytes) rather than an .npz."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("data.pkl") for name in z.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


def output_format(ref) -> Format:
    """The format of an output, from its suffix (it has no bytes yet)."""
    if ref.is_std:
        return STDIO
    suffix = os.path.splitext(ref.path)[1].lower()
    found = suffix_formats().get(suffix)
    if found is None:
        expected = one_of(list(suffix_formats()))
        ref.fail(f"unknown output format '{suffix or '(no suffix)'}': expected {expected}, or - for stdout")
    return found
