"""One volume larger than the memory budget: `convt run` in spatial tiles against the same volume in memory.

    python benchmarks/volume.py [--size 256] [--budget 256M] [--folder DIR] [--json results.json]

Writes DIR/vol.npy, 1 x SIZE^3 x 16 float32 (1 GiB at 256), and 3x3x3 filters, 16 -> 16 channels; the output at
stride 2 is 8x the input. Then, one subprocess each:
- tiled: `convt run vol.npy w.npy --strides 2 -o out.npy --max-memory BUDGET --json` (one batch element, so it
  runs in spatial tiles: `tile_shape` in its summary), its peak RSS above the interpreter's baseline (`convt shape`
  on the same files) against the budget, and its wall_seconds;
- in memory: the same volume loaded whole and computed by `convt_cli.conv_transpose`, timed inside the process
  (loading excluded), and the result saved for the comparison.
Reports throughput (output values per second) of both and their ratio, and the largest difference between the two
outputs relative to the largest output value (tiles choose their own strategy, so the bits may differ).
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import blas_info, convt_cmd, emit, peak_rss_mb, scratch_folder  # noqa: E402

IN_MEMORY = """
import json, time, numpy as np
from convt_cli import conv_transpose
x, w = np.load("vol.npy"), np.load("w.npy")
start = time.perf_counter()
y = conv_transpose(x, w, strides=2)
seconds = time.perf_counter() - start
np.save("whole.npy", y)
print(json.dumps({"seconds": seconds}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--budget", default="256M")
    parser.add_argument("--folder")
    parser.add_argument("--json")
    args = parser.parse_args()
    n, c = args.size, 16
    rng = np.random.default_rng(0)
    with scratch_folder(args.folder, "convt-volume-") as folder:
        x = np.lib.format.open_memmap(os.path.join(folder, "vol.npy"), "w+", np.float32, (1, n, n, n, c))
        for z in range(0, n, 16):
            x[0, z:z + 16] = rng.standard_normal((min(16, n - z), n, n, c), dtype=np.float32)
        x.flush()
        del x
        np.save(os.path.join(folder, "w.npy"), (rng.standard_normal((3, 3, 3, c, c)) / 20).astype(np.float32))
        base = peak_rss_mb(convt_cmd() + ["shape", "vol.npy", "w.npy", "--strides", "2"], folder)
        tiled_cmd = convt_cmd() + ["run", "vol.npy", "w.npy", "--strides", "2", "-o", "out.npy", "--force", "--quiet",
                                   "--max-memory", args.budget, "--json"]
        out = subprocess.run(tiled_cmd, cwd=folder, capture_output=True, text=True, check=True)
        tiled = json.loads(out.stdout)
        rss = peak_rss_mb(tiled_cmd, folder)
        whole = json.loads(subprocess.run([sys.executable, "-c", IN_MEMORY], cwd=folder, capture_output=True,
                                          text=True, check=True).stdout)
        a = np.load(os.path.join(folder, "out.npy"), mmap_mode="r")
        b = np.load(os.path.join(folder, "whole.npy"), mmap_mode="r")
        top, diff = 0.0, 0.0
        for z in range(0, a.shape[1], 32):  # a slab at a time: the outputs are larger than the budget too
            sa, sb = np.asarray(a[0, z:z + 32], np.float64), np.asarray(b[0, z:z + 32], np.float64)
            top, diff = max(top, float(np.abs(sb).max())), max(diff, float(np.abs(sa - sb).max()))
        values = int(np.prod(a.shape))
        budget_mb = float(args.budget.rstrip("MmBb")) if args.budget[-1] in "Mm" else None
        result = {
            "blas": blas_info(), "volume": [1, n, n, n, c], "output": list(a.shape), "budget": args.budget,
            "tile_shape": tiled["tile_shape"], "tiles": tiled["pieces"],
            "tiled": {"wall_seconds": tiled["wall_seconds"], "compute_seconds": tiled["seconds"],
                      "output_values_per_s": round(values / tiled["wall_seconds"]),
                      "peak_rss_mb": round(rss, 1), "above_baseline_mb": round(rss - base, 1)},
            "in_memory": {"compute_seconds": round(whole["seconds"], 3),
                          "output_values_per_s": round(values / whole["seconds"])},
            "tiled_over_in_memory_throughput": round(whole["seconds"] / tiled["wall_seconds"], 3),
            "baseline_rss_mb": round(base, 1),
            "max_difference_over_max_output": diff / top if top else 0.0,
        }
        if budget_mb:
            result["under_budget_plus_baseline"] = rss <= budget_mb + base
        emit(result, args.json)


if __name__ == "__main__":
    main()
