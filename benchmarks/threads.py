"""Scaling with --threads, one image on all threads, and weights prepared once per run, as same-run ratios.

    python benchmarks/threads.py [--repeat 9] [--json threads.json]

- Scaling: W1 and W4 (see bench.py) with threads=1 and threads=2 (and every usable core when there are more),
  with their whole batch and with a batch of one image (whose blocks must still spread over all threads): best
  time over --repeat runs, the threads alternating so that all see the same machine load, and the speed-up.
- Prepared once: `convt run` works in pieces of about 8 MiB; the weights (Winograd's transform included) are now
  prepared once per run (engine.prepare) instead of once per piece (engine.run_conv_transpose). Per workload, the
  time of one piece both ways, the time to the first result (prepare + one piece), and a whole run of 8 pieces.

If OPENBLAS_CORETYPE is set (it slows current OpenBLAS on some CPUs), the script re-executes itself without it and
OPENBLAS_L2_SIZE; it prints which BLAS kernel ran.
"""

import argparse
import json
import math
import os
import sys
import time

if os.environ.get("OPENBLAS_CORETYPE") and not os.environ.get("CONVT_BENCH_REEXEC"):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    env["CONVT_BENCH_REEXEC"] = "1"
    os.execve(sys.executable, [sys.executable, *sys.argv], env)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import WORKLOADS, make_arrays  # noqa: E402

from convt_cli import engine  # noqa: E402
from convt_cli.engine import runtime  # noqa: E402
from convt_cli.shapes import plan_conv_transpose  # noqa: E402

PIECE_BYTES = 8 << 20  # what `convt run` holds of input and output per piece


def best_alternating(fns: dict, repeat: int) -> dict:
    best = {k: math.inf for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - start)
    return best


def blas_kernel() -> str:
    from threadpoolctl import threadpool_info

    return ", ".join(f"{lib['internal_api']} {lib['version']} {lib.get('architecture')}"
                     for lib in threadpool_info() if lib["user_api"] == "blas")


def scaling(name: str, repeat: int) -> list:
    x, w, plan = _arrays(name)
    counts = sorted({1, 2, runtime.usable_cores()})
    rows = []
    for label, xs in (("batch", x), ("one image", x[:1])):
        p = plan_conv_transpose(xs.shape, w.shape, None, plan.spec.strides, "SAME", plan.spec.data_format,
                                plan.spec.dilations)
        prepared = engine.prepare(p, w)
        best = best_alternating({t: (lambda t=t: prepared.run(xs, threads=t)) for t in counts}, repeat)
        rows.append(dict(workload=name, batch=label, images=len(xs), strategy=prepared.strategy,
                         ms={t: round(v * 1e3, 2) for t, v in best.items()},
                         speedup={t: round(best[1] / v, 2) for t, v in best.items()}))
    return rows


def prepared_once(name: str, repeat: int) -> dict:
    x, w, plan = _arrays(name)
    per_image = x[0].nbytes + math.prod(plan.output_shape[1:]) * x.dtype.itemsize
    piece = max(1, min(len(x), PIECE_BYTES // per_image))
    xs = np.concatenate([x] * -(-8 * piece // len(x)))[:8 * piece]  # a run of 8 pieces
    p = plan_conv_transpose(xs.shape, w.shape, None, plan.spec.strides, "SAME", plan.spec.data_format,
                            plan.spec.dilations)
    pieces = [xs[b:b + piece] for b in range(0, len(xs), piece)]

    def per_piece():
        for chunk in pieces:
            engine.run_conv_transpose(p, chunk, w)

    def once():
        prepared = engine.prepare(p, w)
        for chunk in pieces:
            prepared.run(chunk)

    def first_old():
        engine.run_conv_transpose(p, pieces[0], w)

    def first_new():
        engine.prepare(p, w).run(pieces[0])

    t = best_alternating(dict(per_piece=per_piece, once=once, first_old=first_old, first_new=first_new), repeat)
    prep = best_alternating(dict(prepare=lambda: engine.prepare(p, w)), repeat)["prepare"]
    return dict(workload=name, strategy=engine.prepare(p, w).strategy, images_per_piece=piece,
                prepare_ms=round(prep * 1e3, 2), first_result_ms=round(t["first_new"] * 1e3, 2),
                first_result_before_ms=round(t["first_old"] * 1e3, 2),
                run_8_pieces_ms=round(t["once"] * 1e3, 2), run_8_pieces_before_ms=round(t["per_piece"] * 1e3, 2),
                ratio=round(t["once"] / t["per_piece"], 3))


def _arrays(name):
    _, _, strides, dilations, fmt, _ = WORKLOADS[name]
    x, w = make_arrays(name)
    plan = plan_conv_transpose(x.shape, w.shape, None, strides, "SAME", fmt, dilations)
    return x, w, plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--json")
    args = parser.parse_args()
    print(f"BLAS: {blas_kernel()}; usable cores: {runtime.usable_cores()}")
    results = dict(scaling=[], prepared=[])
    for name in ("W1", "W4"):
        for row in scaling(name, args.repeat):
            results["scaling"].append(row)
            times = ", ".join(f"{t} thread{'s' if t > 1 else ''} {ms} ms (x{row['speedup'][t]})"
                              for t, ms in row["ms"].items())
            print(f"{name} {row['batch']} ({row['images']} images, {row['strategy']}): {times}")
    for name in ("W1", "W4", "W7", "W8f32"):
        r = prepared_once(name, args.repeat)
        results["prepared"].append(r)
        print(f"{name} ({r['strategy']}, {r['images_per_piece']} images a piece): prepare {r['prepare_ms']} ms; "
              f"first result {r['first_result_ms']} ms (per piece before: {r['first_result_before_ms']} ms); "
              f"8 pieces {r['run_8_pieces_ms']} ms vs {r['run_8_pieces_before_ms']} ms preparing per piece "
              f"({r['ratio']}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
