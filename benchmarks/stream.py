"""Stream a 4 GiB HDF5 input through `convt run --max-memory 512M`: peak RSS and throughput.

    python benchmarks/stream.py [--gib 4] [--budget 512M] [--folder DIR] [--json results.json]

Writes DIR/big.h5:/x (float32, batch x 64x64x64, 1 MiB per batch element; DIR defaults to a temporary folder
beside the repository's benchmarks, removed afterwards), then, one subprocess each:
- `convt run big.h5:/x w.npy -o out.h5:/y --max-memory BUDGET` (streamed over the batch axis);
- `convt run slice.npy w.npy -o slice_out.npy` on the first 256 elements held in memory;
and reports each one's peak RSS (above the interpreter's baseline, `convt shape` on the same files) and its
throughput in batch elements per second. The aim: the streamed peak under the budget plus the baseline, and the
streamed throughput at 90% or more of the in-memory one.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import h5py
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import blas_info, convt_cmd, peak_rss_mb  # noqa: E402

PER = (64, 64, 64)  # one batch element: 1 MiB of float32


def timed_rss(args, cwd):
    start = time.perf_counter()
    rss = peak_rss_mb(args, cwd)
    return time.perf_counter() - start, rss


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=4.0)
    parser.add_argument("--budget", default="512M")
    parser.add_argument("--folder")
    parser.add_argument("--json")
    args = parser.parse_args()
    folder = args.folder or tempfile.mkdtemp(prefix="convt-stream-")
    batch = int(args.gib * 1024)
    rng = np.random.default_rng(0)
    try:
        w = (rng.standard_normal((3, 3, 64, 64)) / 24).astype(np.float32)
        np.save(os.path.join(folder, "w.npy"), w)
        block = rng.standard_normal((256, *PER)).astype(np.float32)
        with h5py.File(os.path.join(folder, "big.h5"), "w") as f:
            d = f.create_dataset("x", shape=(batch, *PER), dtype=np.float32, chunks=(1, *PER))
            for b0 in range(0, batch, 256):
                d[b0:b0 + 256] = block[: min(256, batch - b0)]
        np.save(os.path.join(folder, "slice.npy"), block)
        flags = ["w.npy", "--force", "--quiet"]
        base = peak_rss_mb(convt_cmd() + ["shape", "big.h5:/x", "w.npy"], folder)
        t_stream, rss_stream = timed_rss(convt_cmd() + ["run", "big.h5:/x", *flags, "-o", "out.h5:/y",
                                                        "--max-memory", args.budget], folder)
        t_slice, rss_slice = timed_rss(convt_cmd() + ["run", "slice.npy", *flags, "-o", "slice_out.npy"], folder)
        with h5py.File(os.path.join(folder, "out.h5")) as f:
            same = np.array_equal(f["y"][:256], np.load(os.path.join(folder, "slice_out.npy")))
        budget_mb = float(args.budget.rstrip("MmBb")) if args.budget[-1] in "Mm" else None
        result = {
            "blas": blas_info(), "input_gib": round(batch / 1024, 2), "budget": args.budget,
            "baseline_rss_mb": round(base, 1),
            "streamed": {"seconds": round(t_stream, 2), "elements_per_s": round(batch / t_stream, 1),
                         "peak_rss_mb": round(rss_stream, 1), "above_baseline_mb": round(rss_stream - base, 1)},
            "in_memory_slice": {"elements": 256, "seconds": round(t_slice, 2),
                                "elements_per_s": round(256 / t_slice, 1), "peak_rss_mb": round(rss_slice, 1)},
            "throughput_ratio": round((batch / t_stream) / (256 / t_slice), 3),
            "first_256_bitwise_equal": bool(same),
        }
        if budget_mb:
            result["streamed"]["under_budget_plus_baseline"] = rss_stream <= budget_mb + base
        print(json.dumps(result, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    finally:
        if not args.folder:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
