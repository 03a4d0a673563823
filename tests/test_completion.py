"""Shell completion: what a word completes to (convt_cli.completion), and the same through click and a real bash.

Matrix:
- complete_array_ref over plain words (file completion), .npz members, HDF5 names (root, nested groups, relative
  names, prefixes, a lone group opened, hidden and dangling names left out, suffixes in any case), and files
  that are missing, folders or not HDF5 (no candidates, nothing printed); complete_files, complete_padding and
  complete_data_format over typed prefixes in any case.
- bash_words / bash_value over the ways bash splits a word at ':' and '=' (cursor on the break, after it, after
  a space, a word bash did not split, --opt=value).
- test_wired_*: the real `cli` through click's completion machinery (bash, zsh, fish), an interactive bash in a
  pseudo-terminal that types Tab, and fish's `complete -C` (each skipped only where that shell is absent).
  These need completion.py wired into cli.py (shell_complete= on the array arguments, -o, --data-format and
  FILE...; Padding.shell_complete; the bash class registered).
"""

import os
import select
import shutil
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from click.shell_completion import BashComplete, get_completion_class

from convt_cli import completion, formats
from convt_cli.completion import (Candidate, bash_value, bash_words, complete_array_ref, complete_data_format,
                                  complete_files, complete_padding)

REPO = os.path.join(os.path.dirname(__file__), "..")


@pytest.fixture
def files(tmp_path, monkeypatch):
    """x.npy, w.npz (kernel, bias), d.h5 (nested groups, an empty one, a hidden and a dangling name), D.HDF5."""
    monkeypatch.chdir(tmp_path)
    np.save("x.npy", np.zeros((1, 4, 3), np.float32))
    np.savez("w.npz", kernel=np.zeros((3, 2, 3), np.float32), bias=np.zeros(2, np.float32))
    with h5py.File("d.h5", "w") as f:
        f["inputs/a"] = np.zeros((1, 4, 3), np.float32)
        f["inputs/b"] = np.zeros((2, 4, 3), np.float32)
        f["filters/w"] = np.zeros((3, 2, 3), np.float32)
        f["deep/er/est/x"] = np.zeros(2, np.float32)
        f.create_group("empty")
        f[".convt-1234-tmp"] = np.zeros(2, np.float32)
        f["gone"] = h5py.ExternalLink("missing.h5", "/x")
    with h5py.File("D.HDF5", "w") as f:
        f["Up/Case"] = np.zeros(2, np.float32)
    os.mkdir("folder.h5")
    with open("bad.h5", "wb") as f:
        f.write(b"not an HDF5 file at all")
    with open("bad.npz", "wb") as f:
        f.write(b"PK not a zip")
    return tmp_path


def values(candidates):
    assert all(c.type == "plain" for c in candidates), candidates
    return [c.value for c in candidates]


# ---------------------------------------------------------------------------------------------------------
# The completion functions, called directly


@pytest.mark.parametrize("word", ["", "x", "x.npy", "sub/dir/", "-", "x.npy:a", "C:\\data\\x.npy", "x.h5"])
def test_a_word_without_a_member_completes_as_a_file(files, word):
    assert complete_array_ref(word) == [Candidate(word, "file")]
    assert complete_files(word) == [Candidate(word, "file")]


@pytest.mark.parametrize("word, expected", [
    ("w.npz:", ["w.npz:kernel", "w.npz:bias"]),
    ("w.npz:k", ["w.npz:kernel"]),
    ("w.npz:kernel", ["w.npz:kernel"]),
    ("w.npz:z", []),
])
def test_npz_members(files, word, expected):
    assert values(complete_array_ref(word)) == expected


@pytest.mark.parametrize("word, expected", [
    ("d.h5:", ["d.h5:/deep/", "d.h5:/empty/", "d.h5:/filters/", "d.h5:/inputs/"]),
    ("d.h5:/", ["d.h5:/deep/", "d.h5:/empty/", "d.h5:/filters/", "d.h5:/inputs/"]),
    ("d.h5:/inputs/", ["d.h5:/inputs/a", "d.h5:/inputs/b"]),
    ("d.h5:/inputs/b", ["d.h5:/inputs/b"]),
    ("d.h5:/in", ["d.h5:/inputs/a", "d.h5:/inputs/b"]),  # the one group that matches is opened
    ("d.h5:/fi", ["d.h5:/filters/w"]),
    ("d.h5:/de", ["d.h5:/deep/er/est/x"]),  # and opened again while it is one group
    ("d.h5:/em", ["d.h5:/empty/"]),  # an empty group stays: it is a place to write to
    ("d.h5:in", ["d.h5:inputs/a", "d.h5:inputs/b"]),  # a name without the leading '/' is kept so
    ("d.h5:inputs/a", ["d.h5:inputs/a"]),
    ("d.h5:/.", ["d.h5:/.convt-1234-tmp"]),  # hidden names only once a '.' is typed
    ("d.h5:/g", []),  # a dangling external link is no dataset
    ("d.h5:/nope/", []),
    ("d.h5:/inputs/a/", []),  # a dataset has nothing under it
    ("D.HDF5:", ["D.HDF5:/Up/Case"]),
    ("D.HDF5:/up", []),  # HDF5 names are case-sensitive, suffixes are not
])
def test_h5_names(files, word, expected):
    assert values(complete_array_ref(word)) == expected


def test_h5_names_keep_the_path_as_typed(files):
    path = str(files / "sub" / ".." / "d.h5")
    os.mkdir(files / "sub")
    assert values(complete_array_ref(path + ":/fi")) == [path + ":/filters/w"]


@pytest.mark.parametrize("word", ["nope.h5:", "nope.npz:", "folder.h5:", "bad.h5:", "bad.h5:/x", "bad.npz:",
                                  "x.npy.h5:"])
def test_a_file_that_cannot_be_listed_gives_nothing_and_prints_nothing(files, word, capfd):
    assert complete_array_ref(word) == []
    assert capfd.readouterr() == ("", "")


def test_the_suffixes_are_the_formats_container_suffixes():
    assert completion.CONTAINER_SUFFIXES == formats.container_suffixes()


def test_a_plain_word_loads_neither_numpy_nor_h5py():
    code = ("import sys; from convt_cli import completion as c; c.complete_array_ref('x.npy'); "
            "c.complete_padding(''); c.complete_data_format(''); print(sorted({'numpy', 'h5py'} & set(sys.modules)))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert p.stdout.strip() == "[]", p.stderr


@pytest.mark.parametrize("word, expected", [
    ("", ["SAME", "VALID", "SAME_LOWER", "SAME_UPPER"]), ("s", ["SAME", "SAME_LOWER", "SAME_UPPER"]),
    ("same_l", ["SAME_LOWER"]), ("Va", ["VALID"]), ("VALID", ["VALID"]), ("0:", []), ("x", []),
])
def test_padding(word, expected):
    assert values(complete_padding(word)) == expected


@pytest.mark.parametrize("word, expected", [
    ("", ["NWC", "NCW", "NHWC", "NCHW", "NDHWC", "NCDHW", "channels_last", "channels_first"]),
    ("nc", ["NCW", "NCHW", "NCDHW"]),
    ("NH", ["NHWC"]),
    ("CHANNELS_F", ["channels_first"]),
    ("q", []),
])
def test_data_format(word, expected):
    assert values(complete_data_format(word)) == expected


# ---------------------------------------------------------------------------------------------------------
# Bash's word breaks: click's reading of COMP_WORDS (args, incomplete) as bash splits `convt run ...`


@pytest.mark.parametrize("args, incomplete, expected", [
    # convt run d.h5:<Tab>: bash's word under the cursor is the ':' itself, and it replaces what follows it
    (["run", "d.h5"], ":", (["run"], "d.h5:", "d.h5:")),
    # convt run d.h5:/in<Tab>
    (["run", "d.h5", ":"], "/in", (["run"], "d.h5:/in", "d.h5:")),
    # convt run d.h5::/in<Tab>: bash keeps a run of breaks as one word
    (["run", "d.h5", "::"], "/in", (["run"], "d.h5::/in", "d.h5::")),
    # convt run d.h5:/inputs/a w.npz:ke<Tab>: earlier words are glued back too, so click counts arguments right
    (["run", "d.h5", ":", "/inputs/a", "w.npz", ":"], "ke", (["run", "d.h5:/inputs/a"], "w.npz:ke", "w.npz:")),
    # convt run d.h5:/inputs/a <Tab>: after a space nothing is glued to the empty word
    (["run", "d.h5", ":", "/inputs/a"], "", (["run", "d.h5:/inputs/a"], "", "")),
    (["run", "d.h5", ":"], "", (["run", "d.h5:"], "", "")),
    # convt run --padding=V<Tab>
    (["run", "--padding", "="], "V", (["run"], "--padding=V", "--padding=")),
    (["run", "--output"], "=", (["run"], "--output=", "--output=")),
    # a bash whose COMP_WORDBREAKS lacks ':' hands the word over whole, and replaces all of it
    (["run"], "d.h5:/in", (["run"], "d.h5:/in", "")),
    (["run", "x.npy"], "w", (["run", "x.npy"], "w", "")),
    ([], "", ([], "", "")),
])
def test_bash_words(args, incomplete, expected):
    assert tuple(bash_words(args, incomplete)) == expected


@pytest.mark.parametrize("value, kept, expected", [
    ("d.h5:/inputs/", "d.h5:", "/inputs/"),
    ("d.h5::/x", "d.h5::", "/x"),
    ("SAME", "--padding=", "SAME"),  # click completed the part after '=' already
    ("d.h5:/inputs/", "--output=d.h5:", "/inputs/"),
    ("d.h5:/inputs/", "", "d.h5:/inputs/"),
])
def test_bash_value(value, kept, expected):
    assert bash_value(value, kept) == expected


# ---------------------------------------------------------------------------------------------------------
# Wired: these need completion.py wired into cli.py


def _completions(args, incomplete):
    from convt_cli.cli import cli

    items = BashComplete(cli, {}, "convt", "_CONVT_COMPLETE").get_completions(args, incomplete)
    return [(item.type, item.value) for item in items]


@pytest.mark.parametrize("args", [
    ["run"], ["run", "x.npy"], ["run", "x.npy", "w.npz:kernel", "-o"], ["run", "x.npy", "--output"],
    ["run", "--strides", "2", "x.npy"], ["shape"], ["shape", "x.npy"], ["verify"], ["verify", "x.npy"],
    ["verify", "x.npy", "w.npy"], ["info"], ["info", "x.npy", "d.h5"],
])
def test_wired_arrays_complete_as_files(files, args):
    assert _completions(args, "sub/x") == [("file", "sub/x")]


@pytest.mark.parametrize("args, incomplete, expected", [
    (["run"], "d.h5:/in", ["d.h5:/inputs/a", "d.h5:/inputs/b"]),
    (["run", "d.h5:/inputs/a"], "w.npz:", ["w.npz:kernel", "w.npz:bias"]),
    (["run", "x.npy", "w.npy", "-o"], "d.h5:/f", ["d.h5:/filters/w"]),
    (["verify", "x.npy", "w.npy"], "d.h5:/in", ["d.h5:/inputs/a", "d.h5:/inputs/b"]),
    (["shape", "d.h5:/inputs/a"], "d.h5:/fi", ["d.h5:/filters/w"]),
    (["info", "x.npy"], "d.h5:/in", ["d.h5:/inputs/a", "d.h5:/inputs/b"]),
    (["info"], "w.npz:", ["w.npz:kernel", "w.npz:bias"]),
    (["run", "--padding"], "v", ["VALID"]),
    (["shape", "--padding"], "", ["SAME", "VALID", "SAME_LOWER", "SAME_UPPER"]),
    (["verify", "--data-format"], "nd", ["NDHWC"]),
    (["run", "--dtype"], "bf", ["bfloat16"]),
    (["run"], "--padding=S", ["SAME", "SAME_LOWER", "SAME_UPPER"]),
])
def test_wired_names_and_flag_values(files, args, incomplete, expected):
    assert _completions(args, incomplete) == [("plain", v) for v in expected]


@pytest.mark.parametrize("comp_words, comp_cword, expected", [
    (["convt", "run", "d.h5", ":"], 3, "plain,/deep/\nplain,/empty/\nplain,/filters/\nplain,/inputs/"),
    (["convt", "run", "d.h5", ":", "/in"], 4, "plain,/inputs/a\nplain,/inputs/b"),
    (["convt", "run", "d.h5", ":", "/inputs/a", "w.npz", ":", "k"], 7, "plain,kernel"),
    (["convt", "run", "d.h5", ":", "/inputs/a", "w"], 5, "file,w"),
    (["convt", "run", "--padding", "=", "V"], 4, "plain,VALID"),
    (["convt", "run", "x.npy", "w.npy", "--output", "=", "d.h5", ":", "/f"], 8, "plain,/filters/w"),
])
def test_wired_bash_gets_back_the_text_after_the_last_break(files, monkeypatch, comp_words, comp_cword, expected):
    # COMP_WORDS as click's bash script sends it: bash's words, split at ':' and '=', joined by newlines
    from convt_cli.cli import cli

    monkeypatch.setenv("COMP_WORDS", "\n".join(comp_words))
    monkeypatch.setenv("COMP_CWORD", str(comp_cword))
    assert get_completion_class("bash")(cli, {}, "convt", "_CONVT_COMPLETE").complete() == expected


@pytest.mark.parametrize("shell, env", [
    ("zsh", {"COMP_WORDS": "convt run d.h5:/in", "COMP_CWORD": "2"}),
    ("fish", {"COMP_WORDS": "convt run d.h5:/in", "COMP_CWORD": "d.h5:/in"}),
])
def test_wired_zsh_and_fish_get_whole_words(files, monkeypatch, shell, env):
    from convt_cli.cli import cli

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = get_completion_class(shell)(cli, {}, "convt", "_CONVT_COMPLETE").complete()
    expected = {"zsh": "plain\nd.h5:/inputs/a\n_\nplain\nd.h5:/inputs/b\n_",
                "fish": "plain,d.h5:/inputs/a\nplain,d.h5:/inputs/b"}[shell]
    assert out == expected


def _bash_tab(folder, typed: str) -> str:
    """The command line an interactive bash shows after `typed` and one Tab, with convt's completion loaded."""
    import pty

    bin_dir = folder / "bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "convt"  # this tree's convt under the name the completion is registered for
    shim.write_text(f'#!/bin/sh\nPYTHONPATH="{os.path.abspath(REPO)}" exec "{sys.executable}" -m convt_cli "$@"\n')
    shim.chmod(0o755)
    (folder / "inputrc").write_text("set bell-style none\n")
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PS1="$ ", TERM="dumb",
               INPUTRC=str(folder / "inputrc"), HISTFILE="/dev/null")
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover (the child)
        os.chdir(folder)
        os.execvpe("bash", ["bash", "--norc", "--noprofile", "-i"], env)
    # typed ahead: readline takes the Tab (running the completion to its end) before the keys after it, which
    # go to the start of the line and make bash echo the line as the Tab left it
    keys = 'eval "$(_CONVT_COMPLETE=bash_source convt)"\r' + typed + "\t\x01echo LINE=\x05\r exit\r"
    os.write(fd, keys.encode())
    out, deadline = b"", time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1)
            if ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # the shell exited
                    break
                if not chunk:
                    break
                out += chunk
    finally:
        os.close(fd)
        os.waitpid(pid, 0)
    lines = [line for line in out.decode(errors="replace").replace("\r", "").split("\n") if line.startswith("LINE=")]
    assert lines, out
    return lines[0][len("LINE="):]


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash on this machine")
@pytest.mark.parametrize("typed, line", [
    ("convt run x.n", "convt run x.npy"),
    ("convt run d.h5:/f", "convt run d.h5:/filters/w"),
    ("convt run d.h5:", "convt run d.h5:/"),
    ("convt run d.h5:/in", "convt run d.h5:/inputs/"),
    ("convt run d.h5:/inputs/a w.npz:k", "convt run d.h5:/inputs/a w.npz:kernel"),
    ("convt run x.npy w.npy -o d.h5:/de", "convt run x.npy w.npy -o d.h5:/deep/er/est/x"),
    ("convt shape x.npy w.npy --padding=v", "convt shape x.npy w.npy --padding=VALID"),
])
def test_wired_real_bash_tab(files, typed, line):
    assert _bash_tab(files, typed).rstrip() == line


@pytest.mark.skipif(shutil.which("fish") is None, reason="no fish on this machine")
def test_wired_real_fish(files):
    shim = files / "bin" / "convt"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nPYTHONPATH="{os.path.abspath(REPO)}" exec "{sys.executable}" -m convt_cli "$@"\n')
    shim.chmod(0o755)
    script = 'env _CONVT_COMPLETE=fish_source convt | source; complete -C "convt run d.h5:/in"'
    p = subprocess.run(["fish", "--no-config", "-c", script], capture_output=True, text=True, cwd=files,
                       env=dict(os.environ, PATH=f"{shim.parent}{os.pathsep}{os.environ['PATH']}"))
    assert p.stdout.split() == ["d.h5:/inputs/a", "d.h5:/inputs/b"], p.stderr
