"""Stream an input through `convt run --max-memory`: overlapped I/O against its two bounds, and peak RSS.

    python benchmarks/stream.py [--gib 2] [--budget 512M] [--repeat 3] [--formats npy,h5] [--folder DIR]
                                [--json results.json]

Per format (.npy in and out; .h5 in and out): writes DIR/big.npy or DIR/big.h5:/x (float32, batch x 64x64x64,
1 MiB per batch element; DIR defaults to a temporary folder, removed afterwards). Filters 3x3, 64 -> 64
channels, stride 1. Then, one subprocess each, alternating, best of --repeat:
- streamed: `convt run IN w.npy -o OUT --max-memory BUDGET --json` (reading, computing and writing overlapped):
  its wall_seconds, and its peak RSS above the interpreter's baseline (`convt shape` on the same files);
- (a) compute alone: the same pieces (`convt shape --json`'s batch_per_chunk) computed from the whole input
  read into memory first (only the compute is timed inside; the wall time includes the read), filters prepared
  once, as the run does, in the faster of two ways: one piece at a time on every thread, and pieces side by side
  one per thread (as the streamed run computes them); both are reported;
- (b) I/O alone: the input read and an output of the output's size written, piece by piece, through convt's own
  readers and writers (io.Source, io.Sink: the same formats, the same atomic commit), with no compute.
Times are measured inside each process (the interpreter's start is left out of all three). The target: streamed
throughput at least 90% of the slower of (a) and (b). The output is checked bitwise
against the first piece computed in memory. Each command's CPU time (user + system; for (a) the faster way's,
measured inside) is reported too: on a
machine where writing through the page cache costs as much CPU as the compute, (a) and (b) cannot overlap on
two cores, and CPU / cores is the bound instead.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

import h5py
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import blas_info, convt_cmd, emit, peak_rss_mb, scratch_folder  # noqa: E402

PER = (64, 64, 64)  # one batch element: 1 MiB of float32

COMPUTE_ALONE = """
import json, resource, sys, time, numpy as np
from convt_cli import engine, io
from convt_cli.engine import runtime
from convt_cli.shapes import plan_conv_transpose
chunk, pieces = int(sys.argv[1]), int(sys.argv[2])
source = io.Source(io.parse_ref("INPUT", sys.argv[3]))
x = source.read(0, source.shape[0])  # every piece in memory first: then only the compute is timed
source.close()
w = np.load("w.npy")
prepared = engine.prepare(plan_conv_transpose(x[:chunk].shape, w.shape), w)
starts = list(range(0, len(x), chunk))

def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

start, cpu0 = time.perf_counter(), cpu()
for b0 in starts:  # one piece at a time on every thread
    y = prepared.run(x[b0:b0 + chunk])
    del y
one_by_one, cpu1 = time.perf_counter() - start, cpu()

def lane(take):
    for b0 in take:
        y = prepared.run(x[b0:b0 + chunk], threads=1)
        del y

start = time.perf_counter()
runtime.over_jobs(starts, lane, runtime.resolve_threads(None))  # pieces side by side, one per thread, as run does
print(json.dumps({"one_by_one": [one_by_one, cpu1 - cpu0], "side_by_side": [time.perf_counter() - start,
                                                                            cpu() - cpu1]}))
"""

IO_ALONE = """
import sys, time, numpy as np
from convt_cli import io
chunk = int(sys.argv[1])
start = time.perf_counter()
source = io.Source(io.parse_ref("INPUT", sys.argv[2]))
out_shape = tuple(source.shape)  # SAME, stride 1, 64 -> 64 channels: the output's shape is the input's
sink = io.Sink(io.parse_ref("OUTPUT", sys.argv[3], must_exist=False), out_shape, np.float32, force=True,
               options=io.WriteOptions(chunk_batch=chunk))
for b0 in range(0, out_shape[0], chunk):
    x = source.read(b0, min(out_shape[0], b0 + chunk))
    sink.write(np.empty(x.shape, np.float32))
sink.commit()
source.close()
print(time.perf_counter() - start)
"""


def run_seconds(args, cwd):
    """Wall seconds of a subprocess, its CPU seconds (user + system), and what it printed."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise RuntimeError(f"{args} failed: {out.stderr}")
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, out.stdout


def measure(fmt, folder, batch, block, w, budget, repeat):
    ins = {"npy": "big.npy", "h5": "big.h5:/x"}[fmt]
    outs = {"npy": ("out.npy", "io_out.npy"), "h5": ("out.h5:/y", "io_out.h5:/y")}[fmt]
    if fmt == "npy":
        x = np.lib.format.open_memmap(os.path.join(folder, "big.npy"), "w+", np.float32, (batch, *PER))
        for b0 in range(0, batch, 256):
            x[b0:b0 + 256] = block[: min(256, batch - b0)]
        x.flush()
        del x
    else:
        with h5py.File(os.path.join(folder, "big.h5"), "w") as f:
            d = f.create_dataset("x", shape=(batch, *PER), dtype=np.float32, chunks=(1, *PER))
            for b0 in range(0, batch, 256):
                d[b0:b0 + 256] = block[: min(256, batch - b0)]
    shape = json.loads(subprocess.run(convt_cmd() + ["shape", ins, "w.npy", "--max-memory", budget, "--json"],
                                      cwd=folder, capture_output=True, text=True, check=True).stdout)
    chunk, pieces = shape["batch_per_chunk"], shape["pieces"]
    base = peak_rss_mb(convt_cmd() + ["shape", ins, "w.npy"], folder)
    stream_cmd = convt_cmd() + ["run", ins, "w.npy", "--force", "--quiet", "-o", outs[0], "--max-memory", budget,
                                "--json"]
    commands = {"streamed": stream_cmd,
                "compute_alone": [sys.executable, "-c", COMPUTE_ALONE, str(chunk), str(pieces), ins],
                "io_alone": [sys.executable, "-c", IO_ALONE, str(chunk), ins, outs[1]]}
    best = {k: (math.inf, math.inf) for k in commands}
    ways = {"one_by_one": (math.inf, math.inf), "side_by_side": (math.inf, math.inf)}
    for _ in range(repeat):
        for key, command in commands.items():
            _, cpu, printed = run_seconds(command, folder)
            # inside the process, as run's own wall_seconds: the interpreter's start is no part of the comparison
            if key == "streamed":
                inside = json.loads(printed)["wall_seconds"]
            elif key == "compute_alone":  # the faster of the two ways to compute the pieces in memory
                both = json.loads(printed)
                ways = {k: min(v, tuple(both[k])) for k, v in ways.items()}
                inside, cpu = min(tuple(v) for v in both.values())  # that way's CPU seconds, from inside
            else:
                inside = float(printed)
            best[key] = min(best[key], (inside, cpu))
    rss = peak_rss_mb(stream_cmd, folder)
    first = io_load_first(folder, outs[0], chunk)
    from convt_cli import engine
    from convt_cli.shapes import plan_conv_transpose

    piece = block[:chunk]
    same = first.tobytes() == engine.run_conv_transpose(plan_conv_transpose(piece.shape, w.shape), piece,
                                                        w).tobytes()
    walls = {k: v[0] for k, v in best.items()}
    slower = max(walls["compute_alone"], walls["io_alone"])
    cpu_bound = (best["compute_alone"][1] + best["io_alone"][1]) / 2  # both on two cores at once
    budget_mb = float(budget.rstrip("MmBb")) if budget[-1] in "Mm" else None
    result = {
        "format": fmt, "batch_per_chunk": chunk, "pieces": pieces, "baseline_rss_mb": round(base, 1),
        "seconds": {k: round(v, 2) for k, v in walls.items()},
        "compute_alone_seconds": {k: round(v[0], 2) for k, v in ways.items()},
        "cpu_seconds": {k: round(v[1], 2) for k, v in best.items()},
        "elements_per_s": {k: round(batch / v, 1) for k, v in walls.items()},
        "streamed_over_slower_bound": round(slower / walls["streamed"], 3),
        "target_met": slower / walls["streamed"] >= 0.9,
        "streamed_over_two_core_cpu_bound": round(max(slower, cpu_bound) / walls["streamed"], 3),
        "streamed_peak_rss_mb": round(rss, 1), "above_baseline_mb": round(rss - base, 1),
        "first_piece_bitwise_equal": bool(same),
    }
    if budget_mb:
        result["under_budget_plus_baseline"] = rss <= budget_mb + base
    return result


def io_load_first(folder, ref, chunk):
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        from convt_cli import io

        source = io.Source(io.parse_ref("INPUT", ref))
        try:
            return source.read(0, chunk)
        finally:
            source.close()
    finally:
        os.chdir(cwd)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--budget", default="512M")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--formats", default="npy,h5")
    parser.add_argument("--folder")
    parser.add_argument("--json")
    args = parser.parse_args()
    batch = int(args.gib * 1024)
    rng = np.random.default_rng(0)
    with scratch_folder(args.folder, "convt-stream-") as folder:
        w = (rng.standard_normal((3, 3, 64, 64)) / 24).astype(np.float32)
        np.save(os.path.join(folder, "w.npy"), w)
        block = rng.standard_normal((256, *PER)).astype(np.float32)
        results = {"blas": blas_info(), "input_gib": round(batch / 1024, 2), "budget": args.budget,
                   "formats": [measure(fmt, folder, batch, block, w, args.budget, args.repeat)
                               for fmt in args.formats.split(",")]}
        emit(results, args.json)


if __name__ == "__main__":
    main()
