"""conv_transpose and conv on NumPy arrays: no I/O, no click.

conv_transpose splits the output into stride phases (output positions with the same residue modulo the stride
on every axis); each phase is a plain correlation of the input with that phase's taps. The default strategies
("offsets", "folded", "dense", "winograd") pad a block of rows of one image once, read input shifts as
contiguous slices of it, and run BLAS GEMMs over the channels; choose_strategy picks one by shape. "phases" and
"taps" are the earlier, simpler strategies, kept and tested.
conv gathers from a zero-padded copy, tap by tap. The two are written independently on purpose: `verify` holds
one against the other, so a mistake in one must not be repeated in the other.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import threading

import numpy as np

from .errors import ConvtError
from .shapes import Plan, axis_phases, plan_conv, plan_conv_transpose, tap_span

# dtype name -> the dtype the engine accumulates in; the result is cast back once at the end
COMPUTE_DTYPES = {
    "float16": np.float32,
    "bfloat16": np.float32,
    "float32": np.float32,
    "float64": np.float64,
    "int32": np.int64,
    "complex64": np.complex64,
    "complex128": np.complex128,
}
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def check_dtypes(op: str, x_dtype: np.dtype, w_dtype: np.dtype) -> None:
    """Both dtypes supported and equal, else ConvtError."""
    for label, dtype in (("input", x_dtype), ("filters", w_dtype)):
        if dtype.name not in COMPUTE_DTYPES:
            raise ConvtError(
                f"{op}: {label} dtype {dtype.name} is not supported: expected one of {', '.join(COMPUTE_DTYPES)}"
            )
    if x_dtype.name != w_dtype.name:
        raise ConvtError(
            f"{op}: input and filters must share a dtype, got input {x_dtype.name} and filters {w_dtype.name}"
        )


def as_arrays(op: str, input, filters):
    """Both as arrays (no copy when they already are), with supported and equal dtypes."""
    x = input if isinstance(input, np.ndarray) else np.asarray(input)
    w = filters if isinstance(filters, np.ndarray) else np.asarray(filters)
    check_dtypes(op, x.dtype, w.dtype)
    return x, w


def _compute_copy(a: np.ndarray) -> np.ndarray:
    # native byte order, C order, accumulation dtype; a view when nothing needs to change, never a write
    return np.ascontiguousarray(a, dtype=COMPUTE_DTYPES[a.dtype.name])


def _check_int32_bound(op: str, x, w, terms: int) -> None:
    # int32 accumulates in int64, exactly as long as no partial sum can leave int64
    if x.dtype.name != "int32" or x.size == 0 or w.size == 0:
        return
    bound = int(np.abs(x.astype(np.int64)).max()) * int(np.abs(w.astype(np.int64)).max()) * terms
    if bound > 2**63 - 1:
        raise ConvtError(
            f"{op}: int32 input too large to accumulate exactly: max|input| * max|filters| * {terms} terms "
            f"= {bound} exceeds int64; cast to float64 instead"
        )


def _finish(op: str, out: np.ndarray, dtype: np.dtype) -> np.ndarray:
    result = np.empty(out.shape, dtype=dtype.newbyteorder("="))  # big-endian in, native out
    _store(op, result, out)
    return result


def estimate_bytes(plan: Plan, dtype) -> int:
    """Peak bytes run_conv_transpose allocates for this plan beyond its input and filters (an upper bound):
    the output, each thread's workspace for the strategy chosen (a batch chunk of about WORK_BYTES for
    "phases"/"taps", a block of about BLOCK_BYTES for the others), and the prepared filters. Not counted:
    the (1 + THREADS) * 2.25 MiB that the worker threads' first GEMMs take once per process (see _pool)."""
    dtype = np.dtype(dtype)
    compute = np.dtype(COMPUTE_DTYPES[dtype.name]).itemsize
    out_image = math.prod(plan.output_shape[1:])
    in_image = math.prod(plan.input_shape[1:])
    taps = math.prod(plan.kernel)
    # shifted inputs (at most every tap's copy) and GEMM results (at most every tap's, or every phase's)
    per_image = (in_image * (taps + 1) + math.prod(plan.input_spatial) * taps * plan.out_channels + out_image)
    per_image *= compute
    chunk = min(max(1, plan.batch), max(1, WORK_BYTES // max(1, per_image)))
    at_once = min(THREADS, max(1, plan.batch))  # chunks in flight, one per thread
    work = chunk * per_image
    layout = _offset_layout(plan)
    if layout is not None:  # "offsets"/"dense": about BLOCK_BYTES per thread, or one block of ROW_MIN rows
        axes, _, _, big, _, st, block = layout
        width = math.prod(len(a) for a in axes) * plan.out_channels
        shifts = math.prod(len({m for ph in a for m in ph.shifts}) for a in axes)
        per_row = 2 * width + (shifts + 1) * plan.in_channels
        work = max(work, ((block + big[0] + 1) * st[0] * per_row) * compute)
    chosen = choose_strategy(plan)
    if chosen == "dense":  # padded block, the shifts side by side, the GEMM result and the output grid
        _, _, _, big, tp, st, block = _offset_layout(plan, dense=True)
        rows = block * st[0]
        shifts, residues = math.prod(b + 1 for b in big), math.prod(plan.spec.strides)
        work = max(work, ((rows + (big[0] + 1) * st[0]) * plan.in_channels + rows * shifts * plan.in_channels +
                          2 * rows * residues * plan.out_channels) * compute)
    if chosen == "folded":  # A (the last axis' shifts side by side), the accumulator, one GEMM result
        work = max(work, _folded_sizes(plan, np.dtype(COMPUTE_DTYPES[dtype.name]).type == dtype.type)[3] * compute)
    if chosen == "winograd":  # (m+1)**n transformed blocks of TILES_MIN tiles or more, F(m, 2)
        wm = _winograd_m(plan, compute)
        points, outputs = (wm + 1) ** plan.spec.n, wm ** plan.spec.n
        width = math.prod(plan.spec.strides) * plan.out_channels
        least = TILES_MIN_FIRST if plan.spec.channels_first else TILES_MIN
        rows = max(least, BLOCK_BYTES // max(1, points * (plan.in_channels + 2 * width) * compute))
        rows = min(rows, math.prod(-(-q // wm) + 1 for q in layout[2]))
        work = max(work, (points * rows * (plan.in_channels + 4 * width) + outputs * rows *
                          (plan.in_channels + width)) * compute)
    weights = 2 * math.prod(plan.filters_shape) * compute
    if chosen == "dense":  # the weights of every shift and residue, and their transpose channels-first
        _, _, _, big, _, _, _ = _offset_layout(plan, dense=True)
        weights += 2 * math.prod(b + 1 for b in big) * math.prod(plan.spec.strides) * plan.in_channels * \
            plan.out_channels * compute
    if chosen == "winograd":  # the transformed taps: (m+1)**n points for every residue combination
        weights += (_winograd_m(plan, compute) + 1) ** plan.spec.n * math.prod(plan.spec.strides) * plan.in_channels * \
            plan.out_channels * compute
    return math.prod(plan.output_shape) * dtype.itemsize + at_once * work + weights


def conv_transpose(
    input, filters, output_shape=None, strides=1, padding="SAME", data_format=None, dilations=None
) -> np.ndarray:
    """Transposed convolution, the same numbers as TensorFlow's tf.nn.conv_transpose.

    Args:
        input: (batch, *spatial, in_channels), or (batch, in_channels, *spatial) when data_format is
            channels-first ("NCW", "NCHW", "NCDHW", "channels_first"). Any N >= 1 spatial dims.
        filters: (*kernel, out_channels, in_channels) whatever the data_format; filters[..., -1] pairs with
            the input's channels. Not flipped.
        output_shape: None (I*s for SAME, (I-1)*s + (K-1)*d + 1 for VALID), the N spatial sizes, or the
            full N+2 shape in data_format order, as TF takes it.
        strides, dilations: an int, or a list of length 1, N or N+2 (data_format order, batch and channel
            entries 1).
        padding: "SAME", "VALID" (any case), or N (lo, hi) pairs (or N+2 with zero batch/channel pairs).
        data_format: None (channels-last), TF's strings for N <= 3, "channels_last" or "channels_first".

    Returns:
        An array of output_shape in data_format order, with the input's dtype.

    Raises:
        ConvtError: any invalid argument, with the parameter, what was expected and what was got.

    >>> conv_transpose(np.ones((2, 5, 5, 3), np.float32), np.ones((3, 3, 4, 3), np.float32), strides=2).shape
    (2, 10, 10, 4)
    """
    x, w = as_arrays("conv_transpose", input, filters)
    plan = plan_conv_transpose(x.shape, w.shape, output_shape, strides, padding, data_format, dilations)
    return run_conv_transpose(plan, x, w)


def run_conv_transpose(plan: Plan, x: np.ndarray, w: np.ndarray, strategy: str | None = None) -> np.ndarray:
    """Execute a plan on arrays whose shapes match it (any batch size: batch elements are independent).

    `strategy` (one of STRATEGIES) overrides the choice by shape; the tests run each.
    """
    batch = x.shape[0]
    _check_int32_bound(plan.op, x, w, plan.in_channels * math.prod(plan.kernel))
    if batch * math.prod(plan.input_spatial) > 4096:
        _pool()  # BLAS buffers before the output: see _pool
    out = np.zeros((batch, *plan.output_shape[1:]), dtype=x.dtype.newbyteorder("="))
    if out.size == 0 or x.size == 0 or w.size == 0:
        return out
    compute = np.dtype(COMPUTE_DTYPES[x.dtype.name])
    wc = np.ascontiguousarray(w, dtype=compute)
    strategy = strategy or choose_strategy(plan)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}")
    if (strategy == "winograd" and not _winograd_ok(plan)) or (strategy == "folded" and not _folded_ok(plan)):
        strategy = "offsets"  # where it does not apply
    if compute.kind in "fc" and not np.isfinite(wc).all():
        # an inf or NaN tap: every other strategy multiplies padding zeros by the taps, which makes NaN where
        # TF's direct sum, over the input only, makes inf or nothing; "taps" sums over the input only
        strategy = "taps"
    if strategy in ("dense", "winograd") and not _tame(wc, _tame_limit(compute, strategy)):
        strategy = "offsets"  # filters that "dense" or "winograd" would not sum as a direct sum does
    if strategy == "phases":
        _transpose_phases(plan, x, wc, out, compute)
    elif strategy == "taps":
        _transpose_taps(plan, x, wc, out, compute)
    elif strategy == "offsets":
        _transpose_offsets(plan, x, wc, out, compute)
    elif strategy == "folded":
        _transpose_folded(plan, x, wc, out, compute)
    else:
        wild: set = set()  # images with a block that is not tame: they are done again by "offsets"
        run = _transpose_winograd if strategy == "winograd" else _transpose_dense
        run(plan, x, wc, out, compute, wild)
        if wild:
            images = sorted(wild)
            out[images] = 0
            _transpose_offsets(plan, x, wc, out, compute, images=images)
    return out


def _tame_limit(compute: np.dtype, strategy: str):
    """The largest magnitude "dense" or "winograd" takes: both are direct sums only for tame numbers. "dense"
    multiplies its zero weights by every input (inf * 0 is NaN): finite numbers only. "winograd" adds and
    subtracts inputs, and taps, before multiplying (inf - inf; overflow near the largest float): below
    2**(e/2 - 16), e the largest exponent, so that nothing overflows that the direct sum would not. Integers:
    no limit for "dense"; "winograd" is not used for them (None)."""
    if compute.kind == "i":
        return np.inf if strategy == "dense" else None
    if strategy == "dense":
        return float(np.finfo(compute).max)
    return 2.0 ** ((np.finfo(compute).maxexp - 1) // 2 - 16)


def _tame(a: np.ndarray, limit) -> bool:
    """Every |element| at most limit (False for any NaN, and for limit None)."""
    if limit is None:
        return False
    if a.size == 0 or a.dtype.kind == "i":
        return True
    if a.dtype.kind == "c":
        return bool(np.abs(a).max() <= limit)
    return bool(a.max() <= limit and a.min() >= -limit)  # a NaN fails both




STRATEGIES = ("phases", "taps", "offsets", "folded", "dense", "winograd")
WORK_BYTES = 8 << 20  # aim for one batch chunk's workspace to stay in the last-level cache
THREADS = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
_blas = []  # a threadpoolctl controller, made on first use (it scans the loaded libraries)


_blas_users = [0]  # convt calls inside _blas_one_thread now, from any thread
_blas_lock = threading.Lock()


@contextlib.contextmanager
def _blas_one_thread():
    """BLAS on one thread while convt runs its own threads over blocks: results then do not depend on the
    number of threads (OpenBLAS rounds some shapes differently on 1 and 2), and the two levels do not fight.
    Counted, so that calls from several threads at once restore the caller's setting only when the last ends
    (threadpoolctl's own limit, entered and left by overlapping threads, would leave BLAS on one thread)."""
    from threadpoolctl import ThreadpoolController

    with _blas_lock:
        if not _blas:
            _blas.append(ThreadpoolController())
        if _blas_users[0] == 0:
            _blas.append(_blas[0].limit(limits=1, user_api="blas"))  # the limiter: restore() undoes it
        _blas_users[0] += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users[0] -= 1
            if _blas_users[0] == 0:
                _blas.pop().restore_original_limits()


def _over_batch(batch: int, per_image: int, work) -> None:
    """work(b0, b1) over the batch in chunks that keep the workspace near WORK_BYTES, on THREADS threads. Every
    GEMM is one image's, so neither the chunks nor the threads change a single bit of the result."""
    chunk = max(1, min(WORK_BYTES // max(1, per_image), -(-batch // THREADS)))
    _run_tasks([(work, b0, min(batch, b0 + chunk)) for b0 in range(0, batch, chunk)])


def _over_jobs(jobs: list, work) -> None:
    """work(jobs) on up to THREADS threads that share one queue of jobs: each takes the next job when it is done
    with one, so a core slowed by other load does less (work allocates its buffers once and iterates). After
    an error anywhere, or an interrupt, no thread takes another job."""
    lock, queue, stop = threading.Lock(), iter(jobs), threading.Event()

    def take():
        while not stop.is_set():
            with lock:
                job = next(queue, None)
            if job is None:
                return
            yield job

    def share():
        try:
            work(take())
        except BaseException:
            stop.set()
            raise

    _run_tasks([(share,) for _ in range(min(THREADS, len(jobs)))], stop)


def _run_tasks(tasks: list, stop=None) -> None:
    """fn(*args) for each (fn, *args), on up to THREADS threads with BLAS on one. On an error or an interrupt,
    `stop` (an Event the tasks watch) is set before waiting for the tasks already running."""
    from concurrent.futures import wait

    with _blas_one_thread():
        pool = _pool() if len(tasks) > 1 else None
        futures = []
        try:
            for fn, *args in tasks:
                future = None
                if pool is not None:
                    try:
                        future = pool.submit(fn, *args)
                    except RuntimeError:  # no thread can be started (a memory cap, a thread limit)
                        future = None
                if future is None:
                    fn(*args)  # here, in this thread
                else:
                    futures.append(future)
            for future in futures:
                future.result()
        except BaseException:
            if stop is not None:
                stop.set()
            raise
        finally:
            for future in futures:
                future.cancel()
            wait(futures)


_WARM = 768  # the size of the threads' first GEMM
_pools: dict = {}  # THREADS -> a ThreadPoolExecutor kept for the process, or None where threads can't start
if hasattr(os, "register_at_fork"):  # a forked child has none of its parent's threads: it starts its own
    os.register_at_fork(after_in_child=_pools.clear)


def _pool():
    """convt's worker threads, started once. Each runs one small GEMM at the start, while memory is still to be
    had: OpenBLAS allocates a buffer for each thread that calls it and exits the process if it cannot, whereas
    a NumPy allocation that fails later is a clean MemoryError."""
    if THREADS not in _pools:
        from concurrent.futures import ThreadPoolExecutor  # here, not at import: `convt --help` starts faster

        pool, barrier, started = None, threading.Barrier(THREADS), threading.Event()
        a = np.ones((_WARM, _WARM), dtype=np.float32)  # a GEMM of ~10 ms: the others start inside it

        def warm(k):
            barrier.wait(timeout=10)  # every thread takes one task: the pool starts all of its threads
            if k == 0:
                started.set()
            else:
                started.wait(timeout=10)
            a @ a  # all at once, so that OpenBLAS holds as many buffers as convt will ever ask of it

        if THREADS > 1:
            try:
                with _blas_one_thread():
                    pool = ThreadPoolExecutor(THREADS)
                    for future in [pool.submit(warm, k) for k in range(THREADS)]:
                        future.result()
            except (RuntimeError, threading.BrokenBarrierError):
                if pool is not None:
                    barrier.abort()
                    pool.shutdown(wait=True, cancel_futures=True)
                pool = None
        _pools[THREADS] = pool
    return _pools[THREADS]


def _chunk_of(x: np.ndarray, b0: int, b1: int, compute: np.dtype) -> np.ndarray:
    return np.ascontiguousarray(x[b0:b1], dtype=compute)  # a view when x is already so


def _store(op: str, dst: np.ndarray, src: np.ndarray) -> None:
    # the one place results are cast to the output dtype; int32 must not wrap on the way
    if dst.dtype.name == "int32" and src.size:
        lo, hi = int(src.min()), int(src.max())
        if lo < _INT32_MIN or hi > _INT32_MAX:
            bad = hi if hi > _INT32_MAX else lo
            raise ConvtError(
                f"{op}: int32 result overflows: an output element is {bad}, outside "
                f"[{_INT32_MIN}, {_INT32_MAX}]; cast the inputs to float64 instead"
            )
    dst[...] = src


def _phase_groups(plan: Plan):
    """Output phases grouped by their per-axis input shifts: a group shares one shifted-input matrix."""
    s, d, lo = plan.spec.strides, plan.spec.dilations, [p[0] for p in plan.pads]
    axes = [axis_phases(plan.input_spatial[j], plan.output_spatial[j], plan.kernel[j], s[j], d[j], lo[j])
            for j in range(plan.spec.n)]
    groups: dict[tuple, list] = {}
    for combo in itertools.product(*axes):
        groups.setdefault(tuple(ph.shifts for ph in combo), []).append(combo)
    return list(groups.items())


def _transpose_phases(plan: Plan, x, w, out, compute) -> None:
    # Sub-pixel decomposition: output phase p (o = q*s + residue - lo) is a plain correlation of the input
    # with the phase's own taps, so per group of phases one GEMM of [shifted inputs] (rows, U*c_in) by
    # (U*c_in, P*c_out) weights writes each output element exactly once; no scatter-add.
    first, n = plan.spec.channels_first, plan.spec.n
    c_in, c_out, spatial = plan.in_channels, plan.out_channels, plan.input_spatial
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
    if not prepared:
        return  # no phase reaches the output: it stays zero
    per_image = max(
        math.prod(b - a for a, b in zip(qa, qb)) * (len(sh) * c_in + len(cb) * c_out)
        for cb, qa, qb, sh, _ in prepared
    ) * compute.itemsize
    def work(b0, b1):
        xb = _chunk_of(x, b0, b1, compute)
        for combos, qa, qb, shifts, weights in prepared:
            nq = [b - a for a, b in zip(qa, qb)]
            a = _shifted_inputs(xb, shifts, qa, nq, spatial, first, compute)
            rows = math.prod(nq)
            if first:
                y = np.matmul(weights, a.reshape(b1 - b0, len(shifts) * c_in, rows))  # (nb, P*c_out, rows)
                y = y.reshape(b1 - b0, len(combos), c_out, *nq)
            else:
                # one GEMM per image (a stacked matmul), never one across images: BLAS rounds a row by its
                # place in the matrix, and results must not depend on how the batch is cut
                y = np.matmul(a.reshape(b1 - b0, rows, len(shifts) * c_in), weights)  # (nb, rows, P*c_out)
                y = y.reshape(b1 - b0, *nq, len(combos), c_out)
            for p, combo in enumerate(combos):
                dst = tuple(slice(ph.o0, ph.o0 + (ph.q1 - ph.q0 - 1) * s + 1, s)
                            for ph, s in zip(combo, plan.spec.strides))
                src = tuple(slice(ph.q0 - a0, ph.q1 - a0) for ph, a0 in zip(combo, qa))
                if first:
                    _store(plan.op, out[(slice(b0, b1), slice(None), *dst)], y[(slice(None), p, slice(None), *src)])
                else:
                    _store(plan.op, out[(slice(b0, b1), *dst, slice(None))], y[(slice(None), *src, p, slice(None))])
            del a, y  # before the next group's buffers exist: the peak holds one set, not two

    _over_batch(x.shape[0], per_image, work)


def _shifted_inputs(xb, shifts, qa, nq, spatial, first, compute):
    """(nb, *nq, U, c_in), or (nb, U, c_in, *nq) channels-first: block u holds x[q - shift_u], zero outside."""
    nb, c_in = xb.shape[0], xb.shape[1 if first else -1]
    shape = (nb, len(shifts), c_in, *nq) if first else (nb, *nq, len(shifts), c_in)
    a = np.empty(shape, dtype=compute)
    for u, ms in enumerate(shifts):
        block = a[:, u] if first else a[(slice(None), *[slice(None)] * len(nq), u)]
        lead = 2 if first else 1  # index of the first spatial axis in block
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
            if first:
                block[(slice(None), slice(None), *inner)] = xb[(slice(None), slice(None), *src)]
            else:
                block[(slice(None), *inner, slice(None))] = xb[(slice(None), *src, slice(None))]
    return a


def _transpose_taps(plan: Plan, x, w, out, compute) -> None:
    # Scatter: one GEMM gives every tap's contribution for a group of taps, (rows, c_in) by (c_in, T*c_out),
    # and strided slices add each tap's block into the output.
    first, n = plan.spec.channels_first, plan.spec.n
    c_in, c_out, spatial = plan.in_channels, plan.out_channels, plan.input_spatial
    positions = math.prod(spatial)
    taps = []
    for tap in np.ndindex(*plan.kernel):
        spans = [tap_span(spatial[j], plan.output_spatial[j], tap[j], plan.spec.strides[j], plan.spec.dilations[j],
                          plan.pads[j][0]) for j in range(n)]
        if all(span is not None for span in spans):  # else the tap lands wholly in the padding
            taps.append((tap, spans))
    if not taps:
        return
    per_tap = max(1, -(-256 // c_out))  # aim for GEMMs at least 256 wide
    group = min(len(taps), per_tap)  # from the shapes only: a GEMM's width changes how BLAS rounds
    groups = [taps[i:i + group] for i in range(0, len(taps), group)]
    weights = []
    for g in groups:
        wg = np.stack([w[tap] for tap, _ in g])  # (T, c_out, c_in)
        weights.append(wg.reshape(len(g) * c_out, c_in) if first else
                       np.ascontiguousarray(wg.reshape(len(g) * c_out, c_in).T))
    per_image = positions * (group * c_out + c_in) * compute.itemsize
    accumulate_in_place = out.dtype == compute

    def work(b0, b1):
        xb = _chunk_of(x, b0, b1, compute)
        acc = out[b0:b1] if accumulate_in_place else np.zeros((b1 - b0, *out.shape[1:]), dtype=compute)
        for g, wg in zip(groups, weights):
            if first:
                y = np.matmul(wg, xb.reshape(b1 - b0, c_in, positions))  # (nb, T*c_out, P)
                y = y.reshape(b1 - b0, len(g), c_out, *spatial)
            else:
                y = np.matmul(xb.reshape(b1 - b0, positions, c_in), wg)  # (nb, P, T*c_out), a GEMM per image
                y = y.reshape(b1 - b0, *spatial, len(g), c_out)
            for t, (_, spans) in enumerate(g):
                src = tuple(slice(i0, i1) for i0, i1, _ in spans)
                dst = tuple(slice(o0, o0 + (i1 - i0 - 1) * s + 1, s)
                            for (i0, i1, o0), s in zip(spans, plan.spec.strides))
                if first:
                    acc[(slice(None), slice(None), *dst)] += y[(slice(None), t, slice(None), *src)]
                else:
                    acc[(slice(None), *dst, slice(None))] += y[(slice(None), *src, t, slice(None))]
            del y
        if not accumulate_in_place:
            _store(plan.op, out[b0:b1], acc)

    _over_batch(x.shape[0], per_image, work)


# rows per block in the "offsets" and "dense" strategies (a block of one image, set by the shapes only): about
# BLOCK_BYTES of padded input, accumulator and GEMM result, so that they stay in a cache, and at least ROW_MIN
BLOCK_BYTES, ROW_MIN = 3 << 20, 256
# tiles per block in "winograd" at least (or one image's): channels-last, they are the rows of its GEMMs;
# channels-first, the columns, which OpenBLAS packs per call and wants wider
TILES_MIN, TILES_MIN_FIRST = 128, 512
# "winograd": F(m, 2) per axis, m outputs of a 2-tap correlation from m + 1 inputs with m + 1 products (see
# _winograd_m); per point, the taps' coefficients ({e: coef}: sum_e coef * g_e)
WINOGRAD_FILTER = {2: ({0: 1.0}, {0: 1.0, 1: 1.0}, {1: 1.0}),
                   3: ({0: 1.0}, {0: 0.5, 1: 0.5}, {0: 0.5, 1: -0.5}, {1: 1.0})}


def _offset_layout(plan: Plan, dense: bool = False):
    """The padded grid of the "offsets", "dense" and "winograd" strategies, or None when no phase reaches
    the output; with the rows per block (dense: sized for its own buffers).

    Per axis j the output phases' q ranges are united into [qa, qa + nq); the input is padded to Tp = nq + M
    positions (M the largest shift) so that x[q - m] sits at padded position q - qa + M - m. Flattened with
    strides st, every shift m is then one contiguous run of the padded input starting at sum((M - m) * st):
    a matrix the GEMM reads in place, with Tp - nq junk positions per row of the inner axes.
    """
    n, s, d = plan.spec.n, plan.spec.strides, plan.spec.dilations
    axes = [axis_phases(plan.input_spatial[j], plan.output_spatial[j], plan.kernel[j], s[j], d[j], plan.pads[j][0])
            for j in range(n)]
    if not all(axes):
        return None
    qa = [min(ph.q0 for ph in a) for a in axes]
    nq = [max(ph.q1 for ph in a) - q for a, q in zip(axes, qa)]
    big = [max(max(ph.shifts) for ph in a) for a in axes]
    tp = [q + m for q, m in zip(nq, big)]
    st = [math.prod(tp[j + 1:]) for j in range(n)]
    width = math.prod(len(a) for a in axes) * plan.out_channels  # the accumulator's columns: every phase's
    if dense:  # a GEMM result is the accumulator itself; the shifted copies take its place
        shifts = {ms for combo in itertools.product(*axes) for ms in itertools.product(*[ph.shifts for ph in combo])}
        per_row = width + (len(shifts) + 1) * plan.in_channels
    else:
        per_row = 2 * width + plan.in_channels
    block = _balanced(nq[0], max(1, max(ROW_MIN, BLOCK_BYTES // (4 * max(1, per_row))) // st[0]))
    return axes, qa, nq, big, tp, st, block


def _balanced(total: int, most: int) -> int:
    """The block size that cuts total into as few blocks of at most `most` as possible, all nearly equal."""
    return -(-total // -(-total // most))


def _phase_stores(plan: Plan, phases, qa, r0: int, r1: int) -> list:
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


def _region(axes, ms):
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


def _transpose_offsets(plan: Plan, x, w, out, compute, images=None) -> None:
    # Shift GEMMs in place: pad a block of rows of one image once; each input shift is then a contiguous slice
    # of the flat padded block, so one GEMM per shift (no im2col copy) gives that shift's contribution to every
    # phase that uses it, accumulated per phase, and each phase is stored once with strided slices.
    layout = _offset_layout(plan)
    if layout is None:
        return
    axes, qa, nq, big, tp, st, block = layout
    first, n = plan.spec.channels_first, plan.spec.n
    c_in, c_out, spatial = plan.in_channels, plan.out_channels, plan.input_spatial
    phases = list(itertools.product(*axes))
    users = _shift_users(axes)
    units = []
    everyone = list(range(len(phases)))
    for ms, uses in users.items():
        wmat = np.empty((len(uses) * c_out, c_in) if first else (c_in, len(uses) * c_out), dtype=compute)
        for j, (_, tap) in enumerate(uses):  # filled in place: no temporary the size of the filters
            if first:
                wmat[j * c_out:(j + 1) * c_out] = w[tap]
            else:
                wmat[:, j * c_out:(j + 1) * c_out] = w[tap].T
        offset = sum((m_max - m) * stride for m_max, m, stride in zip(big, ms, st))
        units.append((offset, wmat, [p for p, _ in uses], _region(axes, ms)))
    n_ph = len(phases)

    def one_block(b, r0, r1, slab, acc):
        rows = (r1 - r0) * st[0]
        # slab[t] = x[qa + t - big] on the padded grid, rows r0 .. r1 + big[0] (+1 spare) of the first axis
        _fill_padded(slab, x, b, first, [r0] + [0] * (n - 1), qa, big, spatial)
        flat = slab.reshape(c_in, -1) if first else slab.reshape(-1, c_in)
        acc = acc[..., :rows] if first else acc[:rows]
        if units[0][2] != everyone:
            acc[...] = 0
        for u, (offset, wmat, ps, region) in enumerate(units):
            if u == 0 and ps == everyone:  # the first product is the accumulator's start: no zeroing, no add
                if first:
                    np.matmul(wmat, flat[:, offset:offset + rows], out=acc)
                else:
                    np.matmul(flat[offset:offset + rows], wmat, out=acc)
                continue
            if first:
                y = np.matmul(wmat, flat[:, offset:offset + rows])  # (P_u*c_out, rows)
            else:
                y = np.matmul(flat[offset:offset + rows], wmat)  # (rows, P_u*c_out)
            _accumulate(acc, y, ps, everyone, region, c_out, first)
        grid = (r1 - r0, *tp[1:])
        view = acc.reshape(n_ph, c_out, *grid) if first else acc.reshape(*grid, n_ph, c_out)
        if (r0, r1) not in stores:
            stores[r0, r1] = _phase_stores(plan, phases, qa, r0, r1)
        for p, dst, src in stores[r0, r1]:
            if first:
                _store(plan.op, out[(b, slice(None), *dst)], view[(p, slice(None), *src)])
            else:
                _store(plan.op, out[(b, *dst, slice(None))], view[(*src, p, slice(None))])

    stores: dict[tuple, list] = {}  # per block bounds: which slices of the accumulator go where
    images = range(x.shape[0]) if images is None else images
    jobs = [(b, r0, min(nq[0], r0 + block)) for b in images for r0 in range(0, nq[0], block)]

    def work(some):
        slab_shape = (block + big[0] + 1, *tp[1:])
        slab = np.empty((c_in, *slab_shape) if first else (*slab_shape, c_in), dtype=compute)
        rows = block * st[0]
        acc = np.empty((n_ph * c_out, rows) if first else (rows, n_ph * c_out), dtype=compute)
        for b, r0, r1 in some:
            one_block(b, r0, r1, slab, acc)

    _over_jobs(jobs, work)


def _shift_users(axes) -> dict:
    """Input shift combination (one shift per axis) -> [(phase index, taps)] of the phases that use it, phases
    numbered as itertools.product(*axes) lists them."""
    users: dict[tuple, list] = {}
    for p, combo in enumerate(itertools.product(*axes)):
        for picks in itertools.product(*[tuple(zip(ph.shifts, ph.taps)) for ph in combo]):
            users.setdefault(tuple(m for m, _ in picks), []).append((p, tuple(t for _, t in picks)))
    return users


def _accumulate(acc, y, ps, everyone, region, c_out: int, first: bool) -> None:
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
    else:
        for k, p in enumerate(ps):
            if first:
                acc[p * c_out:(p + 1) * c_out] += y[k * c_out:(k + 1) * c_out]
            else:
                acc[:, p * c_out:(p + 1) * c_out] += y[:, k * c_out:(k + 1) * c_out]


def _folded_inner(axes):
    """For "folded": the input shifts of the last axis that any phase uses (ascending), and per phase of that
    axis the range [i0, i1) of them it uses; None unless each phase's shifts are consecutive in that list."""
    used = sorted({m for ph in axes[-1] for m in ph.shifts})
    ranges = []
    for ph in axes[-1]:
        i0 = used.index(ph.shifts[0])
        if list(ph.shifts) != used[i0:i0 + len(ph.shifts)]:
            return None
        ranges.append((i0, i0 + len(ph.shifts)))
    return used, ranges


def _folded_ok(plan: Plan) -> bool:
    """Whether "folded" applies (see _folded_inner); where it does not, "offsets" runs instead."""
    layout = _offset_layout(plan)
    return layout is not None and _folded_inner(layout[0]) is not None


def _folded_sizes(plan: Plan, same_dtype: bool):
    """(direct, width, block, buffers) of "folded": whether the GEMMs write straight into the output (one
    phase that is the whole output, no junk rows: at most 2-D; and the output in the compute dtype), the
    widest GEMM result's columns, the rows of the first axis per block, and each thread's buffers in elements."""
    axes, _, nq, big, tp, _, _ = _offset_layout(plan)
    n, c_in, c_out = plan.spec.n, plan.in_channels, plan.out_channels
    used = _folded_inner(axes)[0]
    n_out, n_in = math.prod(len(a) for a in axes[:-1]), len(axes[-1])
    direct = same_dtype and n <= 2 and n_out * n_in == 1 and all(
        ph.o0 == 0 and ph.q1 - ph.q0 == size for (ph,), size in zip(axes, plan.output_spatial))
    width = max(len(uses) for uses in _shift_users(axes[:-1]).values()) * c_out
    row = math.prod(nq[-1:] if n > 1 else [1]) * math.prod(tp[1:-1])  # A's positions per row of the first axis
    per = len(used) * c_in + (0 if direct else n_in * n_out * c_out) + width  # A, accumulator, GEMM result
    block = _balanced(nq[0], max(1, max(ROW_MIN, BLOCK_BYTES // (4 * per)) // row))
    buffers = ((block + big[0] + 1) * row * len(used) * c_in if n > 1 else block * len(used) * c_in) + \
        block * row * (width + (0 if direct else n_in * n_out * c_out))
    return direct, width, block, buffers


def _transpose_folded(plan: Plan, x, w, out, compute) -> None:
    # "offsets" with the last axis folded into the contraction: a block of rows of the input is copied, padded,
    # once per input shift of the last axis, side by side (A), so that each phase of the last axis sums all its
    # taps there in one GEMM whose contraction is its shifts times c_in. The other axes' shifts are contiguous
    # slices of A as in "offsets". Fewer accumulations, and no junk positions on the last axis: A holds only
    # the nq used.
    layout = _offset_layout(plan)
    if layout is None:
        return
    axes, qa, nq, big, tp, _, _ = layout
    first, n = plan.spec.channels_first, plan.spec.n
    c_in, c_out, spatial = plan.in_channels, plan.out_channels, plan.input_spatial
    used, ranges = _folded_inner(axes)
    grid = [*tp[:-1], nq[-1]]  # A's positions: padded on the outer axes, exactly nq on the last
    gst = [math.prod(grid[j + 1:]) for j in range(n)]  # and their strides, flattened
    outer, inner = axes[:-1], axes[-1]
    n_out, n_in = math.prod(len(a) for a in outer), len(inner)
    everyone = list(range(n_out))
    users = _shift_users(outer)
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
            offset = sum((m_max - m) * g for m_max, m, g in zip(big, ms, gst))
            mine.append((offset, wmat, [po for po, _ in uses], _region(outer, ms)))
        mine.sort(key=lambda unit: unit[2] != everyone)  # one that every outer phase uses first: no zeroing
        units.append((slice(i0 * c_in, i1 * c_in), mine))
    phases = list(itertools.product(*axes))
    direct, width, block, _ = _folded_sizes(plan, compute == out.dtype)

    def one_block(b, r0, r1, a, acc, ybuf):
        nb = r1 - r0
        rows = nb * gst[0] if n > 1 else nb
        reach = nq[-1] if n > 1 else nb  # one image's last axis, or (1-D) this block's part of it
        for i, m in enumerate(used):  # A[.., v, i, c] = x[b, .., qa + v - used[i], c], zero outside x
            slot = a[i, ..., :reach] if first else a[..., :reach, i, :]
            lo_t = [r0] + [0] * (n - 2) + [big[-1] - m] if n > 1 else [r0 + big[0] - m]
            _fill_padded(slot, x, b, first, lo_t, qa, big, spatial)
        flat = a.reshape(len(used) * c_in, -1) if first else a.reshape(-1, len(used) * c_in)
        for p2, (cols, mine) in enumerate(units):
            if direct:
                sub = out[b, :, r0:r1].view() if first else out[b, r0:r1].view()
                sub.shape = (c_out, rows) if first else (rows, c_out)  # never a copy
            else:
                sub = acc[p2, :, :rows] if first else acc[:rows, p2]  # (P_out*c_out, rows) or (rows, P_out*c_out)
            if mine[0][2] != everyone:
                sub[...] = 0
            for u, (offset, wmat, ps, region) in enumerate(mine):
                src = flat[cols, offset:offset + rows] if first else flat[offset:offset + rows, cols]
                if u == 0 and ps == everyone:
                    if first:
                        np.matmul(wmat, src, out=sub)
                    else:
                        np.matmul(src, wmat, out=sub)
                    continue
                cells = wmat.shape[0] if first else wmat.shape[1]
                y = ybuf[:cells * rows].reshape((cells, rows) if first else (rows, cells))
                if first:
                    np.matmul(wmat, src, out=y)
                else:
                    np.matmul(src, wmat, out=y)
                _accumulate(sub, y, ps, everyone, region, c_out, first)
        if direct:
            return
        shape = (nb, *grid[1:])
        view = acc.reshape(n_in, n_out, c_out, -1)[..., :rows].reshape(n_in, n_out, c_out, *shape) if first else \
            acc.reshape(-1, n_in, n_out, c_out)[:rows].reshape(*shape, n_in, n_out, c_out)
        if (r0, r1) not in stores:
            stores[r0, r1] = _phase_stores(plan, phases, qa, r0, r1)
        for p, dst, src in stores[r0, r1]:
            po, p2 = divmod(p, n_in)
            if first:
                _store(plan.op, out[(b, slice(None), *dst)], view[(p2, po, slice(None), *src)])
            else:
                _store(plan.op, out[(b, *dst, slice(None))], view[(*src, p2, po, slice(None))])

    stores: dict[tuple, list] = {}
    jobs = [(b, r0, min(nq[0], r0 + block)) for b in range(x.shape[0]) for r0 in range(0, nq[0], block)]

    def work(some):
        a_shape = (block + big[0] + 1, *grid[1:]) if n > 1 else (block,)
        a = np.empty((len(used), c_in, *a_shape) if first else (*a_shape, len(used), c_in), dtype=compute)
        rows = block * gst[0] if n > 1 else block
        acc = None if direct else \
            np.empty((n_in, n_out * c_out, rows) if first else (rows, n_in, n_out * c_out), dtype=compute)
        ybuf = np.empty(rows * width, dtype=compute)
        for b, r0, r1 in some:
            one_block(b, r0, r1, a, acc, ybuf)

    _over_jobs(jobs, work)


def _full_axes(plan: Plan):
    """Per axis, every residue 0..s-1 as (shifts, taps), with no taps for a residue no tap lands on."""
    axes = []
    for k, s, d in zip(plan.kernel, plan.spec.strides, plan.spec.dilations):
        axes.append([(tuple(t * d // s for t in range(k) if t * d % s == r), tuple(t for t in range(k)
                     if t * d % s == r)) for r in range(s)])
    return axes


def _largest_shifts(plan: Plan) -> list:
    """Per axis, the largest input shift of any tap, k*d // s for the last tap (reaching the output or not)."""
    return [(k - 1) * d // s for k, s, d in zip(plan.kernel, plan.spec.strides, plan.spec.dilations)]


def _winograd_ok(plan: Plan) -> bool:
    """Winograd applies when every tap's shift (k*d // s) is 0 or 1, and some axis has both."""
    return _offset_layout(plan) is not None and max(_largest_shifts(plan)) == 1


def _winograd_m(plan: Plan, itemsize: int) -> int:
    """Outputs per tile and axis, 2 or 3. F(3, 2) makes 16 products for 9 outputs in 2-D where F(2, 2) makes 9
    for 4, 21% fewer, but its transforms take twice the NumPy passes, and it pays only on large blocks: on whole
    images it measured 6-12% faster (W7, W8 in float32 and bfloat16, 40-60 paired runs), on W1's blocks of ~100
    tiles no faster, and W6's whole images in float64 7% slower. So F(3, 2) channels-first, whose blocks are
    512 tiles or a whole image, and channels-last where a whole image's block of it fits in 2 * BLOCK_BYTES
    (itemsize: the compute dtype's; W8 does, W1 and W6 do not); F(2, 2), on smaller blocks, otherwise."""
    if plan.spec.channels_first:
        return 3
    tiles = math.prod(-(-(i + b) // 3) for i, b in zip(plan.input_spatial, _largest_shifts(plan)))  # nq ~ i + big
    per_tile = 4 ** plan.spec.n * (plan.in_channels + 2 * math.prod(plan.spec.strides) * plan.out_channels)
    return 3 if tiles * per_tile * itemsize <= 2 * BLOCK_BYTES else 2


def _winograd_filters(plan: Plan, axes, big, w, compute):
    """U: (points, c_in, P*c_out), or (points, P*c_out, c_in) channels-first, over every residue combination P:
    each phase's taps transformed per axis by WINOGRAD_FILTER (F(3, 2): g0, (g0 + g1)/2, (g0 - g1)/2, g1), zeros
    for taps a phase lacks. Filled point by point, so that nothing but U itself is allocated."""
    first, c_in, c_out = plan.spec.channels_first, plan.in_channels, plan.out_channels
    phases = list(itertools.product(*axes))
    # per axis, point a of a phase is sum_e coef * g_e over {e: coef} (e: y[v] = sum_e d[v + e] g_e)
    point_taps = [WINOGRAD_FILTER[_winograd_m(plan, compute.itemsize)] if b else ({0: 1.0},) for b in big]
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


def _transpose_dense(plan: Plan, x, w, out, compute, wild: set) -> None:
    # For few input channels: pad a block of rows of one image once, copy every shift e (0..big per axis) of it
    # side by side, and run one GEMM per block against the taps of every residue combination (zeros where a
    # residue lacks a tap), so the contraction is (big+1)**n * c_in long. Output o = s*v + r + (qa*s - lo) for
    # padded-grid position v and residue r: the block's outputs are one window of the output, stored once.
    layout = _offset_layout(plan, dense=True)
    if layout is None:
        return
    axes, qa, nq, big, tp, st, block = layout
    first, n, strides = plan.spec.channels_first, plan.spec.n, plan.spec.strides
    c_in, c_out, spatial = plan.in_channels, plan.out_channels, plan.input_spatial
    es = list(itertools.product(*[range(b + 1) for b in big]))  # e = big - shift; the last axis varies fastest
    n_res = math.prod(strides)
    wd = np.zeros((len(es), c_in, n_res, c_out), dtype=compute)
    for combo in itertools.product(*axes):
        f = int(np.ravel_multi_index([ph.residue for ph in combo], strides))
        for picks in itertools.product(*[tuple(zip(ph.shifts, ph.taps)) for ph in combo]):
            e = tuple(b - m for b, (m, _) in zip(big, picks))
            wd[es.index(e), :, f, :] = w[tuple(t for _, t in picks)].T
    wd = wd.reshape(len(es) * c_in, n_res * c_out)
    wd = np.ascontiguousarray(wd.T) if first else wd
    limit = _tame_limit(compute, "dense")
    inner = big[-1] + 1  # channels-last: the shifts of the last axis are consecutive in memory, copied together
    offsets = [sum(e_j * s_j for e_j, s_j in zip(e, st)) for e in es]  # of each shift's slice
    outer = offsets[::inner]
    shift = [q * s - p[0] for q, s, p in zip(qa, strides, plan.pads)]  # o - (s*v + r)

    full = [strides[j] * tp[j] for j in range(n)]  # the grid of a block: (s*v + r) per axis

    def one_block(b, r0, r1, slab, a, acc, grid):
        nb, rows = r1 - r0, (r1 - r0) * st[0]
        _fill_padded(slab, x, b, first, [r0] + [0] * (n - 1), qa, big, spatial)
        if limit != np.inf and not _tame(slab, limit):  # see _tame_limit: the image is done by "offsets"
            wild.add(b)
            return
        flat = slab.reshape(c_in, -1) if first else slab.reshape(-1, c_in)
        if first:
            a_now = a[..., :rows]  # (U, c_in, rows)
            for u, offset in enumerate(offsets):
                a_now[u] = flat[:, offset:offset + rows]
            y = np.matmul(wd, a_now.reshape(-1, rows), out=acc[:, :rows])  # (n_res*c_out, rows)
            y = y.reshape(*strides, c_out, nb, *tp[1:]).transpose(
                n, n + 1, 0, *[k for j in range(1, n) for k in (n + 1 + j, j)])  # (c, v0, r0, v1, r1, ..)
        else:
            a_now = a[:rows]  # (rows, U/inner, inner*c_in)
            item = flat.strides[1]
            for u, offset in enumerate(outer):
                a_now[:, u] = np.lib.stride_tricks.as_strided(flat[offset:], (rows, inner * c_in), (c_in * item, item))
            y = np.matmul(a_now.reshape(rows, -1), wd, out=acc[:rows])  # (rows, n_res*c_out)
            y = y.reshape(nb, *tp[1:], *strides, c_out).transpose(
                0, n, *[k for j in range(1, n) for k in (j, n + j)], 2 * n)  # (v0, r0, v1, r1, .., c)
        covered = _window(plan, shift, [strides[0] * r0] + [0] * (n - 1),
                          [strides[0] * r1] + [s * q for s, q in zip(strides[1:], nq[1:])])
        if covered is None:
            return
        dst, src = covered
        window = out[(b, slice(None), *dst)] if first else out[(b, *dst, slice(None))]
        # whole (v, r) groups on every axis: the output window is y's (v, r) grid, cropped
        if all(g.start % s == 0 and (g.stop - g.start) % s == 0 for g, s in zip(src, strides)):
            pairs = [(g.stop - g.start) // s for g, s in zip(src, strides)]
            shape = [d for k, s in zip(pairs, strides) for d in (k, s)]
            view = window.view()
            view.shape = (c_out, *shape) if first else (*shape, c_out)  # splits axes: never a copy
            cut = tuple(sl for g, s, k in zip(src, strides, pairs) for sl in (slice(g.start // s, g.start // s + k),
                                                                          slice(None)))
            _store(plan.op, view, y[(slice(None), *cut)] if first else y[cut])
            return
        sizes = [strides[0] * nb, *full[1:]]
        g = grid[:c_out * math.prod(sizes)]
        g.reshape(y.shape)[...] = y
        if first:
            _store(plan.op, window, g.reshape(c_out, *sizes)[(slice(None), *src)])
        else:
            _store(plan.op, window, g.reshape(*sizes, c_out)[(*src, slice(None))])

    jobs = [(b, r0, min(nq[0], r0 + block)) for b in range(x.shape[0]) for r0 in range(0, nq[0], block)]

    def work(some):
        slab_shape = (block + big[0] + 1, *tp[1:])
        rows = block * st[0]
        slab = np.empty((c_in, *slab_shape) if first else (*slab_shape, c_in), dtype=compute)
        a = np.empty((len(es), c_in, rows) if first else (rows, len(es) // inner, inner * c_in), dtype=compute)
        acc = np.empty((n_res * c_out, rows) if first else (rows, n_res * c_out), dtype=compute)
        grid = np.empty(c_out * block * strides[0] * math.prod(full[1:]), dtype=compute)  # flat: any block fits
        for b, r0, r1 in some:
            one_block(b, r0, r1, slab, a, acc, grid)

    _over_jobs(jobs, work)


def _transpose_winograd(plan: Plan, x, w, out, compute, wild: set) -> None:
    # Winograd's minimal filtering F(m, 2) on each axis of the phase grid: every phase of every axis is a
    # correlation y[v] = d[v] g0 + d[v + 1] g1 of the padded input d, and a tile of m outputs takes m + 1
    # products instead of 2m. F(2, 2): (d0 - d1) g0, d1 (g0 + g1), (d2 - d1) g1. F(3, 2): (d0 - d2) g0,
    # (d1 + d2) (g0 + g1)/2, (d2 - d1) (g0 - g1)/2, (d3 - d1) g1, and y0 = M0 + M1 + M2, y1 = M1 - M2,
    # y2 = M1 + M2 + M3. In N-D the (m+1)**n transformed inputs of a block of tiles are each one GEMM over the
    # channels against the transformed taps of every phase, so a stride-2 kernel-4 layer needs 9/16 (F(2, 2))
    # or 7/16 (F(3, 2)) of the direct products in 2-D. The input and output transforms only add and subtract.
    # Output position o = s*(m*t + i) + r + (qa*s - lo) for tile t, place i in the tile and residue r: a block's
    # outputs are one window of the output, written once.
    _, qa, nq, _, _, _, _ = _offset_layout(plan)
    axes = _full_axes(plan)
    first, n, strides = plan.spec.channels_first, plan.spec.n, plan.spec.strides
    c_in, c_out, spatial = plan.in_channels, plan.out_channels, plan.input_spatial
    big = _largest_shifts(plan)
    wm = _winograd_m(plan, compute.itemsize)
    m = [wm if b else 1 for b in big]  # outputs per tile
    k = wm + 1  # points per axis
    tiles = [-(-q // k) for q, k in zip(nq, m)]
    u = _winograd_filters(plan, axes, big, w, compute)
    points, width = u.shape[0], math.prod(strides) * c_out
    per_row = math.prod(tiles[1:])
    row_bytes = points * per_row * (c_in + 2 * width) * compute.itemsize
    least = TILES_MIN_FIRST if first else TILES_MIN
    block = _balanced(tiles[0], max(-(-least // per_row), BLOCK_BYTES // max(1, row_bytes), 1))
    limit = _tame_limit(compute, "winograd")
    shift = [q * s - p[0] for q, s, p in zip(qa, strides, plan.pads)]  # o - g

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

    def one_block(b, t0, t1, slab, grid, spare):
        lo_t = [m[0] * t0] + [0] * (n - 1)
        hi_t = [m[0] * t1 + big[0]] + [m[j] * tiles[j] + big[j] for j in range(1, n)]
        d = slab[(slice(None), *[slice(0, h - lo) for h, lo in zip(hi_t, lo_t)])] if first else \
            slab[tuple(slice(0, h - lo) for h, lo in zip(hi_t, lo_t))]
        _fill_padded(d, x, b, first, lo_t, qa, big, spatial)
        if not _tame(d, limit):  # see _tame_limit: the image is done by "offsets"
            wild.add(b)
            return
        v = transform_in(d)  # (3, .., 3, c_in, *T) or (3, .., 3, *T, c_in)
        nt = [t1 - t0, *tiles[1:]]
        rows = math.prod(nt)
        if first:
            y = np.matmul(u, v.reshape(points, c_in, rows))  # (points, P*c_out, rows)
            y = y.reshape(*[k if b else 1 for b in big], *strides, c_out, *nt)
        else:
            y = np.matmul(v.reshape(points, rows, c_in), u)  # (points, rows, P*c_out)
            y = y.reshape(*[k if b else 1 for b in big], *nt, *strides, c_out)
        # the block's outputs: grid (T, m, s) per axis (c first or last), viewed in y's order (m.., then y's)
        g = grid[(slice(None), slice(0, nt[0])) if first else (slice(0, nt[0]),)]
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
        window_store(b, t0, t1, g)

    def window_store(b, t0, t1, g):
        covered = _window(plan, shift, [strides[0] * m[0] * t0] + [0] * (n - 1),
                          [strides[0] * m[0] * t1] + [s * k * t for s, k, t in zip(strides[1:], m[1:], tiles[1:])])
        if covered is None:
            return
        dst, src = covered
        full = [strides[j] * m[j] * (t1 - t0 if j == 0 else tiles[j]) for j in range(n)]
        if first:
            _store(plan.op, out[(b, slice(None), *dst)], g.reshape(c_out, *full)[(slice(None), *src)])
        else:
            _store(plan.op, out[(b, *dst, slice(None))], g.reshape(*full, c_out)[(*src, slice(None))])

    jobs = [(b, t0, min(tiles[0], t0 + block)) for b in range(x.shape[0]) for t0 in range(0, tiles[0], block)]

    def work(some):
        shape = (m[0] * block + big[0], *[m[j] * tiles[j] + big[j] for j in range(1, n)])
        slab = np.empty((c_in, *shape) if first else (*shape, c_in), dtype=compute)
        cells = [(block if j == 0 else tiles[j], m[j], strides[j]) for j in range(n)]
        cells = [c for cell in cells for c in cell]
        grid = np.empty((c_out, *cells) if first else (*cells, c_out), dtype=compute)
        # F(3, 2)'s output transform keeps one point's share of the GEMM result aside
        spare = np.empty(points // k * block * per_row * width if wm == 3 else 0, dtype=compute)
        for b, t0, t1 in some:
            one_block(b, t0, t1, slab, grid, spare)

    _over_jobs(jobs, work)


def _window(plan: Plan, shift, start, end):
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


def _fill_padded(d, x, b, first, lo_t, qa, big, spatial) -> None:
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
        if first:
            d[(slice(None), *box)] = x[(b, slice(None), *src)]
        else:
            d[(*box, slice(None))] = x[(b, *src, slice(None))]


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
    """
    layout = _offset_layout(plan)
    if layout is None:
        return "phases"
    axes, _, nq, _, tp, _, _ = layout
    if math.prod(tp[1:]) > 1.5 * math.prod(nq[1:]):
        return "phases"
    if plan.in_channels >= 16 and _winograd_ok(plan) and _winograd_saving(plan, axes) >= 0.4:
        return "winograd"
    folded = not plan.spec.channels_first and plan.spec.n >= 2 and plan.in_channels >= 8 and \
        _folded_inner(axes) is not None
    if folded and math.prod(plan.spec.strides) == 1:
        return "folded"
    direct = sum(math.prod(len(ph.taps) for ph in combo) for combo in itertools.product(*axes))
    dense = math.prod(b + 1 for b in layout[3]) * math.prod(plan.spec.strides)  # products "dense" makes
    if plan.in_channels < 32 or dense <= 1.15 * direct:
        return "dense"
    return "folded" if folded else "offsets"


def _winograd_saving(plan: Plan, axes) -> float:
    """1 - Winograd's products / the direct products, per position of the phase grid, for F(2, 2): the smaller
    saving of the two tile sizes, and one that does not depend on the dtype (see _winograd_m)."""
    direct = sum(math.prod(len(ph.taps) for ph in combo) for combo in itertools.product(*axes))
    winograd = math.prod((3 / 2 if b else 1) * s for b, s in zip(_largest_shifts(plan), plan.spec.strides))
    return 1 - winograd / direct


def conv(input, filters, strides=1, padding="SAME", data_format=None, dilations=None) -> np.ndarray:
    """Forward convolution, the same numbers as tf.nn.convolution; the adjoint of conv_transpose.

    Args:
        input: (batch, *spatial, in_channels), or (batch, in_channels, *spatial) channels-first.
        filters: (*kernel, in_channels, out_channels) whatever the data_format (TF's forward layout; the same
            array that conv_transpose takes as (*kernel, out_channels, in_channels) for the reverse direction).
        strides, dilations, padding, data_format: as for conv_transpose. Unlike tf.nn.convolution, strides
            > 1 together with dilations > 1 are allowed.

    Returns:
        (batch, *out_spatial, out_channels) in data_format order, with the input's dtype, where out_spatial is
        ceil(O/s) for SAME and (O + lo + hi - (K-1)*d - 1)//s + 1 otherwise.

    Raises:
        ConvtError: any invalid argument.

    >>> conv(np.ones((2, 10, 10, 4), np.float32), np.ones((3, 3, 4, 3), np.float32), strides=2).shape
    (2, 5, 5, 3)
    """
    x, w = as_arrays("conv", input, filters)
    plan = plan_conv(x.shape, w.shape, strides, padding, data_format, dilations)
    return run_conv(plan, x, w)


def run_conv(plan: Plan, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Execute a conv plan on arrays whose shapes match it (any batch size)."""
    batch = x.shape[0]
    out_shape = (batch, *plan.output_shape[1:])
    _check_int32_bound(plan.op, x, w, plan.in_channels * math.prod(plan.kernel))
    wc = _compute_copy(w)
    out = np.zeros(out_shape, dtype=wc.dtype)
    if out.size == 0 or x.size == 0:
        return _finish(plan.op, out, x.dtype)

    first = plan.spec.channels_first
    c_in, c_out, spatial = plan.in_channels, plan.out_channels, plan.output_spatial
    positions = math.prod(spatial)
    pad_width = [(0, 0), *plan.pads, (0, 0)] if not first else [(0, 0), (0, 0), *plan.pads]
    padded = np.pad(_compute_copy(x), pad_width)  # zero padding of the forward conv
    if first:
        out_mat = out.reshape(batch, c_out, positions)
        buf = np.empty((batch, c_out, positions), dtype=wc.dtype)
    else:
        out_mat = out.reshape(batch * positions, c_out)
        buf = np.empty((batch * positions, c_out), dtype=wc.dtype)

    for tap in np.ndindex(*plan.kernel):
        window = tuple(
            slice(t * d, t * d + (size - 1) * s + 1, s)
            for t, d, s, size in zip(tap, plan.spec.dilations, plan.spec.strides, spatial)
        )
        if first:
            patch = np.ascontiguousarray(padded[(slice(None), slice(None), *window)])  # (n, c_in, *out)
            np.matmul(wc[tap].T, patch.reshape(batch, c_in, positions), out=buf)  # (n, c_out, P)
        else:
            patch = np.ascontiguousarray(padded[(slice(None), *window, slice(None))])  # (n, *out, c_in)
            np.matmul(patch.reshape(batch * positions, c_in), wc[tap], out=buf)  # (n*P, c_out)
        out_mat += buf
    return _finish(plan.op, out, x.dtype)
