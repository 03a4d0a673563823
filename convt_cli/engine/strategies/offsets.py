"""Shift GEMMs read in place from a padded block of rows: the default where nothing more specific pays."""

from __future__ import annotations

import itertools
import math

import numpy as np

from ...shapes import Plan
from .. import runtime
from ..dtypes import compute_dtype, store
from ..grid import accumulate, block_jobs, fill_padded, grid, phase_stores, region, shift_users
from ..layout import at, flat, gemm, positions, shaped
from .base import Strategy, blocks_in_flight


class Offsets(Strategy):
    # Pad a block of rows of one image once; each input shift is then a contiguous slice of the flat padded
    # block, so one GEMM per shift (no im2col copy) gives that shift's contribution to every phase that uses it,
    # accumulated per phase, and each phase is stored once with strided slices.
    name = "offsets"

    def workspace_bytes(self, plan, dtype, threads):
        g = grid(plan)
        if g is None:
            return 0
        width = math.prod(len(a) for a in g.axes) * plan.out_channels
        shifts = math.prod(len({m for ph in a for m in ph.shifts}) for a in g.axes)
        per_row = 2 * width + (shifts + 1) * plan.in_channels
        per_thread = ((g.block + g.big[0] + 1) * g.st[0] * per_row) * compute_dtype(dtype).itemsize
        return blocks_in_flight(plan, -(-g.nq[0] // g.block), threads) * per_thread

    def prepare(self, plan: Plan, w, compute):
        g = grid(plan)
        if g is None:
            return None
        first, c_in, c_out = plan.spec.channels_first, plan.in_channels, plan.out_channels
        units = []
        for ms, uses in shift_users(g.axes).items():
            wmat = np.empty((len(uses) * c_out, c_in) if first else (c_in, len(uses) * c_out), dtype=compute)
            for j, (_, tap) in enumerate(uses):  # filled in place: no temporary the size of the filters
                if first:
                    wmat[j * c_out:(j + 1) * c_out] = w[tap]
                else:
                    wmat[:, j * c_out:(j + 1) * c_out] = w[tap].T
            offset = sum((m_max - m) * stride for m_max, m, stride in zip(g.big, ms, g.st))
            units.append((offset, wmat, [p for p, _ in uses], region(g.axes, ms)))
        return units

    def run(self, plan: Plan, prepared, x, out, compute, threads, images=None) -> set:
        if prepared is None:
            return set()
        units = prepared
        g = grid(plan)
        qa, nq, big, tp, st, block = g.qa, g.nq, g.big, g.tp, g.st, g.block
        first, n = plan.spec.channels_first, plan.spec.n
        c_in, c_out, spatial = plan.in_channels, plan.out_channels, plan.input_spatial
        phases = list(itertools.product(*g.axes))
        n_ph = len(phases)
        everyone = list(range(n_ph))
        stores: dict[tuple, list] = {}  # per block bounds: which slices of the accumulator go where

        def one_block(b, r0, r1, slab, acc):
            rows = (r1 - r0) * st[0]
            # slab[t] = x[qa + t - big] on the padded grid, rows r0 .. r1 + big[0] (+1 spare) of the first axis
            fill_padded(slab, x, b, first, [r0] + [0] * (n - 1), qa, big, spatial)
            a = flat(first, slab, c_in)  # (c_in, positions) or (positions, c_in)
            acc = positions(first, acc, 0, rows)
            if units[0][2] != everyone:
                acc[...] = 0
            for u, (offset, wmat, ps, box) in enumerate(units):
                if u == 0 and ps == everyone:  # the first product is the accumulator's start: no zeroing, no add
                    gemm(first, wmat, positions(first, a, offset, offset + rows), out=acc)
                    continue
                y = gemm(first, wmat, positions(first, a, offset, offset + rows))  # (P_u*c_out, rows) or transposed
                accumulate(acc, y, ps, everyone, box, c_out, first)
            view = acc.reshape(shaped(first, (r1 - r0, *tp[1:]), n_ph, c_out))
            if (r0, r1) not in stores:
                stores[r0, r1] = phase_stores(plan, phases, qa, r0, r1)
            for p, dst, src in stores[r0, r1]:
                store(plan.op, out[at(first, dst, b)], view[at(first, src, tail=(p,))])

        def work(some):
            slab = np.empty(shaped(first, (block + big[0] + 1, *tp[1:]), c_in), dtype=compute)
            acc = np.empty(shaped(first, (block * st[0],), n_ph * c_out), dtype=compute)
            for b, r0, r1 in some:
                one_block(b, r0, r1, slab, acc)

        runtime.over_jobs(block_jobs(x.shape[0], images, nq[0], block), work, threads)
        return set()
