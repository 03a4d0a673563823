"""What a word on `convt`'s command line completes to in a shell, as plain data; cli.py hands it to click.

Each `complete_*` function takes the word being completed and returns `Candidate(value, type)` pairs in click's
terms: type "file" asks the shell for its own file-name completion (the value is the word itself), type "plain"
is a finished word. Array references complete as files, and past `PATH.h5:` / `PATH.npz:` as the names inside
the file: `data.h5:/inputs/` (a group: go on typing) or `data.h5:/inputs/x` (a dataset), `w.npz:kernel`.

Bash splits a word at ':' and '=' (they are in its COMP_WORDBREAKS), so click's bash script hands over
`data.h5`, `:`, `/in` as three words, and bash replaces only the text after the last ':' with what comes back.
`bash_words` glues the pieces back before click reads them, and `bash_value` cuts each answer down to the part
bash replaces (what bash-completion's __ltrim_colon_completions does). Zsh and fish keep the word whole.

Completion runs at every Tab: it imports nothing heavy until a word names a member of a file (h5py then), and
any trouble with that file means no candidates, never a traceback.
"""

from __future__ import annotations

import os
from typing import NamedTuple

# Suffixes after which a reference goes on with ':NAME', in the order io.parse_ref tries them; a test holds this
# equal to formats.container_suffixes(), which cannot be imported here without loading NumPy at every Tab.
CONTAINER_SUFFIXES = (".npz", ".h5", ".hdf5", ".safetensors", ".zarr")
PADDINGS = ("SAME", "VALID", "SAME_LOWER", "SAME_UPPER")
_BREAKS = frozenset(":=")  # the characters of bash's default COMP_WORDBREAKS that can occur inside a convt word


class Candidate(NamedTuple):
    value: str
    type: str = "plain"  # "plain" or "file", as click's CompletionItem


def complete_files(incomplete: str) -> list[Candidate]:
    """A file name: the shell's own completion (`convt info FILE...`)."""
    return [Candidate(incomplete, "file")]


def complete_array_ref(incomplete: str) -> list[Candidate]:
    """INPUT, FILTERS, OUTPUT: a file name, or past `PATH.h5:` / `PATH.npz:` / `PATH.safetensors:` the names
    inside that file.

    >>> complete_array_ref("samples/inp")
    [Candidate(value='samples/inp', type='file')]
    """
    split = _split_ref(incomplete)
    if split is None:
        return complete_files(incomplete)
    path, suffix, name = split
    try:
        if suffix == ".zarr":
            return [Candidate(f"{path}:{member}") for member in _zarr_members(path, name)]
        if not os.path.isfile(path):
            return []
        if suffix == ".npz":
            return [Candidate(f"{path}:{member}") for member in _npz_members(path, name)]
        if suffix == ".safetensors":
            return [Candidate(f"{path}:{member}") for member in _safetensors_members(path, name)]
        return [Candidate(f"{path}:{member}") for member in _h5_members(path, name)]
    except Exception:  # a damaged, locked or foreign file: nothing to offer, and nothing printed over the prompt
        return []


def complete_padding(incomplete: str) -> list[Candidate]:
    """--padding: SAME, VALID, SAME_LOWER or SAME_UPPER, whatever case was typed (p and lo:hi are the user's)."""
    return _names(PADDINGS, incomplete)


def complete_data_format(incomplete: str) -> list[Candidate]:
    """--data-format: TF's names for 1 to 3 spatial dims, then channels_last and channels_first."""
    from .shapes import CHANNELS_FIRST_NAMES, CHANNELS_LAST_NAMES

    names = [name for n in sorted(CHANNELS_LAST_NAMES) for name in (CHANNELS_LAST_NAMES[n], CHANNELS_FIRST_NAMES[n])]
    return _names(names + ["channels_last", "channels_first"], incomplete)


def _names(names, incomplete: str) -> list[Candidate]:
    typed = incomplete.strip().upper()
    return [Candidate(name) for name in names if name.upper().startswith(typed)]


def _split_ref(text: str):
    """(path, suffix, name) when `text` goes on past a container suffix and ':', else None (io.parse_ref's rule)."""
    lowered = text.lower()
    for suffix in CONTAINER_SUFFIXES:
        at = lowered.find(suffix + ":")
        if at > 0:
            end = at + len(suffix)
            return text[:end], suffix, text[end + 1:]
    return None


def _visible(name: str, typed: str) -> bool:
    """Hidden names (convt's own `.convt-*` temporaries) only when a '.' was typed, as shells do with dotfiles."""
    return name.startswith(typed) and (not name.startswith(".") or typed.startswith("."))


def _safetensors_members(path: str, typed: str) -> list[str]:
    # the JSON header after its 8-byte little-endian length, read here: no NumPy at a Tab
    import json
    import struct

    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(min(size, 100 << 20)))
    return [m for m in header if m != "__metadata__" and _visible(m, typed)]


def _npz_members(path: str, typed: str) -> list[str]:
    import zipfile

    with zipfile.ZipFile(path) as z:
        members = [m[:-4] for m in z.namelist() if m.endswith(".npy")]
    return [m for m in members if _visible(m, typed)]


def _zarr_members(path: str, typed: str) -> list[str]:
    """Names under the group `typed` reaches in a zarr store (a folder), as for HDF5: groups end with '/'. Read from
    the folders and their metadata files, with no zarr import at a Tab."""
    import json

    head, _, leaf = typed.rpartition("/")
    folder = os.path.join(path, *[p for p in head.split("/") if p])
    found = []
    for name in sorted(os.listdir(folder)):
        inside = os.path.join(folder, name)
        if not _visible(name, leaf) or not os.path.isdir(inside):
            continue
        if os.path.isfile(os.path.join(inside, ".zgroup")):
            kind = "group"
        elif os.path.isfile(os.path.join(inside, ".zarray")):
            kind = "array"
        elif os.path.isfile(os.path.join(inside, "zarr.json")):
            with open(os.path.join(inside, "zarr.json")) as f:
                kind = json.load(f).get("node_type")
        else:
            continue
        found.append(f"{head}/{name}/" if head or typed.startswith("/") else f"{name}/")
        if kind == "array":
            found[-1] = found[-1][:-1]
    return found


def _h5_members(path: str, typed: str) -> list[str]:
    """Names under the group `typed` reaches, spelled as typed: groups end with '/', datasets do not.

    When only one group matches, its contents are offered instead (again while that is a single group): bash and
    zsh put a space after a lone candidate, which would end the word at the group.
    """
    import h5py

    with h5py.File(path, "r") as f:
        found = _h5_children(f, typed or "/")
        while len(found) == 1 and found[0].endswith("/"):
            inside = _h5_children(f, found[0])
            if not inside:
                break
            found = inside
    return found


def _h5_children(f, typed: str) -> list[str]:
    import h5py

    group_name, _, leaf = typed.rpartition("/")
    group_name += "/" if typed.count("/") else ""
    group = f.get(group_name or "/")
    if not isinstance(group, h5py.Group):
        return []
    found = []
    for key in group:
        if not _visible(key, leaf):
            continue
        try:
            kind = group.get(key, getclass=True)
        except Exception:  # a dangling external link, say: skip that one name
            continue
        if kind is h5py.Group:
            found.append(f"{group_name}{key}/")
        elif kind is h5py.Dataset:
            found.append(f"{group_name}{key}")
    return found


# ---------------------------------------------------------------------------------------------------------
# Bash's word breaks


class BashWords(NamedTuple):
    args: list[str]  # the complete words before the one being completed, each glued back whole
    incomplete: str  # the word being completed, glued back whole
    kept: str  # its head that bash keeps: up to its last ':' or '=' where bash split it, else ''


def bash_words(args: list[str], incomplete: str) -> BashWords:
    """Glue back the words bash split at ':' or '=' (`data.h5`, `:`, `/in` -> `data.h5:/in`).

    `args` and `incomplete` are click's reading of bash's COMP_WORDS: a lone break word is bash's split (no one
    passes ':' as an argument), and it joins the words on both sides, the word under the cursor too unless that
    is empty (then a space came after the break). A word bash did not split (COMP_WORDBREAKS without ':') keeps
    nothing back.

    >>> bash_words(["run", "data.h5", ":"], "/in")
    BashWords(args=['run'], incomplete='data.h5:/in', kept='data.h5:')
    """
    words = args + [incomplete] if incomplete else list(args)
    glued: list[list[str]] = []
    for word in words:
        if glued and (_is_break(word) or _is_break(glued[-1][-1])):
            glued[-1].append(word)
        else:
            glued.append([word])
    if not incomplete:
        return BashWords(["".join(g) for g in glued], "", "")
    last = glued.pop()
    whole = "".join(last)
    replaced = "" if _is_break(last[-1]) else last[-1]  # what bash's own word under the cursor holds
    return BashWords(["".join(g) for g in glued], whole, whole[: len(whole) - len(replaced)])


def bash_value(value: str, kept: str) -> str:
    """`value` without the head of the word that bash keeps (it replaces only the text after the last break).

    click may have completed a tail of the word (`--output=data.h5:/in` completes `data.h5:/in`), so the longest
    end of `kept` that `value` starts with is cut.

    >>> bash_value("data.h5:/inputs/", "data.h5:")
    '/inputs/'
    """
    for start in range(len(kept) + 1):
        if value.startswith(kept[start:]):
            return value[len(kept) - start:]
    return value


def _is_break(word: str) -> bool:
    return bool(word) and set(word) <= _BREAKS
