"""The adjoint check: does `output` equal conv_transpose(input, filters) under these flags?

`verify_conv_transpose` never calls conv_transpose. It draws K seeded probes x of the output's shape and
compares, per probe, the two sides of the adjoint identity

    a = <OUT, x>                          (one pass over OUT)
    b = <IN, conv(x, conj(W))>            (a forward convolution: gather, written here, not the engine's)

with <p, q> = sum(conj(p) * q). conv_transpose is bilinear (no conjugation): OUT[j] = sum IN[i] W[t] over
the (i, t) pairs that reach j, so conj(OUT[j]) = sum conj(IN[i]) conj(W[t]) and
<OUT, x> = sum conj(IN[i]) conj(W[t]) x[j] = <IN, conv(x, conj(W))>. For real dtypes conj is the identity.

Probes are rank one over channels: x_k[batch, pos, c] = u_k[batch, pos] * v_k[c], so for any error E of the
output E[|<E, x_k>|^2] = ||E||^2, while both sides stay cheap:
    a_k = sum_pos u_k[pos] * (conj(OUT[pos, :]) @ v_k)                      one GEMM over OUT for all K probes
    b_k = sum_taps sum_pos U_k,tap[pos] * (conj(IN[pos, :]) @ Wv_k[tap, :])  one GEMM over IN per tap group
where Wv_k[tap, ci] = sum_co v_k[co] conj(W[tap, co, ci]) and U_k,tap is the stride/dilation gather of u_k
zero-padded by the forward conv's pads (plan.pads) for that tap. Every product and sum is done in float64
(complex128 for complex data), whatever the data's dtype; sums over positions are pairwise, and the per batch
element results are added exactly (math.fsum).

Cost: the GEMMs (each with its twin on squared magnitudes, for S below) are 2K / out_channels + 2K * prod(s) /
(taps * in_channels) of the run's FLOPs (W1: 0.14); the rest is elementwise work on K * (output positions +
taps * input positions) probe values, which dominates when in_channels * out_channels is small.
Python loops over tap groups and batch groups only (and over batch elements to seed their probes). The batch
is processed in groups of about 2**20 elements per working array, at least one batch element; besides the
group's float64 copies of output and input, the probe field (K x padded output positions, float64) is the
largest array, smaller than the output while out_channels * itemsize > 8 * K.

Probe stream (reproducible; independent of how the batch is chunked):
    v = default_rng([seed, 0]).standard_normal((K, out_channels))
    u[b] = default_rng([seed, 1, b]).standard_normal((K, *out_spatial))     for batch element b
For complex dtypes each draw is standard_normal((2, *shape)) and the probe is (draw[0] + 1j*draw[1]) / sqrt(2).

Residual (per probe; free of the problem's size and of the data's scale, since both sides grow alike):
    r_k = |a_k - b_k| / S_k,   S_k^2 = sum_j |x_k[j]|^2 * (|OUT[j]|^2 + Q[j]),
    Q[j] = the sum of |IN[i] * W[t]|^2 over the terms summed into OUT[j]
S_k is computed by the same two passes on squared magnitudes (|OUT|^2, |IN|^2, |W|^2, |u|^2, |v|^2). If each
output element is off by at most e * sqrt(|OUT[j]|^2 + Q[j]), with independent signs, then r_k ~ e: rounding
the result costs e = eps_out, and accumulating n terms costs e ~ eps_acc * sqrt(n) (a random walk whose steps
are the partial sums, bounded by |OUT[j]| when the terms share a sign and by sqrt(Q[j]) when they cancel).

Tolerance (overridden by `rtol`):
    tol = 4 * (eps_out + eps_acc * sqrt(n) + 2**-52 * sqrt(out_channels))
    n   = in_channels * prod_j min(K_j, I_j, ceil(K_j * gcd(s_j, d_j) / s_j))   terms summed per output element
eps_out is the output dtype's machine epsilon (float16 2**-10, bfloat16 2**-7, float32 and complex64 2**-23,
float64 and complex128 2**-52; int32 0, its results are exact); eps_acc that of the precision the producer
accumulates in: float32 for float16, bfloat16, float32 and complex64 (as TF and convt do), float64 for the
others (int32: verify's own float64 arithmetic). The last term is verify's own float64 rounding in its sums
over out_channels. On TF's goldens and on convt's outputs (float16 to float64, complex64, int32; zero-mean and
all-positive data; n up to 9216) no residual exceeded 0.3 * tol in over 200,000 probes: the factor 4 leaves room
for the tails of the probe statistics. The tolerance is statistical, not a
worst-case bound: pass `rtol` for a producer that accumulates in float16/bfloat16, or for data whose partial
sums dwarf both |OUT| and sqrt(Q).

Non-finite values in the output fail the check without evaluating the identity (the report counts them).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from .engine.dtypes import as_arrays
from .errors import ConvtError
from .shapes import Plan, block_sizes, plan_conv_transpose

DEFAULT_PROBES = 8
SAFETY = 4.0
# dtype -> (eps_out, eps_acc): the result's rounding and the precision a producer accumulates in
EPS = {
    "float16": (2.0**-10, 2.0**-23),
    "bfloat16": (2.0**-7, 2.0**-23),
    "float32": (2.0**-23, 2.0**-23),
    "float64": (2.0**-52, 2.0**-52),
    "int32": (0.0, 2.0**-52),
    "complex64": (2.0**-23, 2.0**-23),
    "complex128": (2.0**-52, 2.0**-52),
}
_EPS_VERIFY = 2.0**-52
_BUDGET = 1 << 20  # elements per working array: bounds memory to a few output-sized arrays at most


@dataclass(frozen=True)
class Probe:
    """One probe: a = <OUT, x>, b = <IN, conv(x, conj W)> (complex for complex dtypes), the scale S and
    residual = |a - b| / S."""

    a: float | complex
    b: float | complex
    scale: float
    residual: float


@dataclass(frozen=True)
class Tile:
    """A part of the output checked on its own: batch element `batch`, spatial box [lo, hi) per axis, and the
    largest residual of its probes (each probe's a, b and S restricted to the tile)."""

    batch: int
    box: tuple[tuple[int, int], ...]
    residual: float


@dataclass(frozen=True)
class VerifyReport:
    """What `verify_conv_transpose` found.

    passed: every residual <= tolerance and the output is finite.
    probes: per probe (a, b, scale, residual), in draw order; empty when the identity was not evaluated (non-finite
        output).
    tolerance: the bound on each residual; tolerance_is_default is False when `rtol` set it.
    seed, probe_count: what the probes were drawn from (see the module docstring).
    dtype: the data's dtype name; output_shape: the output's full shape in data_format order.
    nonfinite_output: how many output elements are nan or +-inf.
    terms_per_output: n, the most products summed into one output element (enters the default tolerance).
    tile_count, failing_tiles: the output is also checked tile by tile (a batch element's image, cut into blocks
        of at most TILE_ELEMENTS values: tile_sizes), each tile's residual held to the same tolerance (by
        Cauchy-Schwarz a tile's residual is at most the worst relative error of its values, so a correct output
        passes whatever the tiling, while an error is measured against its own tile, not the whole output); the
        tiles over the tolerance, in batch and box order. output_spatial: the image the boxes are in.
    """

    passed: bool
    probes: tuple[Probe, ...]
    tolerance: float
    tolerance_is_default: bool
    seed: int
    dtype: str
    probe_count: int
    nonfinite_output: int
    terms_per_output: int
    output_shape: tuple[int, ...]
    context: dict = field(default_factory=dict, compare=False)  # what was checked (files, flags, time): to_dict's
    tile_count: int = 0
    failing_tiles: tuple[Tile, ...] = ()
    output_spatial: tuple[int, ...] = ()  # the image a tile's box is in
    hint: str | None = None  # what a failing output matches instead (stream.likely_cause), when it was looked for

    @property
    def max_residual(self) -> float:
        """The largest residual (nan if any is nan, or if no probe was evaluated)."""
        if not self.probes:
            return math.nan
        rs = [p.residual for p in self.probes]
        return math.nan if any(math.isnan(r) for r in rs) else max(rs)

    def to_dict(self) -> dict:
        """Plain JSON types only: complex as [re, im], non-finite floats as None."""
        return {
            **self.context,
            "passed": self.passed,
            "summary": self.summary(),
            "dtype": self.dtype,
            "output_shape": list(self.output_shape),
            "seed": self.seed,
            "probe_count": self.probe_count,
            "nonfinite_output": self.nonfinite_output,
            "terms_per_output": self.terms_per_output,
            "tolerance": _json_number(self.tolerance),
            "tolerance_is_default": self.tolerance_is_default,
            "max_residual": _json_number(self.max_residual),
            "probes": [
                {key: _json_number(getattr(p, key)) for key in ("a", "b", "scale", "residual")}
                for p in self.probes
            ],
            "hint": self.hint,
            "tile_count": self.tile_count,
            "failing_tiles": [{"batch": t.batch, "box": [list(b) for b in t.box], "residual": _json_number(t.residual)}
                              for t in self.failing_tiles],
        }

    def summary(self) -> str:
        """One line for a person, e.g. `PASS: max residual 1.2e-07, 340x below the tolerance 4.1e-05 (8 probes,
        float32 output (2, 16, 16, 4), seed 0)`: how far inside or outside the bound the worst probe is."""
        where = f"{self.dtype} output {tuple(self.output_shape)}, seed {self.seed}"
        if self.nonfinite_output:
            return f"FAIL: the output holds {_count(self.nonfinite_output, 'non-finite value')} (inf or nan) ({where})"
        worst, tol = self.max_residual, self.tolerance
        probes = _count(self.probe_count, "probe")
        if self.passed:
            inside = (f"max residual {worst:.1e}, {_times(tol / worst)} below the tolerance {tol:.1e}" if worst > 0
                      else f"max residual 0 (exact), within the tolerance {tol:.1e}")
            return f"PASS: {inside} ({probes}, {where})"
        if math.isnan(worst):
            return f"FAIL: a probe's residual is nan (inf or nan in INPUT or FILTERS?) ({probes}, {where})"
        bad = sum(1 for p in self.probes if not p.residual <= tol)
        tiles = [t.residual for t in self.failing_tiles]
        worst = max([worst, *tiles])
        over = f"{_times(worst / tol)} the tolerance" if tol > 0 else "over a tolerance of"
        probes = f", in {bad} of {probes}" if bad else ""
        hint = f"; {self.hint}" if self.hint else ""
        return f"FAIL: max residual {worst:.1e}, {over} {tol:.1e}{probes}{self._where_wrong()} ({where}){hint}"

    def _where_wrong(self) -> str:
        """'; wrong in batch element 3 of 8', '; wrong in batch elements 3, 5 and 7 of 8', '... and 12 more'."""
        if not self.failing_tiles:
            return ""
        batches = sorted({t.batch for t in self.failing_tiles})
        shown = [str(b) for b in batches[:5]]
        listed = shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1]
        if len(batches) > 5:
            listed = ", ".join(shown) + f" and {len(batches) - 5:,} more"
        noun = "element" if len(batches) == 1 else "elements"
        first = self.failing_tiles[0]
        box = ""
        if any(hi - lo < n for (lo, hi), n in zip(first.box, self.output_spatial)):  # part of an image: which
            more = len(self.failing_tiles) - 1
            box = (f", first at [{', '.join(f'{lo}:{hi}' for lo, hi in first.box)}] of element {first.batch}"
                   + (f" ({more:,} more tile{'s' if more > 1 else ''})" if more else ""))
        return f"; wrong in batch {noun} {listed} of {self.output_shape[0]:,}{box}"


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _times(ratio: float) -> str:
    """How many times: 1.5x, 38x, 1,900x; 'over 1,000,000x' past that."""
    if ratio >= 1e6:
        return "over 1,000,000x"
    return f"{ratio:.1f}x" if ratio < 10 else f"{ratio:,.0f}x"


def _json_number(value):
    if isinstance(value, complex):
        return [_json_number(value.real), _json_number(value.imag)]
    value = float(value)
    return value if math.isfinite(value) else None


def terms_per_output(plan: Plan) -> int:
    """Most products summed into one output element: in_channels times the taps that can meet there."""
    taps = 1
    for i, k, s, d in zip(plan.input_spatial, plan.kernel, plan.spec.strides, plan.spec.dilations):
        # taps t, t' reach the same output iff (t - t') * d = 0 mod s, i.e. t = t' mod s / gcd(s, d)
        taps *= min(k, i, -(-k * math.gcd(s, d) // s))
    return plan.in_channels * taps


def default_tolerance(dtype_name: str, plan: Plan) -> float:
    """4 * (eps_out + eps_acc * sqrt(n) + 2**-52 * sqrt(out_channels)); see the module docstring."""
    eps_out, eps_acc = EPS[dtype_name]
    n = max(1, terms_per_output(plan))
    return SAFETY * (eps_out + eps_acc * math.sqrt(n) + _EPS_VERIFY * math.sqrt(max(1, plan.out_channels)))


def verify_conv_transpose(
    input,
    filters,
    output,
    strides=1,
    padding="SAME",
    data_format=None,
    dilations=None,
    probes=None,
    seed=0,
    rtol=None,
) -> VerifyReport:
    """Check that `output` is conv_transpose(input, filters, output.shape, ...) without computing it.

    Args:
        input: (batch, *spatial, in_channels), or (batch, in_channels, *spatial) channels-first.
        filters: (*kernel, out_channels, in_channels) whatever the data_format.
        output: the claimed result, (batch, *out_spatial, out_channels) in data_format order; its shape is
            the output_shape, and must be legal for these flags. Same dtype as input and filters.
        strides, padding, data_format, dilations: as for conv_transpose.
        probes: number of probes K (default 8).
        seed: a non-negative int; the probes are a function of (seed, K, shapes) only.
        rtol: overrides the default tolerance on the residual.

    Returns:
        A VerifyReport; it prints nothing.

    Raises:
        ConvtError: bad flags, an output shape conv_transpose cannot produce from this input, dtype mismatch.

    >>> x = np.ones((2, 5, 5, 3), np.float32); w = np.ones((3, 3, 4, 3), np.float32)
    >>> verify_conv_transpose(x, w, np.zeros((2, 10, 10, 4), np.float32), strides=2).output_shape
    (2, 10, 10, 4)
    """
    x, w = as_arrays("verify", input, filters)
    y = output if isinstance(output, np.ndarray) else np.asarray(output)
    if x.ndim >= 3 and y.ndim != x.ndim:
        raise ConvtError(
            f"verify: output_shape {tuple(y.shape)} must have rank {x.ndim} like the input (batch, spatial and "
            f"channels in data_format order), got rank {y.ndim}"
        )
    plan = plan_conv_transpose(x.shape, w.shape, y.shape, strides, padding, data_format, dilations)
    if y.dtype.name != x.dtype.name:
        raise ConvtError(
            f"verify: output dtype {y.dtype.name} must match the input and filters dtype {x.dtype.name}"
        )
    check = AdjointCheck(plan, w, x.dtype.name, probes=probes, seed=seed, rtol=rtol)
    check.add(x, y)
    return check.report()


class AdjointCheck:
    """The adjoint check fed batch chunk by batch chunk (in any order and grouping: the result is the same).

    Usage, for a plan from plan_conv_transpose and arrays that may not fit in memory at once:

        check = AdjointCheck(plan, w, "float32")
        for b0 in range(0, plan.batch, 4):
            check.add(x[b0:b0 + 4], y[b0:b0 + 4], batch_offset=b0)
        report = check.report()
    """

    def __init__(self, plan: Plan, filters: np.ndarray, dtype: str, probes=None, seed=0, rtol=None):
        self.plan, self.w, self.dtype = plan, filters, dtype
        self.k = DEFAULT_PROBES if probes is None else _positive_int("probes", probes)
        self.seed = _seed(seed)
        if rtol is None:
            self.tol = default_tolerance(dtype, plan)
        else:
            if isinstance(rtol, bool) or not isinstance(rtol, numbers.Real) or not rtol >= 0 or math.isinf(rtol):
                raise ConvtError(f"verify: rtol must be a finite number >= 0, got {rtol!r}")
            self.tol = float(rtol)
        self.rtol = rtol
        self.nonfinite = 0
        self.parts: list[tuple] = []  # per chunk: (K, nb) arrays of a, b, S^2
        self.offsets: list[int] = []  # per chunk: the batch index of its first element
        self.tiles: list[tuple] = []  # per chunk: (K, nb, *blocks) arrays of a, b, S^2 per tile
        self.blocks = tile_sizes(plan.output_spatial, plan.out_channels)

    def add(self, x: np.ndarray, y: np.ndarray, batch_offset: int = 0) -> None:
        """Batch elements [batch_offset, batch_offset + len(x)) of input and output."""
        self.nonfinite += _count_nonfinite(y)
        if not self.nonfinite:
            a, b, scale2, tiles = _identity(self.plan, x, self.w, y, self.k, self.seed, batch_offset)
            self.parts.append((a, b, scale2))
            self.tiles.append(tiles)
            self.offsets.append(batch_offset)

    def report(self) -> VerifyReport:
        common = {
            "tolerance": self.tol,
            "tolerance_is_default": self.rtol is None,
            "seed": self.seed,
            "dtype": self.dtype,
            "probe_count": self.k,
            "terms_per_output": terms_per_output(self.plan),
            "output_shape": tuple(int(v) for v in self.plan.output_shape),
        }
        if self.nonfinite:
            return VerifyReport(passed=False, probes=(), nonfinite_output=self.nonfinite, **common)
        a, b, scale2 = ([np.concatenate([p[i] for p in self.parts], axis=1) for i in range(3)]
                        if self.parts else [np.zeros((self.k, 0))] * 3)
        results = []
        for ak, bk, sk in zip(_fsum_rows(a), _fsum_rows(b), [math.fsum(row) for row in scale2]):
            r = _residual(abs(ak - bk), sk)
            results.append(Probe(ak, bk, math.sqrt(sk), r))
        spatial = self.plan.output_spatial
        tiles = []
        for offset, (ta, tb, ts) in sorted(zip(self.offsets, self.tiles), key=lambda item: item[0]):
            worst = _residuals(np.abs(ta - tb), ts).max(axis=0)  # (nb, *blocks): each tile's worst probe
            for where in np.argwhere(~(worst <= self.tol)):
                box = tuple((int(m) * size, min(int(m + 1) * size, n))
                            for m, size, n in zip(where[1:], self.blocks, spatial))
                tiles.append(Tile(offset + int(where[0]), box, float(worst[tuple(where)])))
        count = self.plan.batch * math.prod(-(-n // size) for n, size in zip(spatial, self.blocks))
        passed = all(p.residual <= self.tol for p in results) and not tiles
        return VerifyReport(passed=passed, probes=tuple(results), nonfinite_output=0, tile_count=count,
                            failing_tiles=tuple(tiles), output_spatial=tuple(int(n) for n in spatial), **common)


def _residual(diff: float, scale2: float) -> float:
    if scale2 > 0:
        return float(diff / math.sqrt(scale2))
    return 0.0 if diff == 0 else (math.nan if math.isnan(diff) else math.inf)


def _residuals(diff: np.ndarray, scale2: np.ndarray) -> np.ndarray:
    """_residual elementwise (nan stays nan, and max() keeps it)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = diff / np.sqrt(np.where(scale2 > 0, scale2, 1.0))
    return np.where(scale2 > 0, r, np.where(diff == 0, 0.0, np.where(np.isnan(diff), np.nan, np.inf)))


def _positive_int(label, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConvtError(f"verify: {label} must be an integer >= 1, got {value!r}")
    return int(value)


def _seed(value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ConvtError(f"verify: seed must be an integer >= 0, got {value!r}")
    return int(value)


def _count_nonfinite(y: np.ndarray) -> int:
    if y.dtype.kind in "iu" or y.size == 0:
        return 0
    flat = y.reshape(y.shape[0], -1)
    rows = max(1, _BUDGET // max(1, flat.shape[1]))
    return sum(
        int(flat[r : r + rows].size - np.count_nonzero(np.isfinite(flat[r : r + rows])))
        for r in range(0, flat.shape[0], rows)
    )


def _draw(seed_key, shape, complex_probes: bool) -> np.ndarray:
    rng = np.random.default_rng(seed_key)
    if not complex_probes:
        return rng.standard_normal(shape)
    re_im = rng.standard_normal((2, *shape))
    return (re_im[0] + 1j * re_im[1]) / math.sqrt(2)


def _abs2(a: np.ndarray) -> np.ndarray:
    return a.real**2 + a.imag**2 if np.iscomplexobj(a) else a * a


def _identity(plan: Plan, x, w, y, k: int, seed: int, batch_offset: int = 0):
    """Per probe and batch element: a = <OUT, x_k>, b = <IN, conv(x_k, conj W)> and S_k^2, (K, nb) float64."""
    first = plan.spec.channels_first
    batch, c_in, c_out = x.shape[0], plan.in_channels, plan.out_channels
    s_in, s_out = plan.input_spatial, plan.output_spatial
    p_in, p_out = math.prod(s_in), math.prod(s_out)
    cplx = x.dtype.kind == "c"
    cdt = np.complex128 if cplx else np.float64
    taps = list(np.ndindex(*plan.kernel))

    v = _draw([seed, 0], (k, c_out), cplx)  # (K, c_out)
    v2 = _abs2(v)
    wc = np.array(w, dtype=cdt).reshape(len(taps), c_out, c_in)  # (T, c_out, c_in)
    wv = np.matmul(v, wc.conj()).reshape(len(taps) * k, c_in)  # (T*K, c_in): W contracted with each v_k
    wv2 = np.matmul(v2, _abs2(wc)).reshape(len(taps) * k, c_in)

    # the probe field zero-padded as the forward conv pads its input; wide enough for every tap's window
    lows = [lo for lo, _ in plan.pads]
    size = [
        max(lo + o + hi, (i - 1) * s + (kk - 1) * d + 1)
        for (lo, hi), o, i, kk, s, d in zip(plan.pads, s_out, s_in, plan.kernel, plan.spec.strides,
                                            plan.spec.dilations)
    ]
    interior = tuple(slice(lo, lo + o) for lo, o in zip(lows, s_out))
    windows = [
        tuple(slice(t * d, t * d + (i - 1) * s + 1, s) for t, d, s, i in zip(tap, plan.spec.dilations,
                                                                          plan.spec.strides, s_in))
        for tap in taps
    ]
    per_element = max(1, p_out * c_out, p_in * c_in, k * math.prod(size))
    group = max(1, _BUDGET // per_element)
    tap_group = max(1, _BUDGET // max(1, min(group, batch) * k * p_in))

    a = np.zeros((k, batch), dtype=cdt)  # per probe, per batch element
    b = np.zeros((k, batch), dtype=cdt)
    scale2 = np.zeros((k, batch))
    blocks = tile_sizes(s_out, c_out)
    nblocks = [-(-o // size) for o, size in zip(s_out, blocks)]
    ta = np.zeros((k, batch, *nblocks), dtype=cdt)  # per probe, batch element and tile
    tb = np.zeros((k, batch, *nblocks), dtype=cdt)
    ts = np.zeros((k, batch, *nblocks))
    tiled = p_out > 0 and math.prod(nblocks) > 1  # else each batch element is one tile: its sums are a, b, S^2
    out_starts = [np.arange(0, o, size) for o, size in zip(s_out, blocks)]
    tap_starts = [_tap_starts(plan, tap, blocks, nblocks) for tap in taps] if tiled else []
    for b0 in range(0, batch, group):
        b1 = min(batch, b0 + group)
        nb = b1 - b0
        upad = np.zeros((k, nb, *size), dtype=cdt)  # (K, nb, *padded)
        for j in range(nb):
            upad[(slice(None), j, *interior)] = _draw([seed, 1, batch_offset + b0 + j], (k, *s_out), cplx)
        upad2 = _abs2(upad)
        u = upad[(slice(None), slice(None), *interior)]  # (K, nb, *s_out), a view
        u2 = upad2[(slice(None), slice(None), *interior)]

        # a side: conj(OUT) contracted with v over channels, then with u over positions
        ym = _channel_matrix(y[b0:b1], first, c_out, p_out, cdt)  # conj(OUT) per element
        prod = u * _over_channels(v, ym, first, s_out)
        a[:, b0:b1] = _sum_all(prod)
        if tiled:
            ta[:, b0:b1] = _block_sums(prod, out_starts)
        ym = _abs2(ym)
        prod = u2 * _over_channels(v2, ym, first, s_out)
        scale2[:, b0:b1] += _sum_all(prod)
        if tiled:
            ts[:, b0:b1] += _block_sums(prod, out_starts)
        del ym, prod

        if p_in == 0 or c_in == 0 or not taps:
            continue
        # b side: conj(IN) contracted with Wv per tap, then with the tap's gather of u over positions
        xm = _channel_matrix(x[b0:b1], first, c_in, p_in, cdt)  # conj(IN) per element
        xm2 = _abs2(xm)
        parts = np.zeros((2, k, nb, len(taps)), dtype=cdt)  # b and S^2 per tap, summed pairwise below
        for t0 in range(0, len(taps), tap_group):
            t1 = min(len(taps), t0 + tap_group)
            z = _over_channels(wv[t0 * k : t1 * k], xm, first, s_in)  # (taps*K, nb, *s_in)
            z2 = _over_channels(wv2[t0 * k : t1 * k], xm2, first, s_in)
            for ti in range(t0, t1):
                win = (slice(None), slice(None), *windows[ti])
                rows = slice((ti - t0) * k, (ti - t0 + 1) * k)
                prod = upad[win] * z[rows]
                parts[0, :, :, ti] = _sum_all(prod)
                if tiled:
                    tb[:, b0:b1] += _block_sums(prod, tap_starts[ti])
                prod = upad2[win] * z2[rows]
                parts[1, :, :, ti] = _sum_all(prod)
                if tiled:
                    ts[:, b0:b1] += _block_sums(prod, tap_starts[ti]).real
            del z, z2
        b[:, b0:b1] = parts[0].sum(axis=-1)
        scale2[:, b0:b1] += parts[1].real.sum(axis=-1)
        del xm, xm2

    if not tiled and p_out:
        ones = (1,) * len(s_out)
        ta, tb, ts = (m.reshape(k, batch, *ones) for m in (a, b, scale2))
    return a, b, scale2, (ta, tb, ts)


TILE_ELEMENTS = 1 << 18  # output values per tile at most (a batch element's whole image when it is smaller)


def tile_sizes(out_spatial, out_channels: int) -> tuple[int, ...]:
    """Block sizes per spatial axis for verify's tiles: whole trailing axes while a tile stays within
    TILE_ELEMENTS values, the next axis cut to fit, the ones before it 1 (a tile is then rows of whole rows).

    >>> tile_sizes((128, 128), 64), tile_sizes((16, 16), 8), tile_sizes((512, 512, 512), 16)
    ((32, 128), (16, 16), (1, 32, 512))
    """
    return block_sizes(out_spatial, max(1, TILE_ELEMENTS // max(1, out_channels)))


def _tap_starts(plan: Plan, tap, blocks, nblocks) -> list[np.ndarray]:
    """Per spatial axis, the first input position whose term (for this tap) lands in each output block: input i
    reaches output o = i*s + t*d - lo, increasing in i. Block 0 also takes the terms before the output (they
    meet the probe's zero padding), the last block those after it."""
    starts = []
    for (lo, _), t, s, d, n_in, size, m in zip(plan.pads, tap, plan.spec.strides, plan.spec.dilations,
                                              plan.input_spatial, blocks, nblocks):
        edges = np.arange(1, m) * size + lo - t * d  # o = edge - lo + ... : first i with i*s >= edge
        first = np.clip(-(-edges // s), 0, n_in)
        starts.append(np.concatenate([[0], first]).astype(np.intp))
    return starts


def _sum_all(prod: np.ndarray) -> np.ndarray:
    """(K, nb, *spatial) -> (K, nb): the sum over positions, pairwise."""
    return prod.reshape(prod.shape[0], prod.shape[1], -1).sum(axis=-1)


def _block_sums(prod: np.ndarray, starts) -> np.ndarray:
    """(K, nb, *spatial) -> (K, nb, *blocks): sums over the ranges [starts[m], starts[m+1]) of each spatial axis
    (the last to the axis' end). A range may be empty (equal starts, or a start at the axis' end): its sum is 0."""
    for axis, first in enumerate(starts, start=2):
        n = prod.shape[axis]
        nonempty = (first < n) & np.append(first[1:] != first[:-1], True)
        if nonempty.all():
            prod = np.add.reduceat(prod, first, axis=axis)
            continue
        shape = list(prod.shape)
        shape[axis] = len(first)
        summed = np.zeros(shape, dtype=prod.dtype)
        index = [slice(None)] * prod.ndim
        index[axis] = nonempty
        if nonempty.any():  # the next non-empty start ends each range, as reduceat reads them
            summed[tuple(index)] = np.add.reduceat(prod, first[nonempty], axis=axis)
        prod = summed
    return prod


def _channel_matrix(chunk, first: bool, c: int, p: int, cdt) -> np.ndarray:
    """conj(chunk) in the compute dtype, one matrix per batch element: (nb, P, c), or (nb, c, P) channels-first."""
    nb = chunk.shape[0]
    m = np.array(chunk, dtype=cdt).reshape((nb, c, p) if first else (nb, p, c))
    if m.dtype.kind == "c":
        np.conjugate(m, out=m)
    return m


def _over_channels(weights: np.ndarray, m: np.ndarray, first: bool, spatial) -> np.ndarray:
    """(R, c) contracted with each element's channels -> (R, nb, *spatial), one GEMM per batch element: a GEMM
    across elements would round each column by its place in the matrix, and the result must not depend on how
    the batch is grouped."""
    if first:
        z = np.matmul(weights, m).transpose(1, 0, 2)  # (nb, c, P) -> (nb, R, P) -> (R, nb, P)
    else:
        z = np.matmul(m, weights.T).transpose(2, 0, 1)  # (nb, P, c) -> (nb, P, R) -> (R, nb, P)
    return z.reshape(len(weights), m.shape[0], *spatial)


def _fsum_rows(m: np.ndarray) -> list:
    # exact sums over batch elements, so the result does not depend on how the batch is grouped
    if np.iscomplexobj(m):
        return [complex(math.fsum(row.real), math.fsum(row.imag)) for row in m]
    return [math.fsum(row) for row in m]
