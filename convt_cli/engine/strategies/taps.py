"""Scatter, tap by tap: the plainest strategy, and the only one that sums over the input only."""

from __future__ import annotations

import math

import numpy as np

from ...shapes import Plan, tap_span
from .. import runtime
from ..dtypes import chunk_of, store
from ..layout import at, shaped
from .base import Strategy, batch_chunk_bytes


class Taps(Strategy):
    # One GEMM gives every tap's contribution for a group of taps, (rows, c_in) by (c_in, T*c_out), and strided
    # slices add each tap's block into the output. It multiplies no padding by any tap, so it takes any filters,
    # inf and NaN included.
    name = "taps"

    def accepts(self, w, compute):
        return True

    def workspace_bytes(self, plan, dtype, threads):
        return batch_chunk_bytes(plan, dtype, threads)

    def prepare(self, plan: Plan, w, compute):
        first, n = plan.spec.channels_first, plan.spec.n
        c_in, c_out, spatial = plan.in_channels, plan.out_channels, plan.input_spatial
        taps = []
        for tap in np.ndindex(*plan.kernel):
            spans = [tap_span(spatial[j], plan.output_spatial[j], tap[j], plan.spec.strides[j],
                              plan.spec.dilations[j], plan.pads[j][0]) for j in range(n)]
            if all(span is not None for span in spans):  # else the tap lands wholly in the padding
                taps.append((tap, spans))
        if not taps:
            return None
        n_g = plan.groups
        c_out //= n_g  # a group's: with groups, every GEMM is one group's, (rows, in/G) by (in/G, T*out/G)
        per_tap = max(1, -(-256 // c_out))  # aim for GEMMs at least 256 wide
        group = min(len(taps), per_tap)  # from the shapes only: a GEMM's width changes how BLAS rounds
        groups = [taps[i:i + group] for i in range(0, len(taps), group)]
        weights = []
        for g in groups:
            wg = np.stack([w[tap] for tap, _ in g])  # (T, c_out, c_in)
            if n_g > 1:  # (G, T*c_out, c_in/G) channels-first, (G, c_in/G, T*c_out) channels-last
                wg = wg.reshape(len(g) * c_out, n_g, c_in // n_g).transpose(1, 0, 2)
                weights.append(np.ascontiguousarray(wg if first else wg.transpose(0, 2, 1)))
                continue
            weights.append(wg.reshape(len(g) * c_out, c_in) if first else
                           np.ascontiguousarray(wg.reshape(len(g) * c_out, c_in).T))
        return group, groups, weights

    def run(self, plan: Plan, prepared, x, out, compute, threads, images=None) -> set:
        if prepared is None:
            return set()
        group, groups, weights = prepared
        first = plan.spec.channels_first
        c_in, c_out, spatial = plan.in_channels, plan.out_channels, plan.input_spatial
        positions = math.prod(spatial)
        per_image = positions * (group * c_out + c_in) * compute.itemsize
        accumulate_in_place = out.dtype == compute

        def work(b0, b1):
            nb = b1 - b0
            xb = chunk_of(x, b0, b1, compute)
            acc = out[b0:b1] if accumulate_in_place else np.zeros((nb, *out.shape[1:]), dtype=compute)
            if plan.groups > 1:
                grouped(xb, acc)
            else:
                ungrouped(xb, acc)
            if not accumulate_in_place:
                store(plan.op, out[b0:b1], acc)

        def ungrouped(xb, acc):
            nb = xb.shape[0]
            for g, wg in zip(groups, weights):
                if first:
                    y = np.matmul(wg, xb.reshape(nb, c_in, positions))  # (nb, T*c_out, P)
                else:
                    y = np.matmul(xb.reshape(nb, positions, c_in), wg)  # (nb, P, T*c_out), a GEMM per image
                y = y.reshape(nb, *shaped(first, spatial, len(g), c_out))  # (nb, T, c_out, *I) or (nb, *I, T, c_out)
                for t, src, dst in _placed(g, plan.spec.strides):
                    acc[at(first, dst, slice(None))] += y[at(first, src, slice(None), tail=(t,))]
                del y

        def grouped(xb, acc):
            # as above with a group axis G: a GEMM per (image, group), each output block added to its group's
            # channels of acc, viewed (nb, G, c_out/G, *O) or (nb, *O, G, c_out/G)
            nb, n_g = xb.shape[0], plan.groups
            ci, co = c_in // n_g, c_out // n_g
            if first:
                xg = xb.reshape(nb, n_g, ci, positions)
            else:  # (nb, G, P, c_in/G): a copy, so that each GEMM reads a contiguous matrix
                xg = np.ascontiguousarray(xb.reshape(nb, positions, n_g, ci).transpose(0, 2, 1, 3))
            view = acc.reshape(nb, n_g, co, *acc.shape[2:]) if first else acc.reshape(*acc.shape[:-1], n_g, co)
            for g, wg in zip(groups, weights):
                y = np.matmul(wg, xg) if first else np.matmul(xg, wg)  # (nb, G, T*co, P) or (nb, G, P, T*co)
                y = y.reshape(nb, n_g, len(g), co, *spatial) if first else y.reshape(nb, n_g, *spatial, len(g), co)
                for t, src, dst in _placed(g, plan.spec.strides):
                    if first:
                        view[(slice(None), slice(None), slice(None), *dst)] += y[(slice(None), slice(None), t,
                                                                                  slice(None), *src)]
                    else:  # (nb, G, *span, co) -> (nb, *span, G, co)
                        view[(slice(None), *dst)] += np.moveaxis(y[(slice(None), slice(None), *src, t)], 1, -2)
                del y

        runtime.over_batch(x.shape[0], per_image, work, threads)
        return set()


def _placed(taps, strides):
    """Per tap of a group of taps: (its index, the input box it reads, the strided output box it adds to)."""
    for t, (_, spans) in enumerate(taps):
        src = tuple(slice(i0, i1) for i0, i1, _ in spans)
        dst = tuple(slice(o0, o0 + (i1 - i0 - 1) * s + 1, s) for (i0, i1, o0), s in zip(spans, strides))
        yield t, src, dst
