"""Generate the golden test arrays in tests/golden/ from live TensorFlow.

Writes one file per case, tests/golden/<name>.npz, holding exactly these keys:

  "input", "filters", "output"  the arrays (bfloat16 cases are stored as float32
                                holding the exact bfloat16 values; float16 as
                                float16; float32/float64 as themselves)
  "params"                      0-d unicode array with a JSON object: op,
                                output_shape, strides, dilations, padding,
                                data_format, dtype, source

"op" is "conv_transpose" (tf.nn.conv_transpose; filters = spatial +
[out_channels, in_channels]) or "conv" (tf.nn.convolution; filters = spatial +
[in_channels, out_channels]). "output_shape" is the full N+2 list in
data_format order (null for conv), "strides"/"dilations" are N spatial ints,
"padding" is "SAME", "VALID" or N [lo, hi] pairs (spatial axes only).

The grid covers N = 1, 2, 3, channels-last and channels-first, SAME / VALID /
explicit padding (only where TF takes a padding list), per-axis strides 1-4
and dilations 1-3 (stride > 1 together with dilation > 1 for conv_transpose),
output sizes at both ends of the legal range, odd/even kernels including K=1,
differing channel counts, batch 1-3 and a few zero-size cases. float32 runs
everywhere (oneDNN); float64, float16 and bfloat16 are tried on a subset and
the cases TF refuses are printed, one line each, and skipped. Every result
is also checked against a float64 TF computation of the same thing by another
route (channels-last, zero-upsampled filters, hand-applied padding: a guard
against TF's kernel bugs) and not stored if it disagrees.

TensorFlow is NOT a dependency of convt. Run this by hand, from the repo root,
with a Python that has tensorflow-cpu (2.21), numpy and ml_dtypes installed:

    python tests/golden/make_golden.py

It is deterministic (fixed seed; each case draws from its own RNG keyed by its
geometry; zip members carry a fixed timestamp), so rerunning it on the same TF
build rewrites byte-identical files. Existing tests/golden/*.npz are deleted
first so the directory always holds exactly the current grid.
"""

import io
import json
import os
import zipfile
import zlib
from collections import Counter
from pathlib import Path

# Silence TF's C++ start-up chatter (oneDNN / CPU feature banners).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

SEED = 20250611
MAX_ELEMS = 20_000  # per array; keeps tests/golden small
OUT_DIR = Path(__file__).resolve().parent

FORMATS = {1: ("NWC", "NCW"), 2: ("NHWC", "NCHW"), 3: ("NDHWC", "NCDHW")}
TF_DTYPES = {"float16": tf.float16, "bfloat16": tf.bfloat16,
             "float32": tf.float32, "float64": tf.float64}
NP_DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
             "float32": np.float32, "float64": np.float64}

# (strides, dilations) per spatial axis, truncated to the first N entries.
# Covers stride 1-4, dilation 1-3, per-axis differences and stride>1 with dilation>1.
SCENARIOS = [
    ([1, 1, 1], [1, 1, 1]),
    ([2, 2, 2], [1, 1, 1]),
    ([3, 1, 4], [1, 1, 1]),
    ([4, 3, 2], [1, 1, 1]),
    ([1, 1, 1], [2, 2, 2]),
    ([1, 1, 1], [3, 1, 2]),
    ([2, 2, 2], [2, 2, 2]),
    ([3, 1, 2], [2, 3, 1]),
]

# Cycles the grid walks through so that kernels (odd, even, K=1) and input
# sizes vary from case to case; 3-D uses smaller values to stay under MAX_ELEMS.
KERNEL_CYCLE = {1: [3, 2, 1, 4, 5, 3, 2], 2: [3, 2, 1, 4, 3, 5, 2], 3: [2, 3, 1, 3, 2]}
INPUT_CYCLE = {1: [5, 7, 3, 9, 2, 6, 1, 4], 2: [3, 4, 2, 5, 1], 3: [2, 3, 1, 2]}

# Explicit padding: TF takes a padding list for conv_transpose only in 2-D NHWC
# without dilation. (strides, ((lo, hi) for H, (lo, hi) for W)).
CT_EXPLICIT = [
    ([1, 1], ((1, 1), (0, 0))),
    ([2, 2], ((1, 0), (0, 1))),
    ([2, 3], ((2, 1), (1, 2))),
    ([3, 1], ((0, 2), (1, 1))),
    ([4, 2], ((1, 2), (2, 0))),
    ([1, 2], ((3, 3), (0, 0))),
    ([2, 2], ((0, 0), (0, 0))),
    ([3, 3], ((2, 2), (1, 3))),
]
# tf.nn.convolution takes a padding list only in 2-D and only when some
# dilation is > 1 (its dilation-1 path hands the list to an op that wants a
# string). (dilations, pads); strides stay 1 because stride>1 with dilation>1 is forbidden.
CONV_EXPLICIT = [
    ([2, 2], ((1, 1), (0, 0))),
    ([2, 1], ((1, 2), (0, 1))),
    ([1, 3], ((0, 0), (2, 2))),
    ([3, 2], ((3, 0), (0, 4))),
]


# ---------------------------------------------------------------- geometry

def output_range(I, K, s, d, padding):
    """Legal output sizes O of a transposed conv along one axis (TF_SEMANTICS.md section 4)."""
    eff = (K - 1) * d + 1
    if padding == "SAME":
        lo, hi = (I - 1) * s + 1, I * s
    elif padding == "VALID":
        lo, hi = (I - 1) * s + eff, I * s + eff - 1
    else:
        plo, phi = padding
        lo, hi = (I - 1) * s + eff - plo - phi, I * s + eff - 1 - plo - phi
    return max(lo, 0), hi


def conv_output_size(I, K, s, d, padding):
    """Forward conv output size along one axis (TF's GetWindowedOutputSize)."""
    eff = (K - 1) * d + 1
    if padding == "SAME":
        return -(-I // s)
    if padding == "VALID":
        return max(0, (I - eff + s) // s)
    plo, phi = padding
    return (I + plo + phi - eff + s) // s


def conv_pads(I, K, s, d, padding):
    """(before, after) padding of a forward conv along one axis (TF_SEMANTICS.md section 5)."""
    eff = (K - 1) * d + 1
    if padding == "SAME":
        total = max(0, (-(-I // s) - 1) * s + eff - I)
        return total // 2, total - total // 2
    if padding == "VALID":
        return 0, 0
    return tuple(padding)


def pick_output(I, K, s, d, padding, end):
    """Pick O at the 'min' or 'max' end of the legal range (never 0 unless forced)."""
    lo, hi = output_range(I, K, s, d, padding)
    if I > 0:
        lo = max(lo, 1)  # O=0 with a non-empty input is legal but uninteresting
    return lo if end == "min" else hi


def channels_last(fmt):
    return not fmt.startswith("NC")


def full_shape(fmt, batch, spatial, channels):
    if channels_last(fmt):
        return [batch] + list(spatial) + [channels]
    return [batch, channels] + list(spatial)


def case_arrays_shapes(case):
    """Shapes of input, filters and output for a case."""
    fmt, B, ci, co = case["fmt"], case["batch"], case["cin"], case["cout"]
    if case["op"] == "conv_transpose":
        return (full_shape(fmt, B, case["I"], ci), list(case["K"]) + [co, ci],
                full_shape(fmt, B, case["O"], co))
    out_sp = [conv_output_size(*a) for a in
              zip(case["I"], case["K"], case["s"], case["d"], case["pads"])]
    return (full_shape(fmt, B, case["I"], ci), list(case["K"]) + [ci, co],
            full_shape(fmt, B, out_sp, co))


def n_elems(shape):
    return int(np.prod(shape, dtype=np.int64))


def make_case(op, fmt, padding, I, K, s, d, end, batch, cin, cout, dtype="float32", tag=""):
    """Build a case dict, shrinking batch/channels/sizes until every array fits MAX_ELEMS.

    For conv the spatial input size is the legal transposed-conv output size
    picked at `end`, so the forward conv reads both ends of that range too.
    """
    N = len(I)
    pads = [padding] * N if isinstance(padding, str) else [tuple(p) for p in padding]
    I, K = list(I), list(K)
    # Big explicit pads can make every output size of a small input negative:
    # grow such axes until a size >= 1 is legal (never below this floor when shrinking).
    floor = [0 if i == 0 else 1 for i in I]
    for j in range(N):
        while I[j] > 0 and output_range(floor[j], K[j], s[j], d[j], pads[j])[1] < 1:
            floor[j] += 1
        I[j] = max(I[j], floor[j])
    while True:
        O = [pick_output(*a, end) for a in zip(I, K, s, d, pads)]
        case = dict(op=op, fmt=fmt, padding=padding, pads=pads, s=list(s), d=list(d),
                    K=K, batch=batch, cin=cin, cout=cout, dtype=dtype, tag=tag,
                    I=I if op == "conv_transpose" else O,
                    O=O if op == "conv_transpose" else None)
        if max(n_elems(sh) for sh in case_arrays_shapes(case)) <= MAX_ELEMS:
            return case
        if batch > 1:
            batch -= 1
        elif max(cin, cout) > 2:
            if cin >= cout:
                cin -= 1
            else:
                cout -= 1
        elif any(i > fl for i, fl in zip(I, floor)):
            j = max(range(N), key=lambda j: I[j] - floor[j])
            I[j] -= 1
        else:
            K[K.index(max(K))] -= 1


def case_name(case, with_dtype=True):
    """Descriptive, unique file name: every parameter that shapes the arrays is in it."""
    x = lambda v: "x".join(str(a) for a in v)  # noqa: E731
    op = "ct" if case["op"] == "conv_transpose" else "conv"
    if isinstance(case["padding"], str):
        pad = case["padding"].lower()
    else:
        pad = "pad" + "x".join(f"{lo}-{hi}" for lo, hi in case["padding"])
    parts = [op, f"{len(case['K'])}d", case["fmt"].lower(), pad,
             "s" + x(case["s"]), "d" + x(case["d"]), "k" + x(case["K"]), "i" + x(case["I"])]
    if case["O"] is not None:
        parts.append("o" + x(case["O"]))
    parts.append(f"b{case['batch']}c{case['cin']}to{case['cout']}")
    if case["tag"]:
        parts.append(case["tag"])
    if with_dtype:
        parts.append(case["dtype"])
    return "_".join(parts)


# ---------------------------------------------------------------- the grid

def build_grid():
    cases = []
    counter = 0  # walks the kernel / input-size / channel / batch cycles

    def cycle_params(N):
        kc, ic = KERNEL_CYCLE[N], INPUT_CYCLE[N]
        K = [kc[(counter + 2 * j) % len(kc)] for j in range(N)]
        I = [ic[(counter + j) % len(ic)] for j in range(N)]
        batch = 1 + counter % 3
        cin = 1 + counter % 5
        cout = 1 + (2 * counter + 1) % 5
        return K, I, batch, cin, cout

    # conv_transpose, SAME / VALID, float32 everywhere.
    for N in (1, 2, 3):
        for fmt in FORMATS[N]:
            for padding in ("SAME", "VALID"):
                for s, d in SCENARIOS:
                    for end in ("min", "max"):
                        K, I, B, ci, co = cycle_params(N)
                        counter += 1
                        cases.append(make_case("conv_transpose", fmt, padding, I, K,
                                               s[:N], d[:N], end, B, ci, co))
    # conv_transpose, explicit padding (2-D NHWC, dilation 1).
    for s, pads in CT_EXPLICIT:
        for end in ("min", "max"):
            K, I, B, ci, co = cycle_params(2)
            counter += 1
            cases.append(make_case("conv_transpose", "NHWC", [list(p) for p in pads], I, K,
                                   s, [1, 1], end, B, ci, co))

    # conv, SAME / VALID; tf.nn.convolution forbids stride>1 with dilation>1.
    for N in (1, 2, 3):
        for fmt in FORMATS[N]:
            for padding in ("SAME", "VALID"):
                for s, d in SCENARIOS:
                    if max(s[:N]) > 1 and max(d[:N]) > 1:
                        continue
                    for end in ("min", "max"):
                        K, I, B, ci, co = cycle_params(N)
                        counter += 1
                        cases.append(make_case("conv", fmt, padding, I, K,
                                               s[:N], d[:N], end, B, ci, co))
    # conv, explicit padding (2-D, some dilation > 1, both layouts).
    for d, pads in CONV_EXPLICIT:
        for fmt in FORMATS[2]:
            K, I, B, ci, co = cycle_params(2)
            counter += 1
            cases.append(make_case("conv", fmt, [list(p) for p in pads], I, K,
                                   [1, 1], d, "max", B, ci, co))

    # Drop duplicate names, if any (a name carries every parameter that shapes the arrays).
    unique = {}
    for c in cases:
        unique.setdefault(case_name(c), c)
    cases = list(unique.values())

    # float64: TF's float64 transposed conv works only channels-last without
    # dilation; its forward conv also works dilated (channels-last only).
    extra = []
    for c in cases:
        if not channels_last(c["fmt"]):
            continue
        if c["op"] == "conv_transpose" and max(c["d"]) > 1:
            continue
        extra.append(dict(c, dtype="float64"))

    # float16 / bfloat16: a handful per op, chosen to span N, layout, padding
    # and dilation; some of them TF is expected to refuse (reported, skipped).
    def first(pred):
        return next(c for c in cases if pred(c))

    for op in ("conv_transpose", "conv"):
        picks = []
        for N in (1, 2, 3):
            cl, cf = FORMATS[N]
            of = lambda c, N=N: c["op"] == op and len(c["K"]) == N  # noqa: E731
            picks += [
                first(lambda c: of(c) and c["fmt"] == cl and c["padding"] == "SAME"
                      and max(c["d"]) == 1 and max(c["s"]) > 1),
                first(lambda c: of(c) and c["fmt"] == cl and c["padding"] == "VALID"
                      and max(c["d"]) == 1 and max(c["s"]) > 1),
                first(lambda c: of(c) and c["fmt"] == cf and c["padding"] == "SAME"
                      and max(c["d"]) == 1),
                first(lambda c: of(c) and c["fmt"] == cl and c["padding"] == "VALID"
                      and max(c["d"]) > 1),
            ]
        picks.append(first(lambda c: c["op"] == op and not isinstance(c["padding"], str)))
        for c in picks:
            for dt in ("float16", "bfloat16"):
                extra.append(dict(c, dtype=dt))

    # Zero-size cases (TF_SEMANTICS.md section 4/5: empty input -> zeros / empty output).
    zs = [
        # batch 0
        make_case("conv_transpose", "NHWC", "SAME", [3, 2], [3, 2], [2, 1], [1, 1], "max", 1, 2, 3,
                  tag="batch0"),
        make_case("conv_transpose", "NCW", "VALID", [4], [3], [2], [1], "min", 1, 2, 3,
                  tag="batch0"),
        # spatial input 0: VALID I=0, K=3, s=2 -> O in {1, 2}, all zeros
        make_case("conv_transpose", "NWC", "VALID", [0], [3], [2], [1], "min", 2, 2, 3),
        make_case("conv_transpose", "NWC", "VALID", [0], [3], [2], [1], "max", 1, 3, 2),
        make_case("conv_transpose", "NHWC", "VALID", [0, 3], [3, 3], [2, 2], [1, 1], "min", 1, 2, 4),
        make_case("conv_transpose", "NCDHW", "VALID", [2, 0, 2], [2, 3, 2], [2, 2, 2], [1, 1, 1],
                  "max", 1, 2, 3),
        # SAME I=0 -> O=0: empty in, empty out
        make_case("conv_transpose", "NWC", "SAME", [0], [3], [2], [1], "max", 1, 2, 3),
        # conv: batch 0, SAME on an empty spatial axis, VALID with I < effective kernel (output 0)
        make_case("conv", "NHWC", "SAME", [3, 2], [3, 2], [2, 1], [1, 1], "max", 1, 2, 3,
                  tag="batch0"),
        make_case("conv", "NWC", "SAME", [0], [3], [2], [1], "max", 1, 2, 3),
        make_case("conv", "NWC", "VALID", [0], [3], [2], [1], "max", 1, 2, 3),
        make_case("conv", "NHWC", "VALID", [0, 2], [3, 2], [2, 1], [1, 1], "max", 2, 2, 3),
    ]
    # 3-D SAME conv whose padding total (out-1)*s + eff - I is clamped from -2 to 0:
    # TF float32 (oneDNN) pads 0; TF's float64 Eigen kernel shifts the window by one
    # instead, which the guard catches (reported as refused).
    zs.append(make_case("conv", "NDHWC", "SAME", [1, 2, 1], [2, 1, 1], [4, 3, 1], [1, 1, 1],
                        "max", 1, 2, 3, tag="negpad"))
    for c in zs:
        if c["tag"] == "batch0":
            c["batch"] = 0
        extra.append(c)
        # float64 too: its (stock) kernels validate shapes that oneDNN float32 skips for empty inputs
        if channels_last(c["fmt"]):
            extra.append(dict(c, dtype="float64"))

    for c in extra:
        unique.setdefault(case_name(c), c)
    return list(unique.values())


# ---------------------------------------------------------------- running TF

def draw_inputs(case):
    """Standard normal input/filters from an RNG keyed by the geometry, cast to the dtype.

    Keying by geometry (not dtype) makes the float64/float16/bfloat16 variants of a
    case use the same underlying draw as its float32 version.
    """
    key = zlib.crc32(case_name(case, with_dtype=False).encode())
    rng = np.random.default_rng([SEED, key])
    xs, fs, _ = case_arrays_shapes(case)
    np_dt = NP_DTYPES[case["dtype"]]
    # float64 draw, rounded once to the dtype (ml_dtypes rounds to nearest for bfloat16).
    x = rng.standard_normal(xs).astype(np_dt)
    f = rng.standard_normal(fs).astype(np_dt)
    return x, f


def tf_padding(case):
    """TF's padding argument: a string, or the N+2 list in data_format order."""
    if isinstance(case["padding"], str):
        return case["padding"]
    pairs = [list(p) for p in case["padding"]]
    if channels_last(case["fmt"]):
        return [[0, 0]] + pairs + [[0, 0]]
    return [[0, 0], [0, 0]] + pairs


def run_tf(case, x, f):
    tdt = TF_DTYPES[case["dtype"]]
    xt = tf.constant(x, dtype=tdt)
    ft = tf.constant(f, dtype=tdt)
    if case["op"] == "conv_transpose":
        y = tf.nn.conv_transpose(xt, ft, case_arrays_shapes(case)[2], strides=case["s"],
                                 padding=tf_padding(case), data_format=case["fmt"],
                                 dilations=case["d"])
    else:
        y = tf.nn.convolution(xt, ft, strides=case["s"], padding=tf_padding(case),
                              data_format=case["fmt"], dilations=case["d"])
    return y.numpy()


def tf_float64_check(case, x, f):
    """TF's answer for the same arrays through its float64 (Eigen) kernels, in the case's layout.

    A guard, not the golden: oneDNN float32 has bugs that return uninitialised
    memory (e.g. 3-D VALID conv with an output width of 1), so every result is
    compared with this before it is stored. The Eigen kernels are
    channels-last only (we transpose there and back) and their transposed conv
    refuses dilation, so a dilated filter is replaced by its zero-upsampled
    equivalent (TF_SEMANTICS.md section 8: same result, same padding).
    """
    first = not channels_last(case["fmt"])
    last_fmt = "N" + case["fmt"][2:] + "C" if first else case["fmt"]
    x64 = np.moveaxis(x, 1, -1) if first else x
    x64, f64 = x64.astype(np.float64), np.asarray(f).astype(np.float64)
    pad = case["padding"] if isinstance(case["padding"], str) else \
        [[0, 0]] + [list(p) for p in case["padding"]] + [[0, 0]]  # conv_transpose only
    if case["op"] == "conv_transpose":
        K, d = case["K"], case["d"]
        up = np.zeros([(k - 1) * dd + 1 for k, dd in zip(K, d)] + list(f64.shape[-2:]))
        up[tuple(slice(None, None, dd) for dd in d)] = f64
        shape = case_arrays_shapes(case)[2]
        if first:
            shape = [shape[0]] + shape[2:] + [shape[1]]
        y = tf.nn.conv_transpose(x64, up, shape, strides=case["s"], padding=pad,
                                 data_format=last_fmt).numpy()
    else:
        # Pad by hand and run a VALID conv: TF's 3-D float64/float16 conv (Eigen)
        # mis-handles SAME when the padding total max(0, (out-1)*s + eff - I) is
        # clamped from <= -2 (it shifts the window instead), and takes a padding
        # list only when dilated.
        pads = [(0, 0)] + [conv_pads(*a) for a in
                           zip(case["I"], case["K"], case["s"], case["d"], case["pads"])] + [(0, 0)]
        y = tf.nn.convolution(np.pad(x64, pads), f64, strides=case["s"], padding="VALID",
                              data_format=last_fmt, dilations=case["d"]).numpy()
    return np.moveaxis(y, -1, 1) if first else y


# Scaled error (see sweep_tf.py: max|a-b| / (sqrt(terms) * max|x| * max|f|)) above
# which a result is treated as wrong; loose for float16/bfloat16, whose outputs
# are rounded to ~3 / ~2 significant digits. float64 results are checked too:
# the reformulated float64 computation takes a different TF code path.
GUARD_TOL = {"float64": 1e-12, "float32": 1e-5, "float16": 5e-3, "bfloat16": 2e-2}


def guard_error(case, x, f, y):
    """Scaled error of TF's result against TF float64, or 0 for empty arrays."""
    if y.size == 0 or np.asarray(x).size == 0 or np.asarray(f).size == 0:
        return 0.0 if not np.any(np.asarray(y, dtype=np.float64)) else float("inf")
    ref = tf_float64_check(case, x, f)
    xf, ff = np.asarray(x, dtype=np.float64), np.asarray(f, dtype=np.float64)
    in_ch = ff.shape[-1] if case["op"] == "conv_transpose" else ff.shape[-2]
    terms = in_ch * int(np.prod(case["K"]))
    err = np.max(np.abs(np.asarray(y, dtype=np.float64) - ref))
    return float(err / (np.sqrt(terms) * np.abs(xf).max() * np.abs(ff).max()))


def short_error(e):
    """First line of a TF error, without the {{function_node ...}} prefix and [Op:...] suffix."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if msg.startswith("{{function_node"):
        msg = msg.split("}}", 1)[1].strip()
    msg = msg.split(" [Op:")[0]
    return f"{type(e).__name__}: {msg[:200]}"


def params_json(case, out_shape):
    return json.dumps({
        "op": case["op"],
        "output_shape": out_shape if case["op"] == "conv_transpose" else None,
        "strides": case["s"],
        "dilations": case["d"],
        "padding": case["padding"] if isinstance(case["padding"], str)
        else [list(p) for p in case["padding"]],
        "data_format": case["fmt"],
        "dtype": case["dtype"],
        "source": f"tf {tf.__version__} {case['dtype']}",
    })


def save_npz(path, arrays):
    """Like np.savez_compressed, but with a fixed member timestamp so reruns are byte-identical."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def stored(arr, dtype):
    # bfloat16 is not a numpy dtype np.load understands without ml_dtypes: store
    # the exact bf16 values as float32 (lossless).
    return np.asarray(arr).astype(np.float32) if dtype == "bfloat16" else np.asarray(arr)


def main():
    for old in OUT_DIR.glob("*.npz"):
        old.unlink()

    written = Counter()
    detail = Counter()
    refused = []
    flaky = []
    for case in build_grid():
        name = case_name(case)
        x, f = draw_inputs(case)
        expected_out = case_arrays_shapes(case)[2]
        try:
            y = run_tf(case, x, f)
        except Exception as e:  # TF refuses: report and skip
            refused.append(f"refused: {name}: {short_error(e)}")
            continue
        # oneDNN float32 conv returns a wrongly shaped, uninitialised result when a
        # VALID output would be empty; never store a result of the wrong shape.
        if list(y.shape) != expected_out:
            refused.append(f"refused: {name}: TF returned shape {list(y.shape)}, "
                           f"expected {expected_out} (bogus result, not stored)")
            continue
        # Guard against TF kernel bugs. The oneDNN ones can be flaky (uninitialised
        # memory): retry a few times and keep the first result the guard confirms.
        errs = [guard_error(case, x, f, y)]
        while not errs[-1] <= GUARD_TOL[case["dtype"]] and len(errs) < 5:
            y = run_tf(case, x, f)
            errs.append(guard_error(case, x, f, y))
        tries = ", ".join(f"{e:.3g}" for e in errs)
        if not errs[-1] <= GUARD_TOL[case["dtype"]]:
            refused.append(f"refused: {name}: TF {case['dtype']} disagrees with the float64 guard "
                           f"on {len(errs)} tries (scaled errors {tries}): not stored")
            continue
        if len(errs) > 1:
            flaky.append(f"flaky: {name}: TF {case['dtype']} wrong, then right "
                         f"(scaled errors vs the guard {tries}); stored the right one")
        save_npz(OUT_DIR / f"{name}.npz", {
            "input": stored(x, case["dtype"]),
            "filters": stored(f, case["dtype"]),
            "output": stored(y, case["dtype"]),
            "params": np.array(params_json(case, expected_out)),
        })
        written[(case["op"], case["dtype"])] += 1
        pad = case["padding"] if isinstance(case["padding"], str) else "explicit"
        layout = "channels-last" if channels_last(case["fmt"]) else "channels-first"
        detail[(case["op"], case["dtype"], f"{len(case['K'])}-D", layout, pad)] += 1

    for line in refused + flaky:
        print(line)
    print()
    print("per op / dtype / N / layout / padding:")
    for key in sorted(detail):
        print("  " + " ".join(key) + f": {detail[key]}")
    print()
    for (op, dt), n in sorted(written.items()):
        print(f"written: {op} {dt}: {n}")
    total = sum(p.stat().st_size for p in OUT_DIR.glob("*.npz"))
    print(f"total: {sum(written.values())} files, {total / 1e6:.2f} MB; "
          f"{len(refused)} refused by TF (tf {tf.__version__})")


if __name__ == "__main__":
    main()
