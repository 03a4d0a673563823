"""The README's commands run as written, so the docs cannot rot.

Matrix: every `convt ...` line in the README's ```sh blocks (the quick start's included, after its install
step), run by a real shell with the installed `convt` in a scratch copy of samples/; the quick start has
exactly two set-up commands and .ci/run runs the README's test command; the Python API block runs.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def _blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def _quick_start():
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [line for block in re.findall(r"```sh\n(.*?)```", section, flags=re.S) for line in block.splitlines()]


def _command_blocks():
    """The convt lines of each ```sh block, in order: a block's lines run one after another in one folder."""
    blocks = []
    for block in _blocks("sh"):
        commands = []
        for line in block.splitlines():
            if line.startswith("pip install . && "):
                line = line[len("pip install . && "):]
            if line.startswith("convt "):
                commands.append(line)
        if commands:
            blocks.append(commands)
    return blocks


def test_quick_start_has_two_commands_and_ci_runs_the_second():
    install_run, install_test = _quick_start()
    assert install_run.startswith("pip install . && convt run samples/")
    assert install_test == "pip install '.[test]' && python -m pytest"
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert install_test in ci.splitlines()


@pytest.mark.parametrize("commands", _command_blocks(), ids=lambda c: c[0][:60])
def test_readme_commands_run(commands, tmp_path):
    shutil.copytree(os.path.join(ROOT, "samples"), tmp_path / "samples")
    env = dict(os.environ)
    bindir = os.path.dirname(shutil.which("convt") or sys.executable)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    for command in commands:
        p = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, (command, p.stderr)
        assert "Traceback" not in p.stderr


def test_readme_lists_enough_commands():
    assert sum(map(len, _command_blocks())) >= 10


def test_python_api_examples_run(tmp_path, monkeypatch):
    shutil.copytree(os.path.join(ROOT, "samples"), tmp_path / "samples")
    monkeypatch.chdir(tmp_path)
    api, on_dask = _blocks("python")
    namespace = {}
    exec(compile(api, "README.md", "exec"), namespace)
    assert namespace["y"].shape == (8, 64, 64, 128)
    assert namespace["z"].shape == (8, 32, 32, 256)
    namespace = {}
    exec(compile(on_dask, "README.md", "exec"), namespace)
    assert namespace["report"].passed and namespace["y"].shape == (2, 16, 16, 8)
    import zarr

    assert zarr.open_array("up.zarr", mode="r")[...].shape == (2, 16, 16, 8)
