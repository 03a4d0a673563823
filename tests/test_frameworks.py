"""convt against PyTorch and JAX themselves: tests/golden/frameworks, made by tests/golden/make_framework_golden.py.

Matrix: every committed case (PyTorch F.conv_transpose1d-3d with padding and output_padding; JAX
lax.conv_transpose with SAME, VALID and explicit padding, transpose_kernel False and True; float64, ranks 1-3,
strides 1-3, dilations 1-2). The weights go in as the frameworks store them, through --filter-layout; the padding
is mapped here by hand, per axis, with eff = d*(K-1)+1 and F = (I-1)*s + eff (the uncropped length) -- the mapping
a user writes today. convt's result must equal the framework's to 1e-12 of max|y|, and verify must pass it. The
PyTorch outputs convt cannot express yet (output_padding - padding >= stride: zeros past the end of the full
result) are refused with an error, never computed wrong.
"""

import glob
import json
import os

import numpy as np
import pytest

from convt_cli import ConvtError, conv_transpose
from convt_cli.verify import verify_conv_transpose

CASES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "golden", "frameworks", "*.npz")))


def _load(path):
    with np.load(path) as z:
        return z["x"], z["w"], z["y"], json.loads(str(z["meta"]))


def _convt_flags(m):
    """(flags for conv_transpose, whether convt can express it) from the framework call's parameters."""
    n, s, d, K, I = m["n"], m["s"], m["d"], m["K"], m["I"]
    eff = [d * (k - 1) + 1 for k in K]
    full = [(i - 1) * s + e for i, e in zip(I, eff)]
    if m["fw"] == "torch":
        lo = m["p"]
        size = [f - 2 * p + op for f, p, op in zip(full, m["p"], m["op"])]
        flags = dict(data_format="channels_first", filter_layout="torch")
    else:
        flags = dict(data_format="channels_last", filter_layout="tf" if m["transpose_kernel"] else "jax")
        if m["padding"] == "SAME":
            return dict(flags, strides=s, dilations=d, padding="SAME"), True
        if m["padding"] == "VALID":  # JAX: (I-1)*s + max(eff, s), zeros after the full result when eff < s
            lo, size = [0] * n, [(i - 1) * s + max(e, s) for i, e in zip(I, eff)]
        else:  # explicit pads of the stride-dilated input: the start is eff-1-a
            lo = [e - 1 - a for e, (a, _) in zip(eff, m["padding"])]
            size = [(i - 1) * s + a + b - e + 2 for i, e, (a, b) in zip(I, eff, m["padding"])]
    expressible = all(low >= 0 and o - (f - low) <= s - 1 for low, o, f in zip(lo, size, full))
    padding = [(low, max(0, f - low - o)) for low, o, f in zip(lo, size, full)]
    return dict(flags, strides=s, dilations=d, padding=padding, output_shape=size), expressible


def test_the_cases_are_there():
    frameworks = [os.path.basename(p).split("_")[0] for p in CASES]
    assert frameworks.count("torch") >= 20 and frameworks.count("jax") >= 60


@pytest.mark.parametrize("path", CASES, ids=[os.path.basename(p)[:-4] for p in CASES])
def test_convt_gives_the_frameworks_numbers(path):
    x, w, y, meta = _load(path)
    flags, expressible = _convt_flags(meta)
    if not expressible:
        with pytest.raises(ConvtError, match="legal sizes are"):
            conv_transpose(x, w, **flags)
        return
    got = conv_transpose(x, w, **flags)
    assert got.shape == y.shape
    assert np.abs(got - y).max() <= 1e-12 * max(1.0, np.abs(y).max()), meta
    flags.pop("output_shape", None)
    report = verify_conv_transpose(x, w, y, **flags)
    assert report.passed, (meta, report.summary())
