"""Streaming over the batch axis under a real address-space limit.

Matrix: one input several times the --max-memory budget, run in a subprocess whose address space is capped
(RLIMIT_AS) a little above what a tiny run of the same command needs: the streamed run succeeds and writes
the same bytes as an unconstrained run; the same arrays held whole (the Python API) fail under the same cap.
"""

import os
import resource
import subprocess
import sys

import numpy as np
import pytest

PEAK = ("import re, runpy, sys\n"
        "sys.argv = ['convt'] + sys.argv[1:]\n"
        "try:\n    runpy.run_module('convt_cli', run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code\n"
        "print(re.search(r'VmPeak:\\s+(\\d+)', open('/proc/self/status').read())[1], code, file=sys.stderr)\n")


# glibc reserves 64 MiB of address space for each thread's malloc arena: an address-space cap counts it though it
# is never touched, and how many arenas exist depends on thread timing. One arena keeps the measure about memory.
ENV = dict(os.environ, MALLOC_ARENA_MAX="1")


def _vm_peak_kb(args, cwd):
    p = subprocess.run([sys.executable, "-c", PEAK, *args], cwd=cwd, capture_output=True, text=True, env=ENV)
    peak, code = p.stderr.split()[-2:]
    assert code == "0", p.stderr
    return int(peak)


def _capped(limit_bytes):
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    return cap


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc to measure the address space")
def test_input_several_times_the_budget_streams_under_a_real_memory_cap(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "tiny.npy", rng.standard_normal((2, 8, 8, 16)).astype(np.float32))
    np.save(tmp_path / "x.npy", rng.standard_normal((96, 48, 48, 16)).astype(np.float32))  # 14 MiB in, 56 MiB out
    np.save(tmp_path / "w.npy", rng.standard_normal((3, 3, 16, 16)).astype(np.float32))
    run = [sys.executable, "-m", "convt_cli", "run"]
    flags = ["w.npy", "--strides", "2", "--force"]
    baseline = _vm_peak_kb(["run", "tiny.npy", *flags, "-o", "tiny_out.npy", "--max-memory", "4M"], tmp_path) * 1024
    cap = baseline + 40 * 2**20  # well below input + output (70 MiB), above what a 4 MiB budget adds

    free = subprocess.run(run + ["x.npy", *flags, "-o", "free.npy"], cwd=tmp_path, capture_output=True, text=True)
    assert free.returncode == 0, free.stderr
    streamed = subprocess.run(run + ["x.npy", *flags, "-o", "streamed.npy", "--max-memory", "4M", "--json"],
                              cwd=tmp_path, capture_output=True, text=True, preexec_fn=_capped(cap), env=ENV)
    assert streamed.returncode == 0, streamed.stderr
    assert '"batch_per_chunk": ' in streamed.stdout and '"batch_per_chunk": 96' not in streamed.stdout
    assert (tmp_path / "streamed.npy").read_bytes() == (tmp_path / "free.npy").read_bytes()

    # the cap is real: the same arrays held whole (the Python API, which does not stream) do not fit under it
    whole = ("import numpy as np, convt_cli\n"
             "np.save('in_memory.npy', convt_cli.conv_transpose(np.load('x.npy'), np.load('w.npy'), strides=2))\n")
    in_memory = subprocess.run([sys.executable, "-c", whole], cwd=tmp_path, capture_output=True, text=True,
                               preexec_fn=_capped(cap), env=ENV)
    assert in_memory.returncode != 0 and "MemoryError" in in_memory.stderr, in_memory.stderr
    assert not (tmp_path / "in_memory.npy").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".convt")]


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc to measure the address space")
@pytest.mark.parametrize("threads", [[], ["--threads", "4"]])
def test_one_volume_larger_than_a_real_memory_cap_runs_in_tiles_without_being_told(tmp_path, threads):
    # no --max-memory: the budget is what the address-space limit leaves (under a limit the run computes on one
    # thread and starts no reader or writer thread, whose malloc arenas would take 64 MiB of it each, whatever
    # --threads asks)
    rng = np.random.default_rng(1)
    np.save(tmp_path / "tiny.npy", rng.standard_normal((1, 17, 16, 16, 8)).astype(np.float32))  # starts workers
    np.save(tmp_path / "vol.npy", rng.standard_normal((1, 64, 96, 96, 8)).astype(np.float32))  # 18 MiB in, 144 out
    np.save(tmp_path / "w.npy", (rng.standard_normal((3, 3, 3, 8, 8)) / 9).astype(np.float32))
    flags = ["w.npy", "--strides", "2", "--force"]
    baseline = _vm_peak_kb(["run", "tiny.npy", *flags, "-o", "tiny_out.npy"], tmp_path) * 1024
    cap = baseline + 96 * 2**20  # the output alone does not fit
    run = [sys.executable, "-m", "convt_cli", "run", "vol.npy", *flags, "-o", "capped.npy", "--json"]
    capped = subprocess.run(run + threads, cwd=tmp_path, capture_output=True, text=True, preexec_fn=_capped(cap),
                            env=ENV)
    assert capped.returncode == 0, capped.stderr
    assert '"tile_shape": [' in capped.stdout
    free = subprocess.run(run[:-3] + ["-o", "free.npy"], cwd=tmp_path, capture_output=True, text=True)
    assert free.returncode == 0, free.stderr
    np.testing.assert_allclose(np.load(tmp_path / "capped.npy"), np.load(tmp_path / "free.npy"), rtol=1e-5,
                               atol=1e-5)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".convt")]


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc to measure the address space")
def test_a_cap_that_leaves_no_budget_is_named_in_the_refusal(tmp_path):
    rng = np.random.default_rng(3)
    np.save(tmp_path / "tiny.npy", rng.standard_normal((1, 17, 16, 16, 8)).astype(np.float32))
    np.save(tmp_path / "vol.npy", rng.standard_normal((1, 64, 96, 96, 8)).astype(np.float32))
    np.save(tmp_path / "w.npy", rng.standard_normal((3, 3, 3, 8, 8)).astype(np.float32))
    flags = ["w.npy", "--strides", "2", "--force"]
    # one thread, as under a cap: a little more than that run's peak leaves less than the margin for the budget
    baseline = _vm_peak_kb(["run", "tiny.npy", *flags, "--threads", "1", "-o", "tiny_out.npy"], tmp_path) * 1024
    run = [sys.executable, "-m", "convt_cli", "run", "vol.npy", *flags, "-o", "capped.npy"]
    capped = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True,
                            preexec_fn=_capped(baseline + 8 * 2**20), env=ENV)
    assert capped.returncode == 2 and capped.stderr.count("\n") == 1, capped.stderr
    assert "(what the address-space limit, ulimit -v, leaves)" in capped.stderr
    assert not (tmp_path / "capped.npy").exists()
