"""Are two commits' outputs bitwise identical? A random sweep of legal configurations over every strategy and dtype.

    python benchmarks/compare_commits.py OLD NEW [--count 2000] [--seed 1]

Each commit is checked out into a temporary folder (git worktree) and runs the same configurations in a process of
its own: every strategy its engine has (forced), its own choice, and the forward `conv`, on the arrays drawn here
(the sweep's configurations do not depend on either commit's code), plus the TF goldens of tests/golden. The sha256
of each output's bytes is compared; a commit whose engine takes `threads=` runs its own choice with 1 and with 2
threads, both compared with the other commit's. Prints the counts and the first differences; exit 1 if any output
differs (the forward conv's are listed apart: a change to it may be intended).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r'''
import hashlib, inspect, json, sys, glob
import numpy as np
sys.path.insert(0, sys.argv[1])
from convt_cli import engine
from convt_cli.shapes import plan_conv_transpose
import ml_dtypes

count, seed = int(sys.argv[2]), int(sys.argv[3])
DTYPES = ["float16", "bfloat16", "float32", "float64", "int32", "complex64", "complex128"]
takes_threads = "threads" in inspect.signature(engine.run_conv_transpose).parameters


def digest(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() + str(a.shape) + a.dtype.name


def draw(rng, dtype, shape):
    if dtype == "int32":
        return rng.integers(-50, 50, size=shape).astype(np.int32)
    if dtype.startswith("complex"):
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    a = rng.standard_normal(shape)
    return a.astype(ml_dtypes.bfloat16) if dtype == "bfloat16" else a.astype(dtype)


def config(i):
    rng = np.random.default_rng([seed, i])
    big = rng.random() < 0.08  # large enough for many blocks, threads and Winograd's own paths
    n = int(rng.integers(1, 4)) if not big else int(rng.integers(2, 4))
    first = bool(rng.random() < 0.35)
    dtype = DTYPES[int(rng.integers(len(DTYPES)))]
    top = (24 if n == 2 else 10) if big else 9
    spatial = [int(rng.integers(1, top + 1)) for _ in range(n)]
    kernel = [int(rng.integers(1, 6)) for _ in range(n)]
    strides = [int(rng.integers(1, 4)) for _ in range(n)]
    dilations = [int(rng.integers(1, 3)) if rng.random() < 0.3 else 1 for _ in range(n)]
    batch = int(rng.integers(1, 4))
    c_in = int(rng.integers(1, 48 if big else 20))
    c_out = int(rng.integers(1, 40 if big else 12))
    choice = rng.random()
    padding = "SAME" if choice < 0.4 else "VALID" if choice < 0.75 else \
        [(int(rng.integers(0, 3)), int(rng.integers(0, 3))) for _ in range(n)]
    if first:
        x_shape = (batch, c_in, *spatial)
        fmt = "channels_first"
    else:
        x_shape = (batch, *spatial, c_in)
        fmt = "channels_last"
    w_shape = (*kernel, c_out, c_in)
    try:
        plan = plan_conv_transpose(x_shape, w_shape, None, strides, padding, fmt, dilations)
    except Exception:
        return None
    if rng.random() < 0.4:  # another legal output size
        sizes = [int(rng.integers(lo, hi + 1)) for lo, hi in plan.legal_ranges]
        try:
            plan = plan_conv_transpose(x_shape, w_shape, sizes, strides, padding, fmt, dilations)
        except Exception:
            return None
    x, w = draw(rng, dtype, x_shape), draw(rng, dtype, w_shape)
    if dtype in ("float32", "float64") and rng.random() < 0.05:  # non-finite numbers take their own paths
        x.reshape(-1)[int(rng.integers(x.size))] = np.inf if rng.random() < 0.5 else np.nan
    return plan, x, w, dict(strides=strides, padding=padding, data_format=fmt, dilations=dilations)


out = {}
for i in range(count):
    made = config(i)
    if made is None:
        continue
    plan, x, w, flags = made
    with np.errstate(all="ignore"):
        for s in engine.STRATEGIES:
            try:
                out[f"{i}/{s}"] = digest(engine.run_conv_transpose(plan, x, w, strategy=s))
            except Exception as e:
                out[f"{i}/{s}"] = "error " + type(e).__name__ + " " + str(e)
        threads = [None, 1, 2] if takes_threads else [None]
        for t in threads:
            try:
                y = engine.run_conv_transpose(plan, x, w, threads=t) if t else engine.run_conv_transpose(plan, x, w)
                out[f"{i}/chosen"] = out.get(f"{i}/chosen") or digest(y)
                if digest(y) != out[f"{i}/chosen"]:
                    out[f"{i}/chosen/threads={t}"] = digest(y)
            except Exception as e:
                out[f"{i}/chosen"] = "error " + type(e).__name__ + " " + str(e)
        try:
            y = engine.run_conv_transpose(plan, x, w)
            z = engine.conv(y, w, **flags)
            out[f"{i}/conv"] = digest(z)
        except Exception as e:
            out[f"{i}/conv"] = "error " + type(e).__name__ + " " + str(e)
for path in sorted(glob.glob(sys.argv[4] + "/*.npz")):
    with np.load(path, allow_pickle=False) as g:
        params = json.loads(str(g["params"]))
        a = {key: g[key] for key in ("input", "filters")}
    if params["dtype"] == "bfloat16":
        a = {key: v.astype(ml_dtypes.bfloat16) for key, v in a.items()}
    name = path.rsplit("/", 1)[-1]
    flags = dict(strides=params["strides"], padding=params["padding"], data_format=params["data_format"],
                 dilations=params["dilations"])
    if params["op"] != "conv_transpose":
        out[f"golden/{name}/conv"] = digest(engine.conv(a["input"], a["filters"], **flags))
        continue
    plan = plan_conv_transpose(a["input"].shape, a["filters"].shape, params["output_shape"], **flags)
    for s in engine.STRATEGIES:
        out[f"golden/{name}/{s}"] = digest(engine.run_conv_transpose(plan, a["input"], a["filters"], strategy=s))
json.dump(out, sys.stdout)
'''


def outputs(repo: str, commit: str, count: int, seed: int, golden: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tree = os.path.join(tmp, "tree")
        subprocess.run(["git", "-C", repo, "worktree", "add", "--detach", "--quiet", tree, commit], check=True)
        try:
            done = subprocess.run([sys.executable, "-c", CHILD, tree, str(count), str(seed), golden],
                                  capture_output=True, text=True, cwd=tmp)
            if done.returncode:
                sys.exit(f"{commit}: the sweep failed:\n{done.stderr[-3000:]}")
            return json.loads(done.stdout)
        finally:
            subprocess.run(["git", "-C", repo, "worktree", "remove", "--force", tree], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    repo = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)),
                          check=True).stdout.strip()
    golden = os.path.join(repo, "tests", "golden")  # the same arrays for both commits
    old = outputs(repo, args.old, args.count, args.seed, golden)
    new = outputs(repo, args.new, args.count, args.seed, golden)
    extra = sorted(k for k in new if "threads=" in k)  # a thread count that changed a bit: always a difference
    common = sorted(set(old) & set(new))
    differ = [k for k in common if old[k] != new[k]]
    conv = [k for k in differ if k.endswith("/conv")]
    engine = [k for k in differ if not k.endswith("/conv")] + extra
    configs = len({k.split("/")[0] for k in common if not k.startswith("golden/")})
    print(f"{configs} configurations, {len(common)} outputs compared ({len(set(old) ^ set(new))} only in one "
          f"commit): {len(common) - len(differ)} identical, {len(engine)} conv_transpose outputs differ, "
          f"{len(conv)} conv outputs differ")
    for k in (engine + conv)[:20]:
        print(f"  {k}: {old.get(k, '-')[:16]} vs {new.get(k, '-')[:16]}")
    return 1 if engine or conv else 0


if __name__ == "__main__":
    sys.exit(main())
