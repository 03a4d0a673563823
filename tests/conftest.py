"""What several test modules share: the golden files, random configurations, and the CLI's fixtures.

Plain functions are imported by name (`from conftest import load_golden`): this folder is on sys.path, as the
loop reference beside them needs too.
"""

import json
import os
import shutil
import sys

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

sys.path.insert(0, os.path.dirname(__file__))

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")


def load_golden(path):
    """(params, {"input", "filters", "output"}) of one TF golden (bfloat16 ones are stored as float32)."""
    with np.load(path, allow_pickle=False) as z:
        params = json.loads(str(z["params"]))
        arrays = {key: z[key] for key in ("input", "filters", "output")}
    if params["dtype"] == "bfloat16":
        arrays = {key: a.astype(ml_dtypes.bfloat16) for key, a in arrays.items()}
    return params, arrays


def legal_range(i, k, s, d, padding):
    """The legal output sizes of one axis, written out independently of convt_cli.shapes."""
    eff = (k - 1) * d + 1
    if padding == "SAME":
        return (i - 1) * s + 1, i * s
    p = 0 if padding == "VALID" else sum(padding)
    return (i - 1) * s + eff - p, i * s + eff - 1 - p


def random_arrays(seed):
    """(x, w, out_sizes, channels_first, flags): float64 arrays of a random legal configuration, rank 1-4, every
    padding kind, strides 1-4, dilations 1-3, an output size at either end of its legal range."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 5))
    channels_first = bool(rng.integers(2))
    kind = ["SAME", "VALID", "explicit"][int(rng.integers(3))]
    strides = [int(v) for v in rng.integers(1, 5, n)]
    dilations = [int(v) for v in rng.integers(1, 4, n)] if rng.random() < 0.6 else [1] * n
    kernel = [int(v) for v in rng.integers(1, 4 if n < 4 else 3, n)]
    in_sizes = [int(v) for v in rng.integers(1, 5 if n < 4 else 3, n)]
    padding = kind if kind != "explicit" else [tuple(int(p) for p in rng.integers(0, 3, 2)) for _ in range(n)]
    out_sizes = []
    for j in range(n):
        lo, hi = legal_range(in_sizes[j], kernel[j], strides[j], dilations[j],
                             padding if kind != "explicit" else padding[j])
        if hi < max(lo, 0):  # pads too large for this input: no output size is legal, drop them
            padding[j] = (0, 0)
            lo, hi = legal_range(in_sizes[j], kernel[j], strides[j], dilations[j], padding[j])
        lo = max(lo, 0)
        out_sizes.append(lo if rng.random() < 0.5 else max(hi, lo))
    batch, c_in, c_out = (int(v) for v in rng.integers(1, 4, 3))
    x_shape = (batch, c_in, *in_sizes) if channels_first else (batch, *in_sizes, c_in)
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal((*kernel, c_out, c_in))
    flags = dict(strides=strides, padding=padding, dilations=dilations)
    return x, w, out_sizes, channels_first, flags


def random_shapes(seed):
    """(x_shape, w_shape, out_sizes, flags) of a random legal configuration, rank 1-3, from the plan's ranges."""
    from convt_cli import ConvtError
    from convt_cli.shapes import plan_conv_transpose

    rng = np.random.default_rng([7, seed])
    n = int(rng.integers(1, 4))
    first = bool(rng.integers(2))
    kind = ("SAME", "VALID", "explicit")[int(rng.integers(3))]
    strides = [int(v) for v in rng.integers(1, 4, n)]
    dilations = [int(v) for v in rng.integers(1, 4, n)] if rng.random() < 0.5 else [1] * n
    kernel = [int(v) for v in rng.integers(1, 4, n)]
    in_sizes = [int(v) for v in rng.integers(1, 6, n)]
    padding = kind if kind != "explicit" else [tuple(int(p) for p in rng.integers(0, 3, 2)) for _ in range(n)]
    batch, c_in, c_out = (int(v) for v in rng.integers(1, 4, 3))
    x_shape = (batch, c_in, *in_sizes) if first else (batch, *in_sizes, c_in)
    flags = dict(strides=strides, padding=padding, dilations=dilations,
                 data_format="channels_first" if first else "channels_last")
    try:
        plan = plan_conv_transpose(x_shape, (*kernel, c_out, c_in), None, **flags)
    except ConvtError:  # explicit pads too large for this input: drop them
        flags["padding"] = "VALID"
        plan = plan_conv_transpose(x_shape, (*kernel, c_out, c_in), None, **flags)
    out_sizes = [r[int(rng.integers(2))] for r in plan.legal_ranges]
    return x_shape, (*kernel, c_out, c_in), out_sizes, flags


def save_pair(folder, batch=2, seed=0):
    """x.npy (batch, 5, 6, 3) and w.npy (3, 3, 4, 3), float32 and seeded, saved in folder: (x, w)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 5, 6, 3)).astype(np.float32)
    w = rng.standard_normal((3, 3, 4, 3)).astype(np.float32)
    np.save(os.path.join(folder, "x.npy"), x)
    np.save(os.path.join(folder, "w.npy"), w)
    return x, w


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A folder with save_pair's x.npy (2, 5, 6, 3) and w.npy, as the current folder: (x, w)."""
    monkeypatch.chdir(tmp_path)
    return save_pair(tmp_path)


def invoke(*args, input=None):
    """`convt ARGS` through Click's test runner."""
    from convt_cli.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def error_line(r):
    """The one `Error:` line of a refused CLI run (exit 2, no traceback)."""
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.output
    return lines[0]


def convt_command() -> list:
    """The installed `convt`, or `python -m convt_cli` where it is not on PATH."""
    exe = shutil.which("convt")
    return [exe] if exe else [sys.executable, "-m", "convt_cli"]


# scripts run by hand with TensorFlow installed (--doctest-modules would import them)
collect_ignore = ["golden"]
