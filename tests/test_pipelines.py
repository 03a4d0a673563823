"""convt in shell pipelines and in people's hands: the defects a new user met, each held by a test.

Matrix: a reader closing stdout early (run -o -, info) on the installed `convt`; bare `convt` and bare
subcommands; stdout and stdin that are terminals (a real pseudo-terminal); the free-space check of the stdout
spool; Ctrl-C in a many-tensor run (glob to .npy files, .h5 group to .h5 group, with and without --json); a
template OUTPUT for one INPUT; casts that overflow (float16, bfloat16, float32); `info` over bad files and globs;
the order and content of messages; the --json fields of run, verify and shape.
"""

import json
import os
import pty
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import convt_command, invoke


def _leftovers(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith(".convt-"))


# ---------------------------------------------------------------------------------------------------------
# A reader that goes away


def _read_some_then_close(args, cwd, nbytes, env=None):
    proc = subprocess.Popen(convt_command() + args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)
    proc.stdout.read(nbytes)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    return proc.wait(), err


@pytest.mark.parametrize("flags", [[], ["--json"], ["--dtype", "float64"]])
def test_a_reader_closing_stdout_early_ends_the_run_quietly(tmp_path, flags):
    rng = np.random.default_rng(0)
    # 8 MiB out at stride 2 (16 MiB in float64): more than any pipe buffers, so the write meets the closed end
    np.save(tmp_path / "x.npy", rng.standard_normal((16, 64, 64, 8)).astype(np.float32))
    np.save(tmp_path / "w.npy", rng.standard_normal((3, 3, 8, 8)).astype(np.float32))
    spool = tmp_path / "spool"
    spool.mkdir()
    env = dict(os.environ, TMPDIR=str(spool))
    code, err = _read_some_then_close(["run", "x.npy", "w.npy", "-o", "-", "--strides", "2", *flags], tmp_path, 100,
                                      env)
    json_lines = [line for line in err.splitlines() if line.startswith("{")]
    assert [line for line in err.splitlines() if line not in json_lines] == []  # no Error:, no traceback
    assert code == 141  # 128 + SIGPIPE, as `cat` or `gzip` report it: neither 1 (a mismatch) nor 2 (a mistake)
    assert sorted(os.listdir(tmp_path)) == ["spool", "w.npy", "x.npy"] and os.listdir(spool) == []


def test_info_into_head_ends_quietly(tmp_path):
    with h5py.File(tmp_path / "many.h5", "w") as f:
        for i in range(6000):  # about 260 KB of listing: more than a pipe holds
            f.create_dataset(f"d{i:04d}", data=np.zeros((1, 2, 2, 1), np.float32))
    code, err = _read_some_then_close(["info", "many.h5"], tmp_path, 40)
    assert (code, err) == (141, "")


# ---------------------------------------------------------------------------------------------------------
# Usage


def test_bare_convt_prints_the_usage_as_written():
    r = subprocess.run(convt_command(), capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert lines[0] == "Usage: convt [OPTIONS] COMMAND [ARGS]..." and not lines[0].startswith("Error")
    assert "Commands:" in lines and len(lines) > 10 and max(len(line) for line in lines) <= 100


@pytest.mark.parametrize("command", ["run", "shape", "verify", "info"])
def test_a_bare_command_prints_its_usage(command):
    r = invoke(command)
    assert r.exit_code == 2
    assert r.stderr.startswith("Usage: ") and f" {command} [OPTIONS] " in r.stderr.splitlines()[0]
    assert "Options:" in r.stderr and not r.stderr.startswith("Error")


# ---------------------------------------------------------------------------------------------------------
# Terminals


def _on_a_terminal(args, cwd, which):
    """Run convt with its stdout or stdin a pseudo-terminal: (exit code, what the terminal got, stderr)."""
    main, other = pty.openpty()
    streams = {"stdout": other} if which == "stdout" else {"stdin": other, "stdout": subprocess.PIPE}
    try:
        proc = subprocess.run(convt_command() + args, cwd=cwd, stderr=subprocess.PIPE, timeout=120, **streams)
    finally:
        os.close(other)
    os.set_blocking(main, False)
    try:
        shown = os.read(main, 1 << 16)
    except OSError:  # nothing was written to the terminal
        shown = b""
    os.close(main)
    return proc.returncode, shown, proc.stderr.decode()


def test_binary_output_to_a_terminal_is_refused_unless_forced(work, tmp_path):
    code, shown, err = _on_a_terminal(["run", "x.npy", "w.npy", "-o", "-"], tmp_path, "stdout")
    assert (code, shown) == (2, b"")
    assert err == ("Error: OUTPUT '-': stdout is a terminal, and the output is binary .npy data: redirect it "
                   "(> y.npy) or pipe it (| convt info -), or pass --force to write it to the terminal anyway\n")
    code, shown, err = _on_a_terminal(["run", "x.npy", "w.npy", "-o", "-", "--force"], tmp_path, "stdout")
    assert (code, err) == (0, "") and b"NUMPY" in shown


@pytest.mark.parametrize("args", [["run", "-", "w.npy", "-o", "y.npy"], ["info", "-"],
                                  ["verify", "-", "w.npy", "x.npy"]])
def test_reading_a_terminal_as_stdin_is_refused_at_once(work, tmp_path, args):
    code, _, err = _on_a_terminal(args, tmp_path, "stdin")  # before: it waited for a .npy typed in by hand
    label = "FILE" if args[0] == "info" else "INPUT"
    assert code == 2
    assert err == (f"Error: {label} '-': stdin is a terminal: redirect a .npy file into it (< x.npy) or pipe one "
                   f"(... | convt ...)\n")
    assert not os.path.exists("y.npy")


def test_the_stdout_spool_is_checked_for_room_before_computing(work, monkeypatch, tmp_path):
    from convt_cli import io

    real = io.shutil.disk_usage

    def disk_usage(path):
        found = real(path)
        return found._replace(free=1000) if os.path.samefile(path, io.spool_folder()) else found

    monkeypatch.setattr(io.shutil, "disk_usage", disk_usage)
    monkeypatch.setattr("convt_cli.stream._conv_transpose_of", lambda *a: pytest.fail("computed anyway"))
    r = invoke("run", "x.npy", "w.npy", "--strides", "2", "-o", "-")
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr == (f"Error: OUTPUT '-': needs about 3.8 KiB of temporary space in '{io.spool_folder()}' (the "
                        f"output is spooled there whole before it goes to stdout, so that a failure puts nothing on "
                        f"stdout) but only 1000 B is free: set TMPDIR to a folder with room, or write to a file\n")


# ---------------------------------------------------------------------------------------------------------
# Ctrl-C in a many-tensor run


def _interrupt_at(monkeypatch, call: int):
    """The engine raises KeyboardInterrupt (as Ctrl-C does) in its call-th piece, counted from 1."""
    from convt_cli import stream

    real, calls = stream._conv_transpose_of, []

    def conv_transpose_of(*args):
        compute = real(*args)

        def interrupted(x, *threads):
            calls.append(1)
            if len(calls) == call:
                raise KeyboardInterrupt
            return compute(x, *threads)

        return interrupted

    monkeypatch.setattr(stream, "_conv_transpose_of", conv_transpose_of)


@pytest.mark.parametrize("as_json", [False, True])
def test_ctrl_c_in_a_glob_names_what_was_written(work, monkeypatch, as_json):
    x, _ = work
    os.mkdir("in")
    for stem in "abcd":
        np.save(f"in/{stem}.npy", x)
    os.mkdir("gout")
    _interrupt_at(monkeypatch, 3)
    r = invoke("run", "in/*.npy", "w.npy", "-o", "gout/{stem}.npy", *(["--json"] if as_json else []))
    assert r.exit_code == 2
    assert r.stderr == ("Error: interrupted; 2 of 4 outputs were written (gout/a.npy, gout/b.npy); 'in/c.npy' was "
                        "not, nor the 1 after it\n")
    assert sorted(os.listdir("gout")) == ["a.npy", "b.npy"]
    if as_json:
        assert [json.loads(line)["output"] for line in r.stdout.splitlines()] == ["gout/a.npy", "gout/b.npy"]
    else:
        assert r.stdout == ""


def test_ctrl_c_in_an_h5_group_keeps_the_finished_datasets(work):
    x, _ = work
    with h5py.File("in.h5", "w") as f:
        for name in ("p", "q", "r"):
            f[f"in/{name}"] = x
    import pytest as _pytest

    with _pytest.MonkeyPatch.context() as monkeypatch:
        _interrupt_at(monkeypatch, 2)
        r = invoke("run", "in.h5:/in/", "w.npy", "-o", "out.h5:/out/")
    assert r.exit_code == 2
    assert r.stderr == ("Error: interrupted; 1 of 3 outputs were written (out.h5:/out/p); 'in.h5:/in/q' was not, "
                        "nor the 1 after it\n")
    with h5py.File("out.h5") as f:
        names = []
        f.visit(names.append)
    assert names == ["out", "out/p"]
    assert _leftovers(".") == []


def test_ctrl_c_in_the_first_item_wrote_nothing(work, monkeypatch):
    os.mkdir("in")
    np.save("in/a.npy", work[0])
    np.save("in/b.npy", work[0])
    _interrupt_at(monkeypatch, 1)
    r = invoke("run", "in/*.npy", "w.npy", "-o", "{stem}_up.npy")
    assert r.stderr == "Error: interrupted; no output was written ('in/a.npy' was not, nor the 1 after it)\n"
    assert not os.path.exists("a_up.npy") and _leftovers(".") == []


# ---------------------------------------------------------------------------------------------------------
# A template OUTPUT for one INPUT


def test_a_template_output_is_filled_for_one_input_too(work):
    os.mkdir("in")
    os.mkdir("out")
    np.save("in/a.npy", work[0])
    with h5py.File("d.h5", "w") as f:
        f["g/img"] = work[0]
    for source, target in (("in/a.npy", "out/a.npy"), ("d.h5:/g/img", "out/img.npy")):
        r = invoke("run", source, "w.npy", "-o", "out/{stem}.npy")
        assert r.exit_code == 0, r.output
        assert os.path.exists(target)
    r = invoke("run", "in/a.npy", "w.npy", "-o", "out/{index:02d}_{name}.h5")
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir("out")) == ["00_a.npy.h5", "a.npy", "img.npy"]
    r = invoke("run", "-", "w.npy", "-o", "out/{stem}.npy", input=open("x.npy", "rb").read())
    assert r.exit_code == 2
    assert r.stderr == ("Error: OUTPUT 'out/{stem}.npy': a template takes {stem} and {name} from INPUT, and stdin "
                        "has neither: name the output\n")


# ---------------------------------------------------------------------------------------------------------
# Casts that change values


@pytest.mark.parametrize("dtype,stored,value,limit", [("float16", np.float32, 1e6, "float16"),
                                                      ("float32", np.float64, 1e39, "float32"),
                                                      ("bfloat16", np.float64, 1e39, "bfloat16")])
def test_a_cast_that_overflows_to_inf_is_refused(work, dtype, stored, value, limit):
    x = np.ones((1, 4, 4, 2), stored)
    x[0, 1, 2, 0] = value
    x[0, 3, 3, 1] = -value
    np.save("big.npy", x)
    np.save("w2.npy", np.ones((3, 3, 2, 2), stored))
    r = invoke("run", "big.npy", "w2.npy", "--dtype", dtype, "-o", "y.npy")
    assert r.exit_code == 2 and not os.path.exists("y.npy")
    assert r.stderr == (f"Error: --dtype {dtype}: INPUT holds 2 values that are finite but beyond the range of "
                        f"{limit} ({value!r} at [0, 1, 2, 0]): the cast would turn them into inf; scale the data, or "
                        f"use a wider --dtype\n")


def test_a_cast_that_only_rounds_or_keeps_inf_goes_through(work):
    x = np.full((1, 4, 4, 2), 1e6)
    x[0, 0, 0, 0] = np.inf  # inf is inf in every dtype: the data's, not the cast's
    np.save("ok.npy", x)
    np.save("w2.npy", np.ones((3, 3, 2, 2)))
    for dtype in ("bfloat16", "float32"):
        r = invoke("run", "ok.npy", "w2.npy", "--dtype", dtype, "-o", f"y_{dtype}.npy")
        assert r.exit_code == 0, r.output


# ---------------------------------------------------------------------------------------------------------
# info


def test_info_reports_each_bad_file_and_lists_the_others(work):
    open("bad.npy", "wb").write(b"not an array")
    r = invoke("info", "x.npy", "nope.npy", "bad.npy", "w.npy")
    assert r.exit_code == 2
    assert r.stdout.splitlines() == ["x.npy  (2, 5, 6, 3) float32", "w.npy  (3, 3, 4, 3) float32"]
    assert r.stderr.splitlines() == ["Error: FILE 'nope.npy': no such file",
                                     "Error: FILE 'bad.npy': is not a .npy, .npz, HDF5 or .safetensors file "
                                     "or a zarr store (it "
                                     "starts with b'not an a')"]
    r = invoke("info", "nope.npy", "x.npy", "--json")
    assert [json.loads(line) for line in r.stdout.splitlines()] == [
        {"file": "nope.npy", "error": "FILE 'nope.npy': no such file"},
        {"file": "x.npy", "arrays": [{"name": None, "shape": [2, 5, 6, 3], "dtype": "float32"}]}]


def test_info_takes_globs(work):
    r = invoke("info", "*.npy", "none*.h5")
    assert r.exit_code == 2
    assert r.stdout.splitlines() == ["w.npy  (3, 3, 4, 3) float32", "x.npy  (2, 5, 6, 3) float32"]
    assert r.stderr == "Error: FILE 'none*.h5': the pattern matches no file\n"


# ---------------------------------------------------------------------------------------------------------
# Messages


def test_a_flag_mistake_is_told_before_the_output_exists(work):
    open("y.npy", "wb").write(b"keep")
    r = invoke("run", "x.npy", "w.npy", "--data-format", "NHCW", "-o", "y.npy")
    assert r.stderr.startswith("Error: INPUT 'x.npy': conv_transpose: data_format='NHCW' does not fit")
    r = invoke("run", "x.npy", "w.npy", "--output-shape", "99,99", "-o", "y.npy")
    assert "is not reachable" in r.stderr
    r = invoke("run", "x.npy", "w.npy", "-o", "y.npy")
    assert r.stderr == "Error: OUTPUT 'y.npy': exists: pass --force to replace it\n"
    assert open("y.npy", "rb").read() == b"keep"


def test_an_input_read_whole_is_named_when_it_does_not_fit(work):
    np.savez("z.npz", a=np.zeros((64, 32, 32, 3), np.float32))
    r = invoke("run", "z.npz:a", "w.npy", "--max-memory", "300K", "-o", "y.npy")
    assert r.exit_code == 2
    assert r.stderr.startswith("Error: run needs about ")
    assert r.stderr.endswith("but --max-memory is 300.0 KiB (available: " + r.stderr.split("(available: ")[1]
                             .split(")")[0] + "): INPUT 'z.npz:a' cannot be read in pieces (stdin and .npz members "
                             "are read whole): save it as .npy or .h5, which are read a piece at a time, or use a "
                             "larger --max-memory\n")
    assert " at once (input 768.0 KiB," in r.stderr


def test_verify_names_its_own_working_space_when_that_is_what_does_not_fit(work):
    r = invoke("verify", "x.npy", "w.npy", "--max-memory", "20K")
    assert r.exit_code == 2, r.output
    assert "its own working space (" in r.stderr and "does not shrink with the pieces: use --max-memory " in r.stderr
    assert "--dtype" not in r.stderr
    needed = r.stderr.rsplit("use --max-memory ", 1)[1].split()[0]
    assert invoke("verify", "x.npy", "w.npy", "--max-memory", needed).exit_code == 0


def test_json_prints_an_error_line_for_a_single_file_as_for_a_glob_item(work):
    r = invoke("run", "x.npy", "w.npy", "--output-shape", "99,99", "-o", "y.npy", "--json")
    assert r.exit_code == 2
    line = json.loads(r.stdout)
    assert line == {"input": "x.npy", "output": "y.npy", "error": r.stderr[len("Error: "):].strip()}
    os.mkdir("in")
    np.save("in/x.npy", work[0])
    r2 = invoke("run", "in/*.npy", "w.npy", "--output-shape", "99,99", "-o", "{stem}.npy", "--json")
    assert sorted(json.loads(r2.stdout)) == sorted(line)


# ---------------------------------------------------------------------------------------------------------
# --json fields


def test_run_json_has_versions_resolved_padding_and_wall_time(work):
    import convt_cli

    r = invoke("run", "x.npy", "w.npy", "--strides", "2", "--padding", "same", "-o", "y.npy", "--json")
    info = json.loads(r.stdout)
    assert info["schema_version"] == 3 and info["convt_version"] == convt_cli.__version__
    assert info["padding"] == info["pads"] == [[0, 1], [0, 1]] and info["padding_given"] == "SAME"
    assert info["wall_seconds"] >= info["seconds"] > 0 and info["pieces"] == 1
    r = invoke("run", "x.npy", "w.npy", "--padding", "1:1,0:2", "-o", "z.npy", "--json")
    info = json.loads(r.stdout)
    assert info["padding"] == info["padding_given"] == [[1, 1], [0, 2]]


def test_verify_json_names_what_it_checked(work):
    assert invoke("run", "x.npy", "w.npy", "--strides", "2", "-o", "y.npy").exit_code == 0
    r = invoke("verify", "x.npy", "w.npy", "y.npy", "--strides", "2", "--json")
    report = json.loads(r.stdout)
    assert (report["input"], report["filters"], report["output"]) == ("x.npy", "w.npy", "y.npy")
    assert report["strides"] == [2, 2] and report["padding"] == [[0, 1], [0, 1]] and report["passed"]
    assert report["wall_seconds"] > 0 and report["convt_version"]


def test_shape_says_the_memory_and_pieces_a_run_would_take(work):
    rng = np.random.default_rng(1)
    np.save("x8.npy", rng.standard_normal((8, 5, 6, 3)).astype(np.float32))
    for budget in ("60K", "100K", "1G"):
        planned = json.loads(invoke("shape", "x8.npy", "w.npy", "--strides", "2", "--max-memory", budget,
                                    "--json").stdout)
        ran = json.loads(invoke("run", "x8.npy", "w.npy", "--strides", "2", "--max-memory", budget, "-o",
                                f"y{budget}.npy", "--json").stdout)
        assert (planned["batch_per_chunk"], planned["pieces"]) == (ran["batch_per_chunk"], ran["pieces"])
        assert planned["memory_bytes"] <= {"60K": 60, "100K": 100, "1G": 2**20}[budget] * 1024
    assert planned["pieces"] == 1
    r = invoke("shape", "x8.npy", "w.npy", "--strides", "2", "--max-memory", "1K")
    assert r.exit_code == 0 and r.stdout.splitlines()[-1].startswith("memory        does not fit: run needs about ")


def test_python_api_run_files_reports_the_same_fields(work):
    from convt_cli.stream import run_files

    info = run_files("x.npy", "w.npy", "lib.npy", padding="VALID")
    assert info["padding_given"] == "VALID" and info["padding"] == [[0, 0], [0, 0]]
    assert sys.modules["convt_cli.stream"].SCHEMA_VERSION == info["schema_version"]


# ---------------------------------------------------------------------------------------------------------
# Where outputs land


def test_replacing_an_output_through_a_symbolic_link_keeps_the_link(work):
    os.mkdir("real")
    np.save("real/y.npy", np.zeros(3))
    os.symlink("real/y.npy", "y.npy")
    r = invoke("run", "x.npy", "w.npy", "-o", "y.npy", "--force")
    assert r.exit_code == 0, r.output
    assert os.path.islink("y.npy") and np.load("real/y.npy").shape == (2, 5, 6, 4)
    assert _leftovers(".") == [] and _leftovers("real") == []


def test_a_member_added_to_an_npz_needs_room_for_the_copy_of_the_file(work, monkeypatch):
    from convt_cli import io

    np.savez("pair.npz", big=np.zeros(100_000))  # 800 KB the new file copies
    output_bytes = 2 * 5 * 6 * 4 * 4
    real = io.shutil.disk_usage
    monkeypatch.setattr(io.shutil, "disk_usage", lambda path: real(path)._replace(free=output_bytes + 4096))
    r = invoke("run", "x.npy", "w.npy", "-o", "pair.npz:y")
    assert r.exit_code == 2
    assert r.stderr == ("Error: OUTPUT 'pair.npz:y': needs about 782.4 KiB (the output, 960 B, and a new copy of the "
                        "file it goes into, 781.5 KiB) but only 4.9 KiB is free where it goes: free some space or "
                        "write it elsewhere\n")
    assert sorted(np.load("pair.npz").files) == ["big"]


# ---------------------------------------------------------------------------------------------------------
# Compression flags


def test_compression_flags_are_checked_before_any_work(work):
    cases = [
        (["-o", "c.npy", "--compression", "gzip"], "Error: --compression gzip: OUTPUT 'c.npy' is a .npy file, which "
         "cannot be compressed; .npz outputs take gzip, .h5 outputs gzip or lzf"),
        (["-o", "c.npz", "--compression", "lzf"], "Error: --compression lzf: OUTPUT 'c.npz' is a .npz file, which "
         "takes only gzip; .npz outputs take gzip, .h5 outputs gzip or lzf"),
        (["-o", "c.h5", "--compression-level", "3"], "Error: --compression-level: applies to --compression gzip "
         "only, got level 3 with no compression"),
        (["-o", "c.h5", "--compression", "lzf", "--compression-level", "3"], "Error: --compression-level: applies "
         "to --compression gzip only, got level 3 with 'lzf'"),
    ]
    for flags, message in cases:
        r = invoke("run", "x.npy", "w.npy", *flags)
        assert (r.exit_code, r.stderr) == (2, message + "\n")
    assert sorted(os.listdir(".")) == ["w.npy", "x.npy"]


def test_a_compressed_npz_member_holds_the_same_array(work):
    assert invoke("run", "x.npy", "w.npy", "-o", "plain.npz:y").exit_code == 0
    assert invoke("run", "x.npy", "w.npy", "-o", "small.npz:y", "--compression", "GZIP",
                  "--compression-level", "9").exit_code == 0
    import zipfile

    with zipfile.ZipFile("small.npz") as z:
        assert z.getinfo("y.npy").compress_type == zipfile.ZIP_DEFLATED
    np.testing.assert_array_equal(np.load("small.npz")["y"], np.load("plain.npz")["y"])


# ---------------------------------------------------------------------------------------------------------
# Signals at awkward moments: `terminate` called where the real handler would run, so each test is deterministic


@pytest.fixture
def signals(monkeypatch):
    """interrupts' state fresh for the test; send() is SIGINT arriving at the caller's frame."""
    from convt_cli import interrupts

    monkeypatch.setattr(interrupts, "_signalled", [])
    monkeypatch.setattr(interrupts, "_held", [])
    monkeypatch.setattr(interrupts, "_depth", 0)
    return lambda: interrupts.terminate(2, sys._getframe(1))


def test_a_signal_during_an_import_is_held_not_raised_inside_it(tmp_path, monkeypatch, signals):
    from convt_cli import interrupts

    (tmp_path / "slow_module.py").write_text("import sys\nSEND(sys._getframe())\nLOADED = True\n")
    import builtins

    monkeypatch.setattr(builtins, "SEND", lambda frame: interrupts.terminate(2, frame), raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    import slow_module  # noqa: F401  (the signal lands in its body: importing must finish)

    assert slow_module.LOADED and interrupts._held == [2]
    with pytest.raises(KeyboardInterrupt):
        interrupts.stop_if_signalled()


def test_a_signal_wrapped_in_another_exception_is_still_an_interrupt(work, monkeypatch, signals):
    def compute_of(*args):
        def compute(x, *threads):
            try:
                signals()
            except KeyboardInterrupt as e:  # as threading's Condition.wait does, re-acquiring its lock
                raise RuntimeError("cannot release un-acquired lock") from e

        return compute

    monkeypatch.setattr("convt_cli.stream._conv_transpose_of", compute_of)
    r = invoke("run", "x.npy", "w.npy", "-o", "y.npy")
    assert (r.exit_code, r.stderr) == (2, "Error: interrupted; no output was written\n")
    assert _leftovers(".") == [] and not os.path.exists("y.npy")


@pytest.mark.parametrize("call", [1, 2])  # the writability probe; the output's own temporary file
def test_a_signal_right_after_a_temporary_file_is_made_leaves_none(work, monkeypatch, signals, call):
    from convt_cli import io

    real, calls = io._temp_file, []

    def temp_file(folder):
        path = real(folder)
        calls.append(path)
        if len(calls) == call:
            signals()
        return path

    monkeypatch.setattr(io, "_temp_file", temp_file)
    r = invoke("run", "x.npy", "w.npy", "-o", "y.npy")
    assert (r.exit_code, r.stderr) == (2, "Error: interrupted; no output was written\n")
    assert _leftovers(".") == [] and not os.path.exists("y.npy")


def test_a_signal_once_an_item_is_renamed_into_place_counts_it_as_written(work, monkeypatch, signals):
    from convt_cli import io

    os.mkdir("in")
    for stem in "abc":
        np.save(f"in/{stem}.npy", work[0])
    real, calls = io.os.replace, []

    def replace(src, dst):
        real(src, dst)
        calls.append(dst)
        if len(calls) == 2:
            signals()

    monkeypatch.setattr(io.os, "replace", replace)
    r = invoke("run", "in/*.npy", "w.npy", "-o", "{stem}_up.npy", "--json")
    assert r.stderr == ("Error: interrupted; 2 of 3 outputs were written (a_up.npy, b_up.npy); 'in/c.npy' was "
                        "not\n")
    assert [json.loads(line)["output"] for line in r.stdout.splitlines()] == ["a_up.npy", "b_up.npy"]
    assert sorted(n for n in os.listdir(".") if n.endswith("_up.npy")) == ["a_up.npy", "b_up.npy"]


def test_an_interrupted_copy_to_stdout_says_the_reader_got_a_truncated_stream(monkeypatch, signals):
    from convt_cli import interrupts, io

    class Reader:
        class buffer:
            calls = []

            @classmethod
            def write(cls, data):
                cls.calls.append(len(data))
                if len(cls.calls) == 2:
                    signals()

            @staticmethod
            def flush():
                pass

    monkeypatch.setattr(sys, "stdout", Reader)
    sink = io.Sink(io.parse_ref("OUTPUT", "-"), (3 << 20,), "i1", force=True)
    sink.write(np.zeros(3 << 20, np.int8))
    with pytest.raises(interrupts.Interrupted) as e:
        sink.commit()
    assert e.value.written == "stdout got the start of the output, a truncated .npy stream"


# ---------------------------------------------------------------------------------------------------------
# What a second look found


def test_info_of_a_named_array_or_group_lists_only_that(work):
    x, _ = work
    with h5py.File("b.h5", "w") as f:
        f["inputs/a"] = x
        f["inputs/b"] = x
        f["filters/w"] = x
    np.savez("p.npz", a=x, b=x[:1])
    r = invoke("info", "b.h5:/inputs/a", "b.h5:inputs", "p.npz:b", "b.h5:/nope", "p.npz:zz")
    assert r.exit_code == 2
    assert r.stdout.splitlines() == ["b.h5:/inputs/a  (2, 5, 6, 3) float32", "b.h5:/inputs/a  (2, 5, 6, 3) float32",
                                     "b.h5:/inputs/b  (2, 5, 6, 3) float32", "p.npz:b  (1, 5, 6, 3) float32"]
    assert r.stderr.splitlines() == [
        "Error: FILE 'b.h5:/nope': has no array or group '/nope': it holds /filters/w, /inputs/a, /inputs/b",
        "Error: FILE 'p.npz:zz': has no array or group 'zz': it holds a, b"]


@pytest.mark.parametrize("args,fields", [
    (["run", "nofile.npy", "w.npy", "-o", "y.npy"], {"input": "nofile.npy", "output": "y.npy"}),
    (["run", "none*.npy", "w.npy", "-o", "{stem}.npy"], {"input": "none*.npy", "output": "{stem}.npy"}),
    (["shape", "x.npy", "nofile.npy"], {"input": "x.npy", "filters": "nofile.npy"}),
    (["verify", "x.npy", "w.npy", "nofile.npy"], {"input": "x.npy", "filters": "w.npy", "output": "nofile.npy"}),
])
def test_json_has_an_error_line_for_every_mistake_about_a_tensor(work, args, fields):
    r = invoke(*args, "--json")
    assert r.exit_code == 2
    assert json.loads(r.stdout) == {**fields, "error": r.stderr[len("Error: "):].strip()}


def test_verify_blames_an_output_whose_own_shape_does_not_fit(work):
    np.save("wrong.npy", np.zeros((2, 7, 6, 4), np.float32))
    r = invoke("verify", "x.npy", "w.npy", "wrong.npy")
    assert r.stderr.startswith("Error: OUTPUT 'wrong.npy': has shape (2, 7, 6, 4), which INPUT 'x.npy' cannot give "
                               "under these flags: conv_transpose: output_shape[1]=7 is not reachable")


def test_a_missing_output_folder_is_one_error_for_a_whole_glob(work):
    os.mkdir("in")
    for stem in "abc":
        np.save(f"in/{stem}.npy", work[0])
    r = invoke("run", "in/*.npy", "w.npy", "-o", "gout/{stem}.npy")
    assert (r.exit_code, r.stderr) == (2, "Error: OUTPUT 'gout/{stem}.npy': folder 'gout' does not exist\n")


def test_copy_attrs_into_a_format_without_attributes_is_refused(work):
    r = invoke("run", "x.npy", "w.npy", "-o", "y.npy", "--copy-attrs")
    assert (r.exit_code, r.stderr) == (2, "Error: OUTPUT 'y.npy': --copy-attrs: a .npy output holds no attributes: "
                                          "write to .h5 or .zarr\n")


def test_the_subpackages_the_readme_names_are_reachable_from_the_package():
    code = "import convt_cli; print(convt_cli.engine.prepare.__name__, convt_cli.shapes.plan_conv_transpose.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["prepare", "plan_conv_transpose"]


def test_shape_says_one_batch_element_in_the_singular(work):
    np.save("x8.npy", np.zeros((8, 5, 6, 3), np.float32))
    for budget in range(16, 64, 2):
        r = invoke("shape", "x8.npy", "w.npy", "--max-memory", f"{budget}K")
        if "in 8 pieces" in r.stdout:
            break
    assert r.stdout.splitlines()[-1].endswith("in 8 pieces of 1 batch element")


# ---------------------------------------------------------------------------------------------------------
# What a third look found


def test_after_the_work_signals_cannot_kill_the_exit(work):
    code = ("import signal, sys\nfrom convt_cli.cli import main\nsys.argv = ['convt', 'info', 'x.npy']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(all(signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGINT, signal.SIGTERM)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.splitlines() == ["x.npy  (2, 5, 6, 3) float32", "True"]


@pytest.mark.parametrize("args", [["shape", "x.npy", "w.npy"], ["info", "x.npy"], ["run", "x.npy", "w.npy", "-o",
                                                                                   "y.npy"]])
def test_a_signal_held_while_click_or_numpy_loaded_stops_every_command(work, signals, args):
    from convt_cli import interrupts

    interrupts._signalled.append(2)  # as terminate does for a signal inside an import
    r = invoke(*args)
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.startswith("Error: interrupted; ") and len(r.stderr.splitlines()) == 1
    assert not os.path.exists("y.npy")


def test_an_interrupt_while_click_parses_is_one_line(work, monkeypatch):
    from convt_cli import cli as cli_module

    def convert(self, value, param, ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module.Size, "convert", convert)
    r = invoke("run", "x.npy", "w.npy", "-o", "y.npy", "--max-memory", "1G")
    assert (r.exit_code, r.stderr) == (2, "Error: interrupted; no output was written\n")


def test_verify_blames_input_and_filters_when_they_do_not_fit_each_other(work):
    assert invoke("run", "x.npy", "w.npy", "-o", "y.npy").exit_code == 0
    np.save("w2.npy", np.ones((3, 3, 4, 2), np.float32))
    r = invoke("verify", "x.npy", "w2.npy", "y.npy")
    assert r.stderr.startswith("Error: INPUT 'x.npy': conv_transpose: filters.shape[-1]=2 (in_channels) must equal")


def test_every_item_error_names_its_item(work):
    os.mkdir("in")
    np.save("in/a.npy", work[0].astype(np.float64))
    np.save("in/b.npy", work[0])
    r = invoke("run", "in/*.npy", "w.npy", "-o", "{stem}_up.npy")
    assert r.stderr == ("Error: INPUT 'in/a.npy': INPUT is float64 but FILTERS is float32: they must share a dtype; "
                        "pass --dtype float64 (or another) to cast both\n")


def test_a_glob_over_npz_files_names_a_member_in_each(work):
    x, _ = work
    for i in (1, 2):
        np.savez(f"m{i}.npz", p=x * i, q=np.ones(2))
    r = invoke("run", "m*.npz:p", "w.npy", "-o", "{stem}_up.npy")
    assert r.exit_code == 0, r.output
    assert sorted(n for n in os.listdir(".") if n.endswith("_up.npy")) == ["m1_up.npy", "m2_up.npy"]
    assert invoke("info", "m*.npz:p").stdout.splitlines() == ["m1.npz:p  (2, 5, 6, 3) float32",
                                                              "m2.npz:p  (2, 5, 6, 3) float32"]


@pytest.mark.parametrize("args,message", [
    (["info", "x.npy:foo"], "Error: FILE 'x.npy:foo': 'x.npy' holds one array, with no names inside: drop the "
                            "':foo'"),
    (["run", "x.npy", "w.npy", "-o", "a{.npy"], "Error: OUTPUT 'a{.npy': not a template convt can fill (expected "
                                                "'}' before end of string; write {{ and }} for a brace in a name)"),
    (["run", "x.npy", "w.npy", "-o", "y.h5", "--copy-attrs"], "Error: INPUT 'x.npy': --copy-attrs: the input holds "
                                                             "no attributes to copy (only .h5 datasets and zarr "
                                                             "arrays have them)"),
])
def test_small_messages(work, args, message):
    r = invoke(*args)
    assert (r.exit_code, r.stderr) == (2, message + "\n")
