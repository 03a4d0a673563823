"""Record which output_shape TensorFlow accepts for conv_transpose with zero-size arrays.

Writes tests/golden/zero_size_cases.json: {"source": ..., "cases": [...]}, one case per line, each a list

    [input_shape, filters_shape, output_shape, strides, padding, verdict, axis]

in channels-last layout (TF's CPU kernels refuse NC* layouts and dilations for an empty input in every dtype:
they skip oneDNN then), dilation 1. `padding` is "SAME", "VALID" or N [lo, hi] pairs (2-D only: TF takes a
padding list only there). `verdict` is "zeros" (TF returned an array of output_shape, all zeros), "empty"
(returned an array of output_shape with no elements), or the kind of TF's refusal:

    "size"      Size of out_backprop doesn't match computed (the forward size of O is not I)
    "negative"  Computed output size would be negative
    "batch"     input and out_backprop must have the same batch size
    "channels"  input depth must be evenly divisible by filter depth (output_shape's channels)
    "depth"     filter depth must be strictly greated than zero [sic] (filters.shape[-2] == 0)

and `axis` is the output_shape index TF names for "size"/"negative" (its spatial_dim; for 1-D TF inserts a
dummy H axis, which is taken off again), else null. Every case runs in float32 and float64; a case where the
two disagree is printed and not stored (none did with tensorflow-cpu 2.21). A kernel size of 0 is not in the
grid: TF's answer for it depends on the dtype (float32: InternalError "Failed to call dnnl_sgemm", float64:
zeros for the sizes its rule takes), so convt refuses it in every dtype; `KERNEL_ZERO` below records TF's
answers for a few such cases, which the test prints nothing for but keeps as evidence.

The grid: N = 1, 2, 3; zero-size batch, one spatial axis (the first), every spatial axis, input channels,
output channels, and mixes; kernels 1-3, strides 1-3; SAME, VALID and (2-D) explicit pads. The first spatial
axis's output size sweeps 0 .. the top of its legal range + 2 and 100; the other axes take their default size,
then (one case each) a size off their legal range, to show an empty axis does not lift the check on the others.

TensorFlow is NOT a dependency of convt. Run this by hand, from the repo root, with tensorflow-cpu 2.21:

    python tests/golden/zero_size_tf.py

Deterministic: rerunning it on the same TF build rewrites a byte-identical file.
"""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

OUT = Path(__file__).resolve().parent / "zero_size_cases.json"

REFUSALS = [
    ("size", "Size of out_backprop doesn't match computed"),
    ("negative", "Computed output size would be negative"),
    ("batch", "must have the same batch size"),
    ("channels", "input depth must be evenly divisible by filter depth"),
    ("depth", "filter depth must be strictly greated than zero"),
]

# A few kernel-size-0 cases (not in the grid: see the docstring). [input, filters, output_shape, padding]
KERNEL_ZERO = [
    [[2, 5, 5, 3], [0, 3, 4, 3], [2, 5, 5, 4], "SAME"],
    [[2, 5, 5, 3], [0, 3, 4, 3], [2, 4, 3, 4], "VALID"],
    [[2, 0, 5, 3], [0, 3, 4, 3], [2, 0, 5, 4], "SAME"],
]


def spatial_rule(i, k, s, padding):
    """(lo, hi) of the output sizes TF's rule takes on one axis (TF_SEMANTICS.md section 4), for the sweep only."""
    if padding == "SAME":
        return (0, 0) if i == 0 else ((i - 1) * s + 1, i * s)
    p = 0 if padding == "VALID" else sum(padding)
    hi = i * s + k - 1 - p
    return max(0, hi - 2 * s + 1 if i == 0 else (i - 1) * s + k - p), hi


def default_size(i, k, s, padding):
    if padding == "SAME":
        return i * s
    p = 0 if padding == "VALID" else sum(padding)
    return max(0, (i - 1) * s + k - p)


def verdict(e):
    msg = str(e)
    for kind, text in REFUSALS:
        if text in msg:
            m = re.search(r"spatial_dim: (\d+)", msg)
            return kind, (int(m.group(1)) if m and kind == "size" else None)
    first = msg.strip().splitlines()[0] if msg.strip() else ""
    return f"other: {type(e).__name__}: {first.split('}}')[-1].split(' [Op:')[0].strip()[:160]}", None


def run_tf(xs, fs, out, strides, padding, dtype):
    x = np.ones(xs, dtype)
    f = np.ones(fs, dtype)
    n = len(xs) - 2
    pad = padding if isinstance(padding, str) else [[0, 0]] + [list(p) for p in padding] + [[0, 0]]
    try:
        y = tf.nn.conv_transpose(x, f, out, strides=strides, padding=pad).numpy()
    except Exception as e:  # noqa: BLE001 - every refusal is recorded
        kind, axis = verdict(e)
        if axis is not None and n == 1:
            axis -= 1  # conv1d_transpose's dummy H axis
        return kind, axis
    if list(y.shape) != list(out):
        return f"other: shape {list(y.shape)}", None
    if y.size == 0:
        return "empty", None
    return ("zeros" if not y.any() else "nonzero"), None


def negative_axis(xs, fs, out, strides, padding):
    """TF's "negative" message names no axis: the first spatial axis whose truncated forward size is < 0."""
    n = len(xs) - 2
    for j in range(n):
        k, s = fs[j], strides[j]
        pad = padding if isinstance(padding, str) else padding[j]
        if pad == "SAME":
            continue
        p = 0 if pad == "VALID" else sum(pad)
        if out[1 + j] + p - k + s < -s + 1:
            return 1 + j
    return None


def grid():
    cases = []
    kinds = ["spatial", "batch", "in_channels", "out_channels", "batch+spatial", "all_spatial"]
    for n in (1, 2, 3):
        rest = [3, 2][: n - 1]
        paddings = ["SAME", "VALID"]
        if n == 2:
            paddings += [[[1, 1], [0, 0]], [[0, 2], [1, 0]]]
        for kind in kinds:
            for k in (1, 2, 3):
                for s in (1, 2, 3):
                    for padding in paddings:
                        if kind == "out_channels" and (k, s, isinstance(padding, str)) != (3, 2, True):
                            continue  # refused whatever the sizes: a few cases show it
                        batch = 0 if "batch" in kind else 2
                        c_in = 0 if kind == "in_channels" else 3
                        c_out = 0 if kind == "out_channels" else 4
                        first = 0 if "spatial" in kind else 4
                        spatial = [first] + [0 if kind == "all_spatial" else r for r in rest]
                        kernel = [k] + [2] * (n - 1)
                        strides = [s] * n
                        pads = [padding] * n if isinstance(padding, str) else [tuple(p) for p in padding]
                        xs = [batch, *spatial, c_in]
                        fs = [*kernel, c_out, c_in]
                        defaults = [default_size(i, kk, ss, p) for i, kk, ss, p in zip(spatial, kernel, strides, pads)]
                        lo, hi = spatial_rule(spatial[0], k, s, pads[0])
                        near = range(0, max(hi, 0) + 3) if spatial[0] == 0 else range(max(lo - 1, 0), hi + 2)
                        sizes = sorted(set(near) | {0, 100})
                        for o in sizes:
                            cases.append((xs, fs, [batch, o, *defaults[1:], c_out], strides, padding))
                        for j in range(1, n):  # another axis off its legal range
                            off = list(defaults)
                            off[j] = spatial_rule(spatial[j], kernel[j], s, pads[j])[1] + 1
                            off[0] = default_size(spatial[0], k, s, pads[0])
                            cases.append((xs, fs, [batch, *off, c_out], strides, padding))
    # batch and channel entries of output_shape
    cases.append(([0, 4, 3], [3, 4, 3], [2, 4, 4], [1], "SAME"))
    cases.append(([2, 0, 3], [3, 4, 3], [2, 0, 5], [1], "SAME"))
    cases.append(([2, 4, 0], [3, 4, 0], [2, 4, 5], [1], "SAME"))
    return cases


class Worker:
    """TF in a child process, one (case, dtype) per line: TF 2.21's 3-D kernels kill the process (SIGSEGV, or
    SIGFPE with no input channels) on some empty inputs with a non-empty output. That is recorded as the
    verdict "crash" and the child restarted."""

    def __init__(self):
        self.proc = None

    def ask(self, case, dtype):
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True)
        self.proc.stdin.write(json.dumps([case, dtype]) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if line:
            return json.loads(line)
        code = self.proc.wait()
        if code not in (-signal.SIGSEGV, -signal.SIGFPE):
            raise RuntimeError(f"TF's child process ended with {code} on {case} {dtype}")
        return ["crash", None]

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()


def worker():
    for line in sys.stdin:
        (xs, fs, out, strides, padding), dtype = json.loads(line)
        sys.stdout.write(json.dumps(list(run_tf(xs, fs, out, strides, padding, np.dtype(dtype)))) + "\n")
        sys.stdout.flush()


def main():
    stored, disagree = [], []
    tf_worker = Worker()
    for case in grid():
        xs, fs, out, strides, padding = case
        (v32, a32), (v64, a64) = (tf_worker.ask(case, dt) for dt in ("float32", "float64"))
        if (v32, a32) != (v64, a64):
            disagree.append(f"float32 {v32} {a32} != float64 {v64} {a64}: {xs} {fs} {out} {strides} {padding}")
            continue
        axis = a32
        if v32 == "negative":
            axis = negative_axis(xs, fs, out, strides, padding)
        stored.append([xs, fs, out, strides, padding, v32, axis])
    kzero = []
    for xs, fs, out, padding in KERNEL_ZERO:
        case = [xs, fs, out, [1] * (len(xs) - 2), padding]
        kzero.append([xs, fs, out, padding, {dt: tf_worker.ask(case, dt)[0] for dt in ("float32", "float64")}])
    tf_worker.close()
    for line in disagree:
        print("not stored:", line)
    lines = ",\n".join("  " + json.dumps(c) for c in stored)
    klines = ",\n".join("  " + json.dumps(c) for c in kzero)
    OUT.write_text(f'{{"source": "tensorflow-cpu {tf.__version__}; float32 and float64 agree on every case",\n'
                   f'"cases": [\n{lines}\n],\n"kernel_zero": [\n{klines}\n]}}\n')
    counts = {}
    for c in stored:
        counts[c[5]] = counts.get(c[5], 0) + 1
    print(f"{len(stored)} cases stored in {OUT.name}: {counts}; {len(disagree)} not stored")


if __name__ == "__main__":
    worker() if sys.argv[1:] == ["--worker"] else main()
