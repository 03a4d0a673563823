"""Transposed convolutions computed by PyTorch, ONNX Runtime and JAX themselves, for tests/test_frameworks.py.

    python -m venv /tmp/fw && /tmp/fw/bin/pip install torch==2.13.0 jax jaxlib onnx onnxruntime numpy
    /tmp/fw/bin/python tests/golden/make_framework_golden.py

Not run in CI (no framework is a dependency). Writes tests/golden/frameworks/<fw>_<nnn>.npz with x, w, y in the
framework's own layouts (PyTorch and ONNX: NC*, weight [in, out/groups, *k]; JAX: N*C, rhs HWIO) and `meta`, the
call's own parameters as JSON (what a user reads off the framework's call, never a convt spelling). Ranks 1-3,
strides 1-3, dilations 1-3:
- PyTorch F.conv_transpose{1,2,3}d, float64 and float32: padding p and every output_padding it allows
  (< max(stride, dilation): at or past the stride when the dilation is larger), groups 1, 2 and depthwise
  (groups = in_channels, channel multiplier 1 or 2);
- ONNX Runtime ConvTranspose (opset 17), float32 (it has no float64 ConvTranspose): explicit pads (begin and end
  apart), auto_pad SAME_UPPER, SAME_LOWER and VALID, output_padding, group, and the output_shape attribute with
  auto_pad NOTSET (any size ONNX takes, with output_padding); cases where ONNX Runtime's output shape is not the
  one the ONNX specification gives are not
  kept (counted and printed: SAME_* with eff + output_padding < stride);
- JAX lax.conv_transpose, float64 and float32, SAME, VALID and explicit padding, transpose_kernel False and True.
Made with torch 2.13.0, onnxruntime 1.32.0 (onnx 1.23.2) and jax 0.10.2 (the versions are stored in each case's meta).
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
    for n, s, d in [*((n, s, d) for n in (1, 2) for s, d in itertools.product((1, 2, 3), (1, 2, 3))),
                    (3, 2, 1), (3, 1, 2), (3, 1, 3)]:
        yield n, s, d, [int(v) for v in rng.integers(1, 6, n)], [int(v) for v in rng.integers(1, 5, n)]


def channels(kind: str):
    """(in_channels, out_channels / groups, groups) for groups 1, 2 or depthwise."""
    if kind == "one":
        return int(rng.integers(1, 4)), int(rng.integers(1, 4)), 1
    if kind == "two":
        return 2 * int(rng.integers(1, 3)), int(rng.integers(1, 3)), 2
    c = int(rng.integers(2, 5))
    return c, int(rng.integers(1, 3)), c  # depthwise, multiplier 1 or 2


def torch_cases():
    import torch
    import torch.nn.functional as F

    fns = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
    idx = 0
    for (n, s, d, I, K), dtype in itertools.product(list(geometries()), ("float64", "float32")):
        eff = [d * (k - 1) + 1 for k in K]
        p = [int(rng.integers(0, (e + 1) // 2 + 1)) for e in eff]
        for op_v in range(max(s, d)):
            op = [op_v] * n
            O = [(i - 1) * s - 2 * pp + e + o for i, pp, e, o in zip(I, p, eff, op)]
            if min(O) <= 0:
                continue
            cin, cog, g = channels(("one", "two", "depthwise")[idx % 3])
            x = rng.standard_normal((2, cin, *I)).astype(dtype)
            w = rng.standard_normal((cin, cog, *K)).astype(dtype)
            y = fns[n](torch.from_numpy(x), torch.from_numpy(w), stride=s, padding=p, output_padding=op,
                       groups=g, dilation=d).numpy()
            save("torch", idx, x, w, y, n=n, stride=s, dilation=d, padding=p, output_padding=op, groups=g,
                 version=torch.__version__)
            idx += 1
    return idx


def onnx_cases():
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    idx = skipped = 0
    for n, s, d, I, K in geometries():
        eff = [d * (k - 1) + 1 for k in K]
        for pad_kind in ("explicit", "SAME_UPPER", "SAME_LOWER", "VALID", "output_shape"):
            op = [int(rng.integers(0, max(s, d)))] * n
            attrs = dict(strides=[s] * n, dilations=[d] * n, output_padding=op)
            if pad_kind == "explicit":
                attrs["pads"] = [int(rng.integers(0, e)) for e in eff] + [int(rng.integers(0, e)) for e in eff]
            elif pad_kind == "output_shape":  # any size whose total pad (I-1)*s + eff + op - O is not negative
                attrs["output_shape"] = [int(rng.integers(1, (i - 1) * s + e + o + 1)) for i, e, o in zip(I, eff, op)]
            else:
                attrs["auto_pad"] = pad_kind
            cin, cog, g = channels(("one", "two", "depthwise")[idx % 3])
            attrs["group"] = g
            x = rng.standard_normal((2, cin, *I)).astype(np.float32)
            w = rng.standard_normal((cin, cog, *K)).astype(np.float32)
            node = helper.make_node("ConvTranspose", ["X", "W"], ["Y"], **attrs)
            graph = helper.make_graph(
                [node], "t", [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x.shape)),
                              helper.make_tensor_value_info("W", TensorProto.FLOAT, list(w.shape))],
                [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
            try:
                session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
                y = session.run(None, {"X": x, "W": w})[0]
            except Exception as e:  # an output it refuses (a negative size, say)
                print("onnxruntime refused", attrs, type(e).__name__)
                skipped += 1
                continue
            wanted = attrs.get("output_shape", [i * s for i in I] if pad_kind.startswith("SAME") else None)
            if wanted is not None and list(y.shape[2:]) != wanted:
                skipped += 1  # the specification's size: I*s, or the output_shape asked for
                continue
            if y.size == 0:
                continue
            save("onnx", idx, x, w, y, n=n, version=f"onnxruntime {ort.__version__}, onnx {onnx.__version__}",
                 **{k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()})
            idx += 1
    print("onnx cases not kept (shape not the specification's, or refused):", skipped)
    return idx


def jax_cases():
    import jax

    jax.config.update("jax_enable_x64", True)
    from jax import lax

    specs = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}
    idx = 0
    for (n, s, d, I, K), dtype in itertools.product(list(geometries()), ("float64", "float32")):
        eff = [d * (k - 1) + 1 for k in K]
        cin, cout = (int(v) for v in rng.integers(1, 4, 2))
        x = rng.standard_normal((2, *I, cin)).astype(dtype)
        explicit = [(int(rng.integers(0, e)), int(rng.integers(0, e))) for e in eff]
        for tk, pad in itertools.product((False, True), ("SAME", "VALID", explicit)):
            w = rng.standard_normal((*K, cin, cout) if not tk else (*K, cout, cin)).astype(dtype)
            y = np.asarray(lax.conv_transpose(x, w, strides=[s] * n, padding=pad, rhs_dilation=[d] * n,
                                              dimension_numbers=specs[n], transpose_kernel=tk,
                                              precision=lax.Precision.HIGHEST))
            if y.size == 0:
                continue
            save("jax", idx, x, w, y, n=n, strides=[s] * n, rhs_dilation=[d] * n, transpose_kernel=tk,
                 padding=pad if isinstance(pad, str) else [list(p) for p in pad], version=jax.__version__)
            idx += 1
    return idx


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    for old in os.listdir(OUT):
        if old.endswith(".npz"):
            os.remove(os.path.join(OUT, old))
    print("torch cases", torch_cases())
    print("onnx cases", onnx_cases())
    print("jax cases", jax_cases())
