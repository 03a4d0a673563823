"""Winograd's minimal filtering F(m, 2) on the phase grid: where every tap's shift is 0 or 1."""

from __future__ import annotations

import itertools
import math

import numpy as np

from ...shapes import Plan
from .. import grid as grids
from .. import runtime
from ..dtypes import compute_dtype, store
from ..grid import balanced, block_jobs, fill_padded, full_axes, grid, largest_shifts, window
from ..guards import finite_taps, tame, tame_limit
from ..layout import at, shaped
from .base import Strategy, blocks_in_flight

# tiles per block at least (or one image's): channels-last, they are the rows of its GEMMs; channels-first, the
# columns, which OpenBLAS packs per call and wants wider
TILES_MIN, TILES_MIN_FIRST = 128, 512
# F(m, 2) per axis, m outputs of a 2-tap correlation from m + 1 inputs with m + 1 products (see winograd_m); per
# point, the taps' coefficients ({e: coef}: sum_e coef * g_e)
WINOGRAD_FILTER = {2: ({0: 1.0}, {0: 1.0, 1: 1.0}, {1: 1.0}),
                   3: ({0: 1.0}, {0: 0.5, 1: 0.5}, {0: 0.5, 1: -0.5}, {1: 1.0})}


class Winograd(Strategy):
    # Every phase of every axis is a correlation y[v] = d[v] g0 + d[v + 1] g1 of the padded input d, and a tile
    # of m outputs takes m + 1 products instead of 2m. F(2, 2): (d0 - d1) g0, d1 (g0 + g1), (d2 - d1) g1.
    # F(3, 2): (d0 - d2) g0, (d1 + d2) (g0 + g1)/2, (d2 - d1) (g0 - g1)/2, (d3 - d1) g1, and y0 = M0 + M1 + M2,
    # y1 = M1 - M2, y2 = M1 + M2 + M3. In N-D the (m+1)**n transformed inputs of a block of tiles are each one
    # GEMM over the channels against the transformed taps of every phase, so a stride-2 kernel-4 layer needs
    # 9/16 (F(2, 2)) or 7/16 (F(3, 2)) of the direct products in 2-D. The input and output transforms only add
    # and subtract. Output position o = s*(m*t + i) + r + (qa*s - lo) for tile t, place i in the tile and
    # residue r: a block's outputs are one window of the output, written once.
    name = "winograd"
    redoes_wild = True

    def applies(self, plan: Plan) -> bool:
        return winograd_ok(plan)

    def accepts(self, w, compute):
        return finite_taps(w) and tame(w, tame_limit(compute, self.name))

    def workspace_bytes(self, plan, dtype, threads):
        if not winograd_ok(plan):
            return 0
        compute = compute_dtype(dtype).itemsize
        wm = winograd_m(plan, compute)
        points, outputs = (wm + 1) ** plan.spec.n, wm ** plan.spec.n
        width = math.prod(plan.spec.strides) * plan.out_channels
        least = TILES_MIN_FIRST if plan.spec.channels_first else TILES_MIN
        # (m+1)**n transformed blocks of TILES_MIN tiles or more
        rows = max(least, grids.BLOCK_BYTES // max(1, points * (plan.in_channels + 2 * width) * compute))
        rows = min(rows, math.prod(-(-q // wm) + 1 for q in grid(plan).nq))
        per_thread = (points * rows * (plan.in_channels + 4 * width) + outputs * rows *
                      (plan.in_channels + width)) * compute
        _, _, tiles, block = _sizes(plan, compute)
        return blocks_in_flight(plan, -(-tiles[0] // block), threads) * per_thread

    def weights_bytes(self, plan, dtype):
        # the transformed taps: (m+1)**n points for every residue combination
        compute = compute_dtype(dtype).itemsize
        return (winograd_m(plan, compute) + 1) ** plan.spec.n * math.prod(plan.spec.strides) * plan.in_channels * \
            plan.out_channels * compute

    def prepare(self, plan: Plan, w, compute):
        """U: (points, c_in, P*c_out), or (points, P*c_out, c_in) channels-first, over every residue combination P:
        each phase's taps transformed per axis by WINOGRAD_FILTER (F(3, 2): g0, (g0 + g1)/2, (g0 - g1)/2, g1),
        zeros for taps a phase lacks. Filled point by point, so that nothing but U itself is allocated."""
        first, c_in, c_out = plan.spec.channels_first, plan.in_channels, plan.out_channels
        axes, big = full_axes(plan), largest_shifts(plan)
        phases = list(itertools.product(*axes))
        # per axis, point a of a phase is sum_e coef * g_e over {e: coef} (e: y[v] = sum_e d[v + e] g_e)
        point_taps = [WINOGRAD_FILTER[winograd_m(plan, compute.itemsize)] if b else ({0: 1.0},) for b in big]
        points = list(itertools.product(*point_taps))
        u = np.zeros((len(points), len(phases) * c_out, c_in) if first else (len(points), c_in, len(phases) * c_out),
                     dtype=compute)
        for p, combo in enumerate(phases):
            by_e = {}
            for picks in itertools.product(*[tuple(zip(*ph)) for ph in combo]):
                by_e[tuple(b - m for b, (m, _) in zip(big, picks))] = tuple(t for _, t in picks)
            cols = slice(p * c_out, (p + 1) * c_out)
            for a, coefs in enumerate(points):
                for e in itertools.product(*coefs):
                    if e in by_e:
                        c = math.prod(coef[k] for coef, k in zip(coefs, e))
                        tap = w[by_e[e]] if c == 1 else c * w[by_e[e]]
                        if first:
                            u[a, cols] += tap
                        else:
                            u[a, :, cols] += tap.T
        return u

    def run(self, plan: Plan, prepared, x, out, compute, threads, images=None) -> set:
        u = prepared
        qa = grid(plan).qa
        first, n, strides = plan.spec.channels_first, plan.spec.n, plan.spec.strides
        c_in, c_out, spatial = plan.in_channels, plan.out_channels, plan.input_spatial
        big = largest_shifts(plan)
        wm, m, tiles, block = _sizes(plan, compute.itemsize)
        k = wm + 1  # points per axis
        points, width = u.shape[0], math.prod(strides) * c_out
        per_row = math.prod(tiles[1:])
        limit = tame_limit(compute, self.name)
        shift = [q * s - p[0] for q, s, p in zip(qa, strides, plan.pads)]  # o - g
        wild: set = set()  # images with a block that is not tame: they are done again by "offsets"

        def transform_in(d):
            # along the spatial axes from the last to the first, each making a leading axis of 3 points (or 1)
            lead = 0
            for j in reversed(range(n)):
                if not big[j]:
                    d, lead = d[None], lead + 1
                    continue
                axis = lead + j + 1 if first else lead + j
                head = (slice(None),) * axis
                t = (d.shape[axis] - 1) // wm
                ds = [d[(*head, slice(i, i + wm * t, wm))] for i in range(k)]  # d_i of every tile
                v = np.empty((k, *ds[0].shape), dtype=compute)
                if wm == 2:  # d0 - d1, d1, d2 - d1
                    np.subtract(ds[0], ds[1], out=v[0])
                    v[1] = ds[1]
                    np.subtract(ds[2], ds[1], out=v[2])
                else:  # d0 - d2, d1 + d2, d2 - d1, d3 - d1
                    np.subtract(ds[0], ds[2], out=v[0])
                    np.add(ds[1], ds[2], out=v[1])
                    np.subtract(ds[2], ds[1], out=v[2])
                    np.subtract(ds[3], ds[1], out=v[3])
                d, lead = v, lead + 1
            return d

        def one_block(b, t0, t1, slab, cells, spare):
            lo_t = [m[0] * t0] + [0] * (n - 1)
            hi_t = [m[0] * t1 + big[0]] + [m[j] * tiles[j] + big[j] for j in range(1, n)]
            d = slab[at(first, [slice(0, h - lo) for h, lo in zip(hi_t, lo_t)])]
            fill_padded(d, x, b, first, lo_t, qa, big, spatial)
            if not tame(d, limit):  # see tame_limit: the image is done by "offsets"
                wild.add(b)
                return
            v = transform_in(d)  # (3, .., 3, c_in, *T) or (3, .., 3, *T, c_in)
            nt = [t1 - t0, *tiles[1:]]
            rows = math.prod(nt)
            if first:
                y = np.matmul(u, v.reshape(points, c_in, rows))  # (points, P*c_out, rows)
            else:
                y = np.matmul(v.reshape(points, rows, c_in), u)  # (points, rows, P*c_out)
            y = y.reshape(*[k if b else 1 for b in big], *shaped(first, nt, *strides, c_out))
            # the block's outputs: grid (T, m, s) per axis (c first or last), viewed in y's order (m.., then y's)
            g = cells[(slice(None), slice(0, nt[0])) if first else (slice(0, nt[0]),)]
            if first:  # grid (c, T0, m0, s0, T1, ...): view as (m.., s.., c, T..)
                view = g.transpose(*[2 + 3 * j for j in range(n)], *[3 + 3 * j for j in range(n)], 0,
                                   *[1 + 3 * j for j in range(n)])
            else:  # grid (T0, m0, s0, T1, ..., c): view as (m.., T.., s.., c)
                view = g.transpose(*[1 + 3 * j for j in range(n)], *[3 * j for j in range(n)],
                                   *[2 + 3 * j for j in range(n)], 3 * n)
            last = max(j for j in range(n) if big[j])
            for j in range(n):  # from the points back to the outputs of each tile, straight into the block's grid
                if not big[j]:  # for the last axis, in place in y before it
                    continue
                head = (slice(None),) * j
                ms = [y[(*head, i)] for i in range(k)]
                ys = [view[(*head, i)] for i in range(wm)] if j == last else None
                if wm == 2:  # y0 = M0 + M1, y1 = M1 + M2; in place: points 0 and 2 become outputs 0 and 1
                    np.add(ms[0], ms[1], out=ys[0] if ys else ms[0])
                    np.add(ms[1], ms[2], out=ys[1] if ys else ms[2])
                    if not ys:
                        y = y[(*head, slice(0, 3, 2))]
                else:  # s = M1 + M2; y0 = M0 + s, y1 = M1 - M2, y2 = s + M3; in place: points 0, 1, 2 become them
                    tmp = spare[:ms[1].size].reshape(ms[1].shape)
                    np.add(ms[1], ms[2], out=tmp)
                    np.add(ms[0], tmp, out=ys[0] if ys else ms[0])
                    np.subtract(ms[1], ms[2], out=ys[1] if ys else ms[1])
                    np.add(tmp, ms[3], out=ys[2] if ys else ms[2])
                    if not ys:
                        y = y[(*head, slice(0, 3))]
            covered = window(plan, shift, [strides[0] * m[0] * t0] + [0] * (n - 1),
                             [strides[0] * m[0] * t1] + [s * k * t for s, k, t in zip(strides[1:], m[1:], tiles[1:])])
            if covered is None:
                return
            dst, src = covered
            full = [strides[j] * m[j] * (t1 - t0 if j == 0 else tiles[j]) for j in range(n)]
            store(plan.op, out[at(first, dst, b)], g.reshape(shaped(first, full, c_out))[at(first, src)])

        def work(some):
            shape = (m[0] * block + big[0], *[m[j] * tiles[j] + big[j] for j in range(1, n)])
            slab = np.empty(shaped(first, shape, c_in), dtype=compute)
            dims = [c for j in range(n) for c in (block if j == 0 else tiles[j], m[j], strides[j])]
            cells = np.empty(shaped(first, dims, c_out), dtype=compute)
            # F(3, 2)'s output transform keeps one point's share of the GEMM result aside
            spare = np.empty(points // k * block * per_row * width if wm == 3 else 0, dtype=compute)
            for b, t0, t1 in some:
                one_block(b, t0, t1, slab, cells, spare)

        runtime.over_jobs(block_jobs(x.shape[0], images, tiles[0], block), work, threads)
        return wild


def _sizes(plan: Plan, itemsize: int):
    """(m, outputs per tile and axis, tiles per axis, tiles of the first axis per block)."""
    nq = grid(plan).nq
    first, big = plan.spec.channels_first, largest_shifts(plan)
    wm = winograd_m(plan, itemsize)
    m = [wm if b else 1 for b in big]
    tiles = [-(-q // k) for q, k in zip(nq, m)]
    points = math.prod(wm + 1 if b else 1 for b in big)
    row_bytes = points * math.prod(tiles[1:]) * (plan.in_channels + 2 * math.prod(plan.spec.strides) *
                                                  plan.out_channels) * itemsize
    least = TILES_MIN_FIRST if first else TILES_MIN
    block = balanced(tiles[0], max(-(-least // math.prod(tiles[1:])), grids.BLOCK_BYTES // max(1, row_bytes), 1))
    return wm, m, tiles, block


def winograd_ok(plan: Plan) -> bool:
    """Winograd applies when every tap's shift (k*d // s) is 0 or 1, and some axis has both."""
    return grid(plan) is not None and max(largest_shifts(plan)) == 1


def winograd_m(plan: Plan, itemsize: int) -> int:
    """Outputs per tile and axis, 2 or 3. F(3, 2) makes 16 products for 9 outputs in 2-D where F(2, 2) makes 9
    for 4, 21% fewer, but its transforms take twice the NumPy passes, and it pays only on large blocks: on whole
    images it measured 6-12% faster (W7, W8 in float32 and bfloat16, 40-60 paired runs), on W1's blocks of ~100
    tiles no faster, and W6's whole images in float64 7% slower. So F(3, 2) channels-first, whose blocks are
    512 tiles or a whole image, and channels-last where a whole image's block of it fits in 2 * BLOCK_BYTES
    (itemsize: the compute dtype's; W8 does, W1 and W6 do not); F(2, 2), on smaller blocks, otherwise."""
    if plan.spec.channels_first:
        return 3
    tiles = math.prod(-(-(i + b) // 3) for i, b in zip(plan.input_spatial, largest_shifts(plan)))  # nq ~ i + big
    per_tile = 4 ** plan.spec.n * (plan.in_channels + 2 * math.prod(plan.spec.strides) * plan.out_channels)
    return 3 if tiles * per_tile * itemsize <= 2 * grids.BLOCK_BYTES else 2
