"""The padded grid that "offsets", "folded", "dense" and "winograd" read shifts from, and the helpers they share.

Per axis j the output phases' q ranges are united into [qa, qa + nq); the input is padded to tp = nq + big
positions (big the largest shift) so that x[q - m] sits at padded position q - qa + big - m. Flattened with
strides st, every shift m is then one contiguous run of the padded input starting at sum((big - m) * st): a
matrix the GEMM reads in place, with tp - nq junk positions per row of the inner axes.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

from ..shapes import AxisPhase, Plan, axis_phases
from .layout import at

# rows per block in the "offsets" and "dense" strategies (a block of one image, set by the shapes only): about
# BLOCK_BYTES of padded input, accumulator and GEMM result, so that they stay in a cache, and at least ROW_MIN
BLOCK_BYTES, ROW_MIN = 3 << 20, 256


@dataclass(frozen=True)
class Grid:
    """One plan's padded grid: per spatial axis, in spatial order."""

    axes: tuple[tuple[AxisPhase, ...], ...]  # the phases that reach the output
    qa: tuple[int, ...]  # the first phase-grid position any phase uses
    nq: tuple[int, ...]  # positions from qa that some phase uses
    big: tuple[int, ...]  # the largest input shift of any phase
    tp: tuple[int, ...]  # padded positions, nq + big
    st: tuple[int, ...]  # the padded grid's strides when flattened (in positions)
    block: int  # rows of the first axis per block


def grid(plan: Plan, dense: bool = False) -> Grid | None:
    """The plan's padded grid, or None when no phase reaches the output; the rows per block sized for the
    "offsets" buffers, or with `dense` for "dense"'s own. Computed once per plan and block sizing."""
    return _grid(plan, dense, BLOCK_BYTES, ROW_MIN)  # read here, so that a patched size takes effect


@functools.lru_cache(maxsize=256)
def _grid(plan: Plan, dense: bool, block_bytes: int, row_min: int) -> Grid | None:
    n, s, d = plan.spec.n, plan.spec.strides, plan.spec.dilations
    axes = tuple(axis_phases(plan.input_spatial[j], plan.output_spatial[j], plan.kernel[j], s[j], d[j],
                             plan.pads[j][0]) for j in range(n))
    if not all(axes):
        return None
    qa = tuple(min(ph.q0 for ph in a) for a in axes)
    nq = tuple(max(ph.q1 for ph in a) - q for a, q in zip(axes, qa))
    big = tuple(max(max(ph.shifts) for ph in a) for a in axes)
    tp = tuple(q + m for q, m in zip(nq, big))
    st = tuple(math.prod(tp[j + 1:]) for j in range(n))
    width = math.prod(len(a) for a in axes) * plan.out_channels  # the accumulator's columns: every phase's
    if dense:  # a GEMM result is the accumulator itself; the shifted copies take its place
        shifts = {ms for combo in itertools.product(*axes) for ms in itertools.product(*[ph.shifts for ph in combo])}
        per_row = width + (len(shifts) + 1) * plan.in_channels
    else:
        per_row = 2 * width + plan.in_channels
    block = balanced(nq[0], max(1, max(row_min, block_bytes // (4 * max(1, per_row))) // st[0]))
    return Grid(axes, qa, nq, big, tp, st, block)


def balanced(total: int, most: int) -> int:
    """The block size that cuts total into as few blocks of at most `most` as possible, all nearly equal."""
    return -(-total // -(-total // most))


def block_jobs(batch, images, total: int, block: int) -> list:
    """(image, start, stop) of every block: `images` (all of the batch when None) cut into blocks of rows."""
    images = range(batch) if images is None else images
    return [(b, r0, min(total, r0 + block)) for b in images for r0 in range(0, total, block)]


def phase_stores(plan: Plan, phases, qa, r0: int, r1: int) -> list:
    """(phase, output slices, accumulator slices) for the phases that reach rows [r0, r1) of the first axis."""
    stores = []
    for p, combo in enumerate(phases):
        dst, src = [], []
        for j, (ph, s) in enumerate(zip(combo, plan.spec.strides)):
            v0, v1 = ph.q0 - qa[j], ph.q1 - qa[j]
            base = 0
            if j == 0:
                v0, v1, base = max(v0, r0), min(v1, r1), r0
                if v1 <= v0:
                    break
            o0 = ph.o0 + (v0 - (ph.q0 - qa[j])) * s
            dst.append(slice(o0, o0 + (v1 - v0 - 1) * s + 1, s))
            src.append(slice(v0 - base, v1 - base))
        else:
            stores.append((p, tuple(dst), tuple(src)))
    return stores


def region(axes, ms):
    """The phases that use shift combination ms, as (phases per axis, a box of slices, its sizes) when on every
    axis they are evenly spaced (they always form a product over the axes), else None."""
    lens, box, sizes = [], [], []
    for phases, m in zip(axes, ms):
        idx = [i for i, ph in enumerate(phases) if m in ph.shifts]
        step = idx[1] - idx[0] if len(idx) > 1 else 1
        if any(b - a != step for a, b in zip(idx, idx[1:])):
            return None
        lens.append(len(phases))
        box.append(slice(idx[0], idx[-1] + 1, step))
        sizes.append(len(idx))
    return tuple(lens), tuple(box), tuple(sizes)


def shift_users(axes) -> dict:
    """Input shift combination (one shift per axis) -> [(phase index, taps)] of the phases that use it, phases
    numbered as itertools.product(*axes) lists them."""
    users: dict[tuple, list] = {}
    for p, combo in enumerate(itertools.product(*axes)):
        for picks in itertools.product(*[tuple(zip(ph.shifts, ph.taps)) for ph in combo]):
            users.setdefault(tuple(m for m, _ in picks), []).append((p, tuple(t for _, t in picks)))
    return users


def accumulate(acc, y, ps, everyone, region, c_out: int, first: bool) -> None:
    """acc's columns (channels-first: rows) of phases ps += y, the GEMM result of a shift those phases use;
    acc: (rows, phases*c_out) or (phases*c_out, rows), a view whose phase axis can be split without a copy."""
    rows = y.shape[-1] if first else y.shape[0]
    if ps == everyone:
        acc += y
    elif region is not None:  # the phases using this shift are a box of the phase grid: one add
        lens, box, sizes = region
        view = acc.view()
        view.shape = (*lens, c_out, rows) if first else (rows, *lens, c_out)  # splits an axis: never a copy
        if first:
            view[box] += y.reshape(*sizes, c_out, rows)
        else:
            view[(slice(None), *box)] += y.reshape(rows, *sizes, c_out)
    else:  # phase by phase: the channel block of phase p is p * c_out .. (p + 1) * c_out on the channel axis
        axis = 0 if first else 1
        for k, p in enumerate(ps):
            sub = [slice(None)] * 2
            sub[axis] = slice(p * c_out, (p + 1) * c_out)
            part = [slice(None)] * 2
            part[axis] = slice(k * c_out, (k + 1) * c_out)
            acc[tuple(sub)] += y[tuple(part)]


def window(plan: Plan, shift, start, end):
    """The output slices a block's grid covers and the slices of the grid that go there, per axis: grid
    position g is output shift + g, and the block's grid on axis j runs [start[j], end[j]); None when no output
    of the block is inside the output."""
    dst, src = [], []
    for j, size in enumerate(plan.output_spatial):
        o0, o1 = max(0, shift[j] + start[j]), min(size, shift[j] + end[j])
        if o1 <= o0:
            return None
        dst.append(slice(o0, o1))
        src.append(slice(o0 - shift[j] - start[j], o1 - shift[j] - start[j]))
    return tuple(dst), tuple(src)


def fill_padded(d, x, b, first, lo_t, qa, big, spatial) -> None:
    """d[s] = x[b, qa + lo_t + s - big] where that is inside x, else 0 (d: a padded block, channels included).
    Only the border outside the copied box is zeroed."""
    src, box = [], []
    n = len(spatial)
    lead = 1 if first else 0
    for j in range(n):
        size = d.shape[j + lead]
        s0 = min(size, max(0, big[j] - qa[j] - lo_t[j]))
        s1 = max(s0, min(size, spatial[j] + big[j] - qa[j] - lo_t[j]))
        box.append(slice(s0, s1))
        src.append(slice(qa[j] + lo_t[j] + s0 - big[j], qa[j] + lo_t[j] + s1 - big[j]))
    for j, part in enumerate(box):  # the slabs before and after the box on each axis
        for edge in (slice(0, part.start), slice(part.stop, d.shape[j + lead])):
            if edge.stop > edge.start:
                d[(*(slice(None),) * (j + lead), edge)] = 0
    if all(part.stop > part.start for part in box):
        d[at(first, box)] = x[at(first, src, b)]


def full_axes(plan: Plan):
    """Per axis, every residue 0..s-1 as (shifts, taps), with no taps for a residue no tap lands on."""
    axes = []
    for k, s, d in zip(plan.kernel, plan.spec.strides, plan.spec.dilations):
        axes.append([(tuple(t * d // s for t in range(k) if t * d % s == r), tuple(t for t in range(k)
                     if t * d % s == r)) for r in range(s)])
    return axes


def largest_shifts(plan: Plan) -> list:
    """Per axis, the largest input shift of any tap, k*d // s for the last tap (reaching the output or not)."""
    return [(k - 1) * d // s for k, s, d in zip(plan.kernel, plan.spec.strides, plan.spec.dilations)]
