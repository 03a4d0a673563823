"""Threads under the caller's control: how many, shared by concurrent callers, BLAS, fork.

Matrix: threads from the argument, CONVT_NUM_THREADS and the cores (affinity, cgroup v1 and v2 quotas);
conv_transpose and conv bitwise the same for threads 1..8 and any batch split; four Python threads calling at once
with threads=2 (at most two worker threads, the same bits as one call alone, BLAS put back after); a fork while a
call runs (no deadlock, the child computes the same bits with its own threads and its parent's BLAS setting).
The concurrency and fork cases run in a fresh interpreter, so that no earlier test's threads are counted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from convt_cli import ConvtError, conv, conv_transpose
from convt_cli.engine import runtime


def test_threads_come_from_the_argument_then_the_environment_then_the_cores(monkeypatch):
    monkeypatch.delenv("CONVT_NUM_THREADS", raising=False)
    assert runtime.resolve_threads(3) == 3
    assert runtime.resolve_threads(np.int64(5)) == 5
    assert runtime.resolve_threads(None) == runtime.usable_cores()
    monkeypatch.setenv("CONVT_NUM_THREADS", "7")
    assert runtime.resolve_threads(None) == 7
    assert runtime.resolve_threads(2) == 2  # the argument wins


@pytest.mark.parametrize("value, message", [
    (0, "threads: expected a whole number >= 1 or None, got 0"),
    (-2, "threads: expected a whole number >= 1 or None, got -2"),
    (1.5, "threads: expected a whole number >= 1 or None, got 1.5"),
    ("2", "threads: expected a whole number >= 1 or None, got '2'"),
    (True, "threads: expected a whole number >= 1 or None, got True"),
])
def test_a_bad_threads_argument_is_named(value, message):
    x, w = np.ones((1, 3, 3, 2), np.float32), np.ones((2, 2, 2, 2), np.float32)
    with pytest.raises(ConvtError) as e:
        conv_transpose(x, w, threads=value)
    assert str(e.value) == message


@pytest.mark.parametrize("text", ["zero", "0", "-1", "1.5"])
def test_a_bad_environment_variable_is_named(monkeypatch, text):
    monkeypatch.setenv("CONVT_NUM_THREADS", text)
    with pytest.raises(ConvtError) as e:
        runtime.resolve_threads(None)
    assert str(e.value) == f"CONVT_NUM_THREADS: expected a whole number of threads >= 1, got '{text}'"


@pytest.mark.parametrize("files, quota", [
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.cfs_quota_us": "50000\n", "cpu.cfs_period_us": "100000\n"}, 0.5),
    ({"cpu.cfs_quota_us": "-1\n", "cpu.cfs_period_us": "100000\n"}, None),
])
def test_cgroup_quotas_are_read(tmp_path, files, quota):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert runtime._read_quota(str(tmp_path), tuple(sorted(files, reverse=True))) == quota


@pytest.mark.parametrize("quota, cores", [(0.5, 1), (1.2, 2), (None, None), (1000.0, None)])
def test_a_cpu_quota_caps_the_cores(monkeypatch, quota, cores):
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    monkeypatch.setattr(runtime, "_quota", [quota])
    assert runtime.usable_cores() == (min(cores, affinity) if cores else affinity)


def _case(first=False, batch=6, dtype=np.float32):
    rng = np.random.default_rng(3)
    shape = (batch, 16, 19, 21) if first else (batch, 19, 21, 16)
    x = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal((4, 4, 12, 16)).astype(dtype)
    return x, w, dict(strides=2, data_format="NCHW" if first else "NHWC")


@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv_transpose_and_conv_are_bitwise_the_same_for_any_threads_and_split(first, dtype):
    x, w, flags = _case(first, dtype=dtype)
    y1 = conv_transpose(x, w, threads=1, **flags)
    z1 = conv(y1, w, threads=1, **flags)
    for threads in range(2, 9):
        assert np.array_equal(conv_transpose(x, w, threads=threads, **flags), y1), threads
        assert np.array_equal(conv(y1, w, threads=threads, **flags), z1), threads
    for cut in ([1, 5], [2, 2, 2], [3, 3]):
        edges = np.cumsum([0, *cut])
        pieces = [slice(a, b) for a, b in zip(edges, edges[1:])]
        assert np.array_equal(np.concatenate([conv_transpose(x[p], w, threads=2, **flags) for p in pieces]), y1)
        assert np.array_equal(np.concatenate([conv(y1[p], w, threads=2, **flags) for p in pieces]), z1)


def _run_script(body: str) -> dict:
    # a fresh interpreter: no worker threads from earlier tests, and a deadlock ends in a timeout, not a hang
    script = textwrap.dedent('''
        import json, os, threading, time
        import numpy as np
        from threadpoolctl import threadpool_info
        from convt_cli import conv_transpose
        from convt_cli.engine import runtime

        def blas_threads():
            return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

        rng = np.random.default_rng(3)
        # GEMMs large enough that OpenBLAS would spread them over its threads (and round differently)
        x = rng.standard_normal((4, 40, 40, 64)).astype(np.float32)
        w = rng.standard_normal((4, 4, 64, 64)).astype(np.float32)
        ''') + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OPENBLAS_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_four_callers_at_once_share_two_worker_threads_and_get_the_same_bits():
    result = _run_script('''
        before = blas_threads()
        alone = conv_transpose(x, w, strides=2, threads=2)
        seen, stop, outputs = [0], threading.Event(), []

        def watch():
            while not stop.is_set():
                seen[0] = max(seen[0], sum(t.name.startswith("convt-worker") for t in threading.enumerate()))
                time.sleep(0.0005)

        def call(keep_alive):
            for _ in range(5):
                outputs.append(conv_transpose(x, w, strides=2, threads=2))
            keep_alive.wait()  # a caller that stays alive while the others call (it used to own the BLAS limit)

        watcher, alive = threading.Thread(target=watch), threading.Event()
        watcher.start()
        callers = [threading.Thread(target=call, args=(alive,)) for _ in range(4)]
        for t in callers:
            t.start()
        while len(outputs) < 20:
            time.sleep(0.01)
        late = conv_transpose(x, w, strides=2, threads=2)  # from the main thread, the others still alive
        alive.set()
        for t in callers:
            t.join()
        stop.set()
        watcher.join()
        print(json.dumps(dict(workers=seen[0], equal=sum(np.array_equal(o, alone) for o in outputs + [late]),
                              calls=len(outputs) + 1, before=before, after=blas_threads(),
                              alive=runtime.worker_threads())))
        ''')
    assert 1 <= result["workers"] <= 2
    assert result["equal"] == result["calls"] == 21
    assert result["after"] == result["before"] == [2]  # BLAS put back as it was found
    assert result["alive"] == 2


def test_a_fork_while_a_call_runs_neither_hangs_nor_leaves_the_child_limited():
    result = _run_script('''
        alone = conv_transpose(x, w, strides=2, threads=2)
        running, stop = threading.Event(), threading.Event()

        def busy():
            while not stop.is_set():
                conv_transpose(x, w, strides=2, threads=2)
                running.set()

        t = threading.Thread(target=busy)
        t.start()
        running.wait()
        time.sleep(0.005)
        r, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            blas = blas_threads()  # the parent's limit is undone: no convt call runs in the child
            y = conv_transpose(x, w, strides=2, threads=2)
            os.write(wfd, json.dumps(dict(blas=blas, equal=bool(np.array_equal(y, alone)),
                                          workers=runtime.worker_threads())).encode())
            os._exit(0)
        os.close(wfd)
        _, status = os.waitpid(pid, 0)
        child = json.loads(os.read(r, 4096).decode())
        stop.set()
        t.join()
        print(json.dumps(dict(status=status, child=child, parent=blas_threads())))
        ''')
    assert result["status"] == 0
    assert result["child"] == {"blas": [2], "equal": True, "workers": 2}
    assert result["parent"] == [2]


def test_when_no_thread_can_start_the_call_goes_on_in_its_own(monkeypatch):
    import threading

    x, w, flags = _case()
    want = conv_transpose(x, w, threads=1, **flags)
    started = []

    def refuse(self):
        started.append(self.name)
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(runtime, "_POOL", runtime._Pool())  # no worker yet: each would have to start now
    monkeypatch.setattr(threading.Thread, "start", refuse)
    assert np.array_equal(conv_transpose(x, w, threads=4, **flags), want)
    assert started and all(name.startswith("convt-worker") for name in started)
    assert runtime.worker_threads() == 0


def test_a_worker_whose_first_gemm_fails_is_not_counted(monkeypatch):
    x, w, flags = _case()
    want = conv_transpose(x, w, threads=1, **flags)

    def fail(a):
        raise MemoryError

    monkeypatch.setattr(runtime, "_POOL", runtime._Pool())
    monkeypatch.setattr(runtime, "_first_gemm", fail)
    assert np.array_equal(conv_transpose(x, w, threads=3, **flags), want)  # in this thread, not waiting forever
    assert runtime._POOL.size == 0 and runtime._POOL.wanted == []
    assert runtime._BLAS.users == 0


def test_an_interrupt_while_the_workers_start_leaves_no_call_behind(monkeypatch):
    def interrupted(self, count):
        raise KeyboardInterrupt

    monkeypatch.setattr(runtime, "_POOL", runtime._Pool())
    monkeypatch.setattr(runtime._Pool, "_grow", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runtime.over_jobs(list(range(4)), lambda some: list(some), 2)
    assert runtime._POOL.wanted == []
    assert runtime._BLAS.users == 0


def test_workers_beyond_what_calls_ask_for_end_when_idle(monkeypatch):
    import time

    monkeypatch.setattr(runtime, "_POOL", runtime._Pool())
    monkeypatch.setattr(runtime, "IDLE_SECONDS", 0.02)
    x, w, flags = _case()
    conv_transpose(x, w, threads=4, **flags)
    assert runtime.worker_threads() == 4
    conv_transpose(x, w, threads=2, **flags)  # the latest call asks for two: the other two are not needed
    for _ in range(500):
        if runtime.worker_threads() == 2:
            break
        time.sleep(0.01)
    assert runtime.worker_threads() == 2
    time.sleep(0.1)  # and the two that are kept stay
    assert runtime.worker_threads() == 2
