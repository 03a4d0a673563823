"""The adjoint check: does `output` equal conv_transpose(input, filters) under these flags?

`verify_conv_transpose` never calls conv_transpose. It draws K seeded probes x of the output's shape and
compares, per probe, the two sides of the adjoint identity

    a = <OUT, x>                          (one pass over OUT)
    b = <IN, conv(x, conj(W))>            (a forward convolution: gather, written here, not the engine's)

with <p, q> = sum(conj(p) * q). conv_transpose is bilinear (no conjugation): OUT[j] = sum IN[i] W[t] over
the (i, t) pairs that reach j, so conj(OUT[j]) = sum conj(IN[i]) conj(W[t]) and
<OUT, x> = sum conj(IN[i]) conj(W[t]) x[j] = <IN, conv(x, conj(W))>. For real dtypes conj is the identity.

Probes are rank one over channels and live in tiles. The output of each batch element is cut into tiles
(tile_sizes: blocks as near a cube as halving makes them, with at most TILE_VALUES output values); probe k of
tile T is x_k[pos, c] = u_k[pos] * v_k[c] on T's positions and 0 elsewhere, with u_k random signs (+-1; complex:
1, -1, i, -i) drawn per tile and v_k standard normal per channel, shared by every tile. For any error E of the
output, E[|<E, x_k>|^2] = ||E restricted to T||^2, and a single wrong value E_j is seen at exactly |E_j| |v_kc|.
Each tile is checked on its own, and the global probe (the sum over tiles) too:
    a_k = sum_pos u_k[pos] * conj(OUT[pos, :] @ conj(v_k))                    one GEMM over the tile of OUT
    b_k = sum_taps sum_i U_k,tap[i] * conj(IN[i, :] @ conj(Wv_k[tap, :]))     one GEMM per kernel row over IN
where Wv_k[tap, ci] = sum_co v_k[co] conj(W[tap, co, ci]), i runs over the tile's input window (the positions
whose terms can land in the tile, shapes.input_window: the halo is the only work done twice) and U_k,tap[i] is
the tile's probe where term (i, tap) lands (o = i*s + tap*d - lo), 0 outside the tile.

Precision, and where float64 goes: channels are contracted by GEMMs in float32 (complex64) for float16,
bfloat16, float32 and complex64 data, whose values float32 holds exactly; in float64 (complex128) for the others,
and for filters whose nonzero values span more than 2**WIDTH (float32 would flush the small ones). The rounding
of such a sum of c terms grows as sqrt(c), so the output side does it in float32 only when out_channels <= n (the
terms per output element, below): verify's own rounding then stays within the producer's, which summed n terms.
A product with a probe sign is exact in any precision; every sum over positions and taps is float64 (pairwise for
float64 data; einsum's sequential loop for float32-class data, whose tolerances are 2**29 times coarser); tiles
and batch elements are added exactly (math.fsum). Sums of squares (S, below) are scales and stay in float32,
checked: when they overflow or come near underflow (values beyond about 2**+-50), the tile is redone on its data
scaled by a power of two, in float64 where float32 cannot hold it; its a, b and S^2 are kept scaled by that power
(S^2 by its square) until the report puts the tiles on one scale, and the filters' squares have their own power:
float64 data is checked to the ends of its range (1e-300 to 1e308 in the tests).

Cost: the GEMMs are K / out_channels (input side) + K * prod(s) / (taps * in_channels) (output side) of the
run's multiply-adds, times the halo, in the run's own precision; the rest is elementwise work on K * taps * input
positions (exact products, float64 sums) and a pass over OUT's squares. Tiles are shared out on the caller's
threads (engine.runtime, as run shares its work), each thread on one tile at a time; whole small images are
grouped. Working space per thread: a tile's arrays (work_bytes), bounded by TILE_VALUES, PROBE_VALUES,
WINDOW_VALUES and PRODUCT_VALUES whatever the data's size (the landing of terms in a tile is kept per axis, never
as a taps x window mask), plus the probes' channel parts: K x taps x in_channels.

Probe stream (reproducible; independent of how the batch is chunked, grouped or threaded): splitmix64 (a
counter hashed), keyed by a tuple of ints (_key, _words):
    v = the standard normals of stream (seed, 0), shape (K, out_channels), by Box-Muller; rounded to float32
        (complex64) for data contracted in float32, so that every path uses the same v
    u of tile m (row-major over the tile grid) of batch element b = the signs of stream (seed, 1, b, m), shape
        (K, *tile shape), one bit each (1: -1); complex: two bits each, (1 - 2*b0) * (i if b1 else 1)
No numpy.random: its import alone costs more memory (8 MB) than a tile's work.

Residual (per probe and per tile; free of the problem's size and of the data's scale, since both sides grow
alike):
    r_k = |a_k - b_k| / S_k,   S_k^2 = sum_j |x_k[j]|^2 * (|OUT[j]|^2 + Q[j] + tiny^2),
    Q[j] = the sum of |IN[i] * W[t]|^2 over the terms summed into OUT[j]
(|x_k[j]|^2 = |v_kc|^2.) tiny is the output dtype's smallest normal value (TINY): below it values are rounded to
a fixed step, eps_out * tiny, not a relative one, and tol * tiny covers that step.
(|u| = 1: S needs |OUT|^2 per channel over the tile, and |IN|^2 per channel summed over the window positions
whose term lands in the tile, per tap, against sum_co |v_kco|^2 |W[t, co, ci]|^2: no GEMM per probe.) If each
output element is off by at most e * sqrt(|OUT[j]|^2 + Q[j]), with independent signs, then r_k ~ e: rounding
the result costs e = eps_out, and accumulating n terms costs e ~ eps_acc * sqrt(n) (a random walk whose steps
are the partial sums, bounded by |OUT[j]| when the terms share a sign and by sqrt(Q[j]) when they cancel). By
Cauchy-Schwarz a tile's residual is at most the worst relative error of its values: a correct output passes
whatever the tiling.

What a probe catches, with ||T||^2 = sum over the tile of (|OUT[j]|^2 + Q[j]) (E[S_k^2] = ||T||^2): one wrong
value E_j in channel c gives r_k = |E_j| |v_kc| / S_k, so with eps = |E_j| / ||T|| and S_k near ||T|| a probe
misses it with probability P(|g| <= tol / eps) (g standard normal): 0.08 at eps = 10 tol, 0.008 at 100 tol; all
K = 8 miss with that to the 8th power. For any error E of the tile (Z = <E, x_k>: E[Z^2] = ||E||^2 and
E[Z^4] <= 9 ||E||^4), Paley-Zygmund gives P(|Z| >= ||E|| / 2) >= 1/16 per probe, whatever E's pattern; an error
spread over many values (a row, a channel, a shift) makes Z close to normal, as for one value.

Tolerance (overridden by `rtol`):
    tol = 4 * (eps_out + eps_acc * sqrt(n) + 2**-52 * sqrt(out_channels))
    n   = in_channels * prod_j min(K_j, I_j, ceil(K_j * gcd(s_j, d_j) / s_j))   terms summed per output element
eps_out is the output dtype's machine epsilon (float16 2**-10, bfloat16 2**-7, float32 and complex64 2**-23,
float64 and complex128 2**-52; int32 0, its results are exact); eps_acc that of the precision the producer
accumulates in: float32 for float16, bfloat16, float32 and complex64 (as TF and convt do), float64 for the
others (int32: verify's own float64 arithmetic). The last term is a float64 rounding over out_channels; verify's
float32 GEMMs sum at most n terms, within the producer's own allowance. On TF's goldens and on convt's outputs
(a sample of 24, float16 to float64, 100 seeds each, every probe and tile) the largest residual was 0.30 * tol
(float16; float32 0.11, float64 0.25): the factor 4 leaves room for the tails of the probe statistics and the
many tiles of a large output. The tolerance is statistical, not a
worst-case bound: pass `rtol` for a producer that accumulates in float16/bfloat16, or for data whose partial
sums dwarf both |OUT| and sqrt(Q).

Non-finite values in the output fail the check without evaluating the identity (the report counts them).
"""

from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from .engine.dtypes import as_arrays
from .errors import ConvtError
from .shapes import Plan, input_window, split_sizes

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
# dtype -> its smallest normal value: below it a value is rounded to a fixed step, not a relative one
TINY_EXPONENT = {"float16": -14, "bfloat16": -126, "float32": -126, "float64": -1022, "complex64": -126,
                 "complex128": -1022}


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
        of at most TILE_VALUES values: tile_sizes), each tile's residual held to the same tolerance (by
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
            return (f"FAIL: the output holds {_count(self.nonfinite_output, 'non-finite value')} (inf or nan)"
                    f"{self._where_wrong()} ({where})")
        worst, tol = self.max_residual, self.tolerance
        probes = _count(self.probe_count, "probe")
        if self.passed:
            inside = (f"max residual {worst:.1e}, {_times(tol / worst)} below the tolerance {tol:.1e}" if worst > 0
                      else f"max residual 0 (exact), within the tolerance {tol:.1e}")
            return f"PASS: {inside} ({probes}, {where})"
        if math.isnan(worst):
            return (f"FAIL: a probe's residual is nan (inf or nan in INPUT or FILTERS, or values too large to square "
                    f"in float64?){self._where_wrong()} ({probes}, {where})" + (f"; {self.hint}" if self.hint else ""))
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
    """Most products summed into one output element: a group's in_channels times the taps that can meet there."""
    taps = 1
    for i, k, s, d in zip(plan.input_spatial, plan.kernel, plan.spec.strides, plan.spec.dilations):
        # taps t, t' reach the same output iff (t - t') * d = 0 mod s, i.e. t = t' mod s / gcd(s, d)
        taps *= min(k, i, -(-k * math.gcd(s, d) // s))
    return plan.in_channels // plan.groups * taps


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
    *,
    threads=None,
    filter_layout="tf",
    output_padding=None,
    groups=1,
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
        threads: as for conv_transpose (the tiles are shared out; the report is the same for any number).
        filter_layout: as for conv_transpose ("tf", "torch", "onnx", "jax").
        output_padding, groups: as for conv_transpose; output_padding must agree with the output's shape.

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
    from .engine.layout import plan_with_layout, tf_filters

    w, layout = tf_filters("verify", w, filter_layout)
    plan = plan_with_layout(x.shape, w.shape, y.shape, strides, padding, data_format, dilations, layout,
                            output_padding=output_padding, groups=groups)
    if y.dtype.name != x.dtype.name:
        raise ConvtError(
            f"verify: output dtype {y.dtype.name} must match the input and filters dtype {x.dtype.name}"
        )
    check = AdjointCheck(plan, w, x.dtype.name, probes=probes, seed=seed, rtol=rtol, threads=threads)
    check.add(x, y)
    return check.report()


class AdjointCheck:
    """The adjoint check fed batch chunk by batch chunk (in any order and grouping: the result is the same).

    Usage, for a plan from plan_conv_transpose and arrays that may not fit in memory at once:

        check = AdjointCheck(plan, w, "float32")
        for b0 in range(0, plan.batch, 4):
            check.add(x[b0:b0 + 4], y[b0:b0 + 4], batch_offset=b0)
        report = check.report()

    Each chunk is checked tile by tile on up to `threads` threads (as the engine resolves them); every tile's
    numbers are its own, computed the same way whatever the chunk, the grouping or the threads.
    """

    def __init__(self, plan: Plan, filters: np.ndarray, dtype: str, probes=None, seed=0, rtol=None, threads=None):
        from .engine import runtime

        self.plan, self.dtype = plan, dtype
        self.k = DEFAULT_PROBES if probes is None else _positive_int("probes", probes)
        self.seed = _seed(seed)
        self.threads = runtime.resolve_threads(threads)
        if rtol is None:
            self.tol = default_tolerance(dtype, plan)
        else:
            if isinstance(rtol, bool) or not isinstance(rtol, numbers.Real) or not rtol >= 0 or math.isinf(rtol):
                raise ConvtError(f"verify: rtol must be a finite number >= 0, got {rtol!r}")
            self.tol = float(rtol)
        self.rtol = rtol
        self.blocks = tile_sizes(plan, self.k)
        self.grid = tuple(-(-n // size) for n, size in zip(plan.output_spatial, self.blocks))
        self.probe = _Probes(plan, filters, dtype, self.k, self.seed)
        self.nonfinite = 0
        self.parts: list[tuple] = []  # per chunk: its batch offset and (K, nb, tiles) arrays of a, b, S^2

    def add(self, x: np.ndarray, y: np.ndarray, batch_offset: int = 0, box=None, window=None) -> None:
        """Batch elements [batch_offset, batch_offset + len(x)) of input and output; or, given `box` ([o0, o1) per
        spatial axis, on the tiles' grid: a multiple of `blocks` or the output's end) and `window` (the input
        positions [i0, i1) per axis that reach it, shapes.tile_window's), only that box of the output and that
        window of the input: the tiles in the box are checked, with the numbers they have in a whole check."""
        from .engine import runtime

        nb = y.shape[0]
        if box is None:
            ids, y_at, x_at = range(math.prod(self.grid)), (0,) * len(self.grid), (0,) * len(self.grid)
        else:
            spans = [range(o0 // size, -(-o1 // size)) for (o0, o1), size in zip(box, self.blocks)]
            ids = [int(np.ravel_multi_index(j, self.grid)) for j in itertools.product(*spans)]
            y_at, x_at = tuple(o0 for o0, _ in box), tuple(i0 for i0, _ in window)
        tiles = len(ids)
        cdt = np.complex128 if self.probe.complex else np.float64
        sums = _Sums(np.zeros((self.k, nb, tiles), cdt), np.zeros((self.k, nb, tiles), cdt),
                     np.zeros((self.k, nb, tiles)), np.zeros((nb, tiles), np.int64), np.zeros((nb, tiles), np.int64))
        group = 1 if math.prod(self.grid) > 1 else self.probe.group
        jobs = [(n0, min(nb, n0 + group), j) for n0 in range(0, nb, group) for j in range(tiles)]

        def work(some):
            with np.errstate(all="ignore"):  # overflows are looked for, and non-finite values fail the check
                for n0, n1, j in some:
                    self.probe.tile(x, y, n0, n1, ids[j], self._box(ids[j]), batch_offset, sums, j, y_at, x_at)

        if nb and tiles:
            runtime.over_jobs(jobs, work, self.threads)
        self.nonfinite += int(sums.nonfinite.sum())
        self.parts.append((batch_offset, tuple(ids), sums))

    def _box(self, m: int) -> tuple[tuple[int, int], ...]:
        where = np.unravel_index(m, self.grid)
        return tuple((int(j) * size, min((int(j) + 1) * size, n))
                     for j, size, n in zip(where, self.blocks, self.plan.output_spatial))

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
        parts = sorted(self.parts, key=lambda part: part[:2])
        count = self.plan.batch * math.prod(self.grid)
        where = {"tile_count": count, "output_spatial": tuple(int(n) for n in self.plan.output_spatial)}
        if self.nonfinite:  # the tiles that hold them
            tiles = tuple(sorted((Tile(offset + int(n), self._box(ids[m]), math.nan)
                                  for offset, ids, p in parts for n, m in np.argwhere(p.nonfinite > 0)),
                                 key=lambda tile: (tile.batch, tile.box)))
            return VerifyReport(passed=False, probes=(), nonfinite_output=self.nonfinite, failing_tiles=tiles,
                                **where, **common)
        top = max((int(p.exponent.max()) for _, _, p in parts if p.exponent.size), default=0)
        # every tile on the largest tile's scale (2**-top), then summed exactly
        shift = [np.ldexp(1.0, p.exponent - top) for _, _, p in parts]
        a, b, scale2 = ([np.concatenate([(getattr(p, key) * f ** (2 if key == "scale2" else 1)).reshape(self.k, -1)
                                         for (_, _, p), f in zip(parts, shift)], axis=1)
                         for key in ("a", "b", "scale2")] if parts else [np.zeros((self.k, 0))] * 3)
        results = []
        for ak, bk, sk in zip(_fsum_rows(a), _fsum_rows(b), [_fsum(row) for row in scale2]):
            residual = _residual(abs(ak - bk), sk)
            with np.errstate(over="ignore"):
                ak, bk = (complex(np.ldexp(v.real, top), np.ldexp(v.imag, top)) if isinstance(v, complex)
                          else float(np.ldexp(v, top)) for v in (ak, bk))
                results.append(Probe(ak, bk, float(np.ldexp(math.sqrt(sk), top)), residual))
        tiles = []
        for offset, ids, p in parts:
            worst = _residuals(np.abs(p.a - p.b), p.scale2).max(axis=0)  # (nb, tiles): each tile's worst probe
            for n, m in np.argwhere(~(worst <= self.tol)):
                tiles.append(Tile(offset + int(n), self._box(ids[m]), float(worst[n, m])))
        tiles.sort(key=lambda tile: (tile.batch, tile.box))
        passed = all(p.residual <= self.tol for p in results) and not tiles
        return VerifyReport(passed=passed, probes=tuple(results), nonfinite_output=0, failing_tiles=tuple(tiles),
                            **where, **common)


@dataclass(frozen=True)
class _Sums:
    """What the tiles of one chunk found: a, b and S^2 per (probe, batch element, tile), each tile's stored scaled
    by 2**-e (S^2 by 2**-2e; e is 0 unless its values' squares leave float64's range), and the non-finite output
    values per (batch element, tile). Each tile job writes its own cells."""

    a: np.ndarray
    b: np.ndarray
    scale2: np.ndarray
    nonfinite: np.ndarray
    exponent: np.ndarray


def _residual(diff: float, scale2: float) -> float:
    return float(_residuals(np.float64(diff), np.float64(scale2)))


def _residuals(diff: np.ndarray, scale2: np.ndarray) -> np.ndarray:
    """_residual elementwise (nan stays nan, and max() keeps it)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = diff / np.sqrt(np.where(scale2 > 0, scale2, 1.0))
    r = np.where(scale2 > 0, r, np.where(diff == 0, 0.0, np.where(np.isnan(diff), np.nan, np.inf)))
    return np.where(np.isinf(scale2), np.nan, r)


def _positive_int(label, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConvtError(f"verify: {label} must be an integer >= 1, got {value!r}")
    return int(value)


def _seed(value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ConvtError(f"verify: seed must be an integer >= 0, got {value!r}")
    return int(value)


# The probes' random numbers: splitmix64 (Steele, Lea and Flood 2014), a counter hashed, here on NumPy arrays:
# word j of the stream keyed `key` is mix(key + (j + 1) * GOLDEN mod 2**64). (NumPy's own generators would cost
# verify the import of numpy.random: 8 MB of memory, more than a piece of its work.)
GOLDEN = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1


def _mix(z):
    """splitmix64's finalizer, on a Python int or a uint64 array (wrapping mod 2**64)."""
    if isinstance(z, int):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        return z ^ (z >> 31)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _key(parts) -> int:
    """The stream key of a tuple of ints >= 0: key = 0, then key = mix(key + (part + 1) * GOLDEN) for each part."""
    key = 0
    for part in parts:
        key = _mix((key + (part + 1) * GOLDEN) & _M64)
    return key


def _words(parts, n: int) -> np.ndarray:
    """The first n uint64 words of the stream keyed by parts."""
    count = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(GOLDEN)
    return _mix(count + np.uint64(_key(parts)))


def _normal(parts, shape, complex_probes: bool) -> np.ndarray:
    """Standard normals (complex: (re + i im) / sqrt(2)) by Box-Muller, normal j from words 2j and 2j + 1:
    sqrt(-2 ln u1) * cos(2 pi u2), with u = ((word >> 11) + 0.5) / 2**53."""
    n = math.prod(shape) * (2 if complex_probes else 1)
    u = ((_words(parts, 2 * n) >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    g = np.sqrt(-2 * np.log(u[0::2])) * np.cos(2 * math.pi * u[1::2])
    if not complex_probes:
        return g.reshape(shape)
    return ((g[0::2] + 1j * g[1::2]) / math.sqrt(2)).reshape(shape)


def _signs(parts, shape, complex_probes: bool) -> np.ndarray:
    """Random signs +-1 (float32), or for complex probes random phases 1, -1, i, -i (complex64), of `shape`: the
    bits of the stream keyed by parts, the lowest bit of each word first, one bit per sign (bit 1: -1), two per
    phase (bits b0, b1: (1 - 2*b0) * (i if b1 else 1))."""
    n = math.prod(shape) * (2 if complex_probes else 1)
    bits = np.unpackbits(_words(parts, -(-n // 64)).astype("<u8").view(np.uint8), count=n, bitorder="little")
    if not complex_probes:
        return (1 - np.multiply(bits, 2, dtype=np.float32)).reshape(shape)
    sign = 1 - np.multiply(bits[0::2], 2, dtype=np.float32)
    turn = bits[1::2].astype(bool)
    out = np.empty(n // 2, np.complex64)
    out.real = np.where(turn, 0, sign)
    out.imag = np.where(turn, sign, 0)
    return out.reshape(shape)


def _abs2(a: np.ndarray) -> np.ndarray:
    return a.real**2 + a.imag**2 if np.iscomplexobj(a) else a * a


TILE_VALUES = 1 << 18  # output values per tile at most (a batch element's whole image when it is smaller)
PROBE_VALUES = 1 << 17  # probe values per tile at most (probes x positions), for each tile's float64 arrays
WINDOW_VALUES = 1 << 18  # input values a tile reads, roughly (its window, before the halo)
PRODUCT_VALUES = 1 << 16  # values of one GEMM result on the input side (probes x taps x window positions)
SHORT = {"float16", "bfloat16", "float32", "complex64"}  # contracted over channels in float32 (complex64)
EXPONENT_RANGE = 50  # a block whose largest |value| is beyond 2**+-50 is contracted in float64 instead
WIDTH = 80  # filters whose nonzero |values| span more than 2**80 are contracted in float64 (float32 would flush)


def tile_sizes(plan: Plan, probes: int = DEFAULT_PROBES) -> tuple[int, ...]:
    """Block sizes per spatial axis for verify's tiles: as near a cube as halving makes it (shapes.split_sizes),
    with at most TILE_VALUES output values, PROBE_VALUES probe values and about WINDOW_VALUES input values.

    >>> from convt_cli.shapes import plan_conv_transpose
    >>> plan = plan_conv_transpose((1, 64, 64, 32), (4, 4, 32, 32), None, 2, "SAME")
    >>> tile_sizes(plan)
    (64, 128)
    """
    positions = min(TILE_VALUES // max(1, plan.out_channels), PROBE_VALUES // probes,
                    WINDOW_VALUES * math.prod(plan.spec.strides) // max(1, plan.in_channels))
    return split_sizes(plan.output_spatial, max(1, positions))


def work_bytes(plan: Plan, dtype, probes=None, threads=1, batch=None) -> int:
    """About the most memory verify's own arrays take at once, besides the data, while checking `batch` batch
    elements (default: plan.batch) at once: a tile's (or a group of small images') arrays on each thread that
    has a job, and the probes' channel parts."""
    k = probes or DEFAULT_PROBES
    batch = plan.batch if batch is None else batch
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    cplx = name.startswith("complex")
    wide = 16 if cplx else 8
    size = (8 if cplx else 4) if name in SHORT else wide
    blocks = tile_sizes(plan, k)
    positions = math.prod(blocks)
    window = math.prod(min(i, -(-b // s) + (kk - 1) * d // s + 2) for b, i, s, kk, d in zip(
        blocks, plan.input_spatial, plan.spec.strides, plan.kernel, plan.spec.dilations))
    taps, rest = math.prod(plan.kernel), math.prod(plan.kernel[1:])
    product = min(k * taps * window, max(PRODUCT_VALUES, k * rest * window))  # one GEMM's result: kernel rows
    a_side = positions * (2 * plan.out_channels * size + k * (2 * size + 1))
    b_side = k * positions * (2 + 2 * size) + 4 * window * plan.in_channels * size + 2 * product * size
    tile = max(a_side, b_side)
    tiles = math.prod(-(-n // b) for n, b in zip(plan.output_spatial, blocks))
    if tiles == 1:  # whole images, grouped
        group = max(1, min(batch, _Probes.group_of(plan, k)))
        tile, jobs = tile * group, -(-batch // group)
    else:
        jobs = batch * tiles
    channels = k * taps * plan.in_channels * (3 * wide + 16 + size) + 3 * plan.out_channels * plan.in_channels * wide
    return tile * max(1, min(threads, jobs)) + channels


class _Probes:
    """The probes' channel parts and each tile's sums.

    Made once, in float64 (complex128): conj(v) (K, c_out) and conj(Wv) = conj(v) contracted with the filters
    (K, *kernel, c_in); |v|^2 and sum_co |v|^2 |W|^2 (K, c_in * taps) for S; then also in float32 (complex64) for
    SHORT dtypes, conj(Wv) scaled by a power of two to a largest value near 1 (v itself is rounded to float32
    first, so both precisions use one v). Where channels are contracted in which precision: the module docstring.
    """

    def __init__(self, plan: Plan, filters, dtype: str, k: int, seed: int):
        self.plan, self.k, self.seed = plan, k, seed
        self.complex = dtype.startswith("complex")
        wide = np.complex128 if self.complex else np.float64
        short = (np.complex64 if self.complex else np.float32) if dtype in SHORT else None
        taps = math.prod(plan.kernel)
        g = plan.groups
        w = np.asarray(filters).reshape(taps, plan.out_channels // g, plan.in_channels)
        v = _normal([seed, 0], (k, plan.out_channels), self.complex)
        if short is not None:
            v = v.astype(short).astype(wide)  # one v for both precisions
        vc = np.conj(v)
        self.v2 = _abs2(v)  # (K, c_out)
        self.tiny = TINY_EXPONENT.get(dtype)  # log2 of the smallest normal value (None: int32, no floor)
        top = _largest(w)
        self.e_big = _exponent_of(top) if math.isfinite(top) else 0  # |W| scaled by 2**-e_big before squaring
        wv = np.empty((k, taps, plan.in_channels), wide)  # conj(Wv)
        wv2 = np.empty((k, taps, plan.in_channels))  # sum_co |v|^2 |W * 2**-e_big|^2
        # with groups, input channel c meets only its group's outputs: (G, K, out/G) @ (G, out/G, in/G) per tap
        cog, cig = plan.out_channels // g, plan.in_channels // g
        vcg = vc.reshape(k, g, cog).transpose(1, 0, 2)
        v2g = self.v2.reshape(k, g, cog).transpose(1, 0, 2)
        for t in range(taps):  # a tap at a time: no float64 copy of all the filters
            wt = w[t].astype(wide).reshape(cog, g, cig).transpose(1, 0, 2)
            wv[:, t] = (vcg @ wt).transpose(1, 0, 2).reshape(k, -1)
            wv2[:, t] = (v2g @ _abs2(_scaled(wt, self.e_big))).transpose(1, 0, 2).reshape(k, -1)
        self.wv2t = wv2.transpose(0, 2, 1).reshape(k, -1)  # (K, c_in * taps), as Q's sums are laid out
        self.landings: dict = {}
        wv = wv.reshape(k, *plan.kernel, plan.in_channels)
        top = _largest(wv)
        e_w = _exponent_of(top) if math.isfinite(top) else 0
        self.wide = _Channels(vc, wv, 0)
        # float32 for the input side only where the scaled conj(Wv) keeps its small values normal in float32
        nonzero = np.abs(w[w != 0]) if w.size else w
        narrow = not nonzero.size or float(nonzero.max()) <= float(nonzero.min()) * 2.0**WIDTH
        self.short = None if short is None else _Channels(vc.astype(short), _scaled(wv, e_w).astype(short), e_w)
        self.short_in = self.short if narrow else None
        self.n = terms_per_output(plan)
        self.group = self.group_of(plan, k)

    @staticmethod
    def group_of(plan: Plan, k: int) -> int:
        """Whole images per job when an image is one tile: as many as keep the job's arrays within the budgets."""
        p_in, p_out = max(1, math.prod(plan.input_spatial)), max(1, math.prod(plan.output_spatial))
        per_element = max(p_out * plan.out_channels / TILE_VALUES, k * p_out / PROBE_VALUES,
                          p_in * plan.in_channels / WINDOW_VALUES,
                          k * math.prod(plan.kernel) * p_in / PRODUCT_VALUES)
        return max(1, int(1 / per_element)) if per_element > 0 else 1

    def tile(self, x, y, n0: int, n1: int, m: int, box, offset: int, sums: _Sums, j: int, y_at, x_at) -> None:
        """a, b and S^2 of tile m (spatial box) of batch elements n0..n1 of the chunk, into sums[..., j]; y holds
        the output from position y_at on, x the input from x_at on."""
        plan, k, first, nb = self.plan, self.k, self.plan.spec.channels_first, n1 - n0
        shape = tuple(o1 - o0 for o0, o1 in box)
        ym = _matrix(y[_index(n0, n1, tuple(slice(o0 - a, o1 - a) for (o0, o1), a in zip(box, y_at)), first)], first,
                     plan.out_channels)
        # a side: OUT's channels against conj(v), conj'd, against u over positions
        ch = self.short if self.short is not None and plan.out_channels <= self.n else self.wide
        # (nb, c): sum |OUT|^2 over the tile; the tile's numbers are worked out and stored scaled by 2**-e (_Sums)
        ym, ch, e, norms = self._in_range(ym, ch, lambda m: _channel_norms2(m, first))
        if norms is None:
            finite = np.isfinite(ym).reshape(nb, -1)
            sums.nonfinite[n0:n1, j] = finite.shape[1] - np.count_nonzero(finite, axis=1)
            return
        sums.exponent[n0:n1, j] = e
        u = np.empty((nb, k, *shape), dtype=ch.v.dtype)
        for n in range(n0, n1):
            u[n - n0] = _signs([self.seed, 1, offset + n, m], (k, *shape), self.complex)
        za = _contract(ch.v, ym, first)  # (nb, K, P)
        sums.a[:, n0:n1, j] = _sum_products(u.reshape(za.shape), _conj(za)).T
        # (nb, K): sum |v|^2 (|OUT|^2 + tiny^2) over the tile, tiny the dtype's smallest normal value
        scale2 = _per_element(norms.astype(np.float64), self.v2)
        if self.tiny is not None:
            scale2 += np.ldexp(float(math.prod(shape)), 2 * (self.tiny - e)) * self.v2.sum(axis=1)
        del ym, za, norms
        # b side: IN's channels against conj(Wv) per tap, conj'd, against the probe where each term lands
        window = [input_window(o0, o1, i, kk, s, d, lo) for (o0, o1), i, kk, s, d, (lo, _) in zip(
            box, plan.input_spatial, plan.kernel, plan.spec.strides, plan.spec.dilations, plan.pads)]
        if any(i1 == i0 for i0, i1 in window) or plan.in_channels == 0:
            sums.scale2[:, n0:n1, j] = scale2.T
            return
        counts = [i1 - i0 for i0, i1 in window]
        lows = [lo + o0 - i0 * s for (o0, _), (i0, _), s, (lo, _) in zip(box, window, plan.spec.strides, plan.pads)]
        landing = self._landing(shape, counts, lows)  # per axis (k, window)
        xm = _matrix(x[_index(n0, n1, tuple(slice(i0 - a, i1 - a) for (i0, i1), a in zip(window, x_at)), first)],
                     first, plan.in_channels)
        ch = self.short_in if self.short_in is not None else self.wide
        # (nb, c, taps): sum |IN|^2 over landing positions; IN scaled by 2**-e_in from here on (non-finite IN: as
        # it is, in float64, for a nan result)
        xm, ch, e_in, reached = self._in_range(xm, ch, lambda m: _reached(m, landing, first))
        if reached is None:
            xm = xm.astype(self.wide.v.dtype, copy=False)
            ch, e_in, reached = self.wide, 0, _reached(xm, landing, first)
        q = _per_element(np.ldexp(reached.astype(np.float64), 2 * (e_in + self.e_big - e)).reshape(nb, -1),
                         self.wv2t)
        sums.scale2[:, n0:n1, j] = (scale2 + q).T
        # the tile's probe, zero-padded so that every term of the window lands inside it: term (j, t) of an axis
        # lands at buffer index j*s + t*d + base, where base = off - lo_t and lo_t = lo + o0 - i0*s is the
        # tile's own low pad
        offs = [max(0, lo_t) for lo_t in lows]
        sizes = [off + max(n, (c - 1) * s + (kk - 1) * d + 1 - lo_t) for off, n, c, s, kk, d, lo_t in zip(
            offs, shape, counts, plan.spec.strides, plan.kernel, plan.spec.dilations, lows)]
        upad = np.zeros((nb, k, *sizes), dtype=ch.v.dtype)
        upad[(slice(None), slice(None), *(slice(off, off + n) for off, n in zip(offs, shape)))] = u
        bases = [off - lo_t for off, lo_t in zip(offs, lows)]
        b = np.zeros((nb, k), dtype=sums.b.dtype)
        step = max(1, PRODUCT_VALUES // max(1, k * math.prod(plan.kernel[1:]) * math.prod(counts)))  # kernel rows
        for t0 in range(0, plan.kernel[0], step):
            t1 = min(plan.kernel[0], t0 + step)
            z = _contract(ch.wv[:, t0:t1].reshape(-1, plan.in_channels), xm, first)  # (nb, K * taps, P_in)
            z = z.reshape(nb, k, t1 - t0, *plan.kernel[1:], *counts)
            b += _sum_products(_reach(upad, bases, t0, t1, plan, counts), _conj(z))
            del z
        sums.b[:, n0:n1, j] = _scaled(b, e - e_in - ch.e_w).T

    def _in_range(self, m: np.ndarray, ch: _Channels, sums_of):
        """(m, ch, e, sums_of(m)) with m in ch's precision, as it is when its sums of squares neither overflow nor
        underflow there; else scaled by 2**-e (e the exponent of its largest |value|), in float64 when float32
        cannot hold it. sums is None when m holds a value that is not finite."""
        m = m.astype(ch.v.dtype, copy=False)
        sums = sums_of(m)
        if _fits(sums, m):
            return m, ch, 0, sums
        top = _largest(m)
        if not math.isfinite(top):
            return m, ch, 0, None
        e = _exponent_of(top)
        if ch is not self.wide and abs(e) > EXPONENT_RANGE:
            ch = self.wide
        m = _scaled(m.astype(ch.v.dtype), e)
        return m, ch, e, sums_of(m)

    def _landing(self, shape, counts, lows) -> list:
        """Per axis, (k, window) 0/1 float32: whether term (tap, window position) lands inside the tile's box of
        `shape` on that axis (a term lands inside the box when it does on every axis). Cached per kind of tile."""
        key = (tuple(shape), tuple(counts), tuple(lows))
        masks = self.landings.get(key)
        if masks is None:
            masks = []
            for n, c, kk, s, d, lo_t in zip(shape, counts, self.plan.kernel, self.plan.spec.strides,
                                            self.plan.spec.dilations, lows):
                q = np.arange(c)[None, :] * s + np.arange(kk)[:, None] * d - lo_t  # (k, c): where the terms land
                masks.append(((q >= 0) & (q < n)).astype(np.float32))
            if len(self.landings) < 256:  # a tiling has few kinds of tile; each is a few small arrays
                self.landings[key] = masks
        return masks


@dataclass(frozen=True)
class _Channels:
    """conj(v) and conj(Wv) * 2**-e_w, in one precision."""

    v: np.ndarray
    wv: np.ndarray
    e_w: int


def _index(n0: int, n1: int, span, first: bool) -> tuple:
    return (slice(n0, n1), slice(None), *span) if first else (slice(n0, n1), *span, slice(None))


def _matrix(block, first: bool, c: int) -> np.ndarray:
    """(nb, *spatial, c) -> (nb, P, c), or (nb, c, *spatial) -> (nb, c, P); a view when the block allows."""
    nb = block.shape[0]
    p = math.prod(block.shape[2:] if first else block.shape[1:-1])
    m = block.reshape((nb, c, p) if first else (nb, p, c))
    return m.astype(np.float32) if m.dtype.name in ("float16", "bfloat16") else m


def _largest(m: np.ndarray) -> float:
    """max |value| (inf or nan when any value is not finite), in two passes that copy nothing."""
    if m.size == 0:
        return 0.0
    if m.dtype.kind == "c":
        return max(_largest(m.real), _largest(m.imag))
    hi, lo = m.max(), m.min()
    if m.dtype.kind in "iu":
        return float(max(abs(int(hi)), abs(int(lo))))
    return float(max(abs(hi), abs(lo))) if not (np.isnan(hi) or np.isnan(lo)) else math.nan


def _exponent_of(top: float) -> int:
    return math.frexp(top)[1] if top > 0 else 0


def _scaled(a: np.ndarray, e: int) -> np.ndarray:
    """a * 2**-e, exactly (a power of two), for real or complex a."""
    if np.iscomplexobj(a):
        return np.ldexp(a.real, -e) + 1j * np.ldexp(a.imag, -e)
    return np.ldexp(a, -e)


def _contract(weights: np.ndarray, m: np.ndarray, first: bool) -> np.ndarray:
    """(R, c) against each element's channels -> (nb, R, P), one GEMM per batch element (the stacked matmul): a
    GEMM across elements would round each column by its place in the matrix."""
    return np.matmul(weights, m if first else m.transpose(0, 2, 1))


def _conj(a: np.ndarray) -> np.ndarray:
    return np.conj(a) if a.dtype.kind == "c" else a


def _sum_products(signs: np.ndarray, q: np.ndarray) -> np.ndarray:
    """(nb, K, ...) x (nb, K, ...) -> (nb, K): sum of signs * q over the rest. The products are exact (signs are
    +-1, +-i or 0, in q's dtype); the sum is float64 (complex128), each (element, probe) row on its own, so the
    result does not depend on how many rows there are."""
    prod = np.multiply(signs, q)
    rows = prod.reshape(prod.shape[0], prod.shape[1], -1)
    if prod.dtype.itemsize * (1 if prod.dtype.kind == "f" else 0.5) >= 8:
        return rows.sum(axis=-1)  # float64 data: pairwise, its rounding far below float64 tolerances
    # float32 products summed in float64 (einsum's loop: about twice as fast as a casting reduction, and its
    # sequential float64 sum is exact enough for float32-class tolerances)
    return np.einsum("nki->nk", rows, dtype=np.complex128 if prod.dtype.kind == "c" else np.float64)


def _per_element(rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(nb, L) against (K, L) -> (nb, K), one GEMM per element (the same bits for any nb)."""
    return np.matmul(rows[:, None, :], weights.T)[:, 0, :]


def _channel_norms2(m: np.ndarray, first: bool) -> np.ndarray:
    """(nb, P, c) or (nb, c, P) -> (nb, c): sum |m|^2 over positions per channel, in m's precision (a scale, where
    float32's rounding does not matter), without a squared copy."""
    parts = (m.real, m.imag) if m.dtype.kind == "c" else (m,)
    spec = "ncp,ncp->nc" if first else "npc,npc->nc"
    return sum(np.einsum(spec, part, part) for part in parts)


def _reached(xm: np.ndarray, masks: list, first: bool) -> np.ndarray:
    """(nb, c, taps): |IN|^2 summed over the window positions whose term (for the tap) lands in the tile, one axis
    at a time (the landing is a product over axes): a stacked GEMM per axis, over contiguous blocks."""
    x2 = _abs2(xm)
    nb, c = x2.shape[0], x2.shape[1 if first else 2]
    lead, trail = (nb * c, 1) if first else (nb, c)  # (lead, *window, trail) in memory order
    counts, taps = [mask.shape[1] for mask in masks], [mask.shape[0] for mask in masks]
    arr = x2
    for a, mask in enumerate(masks):
        block = arr.reshape(lead * math.prod(taps[:a]), counts[a], math.prod(counts[a + 1:]) * trail)
        arr = np.matmul(mask.astype(block.dtype, copy=False), block)  # (.., k_a, rest)
    arr = arr.reshape(nb, c, -1) if first else arr.reshape(nb, -1, c).transpose(0, 2, 1)
    return arr


_RANGE = {np.dtype(np.float32): 2.0**-100, np.dtype(np.float64): 2.0**-1000}


def _fits(sums2: np.ndarray, data: np.ndarray) -> bool:
    """Whether data's sums of squares in float32 (float64) neither overflowed nor came near underflow: all finite,
    and the largest within 2**+-100 (2**+-1000), or 0 with the data all zero."""
    if sums2.size == 0:
        return True
    top = float(sums2.max())
    small = _RANGE[sums2.dtype]
    if top == 0:
        return not data.any()
    return math.isfinite(top) and small < top < 1 / small and bool(np.isfinite(sums2).all())


def _reach(upad: np.ndarray, bases, t0: int, t1: int, plan: Plan, counts) -> np.ndarray:
    """The probe at every term's landing place, for kernel rows t0..t1 on the first axis: a view
    (nb, K, t1 - t0, *kernel[1:], *counts) of upad, entry [n, k, *t, *j] = upad[n, k, *(j*s + t*d + base)]."""
    st = upad.strides
    taps = [t1 - t0, *plan.kernel[1:]]
    start = upad[(slice(None), slice(None), *(slice(base + (t0 * d if axis == 0 else 0), None)
                                               for axis, (base, d) in enumerate(zip(bases, plan.spec.dilations))))]
    strides = (st[0], st[1], *(d * st[2 + a] for a, d in enumerate(plan.spec.dilations)),
               *(s * st[2 + a] for a, s in enumerate(plan.spec.strides)))
    return np.lib.stride_tricks.as_strided(start, (*upad.shape[:2], *taps, *counts), strides, writeable=False)


def _fsum_rows(m: np.ndarray) -> list:
    # exact sums over batch elements, so the result does not depend on how the batch is grouped
    if np.iscomplexobj(m):
        return [complex(_fsum(row.real), _fsum(row.imag)) for row in m]
    return [_fsum(row) for row in m]


def _fsum(row: np.ndarray) -> float:
    """math.fsum, or nan/inf where it cannot say (inf - inf, an overflow)."""
    try:
        return math.fsum(row)
    except (ValueError, OverflowError):
        with np.errstate(all="ignore"):
            return float(np.sum(row)) if np.isfinite(row).all() or np.isnan(row).any() else math.nan
