"""conv_transpose: the strategy dispatch, filters prepared once and run on any number of batches, and the
memory estimate that budgets a run."""

from __future__ import annotations

import math
import threading

import numpy as np

from ..errors import ConvtError
from ..shapes import Plan
from . import runtime
from .choose import choose_strategy
from .dtypes import as_arrays, check_dtypes, check_int32_bound, compute_dtype, largest_magnitude
from .strategies import OFFSETS, REGISTRY, STRATEGIES, TAPS
from .strategies.base import Strategy

_WARM_POSITIONS = 4096  # runs over fewer input positions than this are too small to start worker threads for
GROUP_WIDTH = 64 * 64  # in * out channels from which BLAS's GEMMs run near full speed (see Grouped)


def conv_transpose(input, filters, output_shape=None, strides=1, padding="SAME", data_format=None, dilations=None,
                   name=None, *, threads=None, filter_layout="tf", output_padding=None, groups=1) -> np.ndarray:
    """Transposed convolution, the same numbers as TensorFlow's tf.nn.conv_transpose.

    Args:
        input: (batch, *spatial, in_channels), or (batch, in_channels, *spatial) when data_format is
            channels-first ("NCW", "NCHW", "NCDHW", "channels_first"). Any N >= 1 spatial dims.
        filters: (*kernel, out_channels, in_channels) whatever the data_format; filters[..., -1] pairs with
            the input's channels. Not flipped.
        output_shape: None (I*s for SAME, (I-1)*s + (K-1)*d + 1 for VALID), the N spatial sizes, or the
            full N+2 shape in data_format order, as TF takes it: a list, tuple, 1-d integer array or tensor.
        strides, dilations: an int, or a list of length 1, N or N+2 (data_format order, batch and channel
            entries 1).
        padding: "SAME", "VALID" (any case), or N (lo, hi) pairs (or N+2 with zero batch/channel pairs), as TF
            takes it; beyond TF: "SAME_LOWER" (the odd pad first, as ONNX), "SAME_UPPER" (= "SAME"), an int p
            (p on both sides of every axis) and one (lo, hi) pair for every axis.
        data_format: None (channels-last), TF's strings for N <= 3, "channels_last" or "channels_first".
        name: ignored; TF's graph name for the op, taken so that a call written for TF runs unchanged.
        threads: how many threads (None: CONVT_NUM_THREADS, else every usable core); never changes a bit.
        filter_layout: how `filters` is stored: "tf" (above), "torch" / "onnx" ([in, out/groups, *kernel], as
            PyTorch's ConvTranspose weight and ONNX's ConvTranspose W), or "jax" ([*kernel, in, out], JAX's
            lax.conv_transpose rhs with transpose_kernel=False); read as "tf" once, here.
        output_padding: None (TF's rules) or PyTorch's and ONNX's output_padding, an int or N ints, each below
            the stride or the dilation: the output grows by it at the end (positions no input reaches are 0).
        groups: G (PyTorch's and ONNX's groups): filters are (*kernel, out_channels / G, in_channels); input
            channels of group g reach its out_channels / G outputs only. Depthwise when G = in_channels.

    Returns:
        An array of output_shape in data_format order, with the input's dtype.

    Raises:
        ConvtError: any invalid argument, with the parameter, what was expected and what was got.

    >>> conv_transpose(np.ones((2, 5, 5, 3), np.float32), np.ones((3, 3, 4, 3), np.float32), strides=2).shape
    (2, 10, 10, 4)
    """
    from .layout import plan_with_layout, tf_filters

    x, w = as_arrays("conv_transpose", input, filters)
    w, layout = tf_filters("conv_transpose", w, filter_layout)
    plan = plan_with_layout(x.shape, w.shape, output_shape, strides, padding, data_format, dilations, layout,
                            output_padding=output_padding, groups=groups)
    return run_conv_transpose(plan, x, w, threads=threads)


def run_conv_transpose(plan: Plan, x: np.ndarray, w: np.ndarray, strategy: str | None = None,
                       threads=None) -> np.ndarray:
    """Execute a plan on arrays whose shapes match it (any batch size: batch elements are independent).

    `strategy` (one of STRATEGIES) overrides the choice by shape; the tests run each.

    >>> from convt_cli.shapes import plan_conv_transpose
    >>> plan = plan_conv_transpose((2, 5, 3), (3, 4, 3), None, 2)
    >>> run_conv_transpose(plan, np.ones((2, 5, 3)), np.ones((3, 4, 3)), strategy="taps").shape
    (2, 10, 4)
    """
    return prepare(plan, w, strategy).run(x, threads)


def prepare(plan: Plan, w: np.ndarray, strategy: str | None = None) -> Prepared:
    """The filters converted, checked and rearranged for the strategy that will run them, once: then
    `.run(x)` on any number of batches (pieces of one batch give the same bits as the whole).

    >>> from convt_cli.shapes import plan_conv_transpose
    >>> p = prepare(plan_conv_transpose((1, 8, 8, 16), (4, 4, 8, 16), None, 2), np.ones((4, 4, 8, 16), np.float32))
    >>> p.strategy, p.run(np.ones((3, 8, 8, 16), np.float32)).shape
    ('winograd', (3, 16, 16, 8))
    """
    w = w if isinstance(w, np.ndarray) else np.asarray(w)
    check_dtypes(plan.op, w.dtype, w.dtype)
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if plan.groups > 1:
        return Grouped(plan, w, strategy)
    return Prepared(plan, w, strategy or choose_strategy(plan))


def _checked_input(plan: Plan, x, dtype: np.dtype) -> np.ndarray:
    x = x if isinstance(x, np.ndarray) else np.asarray(x)
    check_dtypes(plan.op, x.dtype, dtype)
    if x.ndim != len(plan.input_shape) or x.shape[1:] != plan.input_shape[1:]:
        raise ConvtError(f"{plan.op}: input shape {x.shape} does not match the plan's "
                         f"(batch, {', '.join(map(str, plan.input_shape[1:]))})")
    return x


def dispatch(plan: Plan, name: str, wc: np.ndarray, compute: np.dtype) -> Strategy:
    """The strategy that runs: `name` where it applies and takes these filters, else "offsets" where that takes
    them, else "taps" (which takes any)."""
    chosen = REGISTRY[name]
    if plan.groups > 1:  # groups together (see Grouped): only "taps" takes them, never summing across groups
        return TAPS
    if not chosen.applies(plan):
        chosen = OFFSETS
    if not chosen.accepts(wc, compute):
        # an inf or NaN tap: every strategy but "taps" multiplies padding zeros by the taps, which makes NaN where
        # TF's direct sum, over the input only, makes inf or nothing; filters "dense" or "winograd" would not
        # sum as a direct sum does: "offsets"
        chosen = OFFSETS if OFFSETS.accepts(wc, compute) else TAPS
    return chosen


class Prepared:
    """Filters ready for one plan: `.strategy` names what runs them, `.run(x, threads=None)` runs them."""

    def __init__(self, plan: Plan, w: np.ndarray, name: str):
        self.plan, self.dtype = plan, w.dtype
        self._compute = compute_dtype(w.dtype)
        self._w_max = largest_magnitude(w) if w.dtype.name == "int32" else 0
        self._empty = w.size == 0 or math.prod(plan.output_shape[1:]) == 0 or math.prod(plan.input_shape[1:]) == 0
        self._lock = threading.Lock()
        self._redo = None  # "offsets"' filters, made when an image first needs them (see run)
        if self._empty:
            self._wc, self._strategy, self._weights = None, REGISTRY[name], None
            self.strategy = name
            return
        wc = np.ascontiguousarray(w, dtype=self._compute)
        self._strategy = dispatch(plan, name, wc, self._compute)
        self.strategy = self._strategy.name
        self._weights = self._strategy.prepare(plan, wc, self._compute)
        self._wc = wc if self._strategy.redoes_wild else None  # kept for "offsets" to redo images

    def run(self, x: np.ndarray, threads=None) -> np.ndarray:
        """conv_transpose of x, (any batch, *the plan's input_shape[1:]), in x's dtype (native byte order)."""
        plan = self.plan
        x = _checked_input(plan, x, self.dtype)
        threads = runtime.resolve_threads(threads)
        batch = x.shape[0]
        if x.dtype.name == "int32" and x.size:
            check_int32_bound(plan.op, x.dtype, largest_magnitude(x), self._w_max,
                              plan.in_channels * math.prod(plan.kernel))
        if batch * math.prod(plan.input_spatial) > _WARM_POSITIONS:
            runtime.warm(threads)  # the worker threads' BLAS buffers before the output: see runtime
        out = np.zeros((batch, *plan.output_shape[1:]), dtype=x.dtype.newbyteorder("="))
        if out.size == 0 or x.size == 0 or self._empty:
            return out
        wild = self._strategy.run(plan, self._weights, x, out, self._compute, threads)
        if wild:  # images with a number "dense" or "winograd" would not sum as a direct sum: again by "offsets"
            images = sorted(wild)
            out[images] = 0
            OFFSETS.run(plan, self._offsets_weights(), x, out, self._compute, threads, images=images)
        return out

    def _offsets_weights(self):
        with self._lock:
            if self._redo is None:
                self._redo = OFFSETS.prepare(self.plan, self._wc, self._compute)
            return self._redo

    def __repr__(self) -> str:
        return f"<Prepared {self.plan.op} {self.dtype.name} by {self.strategy!r}>"


class Grouped:
    """Filters of G groups ready for one plan, as blocks of groups (merged_groups: each block in/G * b channels
    wide, b groups, and the block-diagonal filters of its b groups): each block is a conv_transpose of its own,
    on the strategy its shape chooses, so the work is 1/(G/b) of the whole block-diagonal filters', and no GEMM
    is too narrow for BLAS. An image whose input holds a value that is not finite runs on "taps" instead, a GEMM
    per group, never across groups (where a zero between groups times an inf would make a NaN PyTorch does not
    make). `.run(x, threads=None)` runs the blocks one after the other, each on every thread."""

    def __init__(self, plan: Plan, w: np.ndarray, strategy: str | None = None):
        self.plan, self.dtype, self._w, self._taps = plan, w.dtype, w, None
        self._lock = threading.Lock()
        b = merged_groups(plan)
        sub = plan.group_plan(b)
        ci, co = plan.in_channels // plan.groups, plan.out_channels // plan.groups
        self._blocks = []
        for j in range(plan.groups // b):
            wb = np.zeros((*plan.kernel, b * co, b * ci), dtype=w.dtype)  # the block's b groups on its diagonal
            for g in range(b):
                wb[..., g * co:(g + 1) * co, g * ci:(g + 1) * ci] = w[..., (j * b + g) * ci:(j * b + g + 1) * ci]
            self._blocks.append(Prepared(sub, wb, strategy or choose_strategy(sub)))
        self.strategy = self._blocks[0].strategy

    def run(self, x: np.ndarray, threads=None) -> np.ndarray:
        """conv_transpose of x, (any batch, *the plan's input_shape[1:]), in x's dtype (native byte order)."""
        plan = self.plan
        x = _checked_input(plan, x, self.dtype)
        if compute_dtype(x.dtype).kind in "fc" and x.size:  # float16 and bfloat16 too
            finite = np.isfinite(x).reshape(len(x), -1).all(axis=1)  # per image: pieces give the bits of the whole
            if not finite.all():
                out = np.empty((x.shape[0], *plan.output_shape[1:]), dtype=x.dtype.newbyteorder("="))
                out[~finite] = self._native().run(x[~finite], threads)
                if finite.any():
                    out[finite] = self.run(x[finite], threads)
                return out
        if len(self._blocks) == 1:
            return self._blocks[0].run(x, threads)
        out = np.empty((x.shape[0], *plan.output_shape[1:]), dtype=x.dtype.newbyteorder("="))
        first, blocks = plan.spec.channels_first, len(self._blocks)
        ci, co = plan.in_channels // blocks, plan.out_channels // blocks
        for j, part in enumerate(self._blocks):
            src = (slice(None), slice(j * ci, (j + 1) * ci)) if first else (..., slice(j * ci, (j + 1) * ci))
            dst = (slice(None), slice(j * co, (j + 1) * co)) if first else (..., slice(j * co, (j + 1) * co))
            out[dst] = part.run(x[src], threads)  # (batch, ..., co): one block's output, then its channels
        return out

    def _native(self) -> Prepared:
        with self._lock:
            if self._taps is None:
                self._taps = Prepared(self.plan, self._w, "taps")
            return self._taps

    def __repr__(self) -> str:
        return f"<Grouped {self.plan.op} {self.dtype.name} in {self.plan.groups} groups by {self.strategy!r}>"


def merged_groups(plan: Plan) -> int:
    """How many groups one block holds (see Grouped): the fewest, dividing G, whose block is at least
    GROUP_WIDTH wide (in * out channels); G when none is."""
    ci, co = plan.in_channels // plan.groups, plan.out_channels // plan.groups
    return next((b for b in range(1, plan.groups + 1) if plan.groups % b == 0 and b * b * ci * co >= GROUP_WIDTH),
                plan.groups)


def estimate_bytes(plan: Plan, dtype, threads=None, strategy: str | None = None, finite_filters: bool = False) -> int:
    """Peak bytes run_conv_transpose allocates for this plan beyond its input and filters (an upper bound): the
    output; the workspace of the strategy chosen (or `strategy`, when forced) or of either fallback ("offsets",
    "taps"), each thread's at once;
    the filters converted to the compute dtype; and what the strategies that may run prepare from them. Not
    counted: the 2.25 MiB per thread that the worker threads' first GEMMs take once per process (see runtime).
    With `finite_filters` (a caller that has seen them), "taps" is not counted unless chosen: only filters holding
    inf or nan send a run there (dispatch).

    >>> from convt_cli.shapes import plan_conv_transpose
    >>> estimate_bytes(plan_conv_transpose((1, 8, 8, 16), (4, 4, 8, 16), None, 2), np.float32, threads=1) > 0
    True
    """
    dtype = np.dtype(dtype)
    threads = runtime.resolve_threads(threads)
    if plan.groups > 1:
        # the output and one block's output and work at a time, every block's filters, and the finite check; or
        # what "taps" takes for the groups together
        sub = plan.group_plan(merged_groups(plan))
        blocks = plan.groups // merged_groups(plan)
        one = estimate_bytes(sub, dtype, threads, strategy, finite_filters)
        merged = (one + (blocks - 1) * prepared_bytes(sub, dtype, strategy)
                  + math.prod(plan.output_shape) * dtype.itemsize)
        # the finite check, and for a batch with images that are not finite: their copy and "taps"' filters and
        # work beside the blocks'
        return merged + math.prod(plan.input_shape) * (1 + dtype.itemsize) + _bytes(plan, dtype, threads, "taps")
    return _bytes(plan, dtype, threads, strategy, finite_filters)


def _bytes(plan: Plan, dtype: np.dtype, threads: int, strategy: str | None, finite_filters: bool = False) -> int:
    work = _work_bytes(plan, dtype, threads, strategy, finite_filters)
    return math.prod(plan.output_shape) * dtype.itemsize + work + prepared_bytes(plan, dtype, strategy)


def prepared_bytes(plan: Plan, dtype, strategy: str | None = None) -> int:
    """What `prepare` holds of the filters for this plan: their copy in the compute dtype and what the strategies
    that may run make of them (with groups, every block's, and "taps"' for images that are not finite); part of
    estimate_bytes. A caller that keeps several prepared filters at once counts this for each but one."""
    dtype = np.dtype(dtype)
    if plan.groups > 1:
        b = merged_groups(plan)
        taps = 2 * math.prod(plan.filters_shape) * compute_dtype(dtype).itemsize  # its copy and its GEMMs' filters
        return plan.groups // b * prepared_bytes(plan.group_plan(b), dtype, strategy) + taps
    chosen = REGISTRY[strategy or choose_strategy(plan)]
    copy = math.prod(plan.filters_shape) * compute_dtype(dtype).itemsize
    weights = chosen.weights_bytes(plan, dtype) + (OFFSETS.weights_bytes(plan, dtype) if chosen.redoes_wild else 0)
    return copy + max(weights, OFFSETS.weights_bytes(plan, dtype), TAPS.weights_bytes(plan, dtype))


def _work_bytes(plan: Plan, dtype, threads: int, strategy: str | None, finite_filters: bool = False) -> int:
    chosen = REGISTRY[strategy or choose_strategy(plan)]
    fallbacks = (OFFSETS,) if finite_filters else (OFFSETS, TAPS)
    return max(s.workspace_bytes(plan, dtype, threads) for s in (chosen, *fallbacks))
