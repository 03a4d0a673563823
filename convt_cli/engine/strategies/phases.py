"""Sub-pixel decomposition: per group of output phases that share their input shifts, one GEMM per image."""

from __future__ import annotations

import itertools
import math

import numpy as np

from ...shapes import Plan, axis_phases
from .. import runtime
from ..dtypes import chunk_of, store
from ..layout import at, shaped
from .base import Strategy, batch_chunk_bytes


class Phases(Strategy):
    # Output phase p (o = q*s + residue - lo) is a plain correlation of the input with the phase's own taps, so
    # per group of phases one GEMM of [shifted inputs] (rows, U*c_in) by (U*c_in, P*c_out) weights writes each
    # output element exactly once; no scatter-add.
    name = "phases"

    def workspace_bytes(self, plan, dtype, threads):
        return batch_chunk_bytes(plan, dtype, threads)

    def prepare(self, plan: Plan, w, compute):
        first, n = plan.spec.channels_first, plan.spec.n
        c_in, c_out = plan.in_channels, plan.out_channels
        prepared = []
        for shift_sets, combos in _phase_groups(plan):
            qa = [min(c[j].q0 for c in combos) for j in range(n)]
            qb = [max(c[j].q1 for c in combos) for j in range(n)]
            shifts = list(itertools.product(*shift_sets))
            weights = np.empty((len(shifts), c_in, len(combos), c_out), dtype=compute)  # (U, c_in, P, c_out)
            for p, combo in enumerate(combos):
                for u, ms in enumerate(shifts):
                    tap = tuple(ph.taps[ph.shifts.index(m)] for ph, m in zip(combo, ms))
                    weights[u, :, p, :] = w[tap].T
            weights = weights.reshape(len(shifts) * c_in, len(combos) * c_out)
            if first:
                weights = np.ascontiguousarray(weights.T)  # (P*c_out, U*c_in)
            prepared.append((combos, qa, qb, shifts, weights))
        return prepared

    def run(self, plan: Plan, prepared, x, out, compute, threads, images=None) -> set:
        first = plan.spec.channels_first
        c_in, c_out, spatial = plan.in_channels, plan.out_channels, plan.input_spatial
        if not prepared:
            return set()  # no phase reaches the output: it stays zero
        per_image = max(
            math.prod(b - a for a, b in zip(qa, qb)) * (len(sh) * c_in + len(cb) * c_out)
            for cb, qa, qb, sh, _ in prepared
        ) * compute.itemsize

        def work(b0, b1):
            xb = chunk_of(x, b0, b1, compute)
            nb = b1 - b0
            for combos, qa, qb, shifts, weights in prepared:
                nq = [b - a for a, b in zip(qa, qb)]
                a = _shifted_inputs(xb, shifts, qa, nq, spatial, first, compute)
                rows = math.prod(nq)
                # one GEMM per image (a stacked matmul), never one across images: BLAS rounds a row by its
                # place in the matrix, and results must not depend on how the batch is cut
                if first:
                    y = np.matmul(weights, a.reshape(nb, len(shifts) * c_in, rows))  # (nb, P*c_out, rows)
                else:
                    y = np.matmul(a.reshape(nb, rows, len(shifts) * c_in), weights)  # (nb, rows, P*c_out)
                y = y.reshape(nb, *shaped(first, nq, len(combos), c_out))  # (nb, P, c_out, *nq) or (nb, *nq, P, c_out)
                for p, combo in enumerate(combos):
                    dst = tuple(slice(ph.o0, ph.o0 + (ph.q1 - ph.q0 - 1) * s + 1, s)
                                for ph, s in zip(combo, plan.spec.strides))
                    src = tuple(slice(ph.q0 - a0, ph.q1 - a0) for ph, a0 in zip(combo, qa))
                    store(plan.op, out[at(first, dst, slice(b0, b1))], y[at(first, src, slice(None), tail=(p,))])
                del a, y  # before the next group's buffers exist: the peak holds one set, not two

        runtime.over_batch(x.shape[0], per_image, work, threads)
        return set()


def _phase_groups(plan: Plan):
    """Output phases grouped by their per-axis input shifts: a group shares one shifted-input matrix."""
    s, d, lo = plan.spec.strides, plan.spec.dilations, [p[0] for p in plan.pads]
    axes = [axis_phases(plan.input_spatial[j], plan.output_spatial[j], plan.kernel[j], s[j], d[j], lo[j])
            for j in range(plan.spec.n)]
    groups: dict[tuple, list] = {}
    for combo in itertools.product(*axes):
        groups.setdefault(tuple(ph.shifts for ph in combo), []).append(combo)
    return list(groups.items())


def _shifted_inputs(xb, shifts, qa, nq, spatial, first, compute):
    """(nb, *nq, U, c_in), or (nb, U, c_in, *nq) channels-first: block u holds x[q - shift_u], zero outside."""
    nb, c_in = xb.shape[0], xb.shape[1 if first else -1]
    a = np.empty((nb, *shaped(first, nq, len(shifts), c_in)), dtype=compute)
    lead = 2 if first else 1  # index of the first spatial axis in a block
    for u, ms in enumerate(shifts):
        # (nb, c_in, *nq) or (nb, *nq, c_in)
        block = a[:, u] if first else a[(slice(None), *[slice(None)] * len(nq), u)]
        dst, src = [], []
        for j, m in enumerate(ms):
            q_lo, q_hi = max(qa[j], m), min(qa[j] + nq[j], spatial[j] + m)
            dst.append((q_lo - qa[j], max(q_lo, q_hi) - qa[j]))
            src.append(slice(q_lo - m, q_hi - m))
        for j, (d0, d1) in enumerate(dst):  # zero the border slabs the input does not reach
            for part in (slice(0, d0), slice(d1, nq[j])):
                if part.stop > part.start:
                    index = [slice(None)] * block.ndim
                    index[lead + j] = part
                    block[tuple(index)] = 0
        if all(d1 > d0 for d0, d1 in dst):
            inner = tuple(slice(d0, d1) for d0, d1 in dst)
            block[at(first, inner, slice(None))] = xb[at(first, src, slice(None))]
    return a
