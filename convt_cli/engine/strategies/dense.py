"""Every shift side by side in one GEMM per block, against the taps of every residue: for few input channels."""

from __future__ import annotations

import itertools
import math

import numpy as np

from ...shapes import Plan
from .. import runtime
from ..dtypes import compute_dtype, store
from ..grid import block_jobs, fill_padded, grid, window
from ..guards import finite_taps, tame, tame_limit
from ..layout import at, flat, shaped
from .base import Strategy, blocks_in_flight


class Dense(Strategy):
    # Pad a block of rows of one image once, copy every shift e (0..big per axis) of it side by side, and run one
    # GEMM per block against the taps of every residue combination (zeros where a residue lacks a tap), so the
    # contraction is (big+1)**n * c_in long. Output o = s*v + r + (qa*s - lo) for padded-grid position v and
    # residue r: the block's outputs are one window of the output, stored once.
    name = "dense"
    redoes_wild = True

    def accepts(self, w, compute):
        return finite_taps(w) and tame(w, tame_limit(compute, self.name))

    def workspace_bytes(self, plan, dtype, threads):
        g = grid(plan, dense=True)
        if g is None:
            return 0
        rows = g.block * g.st[0]
        shifts, residues = math.prod(b + 1 for b in g.big), math.prod(plan.spec.strides)
        # padded block, the shifts side by side, the GEMM result and the output grid
        per_thread = ((rows + (g.big[0] + 1) * g.st[0]) * plan.in_channels + rows * shifts * plan.in_channels +
                      2 * rows * residues * plan.out_channels) * compute_dtype(dtype).itemsize
        return blocks_in_flight(plan, -(-g.nq[0] // g.block), threads) * per_thread

    def weights_bytes(self, plan, dtype):
        # the weights of every shift and residue, and their transpose channels-first
        g = grid(plan, dense=True)
        if g is None:
            return 0
        return 2 * math.prod(b + 1 for b in g.big) * math.prod(plan.spec.strides) * plan.in_channels * \
            plan.out_channels * compute_dtype(dtype).itemsize

    def prepare(self, plan: Plan, w, compute):
        g = grid(plan, dense=True)
        if g is None:
            return None
        first, strides, c_in, c_out = plan.spec.channels_first, plan.spec.strides, plan.in_channels, plan.out_channels
        es = list(itertools.product(*[range(b + 1) for b in g.big]))  # e = big - shift; the last axis varies fastest
        n_res = math.prod(strides)
        wd = np.zeros((len(es), c_in, n_res, c_out), dtype=compute)
        for combo in itertools.product(*g.axes):
            f = int(np.ravel_multi_index([ph.residue for ph in combo], strides))
            for picks in itertools.product(*[tuple(zip(ph.shifts, ph.taps)) for ph in combo]):
                e = tuple(b - m for b, (m, _) in zip(g.big, picks))
                wd[es.index(e), :, f, :] = w[tuple(t for _, t in picks)].T
        wd = wd.reshape(len(es) * c_in, n_res * c_out)
        return np.ascontiguousarray(wd.T) if first else wd

    def run(self, plan: Plan, prepared, x, out, compute, threads, images=None) -> set:
        if prepared is None:
            return set()
        wd = prepared
        g = grid(plan, dense=True)
        qa, nq, big, tp, st, block = g.qa, g.nq, g.big, g.tp, g.st, g.block
        first, n, strides = plan.spec.channels_first, plan.spec.n, plan.spec.strides
        c_in, c_out, spatial = plan.in_channels, plan.out_channels, plan.input_spatial
        es = list(itertools.product(*[range(b + 1) for b in big]))
        n_res = math.prod(strides)
        limit = tame_limit(compute, self.name)
        inner = big[-1] + 1  # channels-last: the shifts of the last axis are consecutive in memory, copied together
        offsets = [sum(e_j * s_j for e_j, s_j in zip(e, st)) for e in es]  # of each shift's slice
        outer = offsets[::inner]
        shift = [q * s - p[0] for q, s, p in zip(qa, strides, plan.pads)]  # o - (s*v + r)
        full = [strides[j] * tp[j] for j in range(n)]  # the grid of a block: (s*v + r) per axis
        wild: set = set()  # images with a block that is not tame: they are done again by "offsets"

        def one_block(b, r0, r1, slab, a, acc, cells):
            nb, rows = r1 - r0, (r1 - r0) * st[0]
            fill_padded(slab, x, b, first, [r0] + [0] * (n - 1), qa, big, spatial)
            if limit != np.inf and not tame(slab, limit):  # see tame_limit: the image is done by "offsets"
                wild.add(b)
                return
            fs = flat(first, slab, c_in)  # (c_in, positions) or (positions, c_in)
            if first:
                a_now = a[..., :rows]  # (U, c_in, rows)
                for u, offset in enumerate(offsets):
                    a_now[u] = fs[:, offset:offset + rows]
                y = np.matmul(wd, a_now.reshape(-1, rows), out=acc[:, :rows])  # (n_res*c_out, rows)
                y = y.reshape(*strides, c_out, nb, *tp[1:]).transpose(
                    n, n + 1, 0, *[k for j in range(1, n) for k in (n + 1 + j, j)])  # (c, v0, r0, v1, r1, ..)
            else:
                a_now = a[:rows]  # (rows, U/inner, inner*c_in)
                item = fs.strides[1]
                for u, offset in enumerate(outer):
                    a_now[:, u] = np.lib.stride_tricks.as_strided(fs[offset:], (rows, inner * c_in),
                                                                  (c_in * item, item))
                y = np.matmul(a_now.reshape(rows, -1), wd, out=acc[:rows])  # (rows, n_res*c_out)
                y = y.reshape(nb, *tp[1:], *strides, c_out).transpose(
                    0, n, *[k for j in range(1, n) for k in (j, n + j)], 2 * n)  # (v0, r0, v1, r1, .., c)
            covered = window(plan, shift, [strides[0] * r0] + [0] * (n - 1),
                             [strides[0] * r1] + [s * q for s, q in zip(strides[1:], nq[1:])])
            if covered is None:
                return
            dst, src = covered
            out_window = out[at(first, dst, b)]
            # whole (v, r) groups on every axis: the output window is y's (v, r) grid, cropped
            if all(g.start % s == 0 and (g.stop - g.start) % s == 0 for g, s in zip(src, strides)):
                pairs = [(g.stop - g.start) // s for g, s in zip(src, strides)]
                view = out_window.view()
                view.shape = shaped(first, [d for k, s in zip(pairs, strides) for d in (k, s)], c_out)  # never a copy
                cut = tuple(sl for g, s, k in zip(src, strides, pairs)
                            for sl in (slice(g.start // s, g.start // s + k), slice(None)))
                store(plan.op, view, y[at(first, cut)])
                return
            sizes = [strides[0] * nb, *full[1:]]
            c = cells[:c_out * math.prod(sizes)]
            c.reshape(y.shape)[...] = y
            store(plan.op, out_window, c.reshape(shaped(first, sizes, c_out))[at(first, src)])

        def work(some):
            rows = block * st[0]
            slab = np.empty(shaped(first, (block + big[0] + 1, *tp[1:]), c_in), dtype=compute)
            a = np.empty((len(es), c_in, rows) if first else (rows, len(es) // inner, inner * c_in), dtype=compute)
            acc = np.empty(shaped(first, (rows,), n_res * c_out), dtype=compute)
            cells = np.empty(c_out * block * strides[0] * math.prod(full[1:]), dtype=compute)  # flat: any block fits
            for b, r0, r1 in some:
                one_block(b, r0, r1, slab, a, acc, cells)

        runtime.over_jobs(block_jobs(x.shape[0], images, nq[0], block), work, threads)
        return wild
