"""Time convt against TensorFlow on the benchmark workloads, in one run, as ratios.

    python benchmarks/bench.py [--json results.json] [--repeat 11] [--only W1,W3] [--no-rss] [--before REV]

Per workload: convt's best time over --repeat runs and, when `tensorflow` is importable, TF's best on the same
arrays, the two alternating so that both see the same machine load; GFLOP/s; % of the same-run float32 matmul
rate (the practical ceiling: a 4096^3 GEMM); the ratio convt/TF; and the peak RSS of `convt run` on the same
arrays stored as .npy files (one subprocess per workload) above the interpreter's baseline (`convt shape` on the
same files, which reads headers only), against the arrays' bytes. With --before REV, the convt of that git revision
(its convt_cli package, imported under another name) is timed too, in the same alternation: "before ms" and
now/before. Then `convt --help` start-up against bare
`python -c "import numpy, click"`, and `convt verify` against `convt run` on W1 (in process).

If OPENBLAS_CORETYPE is set (it slows current OpenBLAS on some CPUs), the script re-executes itself without it
and OPENBLAS_L2_SIZE; it prints which BLAS kernel ran. TensorFlow is optional and never a convt dependency.
"""

import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

if os.environ.get("OPENBLAS_CORETYPE") and not os.environ.get("CONVT_BENCH_REEXEC"):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    env["CONVT_BENCH_REEXEC"] = "1"
    os.execve(sys.executable, [sys.executable, *sys.argv], env)

import numpy as np  # noqa: E402

import convt_cli  # noqa: E402
from convt_cli.shapes import plan_conv_transpose  # noqa: E402

# name: input shape, filters shape, strides, dilations, data_format, dtype, TF's time on the machine the
# issue was written on (ms; for reference only, never compared against)
WORKLOADS = {
    "W1": ((8, 32, 32, 256), (4, 4, 128, 256), 2, 1, "NHWC", "float32"),
    "W2": ((16, 128, 128, 3), (3, 3, 3, 3), 2, 1, "NHWC", "float32"),
    "W3": ((4, 16000, 64), (16, 32, 64), 8, 1, "NWC", "float32"),
    "W4": ((2, 16, 16, 16, 64), (3, 3, 3, 32, 64), 2, 1, "NDHWC", "float32"),
    "W5": ((8, 64, 64, 64), (3, 3, 64, 64), 1, 2, "NHWC", "float32"),
    "W6": ((4, 32, 32, 128), (4, 4, 64, 128), 2, 1, "NHWC", "float64"),
    "W7": ((8, 256, 32, 32), (4, 4, 128, 256), 2, 1, "NCHW", "float32"),
    "W8": ((8, 32, 32, 128), (4, 4, 64, 128), 2, 1, "NHWC", "float16"),
    "W8bf": ((8, 32, 32, 128), (4, 4, 64, 128), 2, 1, "NHWC", "bfloat16"),
    "W8f32": ((8, 32, 32, 128), (4, 4, 64, 128), 2, 1, "NHWC", "float32"),
}


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_rate(repeat):
    a = np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32)
    seconds = best_of(lambda: a @ a, repeat)
    return 2 * 4096**3 / seconds / 1e9


def blas_info():
    try:
        from threadpoolctl import threadpool_info

        return [{k: i.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                for i in threadpool_info() if i.get("user_api") == "blas"]
    except ImportError:
        return "threadpoolctl not installed; see numpy.show_config()"


def load_before(rev):
    """The convt_cli package of git revision `rev`, imported as convt_before (its imports are relative)."""
    import importlib
    import io
    import tarfile

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data = subprocess.run(["git", "-C", repo, "archive", rev, "convt_cli"], capture_output=True, check=True).stdout
    folder = tempfile.mkdtemp(prefix="convt-before-")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(folder, filter="data")
    os.rename(os.path.join(folder, "convt_cli"), os.path.join(folder, "convt_before"))
    sys.path.insert(0, folder)
    return importlib.import_module("convt_before")


def make_arrays(name):
    xs, ws, _, _, _, dtype = WORKLOADS[name]
    rng = np.random.default_rng(0)
    if dtype == "bfloat16":
        import ml_dtypes

        dt = ml_dtypes.bfloat16
    else:
        dt = np.dtype(dtype)
    return rng.standard_normal(xs).astype(dt), (rng.standard_normal(ws) / math.sqrt(math.prod(ws[:-2]))).astype(dt)


def tf_function(name, x, w):
    try:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf
    except ImportError:
        return None
    _, _, s, d, fmt, dtype = WORKLOADS[name]
    plan = plan_conv_transpose(x.shape, w.shape, None, s, "SAME", fmt, d)
    tx, tw = tf.constant(x), tf.constant(w)
    shape = list(plan.output_shape)

    def run():
        return tf.nn.conv_transpose(tx, tw, shape, s, "SAME", fmt, d).numpy()

    try:
        run()
    except Exception as e:  # TF's CPU kernels refuse some dtype/layout combinations
        print(f"  {name}: TF refused: {str(e).splitlines()[0][:100]}", file=sys.stderr)
        return None
    return run


def peak_rss_mb(args, cwd):
    """Peak RSS (MiB) of one command, measured from a small parent that only waits for it."""
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)")
    out = subprocess.run([sys.executable, "-c", probe, *args], cwd=cwd, capture_output=True, text=True, check=True)
    rss_kb, code = out.stdout.split()
    if code != "0":
        raise RuntimeError(f"{args} failed")
    return int(rss_kb) / 1024


def emit(result: dict, path: str | None) -> None:
    """Print a benchmark's result as JSON, and write it to `path` too when one is given."""
    print(json.dumps(result, indent=1))
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


@contextlib.contextmanager
def scratch_folder(given: str | None, prefix: str):
    """The folder a benchmark writes its arrays to: `given`, or a temporary one removed afterwards."""
    folder = given or tempfile.mkdtemp(prefix=prefix)
    try:
        yield folder
    finally:
        if not given:
            shutil.rmtree(folder, ignore_errors=True)


def convt_cmd():
    return [sys.executable, "-m", "convt_cli"]


def rss_row(name, x, w, folder):
    _, _, s, d, fmt, dtype = WORKLOADS[name]
    np.save(os.path.join(folder, "x.npy"), x)
    np.save(os.path.join(folder, "w.npy"), w)
    flags = ["--strides", str(s), "--dilations", str(d), "--data-format", fmt]
    base = peak_rss_mb(convt_cmd() + ["shape", "x.npy", "w.npy", *flags], folder)
    peak = peak_rss_mb(convt_cmd() + ["run", "x.npy", "w.npy", "-o", "y.npy", "--force", *flags], folder)
    out_bytes = os.path.getsize(os.path.join(folder, "y.npy"))
    data_mb = (x.nbytes + w.nbytes + out_bytes) / 2**20
    return {"rss_baseline_mb": round(base, 1), "rss_peak_mb": round(peak, 1),
            "rss_above_baseline_over_data": round((peak - base) / data_mb, 3), "data_mb": round(data_mb, 1)}


def startup(repeat):
    convt = best_of(lambda: subprocess.run(convt_cmd() + ["--help"], capture_output=True, check=True), repeat)
    bare = best_of(lambda: subprocess.run([sys.executable, "-c", "import numpy, click"], capture_output=True,
                                          check=True), repeat)
    return {"convt_help_s": round(convt, 4), "import_numpy_click_s": round(bare, 4), "ratio": round(convt / bare, 3)}


def verify_vs_run(repeat):
    from convt_cli.verify import verify_conv_transpose

    x, w = make_arrays("W1")
    y = convt_cli.conv_transpose(x, w, strides=2)
    run = best_of(lambda: convt_cli.conv_transpose(x, w, strides=2), repeat)
    ver = best_of(lambda: verify_conv_transpose(x, w, y, strides=2), repeat)
    return {"run_ms": round(run * 1e3, 2), "verify_ms": round(ver * 1e3, 2), "ratio": round(ver / run, 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--repeat", type=int, default=11)  # the machine is shared: more runs, steadier minima
    parser.add_argument("--only", help="comma-separated workload names")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--before", metavar="REV", help="also time the convt of this git revision")
    args = parser.parse_args()
    before = load_before(args.before) if args.before else None
    names = args.only.split(",") if args.only else list(WORKLOADS)

    results = {"convt_version": convt_cli.__version__, "numpy": np.__version__, "blas": blas_info(),
               "cpus": os.cpu_count(), "workloads": {}}
    rate = matmul_rate(args.repeat)
    results["matmul_gflops"] = round(rate, 1)
    print(f"float32 matmul rate (4096^3, same run): {rate:.0f} GFLOP/s; BLAS: {results['blas']}")
    header = f"{'':6} {'convt ms':>9} {'GFLOP/s':>8} {'%mm':>5} {'TF ms':>8} {'convt/TF':>9} {'RSS/data':>9}"
    if before:
        header += f" {'before ms':>10} {'now/before':>11}"
    print(header)
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            xs, ws, s, d, fmt, dtype = WORKLOADS[name]
            x, w = make_arrays(name)
            plan = plan_conv_transpose(x.shape, w.shape, None, s, "SAME", fmt, d)
            ours = lambda x=x, w=w, s=s, fmt=fmt, d=d: convt_cli.conv_transpose(x, w, None, s, "SAME", fmt, d)  # noqa: E731
            tf_run = tf_function(name, x, w)
            old = before and (lambda x=x, w=w, s=s, fmt=fmt, d=d: before.conv_transpose(x, w, None, s, "SAME", fmt, d))
            ours()
            if old:
                old()
            t_ours, t_tf, t_old = math.inf, math.inf, math.inf
            for _ in range(args.repeat):  # alternate, so that all see the same load
                t_ours = min(t_ours, best_of(ours, 1))
                if tf_run:
                    t_tf = min(t_tf, best_of(tf_run, 1))
                if old:
                    t_old = min(t_old, best_of(old, 1))
            row = {"input": list(xs), "filters": list(ws), "strides": s, "dilations": d, "data_format": fmt,
                   "dtype": dtype, "gflop": round(plan.flops / 1e9, 3), "convt_ms": round(t_ours * 1e3, 2),
                   "convt_gflops": round(plan.flops / t_ours / 1e9, 1),
                   "pct_matmul": round(100 * plan.flops / t_ours / 1e9 / rate, 1)}
            if tf_run:
                row.update(tf_ms=round(t_tf * 1e3, 2), ratio=round(t_ours / t_tf, 3))
            if old:
                row.update(before_ms=round(t_old * 1e3, 2), over_before=round(t_ours / t_old, 3))
            if not args.no_rss:
                row.update(rss_row(name, x, w, folder))
            results["workloads"][name] = row
            print(f"{name:6} {row['convt_ms']:9.1f} {row['convt_gflops']:8.1f} {row['pct_matmul']:5.0f} "
                  f"{row.get('tf_ms', float('nan')):8.1f} {row.get('ratio', float('nan')):9.2f} "
                  f"{row.get('rss_above_baseline_over_data', float('nan')):9.2f}"
                  + (f" {row['before_ms']:10.1f} {row['over_before']:11.2f}" if old else ""))
    ratios = [r["ratio"] for k, r in results["workloads"].items() if "ratio" in r and not k.endswith(("bf", "f32"))]
    if ratios:
        results["geomean_ratio"] = round(math.exp(sum(map(math.log, ratios)) / len(ratios)), 3)
        print(f"geometric mean convt/TF over {len(ratios)} workloads: {results['geomean_ratio']:.2f}")
    w8 = results["workloads"]
    if "W8f32" in w8:
        for half in ("W8", "W8bf"):
            if half in w8:
                w8[half]["over_float32"] = round(w8[half]["convt_ms"] / w8["W8f32"]["convt_ms"], 3)
                print(f"{half} / float32 of the same shapes: {w8[half]['over_float32']:.2f}")
    results["startup"] = startup(args.repeat)
    print(f"convt --help {results['startup']['convt_help_s'] * 1e3:.0f} ms vs import numpy, click "
          f"{results['startup']['import_numpy_click_s'] * 1e3:.0f} ms: {results['startup']['ratio']:.2f}x")
    results["verify_vs_run_W1"] = verify_vs_run(args.repeat)
    print(f"verify / run on W1: {results['verify_vs_run_W1']['ratio']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
