"""--groups against the same filters written out block-diagonal (what a user without --groups runs), as same-run
ratios.

    python benchmarks/groups.py [--repeat 5] [--json groups.json]

Per case and G: the best time over --repeat runs of conv_transpose(x, w, groups=G) and of conv_transpose(x, W)
with W the block-diagonal (*k, C, C) filters that hold w's groups, alternating; their ratio; and 1/G, the ratio
of multiply-adds (plan.flops). Both outputs are compared (they must agree to float32 rounding). Cases:
- compute-bound: 2 x 16x16 x 1024 channels, 3x3, stride 1; 4 x 16x16 x 512, 4x4, stride 2;
- memory-bound: 8 x 32x32 x 256, 4x4, stride 2 (a decoder block) and 4 x 64x64 x 128, 3x3, stride 1;
with G = 2, 4, 8, 32 and C (depthwise).

If OPENBLAS_CORETYPE is set (it slows current OpenBLAS on some CPUs), the script re-executes itself without it and
OPENBLAS_L2_SIZE; it prints which BLAS kernel ran.
"""

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import blas_info  # noqa: E402  (bench re-executes this script without OPENBLAS_CORETYPE)

import numpy as np  # noqa: E402

from convt_cli import conv_transpose  # noqa: E402
from convt_cli.shapes import plan_conv_transpose  # noqa: E402

CASES = [  # (name, batch, size, channels, kernel, stride)
    ("compute-bound 1024ch 3x3 s1", 2, 16, 1024, 3, 1),
    ("compute-bound 512ch 4x4 s2", 4, 16, 512, 4, 2),
    ("decoder 256ch 4x4 s2", 8, 32, 256, 4, 2),
    ("memory-bound 128ch 3x3 s1", 4, 64, 128, 3, 1),
]


def block_diagonal(w: np.ndarray, groups: int) -> np.ndarray:
    """(*k, C/G, C) grouped filters -> (*k, C, C) with group g's block on the diagonal, zeros elsewhere."""
    *k, co, c = w.shape
    ci = c // groups
    full = np.zeros((*k, co * groups, c), w.dtype)
    for g in range(groups):
        full[..., g * co:(g + 1) * co, g * ci:(g + 1) * ci] = w[..., g * ci:(g + 1) * ci]
    return full


def measure(repeat: int) -> list:
    rng = np.random.default_rng(0)
    rows = []
    for name, n, size, c, k, s in CASES:
        x = rng.standard_normal((n, size, size, c)).astype(np.float32)
        for g in (2, 4, 8, 32, c):
            w = rng.standard_normal((k, k, c // g, c)).astype(np.float32)
            full = block_diagonal(w, g)
            best = {"groups": math.inf, "block_diagonal": math.inf}
            for _ in range(repeat):
                for key, fn in (("groups", lambda: conv_transpose(x, w, strides=s, groups=g)),
                                ("block_diagonal", lambda: conv_transpose(x, full, strides=s))):
                    start = time.perf_counter()
                    y = fn()
                    best[key] = min(best[key], time.perf_counter() - start)
                    if key == "groups":
                        grouped = y
            np.testing.assert_allclose(grouped, y, rtol=1e-4, atol=1e-3)
            plan = plan_conv_transpose(x.shape, w.shape, None, s, groups=g)
            full_plan = plan_conv_transpose(x.shape, full.shape, None, s)
            row = dict(case=name, groups=g, seconds_groups=round(best["groups"], 4),
                       seconds_block_diagonal=round(best["block_diagonal"], 4),
                       time_ratio=round(best["groups"] / best["block_diagonal"], 3),
                       flops_ratio=round(plan.flops / full_plan.flops, 4))
            rows.append(row)
            print(f"{name:30s} G={g:5d}  groups {row['seconds_groups']:.4f} s  block-diagonal "
                  f"{row['seconds_block_diagonal']:.4f} s  time ratio {row['time_ratio']:.3f}  "
                  f"(multiply-adds {row['flops_ratio']:.4f})", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    print(f"BLAS: {blas_info()}")
    rows = measure(args.repeat)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"blas": blas_info(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
