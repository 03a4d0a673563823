""""offsets" with the last axis folded into the contraction: fewer, longer GEMMs."""

from __future__ import annotations

import itertools
import math

import numpy as np

from ...shapes import Plan
from .. import grid as grids
from .. import runtime
from ..dtypes import compute_dtype, store
from ..grid import accumulate, balanced, block_jobs, fill_padded, grid, phase_stores, region, shift_users
from ..layout import at, flat, gemm, shaped
from .base import Strategy, blocks_in_flight


class Folded(Strategy):
    # A block of rows of the input is copied, padded, once per input shift of the last axis, side by side (A),
    # so that each phase of the last axis sums all its taps there in one GEMM whose contraction is its shifts
    # times c_in. The other axes' shifts are contiguous slices of A as in "offsets". Fewer accumulations, and no
    # junk positions on the last axis: A holds only the nq used.
    name = "folded"

    def applies(self, plan: Plan) -> bool:
        return folded_ok(plan)

    def workspace_bytes(self, plan, dtype, threads):
        if not folded_ok(plan):
            return 0
        dtype = np.dtype(dtype)
        _, _, block, buffers = folded_sizes(plan, compute_dtype(dtype).type == dtype.type)
        blocks = -(-grid(plan).nq[0] // block)
        return blocks_in_flight(plan, blocks, threads) * buffers * compute_dtype(dtype).itemsize

    def prepare(self, plan: Plan, w, compute):
        g = grid(plan)
        first, c_in, c_out = plan.spec.channels_first, plan.in_channels, plan.out_channels
        used, ranges = folded_inner(g.axes)
        gst = _a_strides(plan, g)
        outer, inner = g.axes[:-1], g.axes[-1]
        everyone = list(range(math.prod(len(a) for a in outer)))
        users = shift_users(outer)
        units = []  # per phase of the last axis: its columns of A; per outer shift, (offset, weights, phases, box)
        for ph2, (i0, i1) in zip(inner, ranges):
            mine = []
            for ms, uses in users.items():
                k = len(ph2.taps) * c_in  # the contraction: this phase's shifts of the last axis
                wmat = np.empty((len(uses) * c_out, k) if first else (k, len(uses) * c_out), dtype=compute)
                for j, (_, taps) in enumerate(uses):  # filled in place: no temporary the size of the filters
                    for i, t2 in enumerate(ph2.taps):
                        rows, cols = slice(j * c_out, (j + 1) * c_out), slice(i * c_in, (i + 1) * c_in)
                        if first:
                            wmat[rows, cols] = w[(*taps, t2)]
                        else:
                            wmat[cols, rows] = w[(*taps, t2)].T
                offset = sum((m_max - m) * st for m_max, m, st in zip(g.big, ms, gst))
                mine.append((offset, wmat, [po for po, _ in uses], region(outer, ms)))
            mine.sort(key=lambda unit: unit[2] != everyone)  # one that every outer phase uses first: no zeroing
            units.append((slice(i0 * c_in, i1 * c_in), mine))
        return units

    def run(self, plan: Plan, prepared, x, out, compute, threads, images=None) -> set:
        units = prepared
        g = grid(plan)
        qa, nq, big, tp = g.qa, g.nq, g.big, g.tp
        first, n = plan.spec.channels_first, plan.spec.n
        c_in, c_out, spatial = plan.in_channels, plan.out_channels, plan.input_spatial
        used, _ = folded_inner(g.axes)
        a_grid = [*tp[:-1], nq[-1]]  # A's positions: padded on the outer axes, exactly nq on the last
        gst = _a_strides(plan, g)  # and their strides, flattened
        n_out, n_in = math.prod(len(a) for a in g.axes[:-1]), len(g.axes[-1])
        everyone = list(range(n_out))
        phases = list(itertools.product(*g.axes))
        direct, width, block, _ = folded_sizes(plan, compute == out.dtype)
        stores: dict[tuple, list] = {}

        def one_block(b, r0, r1, a, acc, ybuf):
            nb = r1 - r0
            rows = nb * gst[0] if n > 1 else nb
            reach = nq[-1] if n > 1 else nb  # one image's last axis, or (1-D) this block's part of it
            for i, m in enumerate(used):  # A[.., v, i, c] = x[b, .., qa + v - used[i], c], zero outside x
                slot = a[i, ..., :reach] if first else a[..., :reach, i, :]
                lo_t = [r0] + [0] * (n - 2) + [big[-1] - m] if n > 1 else [r0 + big[0] - m]
                fill_padded(slot, x, b, first, lo_t, qa, big, spatial)
            fa = flat(first, a, len(used) * c_in)  # (U*c_in, positions) or (positions, U*c_in)
            for p2, (cols, mine) in enumerate(units):
                if direct:
                    sub = out[b, :, r0:r1].view() if first else out[b, r0:r1].view()
                    sub.shape = shaped(first, (rows,), c_out)  # never a copy
                else:
                    sub = acc[p2, :, :rows] if first else acc[:rows, p2]  # (P_out*c_out, rows) or (rows, P_out*c_out)
                if mine[0][2] != everyone:
                    sub[...] = 0
                for u, (offset, wmat, ps, box) in enumerate(mine):
                    src = fa[cols, offset:offset + rows] if first else fa[offset:offset + rows, cols]
                    if u == 0 and ps == everyone:
                        gemm(first, wmat, src, out=sub)
                        continue
                    cells = wmat.shape[0] if first else wmat.shape[1]
                    y = ybuf[:cells * rows].reshape(shaped(first, (rows,), cells))
                    gemm(first, wmat, src, out=y)
                    accumulate(sub, y, ps, everyone, box, c_out, first)
            if direct:
                return
            shape = (nb, *a_grid[1:])
            view = acc.reshape(n_in, n_out, c_out, -1)[..., :rows].reshape(n_in, n_out, c_out, *shape) if first \
                else acc.reshape(-1, n_in, n_out, c_out)[:rows].reshape(*shape, n_in, n_out, c_out)
            if (r0, r1) not in stores:
                stores[r0, r1] = phase_stores(plan, phases, qa, r0, r1)
            for p, dst, src in stores[r0, r1]:
                po, p2 = divmod(p, n_in)
                store(plan.op, out[at(first, dst, b)], view[at(first, src, tail=(p2, po))])

        def work(some):
            a_shape = (block + big[0] + 1, *a_grid[1:]) if n > 1 else (block,)
            a = np.empty(shaped(first, a_shape, len(used), c_in), dtype=compute)
            rows = block * gst[0] if n > 1 else block
            acc = None if direct else np.empty((n_in, n_out * c_out, rows) if first else (rows, n_in, n_out * c_out),
                                               dtype=compute)
            ybuf = np.empty(rows * width, dtype=compute)
            for b, r0, r1 in some:
                one_block(b, r0, r1, a, acc, ybuf)

        runtime.over_jobs(block_jobs(x.shape[0], images, nq[0], block), work, threads)
        return set()


def _a_strides(plan: Plan, g) -> list:
    a_grid = [*g.tp[:-1], g.nq[-1]]
    return [math.prod(a_grid[j + 1:]) for j in range(plan.spec.n)]


def folded_inner(axes):
    """The input shifts of the last axis that any phase uses (ascending), and per phase of that axis the range
    [i0, i1) of them it uses; None unless each phase's shifts are consecutive in that list."""
    used = sorted({m for ph in axes[-1] for m in ph.shifts})
    ranges = []
    for ph in axes[-1]:
        i0 = used.index(ph.shifts[0])
        if list(ph.shifts) != used[i0:i0 + len(ph.shifts)]:
            return None
        ranges.append((i0, i0 + len(ph.shifts)))
    return used, ranges


def folded_ok(plan: Plan) -> bool:
    """Whether "folded" applies (see folded_inner); where it does not, "offsets" runs instead."""
    g = grid(plan)
    return g is not None and folded_inner(g.axes) is not None


def folded_sizes(plan: Plan, same_dtype: bool):
    """(direct, width, block, buffers) of "folded": whether the GEMMs write straight into the output (one
    phase that is the whole output, no junk rows: at most 2-D; and the output in the compute dtype), the
    widest GEMM result's columns, the rows of the first axis per block, and each thread's buffers in elements."""
    g = grid(plan)
    axes, nq, big, tp = g.axes, g.nq, g.big, g.tp
    n, c_in, c_out = plan.spec.n, plan.in_channels, plan.out_channels
    used = folded_inner(axes)[0]
    n_out, n_in = math.prod(len(a) for a in axes[:-1]), len(axes[-1])
    direct = same_dtype and n <= 2 and n_out * n_in == 1 and all(
        ph.o0 == 0 and ph.q1 - ph.q0 == size for (ph,), size in zip(axes, plan.output_spatial))
    width = max(len(uses) for uses in shift_users(axes[:-1]).values()) * c_out
    row = math.prod(nq[-1:] if n > 1 else [1]) * math.prod(tp[1:-1])  # A's positions per row of the first axis
    per = len(used) * c_in + (0 if direct else n_in * n_out * c_out) + width  # A, accumulator, GEMM result
    block = balanced(nq[0], max(1, max(grids.ROW_MIN, grids.BLOCK_BYTES // (4 * per)) // row))
    buffers = ((block + big[0] + 1) * row * len(used) * c_in if n > 1 else block * len(used) * c_in) + \
        block * row * (width + (0 if direct else n_in * n_out * c_out))
    return direct, width, block, buffers
