"""Sweep random legal configurations against live TensorFlow (acceptance check).

Draws --count random LEGAL conv_transpose configurations (float32) and runs
both tf.nn.conv_transpose and convt's conv_transpose on the same arrays; for a
share of them (--conv-share) it also runs tf.nn.convolution and convt's conv.
Prints one line per disagreement and a final summary line:

    sweep: 1000 configs (seed 12345): 0 disagreements, max scaled error X

Exit code 1 if there is any disagreement, 0 otherwise.

Run it by hand from the repo root, with convt installed or on PYTHONPATH, and a
Python that has tensorflow-cpu (2.21) and numpy installed (TensorFlow is not a
dependency of convt; this is never run in CI):

    PYTHONPATH=. python tests/golden/sweep_tf.py --count 1000 --seed 12345
    PYTHONPATH=. python tests/golden/sweep_tf.py --seed 12345 --only 417   # replay one config
    python tests/golden/sweep_tf.py --dry-run      # TF half only, convt not needed

Configurations (each drawn from its own RNG seeded with (seed, index), so
--only replays config i exactly): N in 1..3, channels-last or channels-first,
SAME or VALID, per-axis stride 1-4, dilation 1-3, kernel 1-5, input size 1-9,
output size uniform over the legal range of each axis (TF_SEMANTICS.md
section 4), batch 1-3, channels 1-8 (in and out drawn independently).
The conv check reuses the config: its input has the transposed op's output
shape and its filters are the same array read as spatial + [in, out], so
TF's conv maps it back to the transposed op's input size. tf.nn.convolution
forbids stride > 1 together with dilation > 1, so for such a config the conv
check sets either the strides or the dilations (a coin flip) to 1; its output
shape then follows the forward-conv size rule.

Tolerance. Every output element is a sum of at most T = in_channels * prod(K)
products, each bounded by max|input| * max|filters|. Rounding in a float32 sum
of T such terms grows like sqrt(T) * eps32 * max|input| * max|filters| (random
signs; eps32 = 2**-24 ~ 6e-8), and TF (oneDNN, own summation order) and convt
each add such an error. So the score is

    scaled error = max|convt - tf| / (sqrt(T) * max|input| * max|filters|)

and a config disagrees when it exceeds --tol (default 1e-5, ~170 eps32: far
above rounding noise, far below the error of a single misplaced or missing
tap, which is of the order of one |x * f| product). A wrong output shape or
dtype, or one side raising while the other returns, is also a disagreement.

TF float32 is not always right: its oneDNN kernels have bugs (e.g. some 3-D
VALID convs with an output width of 1 read uninitialised memory). So when the
values differ, the sweep asks TF float64 for a second opinion (TF's own Eigen
kernels, reached by another route: see tf_float64). If that agrees with convt
and not with TF float32, the config is printed as TF-FLOAT32-WRONG and not
counted (--strict counts it); its max scaled error then counts convt against
TF float64.
"""

import argparse
import json
import os
import sys

# Silence TF's C++ start-up chatter (oneDNN / CPU feature banners).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

FORMATS = {1: ("NWC", "NCW"), 2: ("NHWC", "NCHW"), 3: ("NDHWC", "NCDHW")}


def output_range(I, K, s, d, padding):
    """Legal output sizes O of a transposed conv along one axis (TF_SEMANTICS.md section 4)."""
    eff = (K - 1) * d + 1
    if padding == "SAME":
        return (I - 1) * s + 1, I * s
    return (I - 1) * s + eff, I * s + eff - 1


def conv_output_size(I, K, s, d, padding):
    """Forward conv output size along one axis (TF's GetWindowedOutputSize)."""
    if padding == "SAME":
        return -(-I // s)
    return max(0, (I - (K - 1) * d - 1 + s) // s)


def full_shape(fmt, batch, spatial, channels):
    if fmt.startswith("NC"):
        return [batch, channels] + list(spatial)
    return [batch] + list(spatial) + [channels]


def draw_config(seed, index, conv_share):
    """One random legal configuration; its own RNG, so any index can be replayed alone."""
    rng = np.random.default_rng([seed, index])
    N = int(rng.integers(1, 4))
    fmt = str(rng.choice(FORMATS[N]))
    padding = str(rng.choice(["SAME", "VALID"]))
    s = [int(v) for v in rng.integers(1, 5, N)]
    d = [int(v) for v in rng.integers(1, 4, N)]
    K = [int(v) for v in rng.integers(1, 6, N)]
    I = [int(v) for v in rng.integers(1, 10, N)]
    O = [int(rng.integers(lo, hi + 1)) for lo, hi in
         (output_range(*a, padding) for a in zip(I, K, s, d))]
    batch = int(rng.integers(1, 4))
    cin = int(rng.integers(1, 9))
    cout = int(rng.integers(1, 9))
    with_conv = bool(rng.random() < conv_share)
    conv_s, conv_d = list(s), list(d)
    if max(s) > 1 and max(d) > 1:  # tf.nn.convolution forbids this mix
        if rng.random() < 0.5:
            conv_s = [1] * N
        else:
            conv_d = [1] * N
    cfg = dict(index=index, N=N, data_format=fmt, padding=padding, strides=s, dilations=d,
               kernel=K, input_shape=full_shape(fmt, batch, I, cin),
               output_shape=full_shape(fmt, batch, O, cout),
               filters_shape=K + [cout, cin])
    if with_conv:
        cfg["conv"] = dict(strides=conv_s, dilations=conv_d, output_shape=full_shape(
            fmt, batch, [conv_output_size(*a, padding) for a in zip(O, K, conv_s, conv_d)], cin))
    x = rng.standard_normal(cfg["input_shape"]).astype(np.float32)
    f = rng.standard_normal(cfg["filters_shape"]).astype(np.float32)
    # conv input: shaped like the transposed op's output.
    y = rng.standard_normal(cfg["output_shape"]).astype(np.float32) if with_conv else None
    return cfg, x, f, y


def forced(strategy, x, f, cfg):
    """convt's conv_transpose with the engine strategy given, not the one it would choose."""
    from convt_cli import engine
    from convt_cli.shapes import plan_conv_transpose

    plan = plan_conv_transpose(x.shape, f.shape, cfg["output_shape"], cfg["strides"], cfg["padding"],
                               cfg["data_format"], cfg["dilations"])
    return engine.run_conv_transpose(plan, x, f, strategy=strategy)


def tf_conv_transpose(cfg, x, f):
    return tf.nn.conv_transpose(x, f, cfg["output_shape"], strides=cfg["strides"],
                                padding=cfg["padding"], data_format=cfg["data_format"],
                                dilations=cfg["dilations"]).numpy()


def tf_conv(cfg, y, f):
    return tf.nn.convolution(y, f, strides=cfg["conv"]["strides"], padding=cfg["padding"],
                             data_format=cfg["data_format"],
                             dilations=cfg["conv"]["dilations"]).numpy()


def tf_float64(op, cfg, inp, f):
    """TF's float64 answer by another route, or None where TF cannot give one.

    Only a tie-breaker when TF float32 and convt disagree: float64 runs TF's own
    (Eigen) kernels instead of oneDNN, so it is an independent second opinion.
    Those kernels are channels-last only (arrays are transposed there and back);
    the transposed one refuses dilation, so a dilated filter is replaced by its
    zero-upsampled equivalent (TF_SEMANTICS.md section 8); and the 3-D forward one
    mis-pads SAME when the padding total is clamped from <= -2 to 0, so conv gets
    its padding applied by hand and runs VALID.
    """
    fmt = cfg["data_format"]
    first = fmt.startswith("NC")
    last_fmt = "N" + fmt[2:] + "C" if first else fmt
    x64 = (np.moveaxis(inp, 1, -1) if first else inp).astype(np.float64)
    f64 = f.astype(np.float64)
    try:
        if op == "conv_transpose":
            d = cfg["dilations"]
            up = np.zeros([(k - 1) * dd + 1 for k, dd in zip(cfg["kernel"], d)] + list(f.shape[-2:]))
            up[tuple(slice(None, None, dd) for dd in d)] = f64
            shape = cfg["output_shape"]
            if first:
                shape = [shape[0]] + shape[2:] + [shape[1]]
            out = tf.nn.conv_transpose(x64, up, shape, strides=cfg["strides"],
                                       padding=cfg["padding"], data_format=last_fmt)
        else:
            s, d = cfg["conv"]["strides"], cfg["conv"]["dilations"]
            pads = [(0, 0)]
            for size, k, ss, dd in zip(x64.shape[1:-1], cfg["kernel"], s, d):
                total = 0
                if cfg["padding"] == "SAME":
                    total = max(0, (-(-size // ss) - 1) * ss + (k - 1) * dd + 1 - size)
                pads.append((total // 2, total - total // 2))
            out = tf.nn.convolution(np.pad(x64, pads + [(0, 0)]), f64, strides=s,
                                    padding="VALID", data_format=last_fmt, dilations=d)
    except Exception:
        return None
    out = out.numpy()
    return np.moveaxis(out, -1, 1) if first else out


def short_error(e):
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if msg.startswith("{{function_node"):
        msg = msg.split("}}", 1)[1].strip()
    return f"{type(e).__name__}: {msg.split(' [Op:')[0][:200]}"


def scaled_error(a, b, inp, filters, n_terms):
    """(max abs error, scaled error) between two same-shaped results; see the docstring."""
    if a.size == 0:
        return 0.0, 0.0
    err = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
    scale = np.sqrt(n_terms) * float(np.max(np.abs(inp))) * float(np.max(np.abs(filters)))
    scaled = err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))
    return err, (scaled if np.isfinite(scaled) else float("inf"))


def check(tf_fn, convt_fn, tf64_fn, inp, filters, n_terms, expected_shape):
    """Run TF and (unless dry run) convt on one op.

    Returns (status, message, scaled error): status "ok", "disagree", or
    "tf32_wrong" (TF float32 differs from convt, but TF float64 agrees with
    convt and not with TF float32).
    """
    try:
        expected = tf_fn()
        tf_err = None
    except Exception as e:  # a legal config TF refuses: convt must refuse it too
        expected, tf_err = None, short_error(e)
    if tf_err is None and list(expected.shape) != list(expected_shape):
        return ("disagree", f"TF returned shape {list(expected.shape)}, "
                f"expected {list(expected_shape)}", 0.0)
    if ARGS.dry_run:
        if tf_err is not None:
            return "disagree", f"TF refused a legal config: {tf_err}", 0.0
        return "ok", "", 0.0

    try:
        got = np.asarray(convt_fn())
        convt_err = None
    except Exception as e:
        got, convt_err = None, f"{type(e).__name__}: {str(e)[:200]}"
    if tf_err is not None:
        if convt_err is not None:
            return "ok", "", 0.0  # both refuse
        return "disagree", f"TF refused ({tf_err}) but convt returned shape {list(got.shape)}", 0.0
    if convt_err is not None:
        return "disagree", f"convt raised {convt_err}", float("inf")
    if got.shape != expected.shape:
        return ("disagree", f"convt shape {list(got.shape)} != TF {list(expected.shape)}",
                float("inf"))

    err, scaled = scaled_error(got, expected, inp, filters, n_terms)
    if scaled > ARGS.tol:
        msg = f"values differ: max abs error {err:.3g}, scaled {scaled:.3g}"
        ref = tf64_fn()
        if ref is None:
            return "disagree", msg + " (no TF float64 tie-breaker for this config)", scaled
        _, convt_vs_64 = scaled_error(got, ref, inp, filters, n_terms)
        _, tf32_vs_64 = scaled_error(expected, ref, inp, filters, n_terms)
        msg += f"; vs TF float64: convt scaled {convt_vs_64:.3g}, TF float32 scaled {tf32_vs_64:.3g}"
        if convt_vs_64 <= ARGS.tol < tf32_vs_64:
            return "tf32_wrong", msg, convt_vs_64
        return "disagree", msg, scaled
    if got.dtype != expected.dtype:
        return "disagree", f"convt dtype {got.dtype} != TF {expected.dtype}", scaled
    return "ok", "", scaled


def main():
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=1000, help="number of configurations")
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--only", type=int, default=None, help="run only config INDEX (replay)")
    p.add_argument("--conv-share", type=float, default=0.5,
                   help="fraction of configs that also check conv (default 0.5)")
    p.add_argument("--tol", type=float, default=1e-5, help="max scaled error (see docstring)")
    p.add_argument("--strategy", default=None,
                   help="force one of convt's engine strategies (engine.STRATEGIES) instead of its choice")
    p.add_argument("--strict", action="store_true",
                   help="count configs where TF float32 itself is wrong as disagreements too")
    p.add_argument("--dry-run", action="store_true",
                   help="run only the TF half (convt not imported)")
    ARGS = p.parse_args()

    convt_ct = convt_conv = None
    if not ARGS.dry_run:
        try:
            from convt_cli import conv_transpose as convt_ct
        except ImportError as e:
            sys.exit(f"cannot import convt_cli.conv_transpose ({e}); run from the repo root "
                     "with convt installed or on PYTHONPATH, or use --dry-run")
        try:
            from convt_cli import conv as convt_conv
        except ImportError:
            print("note: convt_cli.conv not importable; conv checks skipped")

    indices = [ARGS.only] if ARGS.only is not None else range(ARGS.count)
    counts = {"conv_transpose": 0, "conv": 0}
    disagreements = tf32_wrong = 0
    max_scaled = 0.0
    for i in indices:
        cfg, x, f, y = draw_config(ARGS.seed, i, ARGS.conv_share)
        runs = [(
            "conv_transpose",
            {k: v for k, v in cfg.items() if k != "conv"},
            lambda: tf_conv_transpose(cfg, x, f),
            lambda: convt_ct(x, f, output_shape=cfg["output_shape"], strides=cfg["strides"],
                             padding=cfg["padding"], data_format=cfg["data_format"],
                             dilations=cfg["dilations"]) if ARGS.strategy is None else
            forced(ARGS.strategy, x, f, cfg),
            lambda: tf_float64("conv_transpose", cfg, x, f),
            x,
            # Terms per output: every (input channel, tap) pair; filters[-1] = input channels.
            f.shape[-1] * int(np.prod(cfg["kernel"])),
            cfg["output_shape"],
        )]
        if y is not None and (convt_conv is not None or ARGS.dry_run):
            runs.append((
                "conv",
                # Seen from conv's side: its input is the transposed op's output.
                dict(index=i, N=cfg["N"], data_format=cfg["data_format"],
                     padding=cfg["padding"], strides=cfg["conv"]["strides"],
                     dilations=cfg["conv"]["dilations"], kernel=cfg["kernel"],
                     input_shape=cfg["output_shape"], filters_shape=cfg["filters_shape"],
                     output_shape=cfg["conv"]["output_shape"]),
                lambda: tf_conv(cfg, y, f),
                lambda: convt_conv(y, f, strides=cfg["conv"]["strides"], padding=cfg["padding"],
                                   data_format=cfg["data_format"],
                                   dilations=cfg["conv"]["dilations"]),
                lambda: tf_float64("conv", cfg, y, f),
                y,
                # conv reads filters as spatial + [in, out]: filters[-2] = its input channels.
                f.shape[-2] * int(np.prod(cfg["kernel"])),
                cfg["conv"]["output_shape"],
            ))
        for op, shown, tf_fn, convt_fn, tf64_fn, inp, n_terms, out_shape in runs:
            status, msg, scaled = check(tf_fn, convt_fn, tf64_fn, inp, f, n_terms, out_shape)
            counts[op] += 1
            max_scaled = max(max_scaled, scaled)
            if status == "tf32_wrong" and not ARGS.strict:
                tf32_wrong += 1
                print(f"TF-FLOAT32-WRONG {op} {json.dumps(shown)}: {msg}", flush=True)
            elif status != "ok":
                disagreements += 1
                print(f"DISAGREE {op} {json.dumps(shown)}: {msg}", flush=True)

    mode = " (dry run: TF only)" if ARGS.dry_run else ""
    print(f"checked{mode}: {counts['conv_transpose']} conv_transpose, {counts['conv']} conv "
          f"(tf {tf.__version__}, tol {ARGS.tol:g} scaled); {tf32_wrong} where TF float32 "
          "is wrong and TF float64 agrees with convt (not counted)")
    label = f"config {ARGS.only}" if ARGS.only is not None else f"{ARGS.count} configs"
    print(f"sweep{mode}: {label} (seed {ARGS.seed}): {disagreements} disagreements, "
          f"max scaled error {max_scaled:.3g}")
    sys.exit(1 if disagreements else 0)


if __name__ == "__main__":
    main()
