"""`convt verify` against `convt run` on the same files, in one run: wall time and peak memory.

    python benchmarks/verify_cost.py [--cases W1,decoder] [--repeat 3] [--max-memory none,24M,64M,256M,1G]
                                     [--json results.json]

Per case the input and filters are saved as .npy files in a temporary folder and `convt run` writes the output
there once. Then, under each --max-memory and alternating so that both see the same machine load, `convt run`
(to another file) and `convt verify` of that output run as subprocesses with the default threads: the best wall
time of --repeat runs each, and the largest peak RSS (os.wait4). RSS is counted above the interpreter's baseline,
`convt shape` on the same files (headers only), as benchmarks/bench.py counts it for `run`, each command
measured from a small parent process that only waits for it. The bars of the issue:
verify/run time at most 1.0, and verify's RSS above the baseline at most 1.1 x run's.

Then the same in memory: conv_transpose against verify_conv_transpose on the same arrays (the API, no files and
no start-up), alternating, best of --repeat.

Cases: W1 of benchmarks/bench.py (8x32x32x256 -> 128 channels, 4x4 filters, stride 2) and `decoder`
(256x64x64x32 -> 32 channels, 4x4 filters, stride 2: a 512 MiB float32 output).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (re-executes without OPENBLAS_CORETYPE if set, and reports the BLAS kernel)
import numpy as np  # noqa: E402

CASES = {
    "W1": ((8, 32, 32, 256), (4, 4, 128, 256), 2),
    "decoder": ((256, 64, 64, 32), (4, 4, 32, 32), 2),
}
CONVT = [sys.executable, "-m", "convt_cli"]


class Refused(Exception):
    pass


def measure(args) -> tuple[float, int]:
    """(wall seconds, peak RSS in bytes) of one convt command, run from a small parent that only waits for it (a
    child forked from this process would start with this process's RSS as its peak). Refused: exit code 2."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True); "
             "t = time.perf_counter() - t; "
             "print(t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode, r.stderr.strip())")
    out = subprocess.run([sys.executable, "-c", probe, *CONVT, *args], capture_output=True, text=True, check=True)
    wall, rss_kb, code, *err = out.stdout.split(maxsplit=3)
    if code == "2":
        raise Refused(" ".join(err))
    if code != "0":
        raise SystemExit(f"convt {' '.join(args)} failed ({code}): {' '.join(err)}")
    return float(wall), int(rss_kb) * 1024


def run_case(name, folder, limits, repeat):
    x_shape, w_shape, stride = CASES[name]
    rng = np.random.default_rng(0)
    x, w = (os.path.join(folder, f"{name}_{part}.npy") for part in ("x", "w"))
    y, y2 = (os.path.join(folder, f"{name}_{part}.npy") for part in ("y", "y2"))
    np.save(x, rng.standard_normal(x_shape, dtype=np.float32))
    np.save(w, (rng.standard_normal(w_shape) / 8).astype(np.float32))
    flags = ["--strides", str(stride)]
    measure(["run", x, w, "-o", y, "--force", *flags])
    base = max(measure(["shape", x, w, *flags])[1] for _ in range(repeat))
    rows = []
    for limit in limits:
        memory = [] if limit == "none" else ["--max-memory", limit]
        run_t, run_m, ver_t, ver_m = [], [], [], []
        try:
            measure(["run", x, w, "-o", y2, "--force", *flags, *memory])
        except Refused as e:
            print(f"{name:8} --max-memory {limit:5}  run refuses: {e}", flush=True)
            continue
        for _ in range(repeat):
            t, m = measure(["run", x, w, "-o", y2, "--force", *flags, *memory])
            run_t.append(t)
            run_m.append(m)
            t, m = measure(["verify", x, w, y, *flags, *memory])
            ver_t.append(t)
            ver_m.append(m)
        row = {"case": name, "max_memory": limit, "run_s": round(min(run_t), 3), "verify_s": round(min(ver_t), 3),
               "time_ratio": round(min(ver_t) / min(run_t), 3), "baseline_mb": round(base / 2**20, 1),
               "run_mb_above": round((max(run_m) - base) / 2**20, 1),
               "verify_mb_above": round((max(ver_m) - base) / 2**20, 1)}
        row["memory_ratio"] = round(row["verify_mb_above"] / max(row["run_mb_above"], 0.1), 3)
        rows.append(row)
        print(f"{name:8} --max-memory {limit:5}  run {row['run_s']:.2f} s  verify {row['verify_s']:.2f} s  "
              f"(x{row['time_ratio']:.2f})   above the baseline ({row['baseline_mb']} MB): run "
              f"{row['run_mb_above']} MB, verify {row['verify_mb_above']} MB (x{row['memory_ratio']:.2f})",
              flush=True)
    return rows


def in_memory(name, repeat):
    from convt_cli import conv_transpose
    from convt_cli.verify import verify_conv_transpose

    x_shape, w_shape, stride = CASES[name]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape, dtype=np.float32)
    w = (rng.standard_normal(w_shape) / 8).astype(np.float32)
    y = conv_transpose(x, w, strides=stride)
    run_t, ver_t = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        conv_transpose(x, w, strides=stride)
        run_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        report = verify_conv_transpose(x, w, y, strides=stride)
        ver_t.append(time.perf_counter() - start)
        assert report.passed, report.summary()
    row = {"case": name, "in_memory": True, "run_s": round(min(run_t), 3), "verify_s": round(min(ver_t), 3),
           "time_ratio": round(min(ver_t) / min(run_t), 3)}
    print(f"{name:8} in memory           run {row['run_s']:.2f} s  verify {row['verify_s']:.2f} s  "
          f"(x{row['time_ratio']:.2f})", flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="W1,decoder")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-memory", default="none,24M,64M,256M,1G")
    parser.add_argument("--json")
    args = parser.parse_args()
    print(f"BLAS: {bench.blas_info()}; threads: default ({os.cpu_count()} cores seen)")
    results = {"blas": bench.blas_info(), "rows": []}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.cases.split(","):
            results["rows"] += run_case(name, folder, args.max_memory.split(","), args.repeat)
    for name in args.cases.split(","):
        results["rows"].append(in_memory(name, args.repeat))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
