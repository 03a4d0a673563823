"""The interface every strategy implements, and the workspace terms they share."""

from __future__ import annotations

import math

import numpy as np

from ...shapes import Plan
from .. import runtime
from ..dtypes import compute_dtype
from ..guards import finite_taps


class Strategy:
    """One way to compute conv_transpose. Stateless: what a run needs of the filters comes from `prepare`.

    - applies(plan): whether it can run this plan at all ("offsets" runs where it cannot);
    - accepts(w, compute): whether it sums these filters (in the compute dtype) exactly as a direct sum would;
    - workspace_bytes(plan, dtype, threads): the buffers it allocates while running, over all threads at once;
    - weights_bytes(plan, dtype): what `prepare` allocates;
    - prepare(plan, w, compute): the filters rearranged for its GEMMs, once per set of filters;
    - run(plan, prepared, x, out, compute, threads, images): fills `out` (zeros, x's batch) from x, for every
      image or only `images`; returns the images it found it cannot sum exactly (see `redoes_wild`).
    """

    name = ""
    redoes_wild = False  # whether run may return images that "offsets" must do again

    def applies(self, plan: Plan) -> bool:
        return True

    def accepts(self, w: np.ndarray, compute: np.dtype) -> bool:
        return finite_taps(w)

    def workspace_bytes(self, plan: Plan, dtype, threads: int) -> int:
        raise NotImplementedError

    def weights_bytes(self, plan: Plan, dtype) -> int:
        # its GEMMs' filters hold each tap at most once
        return math.prod(plan.filters_shape) * compute_dtype(dtype).itemsize

    def prepare(self, plan: Plan, w: np.ndarray, compute: np.dtype):
        raise NotImplementedError

    def run(self, plan: Plan, prepared, x, out, compute, threads: int, images=None) -> set:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<strategy {self.name}>"


def batch_chunk_bytes(plan: Plan, dtype, threads: int) -> int:
    """The workspace of "phases" and "taps" over all threads: a batch chunk of about WORK_BYTES per thread, of
    shifted inputs (at most every tap's copy) and GEMM results (at most every tap's, or every phase's)."""
    compute = compute_dtype(dtype).itemsize
    out_image = math.prod(plan.output_shape[1:])
    in_image = math.prod(plan.input_shape[1:])
    taps = math.prod(plan.kernel)
    per_image = (in_image * (taps + 1) + math.prod(plan.input_spatial) * taps * plan.out_channels + out_image)
    per_image *= compute
    chunk = min(max(1, plan.batch), max(1, runtime.WORK_BYTES // max(1, per_image)))
    return min(threads, max(1, plan.batch)) * chunk * per_image  # chunks in flight, one per thread


def blocks_in_flight(plan: Plan, blocks: int, threads: int) -> int:
    """How many block workspaces exist at once: one per thread that has a job (an image's block) to take."""
    return min(threads, max(1, plan.batch) * max(1, blocks))
