"""Threads and BLAS control: convt's worker threads, owned by the caller.

How many threads a call uses is the caller's: `threads=` on every engine function (`--threads` on the CLI), else
the environment variable CONVT_NUM_THREADS, else every core this process may use (its CPU affinity and its
cgroup's CPU quota), with no cap. A call with threads=1 runs in the calling thread.

The worker threads are one pool for the process, shared by every call from every Python thread: a call hands the
pool at most `threads` tasks (each takes jobs from the call's own queue until none is left), so calls from many
threads at once (a Dask threaded worker, a user's thread pool) never run more than the largest `threads` among
them. No task waits for another, so there is no deadlock; a call's tasks may queue behind those of calls that came
before it. The pool is grown under a lock when a call asks for more threads than it has (a worker counts once its
first GEMM is done; one that cannot start or whose first GEMM fails is left out, and the call goes on with fewer);
a worker that neither a running call nor the latest one needs ends after IDLE_SECONDS idle. After a fork the child
starts from nothing: no pool (its threads did not come along), no running call, locks anew, and the BLAS thread
count the parent had before convt limited it.

BLAS runs on one thread during convt's calls: every GEMM is one block's, on one BLAS thread, so results are bitwise
the same for any number of convt threads and any batch split (OpenBLAS rounds a GEMM differently on one and two
threads), and the two levels of threads do not fight. OpenBLAS built with pthreads, which NumPy's wheels ship, has
one thread count for the whole process: no library call limits it for one thread only. So convt sets it to 1 while
any convt call runs (counted over concurrent calls), and puts back the value it found when the last one ends, unless
someone else changed it in between. Other threads' matmuls in that time run on one BLAS thread too. It calls the
library's own setter (found through threadpoolctl): threadpoolctl's own limit (3.8, OpenBLAS's pthreads layer)
lets one thread at a time set the count, and silently does nothing in any other thread while that one holds it.

Each worker thread costs OpenBLAS a buffer of some tens of MB of address space: a very large `threads` under a
memory cap (ulimit -v) can make OpenBLAS end the process at the first GEMM of the new threads.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import threading
from concurrent.futures import Future, wait

import numpy as np

from ..errors import ConvtError

WORK_BYTES = 8 << 20  # aim for one batch chunk's workspace to stay in the last-level cache
ENV_THREADS = "CONVT_NUM_THREADS"
_WARM = 768  # the size of a new worker thread's first GEMM


# ---------------------------------------------------------------------------------------------------------
# How many threads


_quota: list = []  # the cgroup's quota, read once per process (a read takes ~0.2 ms, every call would pay it)


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by its cgroup's CPU quota (rounded up)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not _quota:
        _quota.append(_cgroup_quota())
    quota = _quota[0]
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def _cgroup_quota() -> float | None:
    """CPUs' worth of time the cgroup may use (cgroup v2 cpu.max, v1 cpu.cfs_quota_us / period), the smallest
    along the way up to the root; None when there is no quota or no cgroup to read."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one hierarchy
            base, files = "/sys/fs/cgroup", ("cpu.max",)
        elif "cpu" in controllers.split(","):
            base = next((b for b in ("/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct") if os.path.isdir(b)), None)
            if base is None:
                continue
            files = ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        else:
            continue
        # inside a container the path is often the host's while the mount is the container's own: try both
        parts = path.strip("/").split("/") if path.strip("/") else []
        for depth in range(len(parts), -1, -1):
            quota = _read_quota(os.path.join(base, *parts[:depth]), files)
            if quota is not None:
                found.append(quota)
    return min(found) if found else None


def _read_quota(folder: str, files) -> float | None:
    try:
        if len(files) == 1:
            with open(os.path.join(folder, files[0])) as f:
                quota, period = (f.read().split() + ["100000"])[:2]
            if quota == "max":
                return None
        else:
            with open(os.path.join(folder, files[0])) as f:
                quota = f.read().strip()
            with open(os.path.join(folder, files[1])) as f:
                period = f.read().strip()
            if int(quota) < 0:
                return None
        return int(quota) / int(period) if int(period) > 0 else None
    except (OSError, ValueError):
        return None


def resolve_threads(threads=None) -> int:
    """The number of threads a call uses: `threads`, else CONVT_NUM_THREADS, else usable_cores().

    >>> resolve_threads(3)
    3
    """
    if threads is None:
        text = os.environ.get(ENV_THREADS, "").strip()
        if not text:
            return usable_cores()
        try:
            threads = int(text)
        except ValueError:
            raise ConvtError(f"{ENV_THREADS}: expected a whole number of threads >= 1, got '{text}'") from None
        if threads < 1:
            raise ConvtError(f"{ENV_THREADS}: expected a whole number of threads >= 1, got '{text}'")
        return threads
    if isinstance(threads, bool) or not isinstance(threads, int) and not hasattr(threads, "__index__"):
        raise ConvtError(f"threads: expected a whole number >= 1 or None, got {threads!r}")
    threads = int(threads.__index__())
    if threads < 1:
        raise ConvtError(f"threads: expected a whole number >= 1 or None, got {threads}")
    return threads


# ---------------------------------------------------------------------------------------------------------
# BLAS on one thread, around convt's calls


class _Blas:
    """The BLAS libraries' thread counts, set to 1 while any convt call runs and put back after the last."""

    def __init__(self):
        self.lock = threading.Lock()
        self.users = 0  # convt calls running now, from any thread
        self.libs = None  # [(get, set)] per loaded BLAS library, found on first use
        self.saved: list = []  # what each library had when the first of the running calls began

    def _find(self) -> list:
        from threadpoolctl import ThreadpoolController

        libs = []
        for lib in ThreadpoolController().select(user_api="blas").lib_controllers:
            pair = _setters(lib)
            if pair is not None:
                libs.append(pair)
        return libs

    def enter(self) -> None:
        with self.lock:
            if self.libs is None:
                self.libs = self._find()
            if self.users == 0:
                self.saved = [get() for get, _ in self.libs]
                for (_, set_), had in zip(self.libs, self.saved):
                    if had != 1:
                        set_(1)
            self.users += 1

    def leave(self) -> None:
        with self.lock:
            self.users -= 1
            if self.users == 0:
                self._restore()

    def _restore(self) -> None:
        for (get, set_), had in zip(self.libs or [], self.saved):
            if had != 1 and get() == 1:  # unless someone else set another count in between
                set_(had)
        self.saved = []

    def after_fork_in_child(self) -> None:
        # the forking thread was not inside convt (it was forking), so no call runs here: undo the parent's limit
        self.lock = threading.Lock()
        if self.users:
            self.users = 0
            self._restore()


def _setters(lib):
    """(get, set) of one threadpoolctl library controller that act on the library itself: for OpenBLAS its
    openblas_set_num_threads symbol (threadpoolctl's set_num_threads does nothing when called from a thread other
    than the first that used it); the controller's own for the others."""
    if lib.internal_api == "openblas":
        dynlib = getattr(lib, "dynlib", None) or getattr(lib, "_dynlib", None)
        for prefix in ("", "scipy_"):
            for suffix in ("", "64_", "_64"):
                set_ = getattr(dynlib, f"{prefix}openblas_set_num_threads{suffix}", None)
                get = getattr(dynlib, f"{prefix}openblas_get_num_threads{suffix}", None)
                if set_ is not None and get is not None:
                    return get, set_
        return None
    return lib.get_num_threads, lib.set_num_threads


_BLAS = _Blas()


@contextlib.contextmanager
def blas_one_thread():
    """BLAS on one thread inside the block (see the module's docstring for what that means for other threads)."""
    _BLAS.enter()
    try:
        yield
    finally:
        _BLAS.leave()


# ---------------------------------------------------------------------------------------------------------
# The worker threads


_in_worker = threading.local()  # set in convt's own worker threads: a call from one runs in place


def _first_gemm(a) -> None:
    a @ a


IDLE_SECONDS = 5.0  # a worker beyond what the running (or the latest) call needs ends after this long idle


class _Pool:
    """Worker threads that take (fn, args, future) from one queue, started under a lock as calls need them."""

    def __init__(self):
        self.lock = threading.Lock()
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.size = 0  # workers started, warmed and not ending
        self.alive = 0  # workers whose thread has not ended
        self.wanted: list[int] = []  # the threads of each running call
        self.latest = 0  # the threads of the latest call: kept, so that a stream of such calls starts none again
        self.serial = 0

    def lease(self, threads: int) -> int:
        """The workers this call may hand tasks to: the pool grown to `threads` if smaller (0 where no thread can
        be started). Every lease is released, whatever happens, by release()."""
        with self.lock:
            self.wanted.append(threads)
            self.latest = threads
            try:
                if self.size < threads:
                    self._grow(threads - self.size)
            except BaseException:  # an interrupt while the workers start: this call is not running
                self.wanted.remove(threads)
                raise
            return min(threads, self.size)

    def release(self, threads: int) -> None:
        with self.lock:
            self.wanted.remove(threads)

    def warm(self, threads: int) -> None:
        """At least `threads` workers, started now (before a large allocation: see _grow)."""
        with self.lock:
            if self.size < threads:
                self._grow(threads - self.size)

    def _grow(self, count: int) -> None:
        # Each new worker runs one small GEMM at its start, all of them at once, while memory is still to be had:
        # OpenBLAS allocates a buffer for each thread that calls it and exits the process if it cannot, whereas a
        # NumPy allocation that fails later is a clean MemoryError. A worker counts once its GEMM is done.
        barrier, started = threading.Barrier(count), []
        a = np.ones((_WARM, _WARM), dtype=np.float32)
        for _ in range(count):
            self.serial += 1
            # set when the first GEMM ended; whether it succeeded; whether the worker must count itself
            warmed = [threading.Event(), False, False]
            thread = threading.Thread(target=self._work, args=(barrier, a, warmed), daemon=True,
                                      name=f"convt-worker-{self.serial}")
            try:
                thread.start()
            except RuntimeError:  # no thread can be started (a memory cap, a thread limit)
                barrier.abort()
                break
            self.alive += 1
            started.append(warmed)
        try:
            for warmed in started:
                warmed[0].wait()
        finally:  # also after an interrupt: a worker still warming counts itself when done (see _work)
            for warmed in started:
                if warmed[0].is_set():
                    self.size += warmed[1]
                else:
                    warmed[2] = True

    def _work(self, barrier, a, warmed) -> None:
        _in_worker.active = True
        try:
            try:
                barrier.wait(timeout=10)
            except threading.BrokenBarrierError:
                pass
            try:
                with blas_one_thread():
                    _first_gemm(a)
                warmed[1] = True
            except Exception:  # (a MemoryError) this worker ends here, uncounted, and the call goes on without it
                pass
            finally:
                warmed[0].set()
            with self.lock:  # after _grow has decided who counts this worker
                if warmed[1] and warmed[2]:
                    self.size += 1
            if warmed[1]:
                self._serve()
        finally:
            with self.lock:
                self.alive -= 1

    def _serve(self) -> None:
        while True:
            try:
                fn, args, future = self.tasks.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with self.lock:  # not needed by a running call, nor by the latest: end
                    if self.size > max(self.wanted, default=self.latest):
                        self.size -= 1
                        return
                continue
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as e:  # handed to the caller, which re-raises it
                    future.set_exception(e)
            del fn, args, future

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self.tasks.put((fn, args, future))
        return future


_POOL = _Pool()


def _after_fork_in_child() -> None:
    global _POOL
    _POOL = _Pool()  # the parent's worker threads do not exist here
    _in_worker.active = False  # nor, if one of them forked, is this thread one of them
    _quota.clear()  # a child may be moved to another cgroup
    _BLAS.after_fork_in_child()


if hasattr(os, "register_at_fork"):
    # the BLAS count is read and set under its lock: a fork in between would leave the child unsure of it
    os.register_at_fork(before=lambda: _BLAS.lock.acquire(), after_in_parent=lambda: _BLAS.lock.release(),
                        after_in_child=_after_fork_in_child)


def worker_threads() -> int:
    """convt's worker threads alive in this process now."""
    return _POOL.alive


def warm_blas() -> None:
    """BLAS's buffers for this thread, allocated now by one small GEMM, before a large allocation: OpenBLAS ends the
    process when it cannot allocate them at a later first GEMM, where NumPy would raise a clean MemoryError."""
    with blas_one_thread():
        _first_gemm(np.ones((_WARM, _WARM), dtype=np.float32))


def warm(threads: int) -> None:
    """Start the worker threads a call with `threads` will use, before its large allocations (see _Pool._grow)."""
    if threads > 1 and not getattr(_in_worker, "active", False):
        with blas_one_thread():
            _POOL.warm(threads)


def run_tasks(tasks: list, threads: int, stop: threading.Event | None = None) -> None:
    """fn(*args) for each (fn, *args): up to `threads` at once on the worker threads, with BLAS on one thread. On an
    error or an interrupt, `stop` (an Event the tasks watch) is set before waiting for the tasks already running."""
    with blas_one_thread():
        if threads <= 1 or len(tasks) <= 1 or getattr(_in_worker, "active", False):
            for fn, *args in tasks:
                fn(*args)
            return
        pool = _POOL
        workers = pool.lease(threads)
        futures = []
        try:
            for i, (fn, *args) in enumerate(tasks):
                if i < workers:
                    futures.append(pool.submit(fn, *args))
                else:
                    fn(*args)  # no worker for it: here, in this thread
            for future in futures:
                future.result()
        except BaseException:
            if stop is not None:
                stop.set()
            raise
        finally:
            try:
                for future in futures:
                    future.cancel()
                wait(futures)
            finally:
                pool.release(threads)


def over_jobs(jobs: list, work, threads: int) -> None:
    """work(jobs) on up to `threads` threads that share one queue of jobs: each takes the next job when it is done
    with one, so a core slowed by other load does less (work allocates its buffers once and iterates). After an
    error anywhere, or an interrupt, no thread takes another job."""
    lock, pending, stop = threading.Lock(), iter(jobs), threading.Event()

    def take():
        while not stop.is_set():
            with lock:
                job = next(pending, None)
            if job is None:
                return
            yield job

    def share():
        try:
            work(take())
        except BaseException:
            stop.set()
            raise

    run_tasks([(share,) for _ in range(min(threads, len(jobs)))], threads, stop)


def over_batch(batch: int, per_image: int, work, threads: int) -> None:
    """work(b0, b1) over the batch in chunks that keep the workspace near WORK_BYTES, on up to `threads` threads.
    Every GEMM is one image's, so neither the chunks nor the threads change a single bit of the result."""
    chunk = max(1, min(WORK_BYTES // max(1, per_image), -(-batch // threads)))

    def each(some):
        for b0, b1 in some:
            work(b0, b1)

    over_jobs([(b0, min(batch, b0 + chunk)) for b0 in range(0, batch, chunk)], each, threads)
