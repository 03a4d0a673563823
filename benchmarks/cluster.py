"""A zarr job through a Dask LocalCluster (`convt run --dask local:2`) against the in-process streamed run.

    python benchmarks/cluster.py [--gib 2] [--workers 2] [--chunks 1,2,4,8,16,32] [--repeat 2] [--folder DIR]
                                 [--json results.json]

Writes DIR/big.zarr (float32, batch x 64x64x64: 1 MiB per batch element, zarr's default zstd, a chunk per
element) and 3x3 filters, 64 -> 64 channels, stride 1; DIR defaults to a temporary folder, removed afterwards.
Then, in one run, alternating, best of --repeat:
- in process: `convt run big.zarr w.npy -o local.zarr --json` in a subprocess (streamed: reading, computing and
  writing overlapped), its wall_seconds;
- on the cluster: the same job through convt's --dask path (cluster.run_job, as `--dask local:N` runs it) on a
  LocalCluster of N one-thread worker processes started once by this script, its wall_seconds (the cluster's
  start, reported apart, is not in it), at each batch-per-task of --chunks, the workers writing local zarr.
Reported: elements per second both ways and the ratio (cluster / in process) per chunk size; the scheduler's
overhead per task (no-op tasks through the same cluster: seconds per task per worker thread); per chunk size, the
overhead's share of the run (its time beyond the largest chunk's, whose few tasks cost next to nothing) and what
each extra task costs (scheduling, opening the input, preparing the filters), and the smallest chunk at which
the share falls below 10%; per chunk size, the largest peak RSS of a worker (the workers are restarted before
each job) and its excess over their baseline before any job; and the cluster's start time. Outputs are checked
bitwise against the in-process one. Target: the cluster at least 0.8x the in-process throughput with chunks of
that size.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

if os.environ.get("OPENBLAS_CORETYPE") and not os.environ.get("CONVT_BENCH_REEXEC"):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    env["CONVT_BENCH_REEXEC"] = "1"
    os.execve(sys.executable, [sys.executable, *sys.argv], env)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import blas_info, convt_cmd, emit, scratch_folder  # noqa: E402

PER = (64, 64, 64)
ZARR_CHUNK = 1  # batch elements per chunk of the input store: a task of any size reads whole chunks


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _now_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _noop(i):
    return i


def overhead_per_task(client, n=2000) -> float:
    """Seconds of scheduling per task per worker thread: n no-op tasks through the cluster, wall x threads / n."""
    threads = sum(client.nthreads().values())
    client.gather(client.map(_noop, range(100), pure=False))  # warm
    start = time.perf_counter()
    client.gather(client.map(_noop, range(n), pure=False))
    return (time.perf_counter() - start) * threads / n


def make_input(folder, batch, rng):
    import zarr

    block = rng.standard_normal((16, *PER)).astype(np.float32)
    x = zarr.create_array(os.path.join(folder, "big.zarr"), shape=(batch, *PER), chunks=(ZARR_CHUNK, *PER),
                          dtype=np.float32)
    for b0 in range(0, batch, 16):
        x[b0:b0 + 16] = block[: min(16, batch - b0)] + np.float32(b0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunks", default="1,2,4,8,16,32")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--folder")
    parser.add_argument("--json")
    args = parser.parse_args()
    import zarr

    from convt_cli import cluster

    batch = int(args.gib * 1024)
    chunks = [int(c) for c in args.chunks.split(",")]
    rng = np.random.default_rng(0)
    with scratch_folder(args.folder, "convt-cluster-") as folder:
        os.chdir(folder)
        np.save("w.npy", (rng.standard_normal((3, 3, 64, 64)) / 24).astype(np.float32))
        make_input(folder, batch, rng)
        started = time.perf_counter()
        with cluster.connect(f"local:{args.workers}") as client:
            start_seconds = time.perf_counter() - started
            base_rss = client.run(_now_rss_mb)
            per_task = overhead_per_task(client)
            local = {"wall_seconds": float("inf")}
            on_cluster = {c: float("inf") for c in chunks}
            peak: dict = {}
            for _ in range(args.repeat):
                out = subprocess.run(convt_cmd() + ["run", "big.zarr", "w.npy", "-o", "local.zarr", "--force",
                                                    "--quiet", "--json"], capture_output=True, text=True, check=True)
                info = json.loads(out.stdout)
                if info["wall_seconds"] < local["wall_seconds"]:
                    local = info
                for c in chunks:
                    client.restart()  # fresh workers: each chunk size's own peak RSS
                    info = cluster.run_job(client, f"local:{args.workers}", "big.zarr", "w.npy", f"c{c}.zarr",
                                           force=True, batch_per_task=c)
                    on_cluster[c] = min(on_cluster[c], info["wall_seconds"])
                    peak[c] = max(peak.get(c, 0.0), *client.run(_rss_mb).values())
        expected = zarr.open_array("local.zarr", mode="r")
        same = all(np.array_equal(zarr.open_array(f"c{c}.zarr", mode="r")[b0:b0 + 64], expected[b0:b0 + 64])
                   for c in chunks for b0 in range(0, batch, max(1, batch // 4)))
        # what a task costs beyond its share of the work: against the largest chunk's run, whose few tasks add
        # next to nothing, per extra task per worker thread (opening the input, preparing the filters, scheduling)
        largest = max(chunks)
        rows = []
        for c in chunks:
            tasks, fewest = -(-batch // c), -(-batch // largest)
            extra = on_cluster[c] - on_cluster[largest]
            rows.append({"batch_per_task": c, "mib_in_per_task": c * 1.0, "wall_seconds": round(on_cluster[c], 2),
                         "elements_per_s": round(batch / on_cluster[c], 1),
                         "over_in_process": round(local["wall_seconds"] / on_cluster[c], 3),
                         "overhead_share": round(max(0.0, extra) / on_cluster[c], 4),
                         "overhead_per_task_ms": round(max(0.0, extra) * args.workers / (tasks - fewest) * 1e3, 2)
                         if tasks > fewest else None,
                         "worker_peak_rss_mb": round(peak[c], 1),
                         "worker_peak_above_baseline_mb": round(peak[c] - max(base_rss.values()), 1)})
        below = [r for r in rows if r["overhead_share"] < 0.10]
        at = below[0] if below else None
        result = {
            "blas": blas_info(), "input_gib": round(batch / 1024, 2), "workers": args.workers,
            "cluster_start_seconds": round(start_seconds, 2),
            "in_process": {"wall_seconds": round(local["wall_seconds"], 2),
                           "elements_per_s": round(batch / local["wall_seconds"], 1),
                           "compute_seconds": round(local["seconds"], 2)},
            "scheduler_overhead_per_task_ms": round(per_task * 1e3, 3),
            "by_chunk": rows,
            "smallest_chunk_below_10pct_overhead": at and at["batch_per_task"],
            "ratio_at_that_chunk": at and at["over_in_process"],
            "target_met": bool(at and at["over_in_process"] >= 0.8),
            "worker_baseline_rss_mb": [round(v, 1) for v in base_rss.values()],
            "bitwise_equal": bool(same),
        }
        emit(result, args.json)


if __name__ == "__main__":
    main()
