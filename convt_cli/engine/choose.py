"""Which strategy runs a plan, from the shapes of one image only."""

from __future__ import annotations

import itertools
import math

from ..shapes import Plan
from .grid import grid, largest_shifts
from .strategies.folded import folded_inner
from .strategies.winograd import winograd_ok

# "phases" when the padded rows of the block strategies would be mostly junk: their inner axes padded by more
# than half again (an inner axis far shorter than the kernel's reach) make as many junk GEMM rows as real ones
JUNK_MAX = 1.5
# "winograd" needs this many input channels for its transforms (adds and subtracts over the block) to be cheap
# next to its GEMMs, and must save at least WINOGRAD_SAVING_MIN of the direct products to pay for them
WINOGRAD_C_IN_MIN, WINOGRAD_SAVING_MIN = 16, 0.4
# "folded" copies the input once per shift of the last axis: worth it from this many input channels on
FOLDED_C_IN_MIN = 8
# "dense" below this many input channels, where folding the shifts into the contraction is what keeps BLAS
# efficient; or at any width when its GEMM, over every shift and residue, makes at most DENSE_EXTRA_MAX times
# the products the taps need
DENSE_C_IN_BELOW, DENSE_EXTRA_MAX = 32, 1.15


def choose_strategy(plan: Plan) -> str:
    """One of STRATEGIES from the shapes of one image (never the batch size, so that any batch slicing gives
    bitwise the same numbers), by what timing the benchmark workloads on a 2-core AVX-512 machine showed:

    - "winograd" where it applies and saves at least 40% of the products (a stride-2 kernel-4 layer in 2-D or
      3-D, say) with c_in >= 16: the transforms are cheap next to GEMMs of that many channels;
    - "dense" when its GEMM, over every shift and residue, makes at most 15% more products than the taps
      need (every residue has all its taps, as in a 1-D stride-8 kernel-16 layer), or with fewer than 32 input
      channels, where folding the shifts into the contraction is what keeps BLAS efficient: one GEMM and one
      contiguous store per block;
    - "folded" for channels-last 2-D and up with c_in >= 8, where each phase of the last axis uses
      consecutive shifts: before "dense" for stride 1 (a 3x3 or a dilated layer), and instead of "offsets";
      it copies the input once per shift of the last axis and then makes fewer, longer GEMMs, adds fewer
      results and makes no junk positions on that axis;
    - "offsets" otherwise (channels-first, dilated or odd-sized kernels with many channels): one GEMM per
      shift over the input channels, read in place, so it copies nothing but the padded input;
    - "phases" when the padded rows of either would be mostly junk (an inner axis far shorter than the
      kernel's reach). "taps" is never the best by much; it stays as the plainest strategy, tested like the
      others.

    >>> from convt_cli.shapes import plan_conv_transpose
    >>> choose_strategy(plan_conv_transpose((1, 20, 20, 64), (4, 4, 32, 64), None, 2))
    'winograd'
    """
    g = grid(plan)
    if g is None:
        return "phases"
    if math.prod(g.tp[1:]) > JUNK_MAX * math.prod(g.nq[1:]):
        return "phases"
    if plan.in_channels >= WINOGRAD_C_IN_MIN and winograd_ok(plan) and \
            winograd_saving(plan, g.axes) >= WINOGRAD_SAVING_MIN:
        return "winograd"
    folded = not plan.spec.channels_first and plan.spec.n >= 2 and plan.in_channels >= FOLDED_C_IN_MIN and \
        folded_inner(g.axes) is not None
    if folded and math.prod(plan.spec.strides) == 1:
        return "folded"
    direct = sum(math.prod(len(ph.taps) for ph in combo) for combo in itertools.product(*g.axes))
    dense = math.prod(b + 1 for b in g.big) * math.prod(plan.spec.strides)  # products "dense" makes
    if plan.in_channels < DENSE_C_IN_BELOW or dense <= DENSE_EXTRA_MAX * direct:
        return "dense"
    return "folded" if folded else "offsets"


def winograd_saving(plan: Plan, axes) -> float:
    """1 - Winograd's products / the direct products, per position of the phase grid, for F(2, 2): the smaller
    saving of the two tile sizes, and one that does not depend on the dtype (see winograd_m)."""
    direct = sum(math.prod(len(ph.taps) for ph in combo) for combo in itertools.product(*axes))
    winograd = math.prod((3 / 2 if b else 1) * s for b, s in zip(largest_shifts(plan), plan.spec.strides))
    return 1 - winograd / direct
