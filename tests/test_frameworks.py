"""convt against PyTorch, ONNX Runtime and JAX themselves: tests/golden/frameworks, made by
tests/golden/make_framework_golden.py.

Matrix: every committed case (PyTorch F.conv_transpose1d-3d with padding, output_padding -- at or past the stride
when the dilation is larger -- and groups 1, 2 and depthwise, float64 and float32; ONNX Runtime ConvTranspose with
explicit pads, auto_pad SAME_UPPER / SAME_LOWER / VALID, output_padding, group and the output_shape attribute,
float32; JAX lax.conv_transpose with SAME, VALID and explicit padding, transpose_kernel False and True, float64 and
float32; ranks 1-3, strides 1-3, dilations 1-3). Each call's own parameters go in through convt's flags as the
README's "Coming from PyTorch / ONNX / JAX" section writes them: PyTorch's and ONNX's directly (--filter-layout,
--padding p or lo:hi, SAME_UPPER / SAME_LOWER, --output-padding, --groups); JAX's padding by the README's one rule.
convt's result must equal the framework's (1e-12 of max|y| for float64, 1e-5 for float32), through the API and the
CLI, and verify must pass it.
"""

import glob
import json
import os

import numpy as np
import pytest

from conftest import invoke
from convt_cli import conv_transpose
from convt_cli.verify import verify_conv_transpose

CASES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "golden", "frameworks", "*.npz")))


def _load(path):
    with np.load(path) as z:
        return z["x"], z["w"], z["y"], json.loads(str(z["meta"]))


def torch_flags(m):
    """F.conv_transpose(x, w, stride, padding, output_padding, groups, dilation) -> convt's flags, one to one."""
    return dict(data_format="channels_first", filter_layout="torch", strides=m["stride"], dilations=m["dilation"],
                padding=[(p, p) for p in m["padding"]], output_padding=m["output_padding"], groups=m["groups"])


def onnx_flags(m):
    """ConvTranspose's attributes -> convt's flags: pads [b..., e...] as lo:hi pairs, auto_pad by name, the
    output_shape attribute (auto_pad NOTSET: the odd pad first) as SAME_LOWER with --output-shape (and
    output_padding as it is: ONNX's total pad counts it)."""
    n = m["n"]
    flags = dict(data_format="channels_first", filter_layout="onnx", strides=m["strides"], dilations=m["dilations"],
                 output_padding=m["output_padding"], groups=m["group"])
    if "pads" in m:
        flags["padding"] = list(zip(m["pads"][:n], m["pads"][n:]))
    elif "output_shape" in m:
        flags.update(padding="SAME_LOWER", output_shape=m["output_shape"])
    else:
        flags["padding"] = m["auto_pad"]
    return flags


def jax_flags(m, k):
    """lax.conv_transpose -> convt's flags: SAME as it is; VALID as VALID plus --output-padding max(0, s - eff)
    (JAX's VALID output is (I-1)*s + max(eff, s)); explicit pads (a, b) of the dilated input as (eff-1-a, eff-1-b)."""
    s, d = m["strides"], m["rhs_dilation"]
    flags = dict(data_format="channels_last", filter_layout="tf" if m["transpose_kernel"] else "jax", strides=s,
                 dilations=d)
    eff = [dj * (kj - 1) + 1 for dj, kj in zip(d, k)]
    if m["padding"] == "SAME":
        return dict(flags, padding="SAME")
    if m["padding"] == "VALID":
        return dict(flags, padding="VALID", output_padding=[max(0, sj - e) for sj, e in zip(s, eff)])
    return dict(flags, padding=[(e - 1 - a, e - 1 - b) for e, (a, b) in zip(eff, m["padding"])])


def convt_flags(m, w):
    if m["fw"] == "torch":
        return torch_flags(m)
    if m["fw"] == "onnx":
        return onnx_flags(m)
    return jax_flags(m, w.shape[:m["n"]])


def test_the_cases_are_there():
    metas = [_load(p)[3] for p in CASES]
    count = {fw: sum(m["fw"] == fw for m in metas) for fw in ("torch", "onnx", "jax")}
    assert count["torch"] >= 80 and count["onnx"] >= 60 and count["jax"] >= 200
    torch = [m for m in metas if m["fw"] == "torch"]
    assert sum(m["groups"] > 1 for m in torch) >= 40 and sum(m["output_padding"][0] >= m["stride"] for m in torch) >= 10
    assert {m.get("auto_pad") for m in metas if m["fw"] == "onnx"} >= {"SAME_UPPER", "SAME_LOWER", "VALID"}


def _tolerance(y):
    return (1e-12 if y.dtype == np.float64 else 1e-5) * max(1.0, float(np.abs(y).max()))


@pytest.mark.parametrize("path", CASES, ids=[os.path.basename(p)[:-4] for p in CASES])
def test_convt_gives_the_frameworks_numbers(path):
    x, w, y, meta = _load(path)
    flags = convt_flags(meta, w)
    got = conv_transpose(x, w, **flags)
    assert got.shape == y.shape and got.dtype == y.dtype, meta
    assert np.abs(got.astype(np.float64) - y).max() <= _tolerance(y), meta
    flags.pop("output_shape", None)
    report = verify_conv_transpose(x, w, y, **flags)
    assert report.passed, (meta, report.summary())


def _cli_flags(flags):
    def text(v):
        if isinstance(v, str) or isinstance(v, int):
            return str(v)
        if v and isinstance(v[0], (tuple, list)):
            return ",".join(f"{lo}:{hi}" for lo, hi in v)
        return ",".join(map(str, v))

    return [a for k, v in flags.items() for a in (f"--{k.replace('_', '-')}", text(v))]


@pytest.mark.parametrize("path", CASES[::7], ids=[os.path.basename(p)[:-4] for p in CASES[::7]])
def test_the_cli_takes_the_same_flags(work, path):
    x, w, y, meta = _load(path)
    np.save("fx.npy", x)
    np.save("fw.npy", w)
    flags = _cli_flags(convt_flags(meta, w))
    r = invoke("run", "fx.npy", "fw.npy", "-o", "fy.npy", *flags)
    assert r.exit_code == 0, (r.output, flags)
    assert np.abs(np.load("fy.npy").astype(np.float64) - y).max() <= _tolerance(y)
    np.save("given.npy", y)
    r = invoke("verify", "fx.npy", "fw.npy", "given.npy", *[f for f in flags])
    assert r.exit_code == 0, (r.output, flags)
