"""Where convt's time goes on the benchmark workloads: inside BLAS GEMMs, or in the rest (copies, adds, casts).

    python benchmarks/profile.py [--only W4,W5] [--repeat 7] [--json profile.json]

Per workload, on one thread (threads=1, so that times add up): the best total time of the chosen
strategy, the time inside its np.matmul calls and their rate (GFLOP/s of the products they make, padding
included), and the rest. Then the best time on all threads, and the GEMM floor there: the GEMMs' one-thread
time divided by the threads, the least any reordering of the same GEMMs could take. Also the same-run float32
matmul rate (4096^3). np.matmul is wrapped for the measurement only, in this process.
"""

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (re-executes without OPENBLAS_CORETYPE if set, like bench.py)
import numpy as np  # noqa: E402

from convt_cli import engine  # noqa: E402
from convt_cli.engine import runtime  # noqa: E402
from convt_cli.shapes import plan_conv_transpose  # noqa: E402

_real_matmul = np.matmul
_gemm = {"seconds": 0.0, "flops": 0}


def _timed_matmul(a, b, *args, **kwargs):
    start = time.perf_counter()
    result = _real_matmul(a, b, *args, **kwargs)
    _gemm["seconds"] += time.perf_counter() - start
    k = a.shape[-1]
    _gemm["flops"] += 2 * k * math.prod(result.shape)
    return result


def profile(name, repeat):
    _, _, s, d, fmt, _ = bench.WORKLOADS[name]
    x, w = bench.make_arrays(name)
    plan = plan_conv_transpose(x.shape, w.shape, None, s, "SAME", fmt, d)

    def run(threads=None):
        return engine.run_conv_transpose(plan, x, w, threads=threads)

    threads = runtime.resolve_threads(None)
    np.matmul = _timed_matmul
    try:
        run(1)
        best = None
        for _ in range(repeat):
            _gemm.update(seconds=0.0, flops=0)
            start = time.perf_counter()
            run(1)
            total = time.perf_counter() - start
            if best is None or total < best[0]:
                best = (total, _gemm["seconds"], _gemm["flops"])
    finally:
        np.matmul = _real_matmul
    run()
    wall = bench.best_of(run, repeat)
    total, in_gemm, flops = best
    return {"strategy": engine.choose_strategy(plan), "one_thread_ms": round(total * 1e3, 2),
            "gemm_ms": round(in_gemm * 1e3, 2), "gemm_gflops": round(flops / in_gemm / 1e9, 1),
            "rest_ms": round((total - in_gemm) * 1e3, 2), "threads": threads, "all_threads_ms": round(wall * 1e3, 2),
            "gemm_floor_ms": round(in_gemm / threads * 1e3, 2), "direct_gflop": round(plan.flops / 1e9, 3),
            "gemm_gflop": round(flops / 1e9, 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated workload names")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(bench.WORKLOADS)
    results = {"blas": bench.blas_info(), "matmul_gflops": round(bench.matmul_rate(args.repeat), 1), "workloads": {}}
    print(f"float32 matmul rate (4096^3, same run): {results['matmul_gflops']:.0f} GFLOP/s; BLAS: {results['blas']}")
    print(f"{'':6} {'strategy':9} {'1 thread':>9} {'in GEMM':>8} {'GFLOP/s':>8} {'rest':>7} "
          f"{'all threads':>12} {'GEMM floor':>11}")
    for name in names:
        row = results["workloads"][name] = profile(name, args.repeat)
        print(f"{name:6} {row['strategy']:9} {row['one_thread_ms']:9.1f} {row['gemm_ms']:8.1f} "
              f"{row['gemm_gflops']:8.1f} {row['rest_ms']:7.1f} {row['all_threads_ms']:12.1f} "
              f"{row['gemm_floor_ms']:11.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
