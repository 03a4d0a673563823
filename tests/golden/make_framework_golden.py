"""Transposed convolutions computed by PyTorch and JAX themselves, for tests/test_frameworks.py.

    python -m venv /tmp/fw && /tmp/fw/bin/pip install torch==2.13.0 jax jaxlib numpy
    /tmp/fw/bin/python tests/golden/make_framework_golden.py

Not run in CI (neither framework is a dependency). Writes tests/golden/frameworks/<fw>_<nnn>.npz with x, w, y in
the framework's own layouts (PyTorch: NC*, weight [in, out, *k]; JAX: N*C, rhs HWIO) and `meta`, the call's
parameters as JSON. float64, groups 1, ranks 1-3, strides 1-3, dilations 1-2:
- PyTorch F.conv_transpose{1,2,3}d with padding p and every output_padding it allows (< max(stride, dilation));
- JAX lax.conv_transpose with SAME, VALID and explicit padding, transpose_kernel False and True.
Made with torch 2.13.0 and jax 0.10.2.
"""

import itertools
import json
import os

import numpy as np

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "frameworks")
rng = np.random.default_rng(15)


def save(fw, idx, x, w, y, **meta):
    np.savez_compressed(os.path.join(OUT, f"{fw}_{idx:03d}.npz"), x=x, w=w, y=y, meta=json.dumps(dict(fw=fw, **meta)))


def geometries():
    for n, s, d in [*((n, s, d) for n in (1, 2) for s, d in itertools.product((1, 2, 3), (1, 2))),
                    (3, 2, 1), (3, 1, 2)]:
        yield n, s, d, [int(v) for v in rng.integers(1, 6, n)], [int(v) for v in rng.integers(1, 5, n)]


def torch_cases():
    import torch
    import torch.nn.functional as F

    fns = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
    idx = 0
    for n, s, d, I, K in geometries():
        eff = [d * (k - 1) + 1 for k in K]
        p = [int(rng.integers(0, (e + 1) // 2 + 1)) for e in eff]
        for op_v in range(max(s, d)):
            op = [op_v] * n
            O = [(i - 1) * s - 2 * pp + e + o for i, pp, e, o in zip(I, p, eff, op)]
            if min(O) <= 0:
                continue
            cin, cout = (int(v) for v in rng.integers(1, 4, 2))
            x, w = rng.standard_normal((2, cin, *I)), rng.standard_normal((cin, cout, *K))
            y = fns[n](torch.from_numpy(x), torch.from_numpy(w), stride=s, padding=p, output_padding=op,
                       dilation=d).numpy()
            save("torch", idx, x, w, y, n=n, s=s, d=d, p=p, op=op, K=K, I=I)
            idx += 1
    return idx


def jax_cases():
    import jax

    jax.config.update("jax_enable_x64", True)
    from jax import lax

    specs = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}
    idx = 0
    for n, s, d, I, K in geometries():
        eff = [d * (k - 1) + 1 for k in K]
        cin, cout = (int(v) for v in rng.integers(1, 4, 2))
        x = rng.standard_normal((2, *I, cin))
        explicit = [(int(rng.integers(0, e)), int(rng.integers(0, e))) for e in eff]  # pads JAX and convt share
        for tk, pad in itertools.product((False, True), ("SAME", "VALID", explicit)):
            w = rng.standard_normal((*K, cin, cout) if not tk else (*K, cout, cin))
            y = np.asarray(lax.conv_transpose(x, w, strides=[s] * n, padding=pad, rhs_dilation=[d] * n,
                                              dimension_numbers=specs[n], transpose_kernel=tk))
            if y.size == 0:
                continue
            save("jax", idx, x, w, y, n=n, s=s, d=d, K=K, I=I, transpose_kernel=tk,
                 padding=pad if isinstance(pad, str) else [list(p) for p in pad])
            idx += 1
    return idx


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    print("torch cases", torch_cases())
    print("jax cases", jax_cases())
