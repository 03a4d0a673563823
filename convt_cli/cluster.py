"""`convt run` and `convt verify` with `--dask ADDRESS`: the job as a Dask graph, computed on a cluster's workers.

ADDRESS is a scheduler's (`tcp://host:8786`; `--dask` with no address: DASK_SCHEDULER_ADDRESS), or `local` /
`local:N`: a LocalCluster of N worker processes (one thread each; N defaults to the usable cores) started here
and stopped at the end.

- Inputs are read by the workers, each task opening the file and reading its own batch elements (h5py handles
  do not pickle, and a file opened once per task needs no lock): a zarr store, an .h5, .npy or .safetensors file,
  on storage every worker sees at the same path. stdin and .npz members (read whole) are refused.
- The filters are read here, once, and go into the graph as one key.
- A zarr output is written by the workers, each task its own chunks of a hidden array that is moved into place
  when every task is done (formats.zarr's atomic write); any other output (.npy, .h5, .safetensors, stdout) is
  gathered here, block by block in batch order with a few blocks in flight, and written as `convt run` writes it
  (io.Sink: a temporary file renamed into place).
- Tasks are sized by --max-memory (each task's budget; default: what this machine has free, shared by the
  local workers) and TASK_BYTES: about 64 MiB of input and output each, where the budget allows.
- A worker that dies mid-job has its tasks recomputed elsewhere (Dask's own retries); a job that still fails
  leaves nothing at OUTPUT, as does Ctrl-C here.
- Progress is reported here (on stderr through convt's bar), never by distributed's own progress bar, which writes
  to stdout.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
import uuid

import numpy as np

from . import io
from .errors import ConvtError
from .interrupts import stop_if_signalled

TASK_BYTES = 64 << 20  # input + output of one task, at most: overhead per task is then far below its compute
IN_FLIGHT = 2  # blocks computed ahead per worker thread while the output is gathered here
ENV = "DASK_SCHEDULER_ADDRESS"
_LOCAL = re.compile(r"local(?::(\d+))?$")


def parse_address(text: str | None) -> tuple[str, str | int]:
    """('local', N) or ('scheduler', address) of a --dask value ('' or None: DASK_SCHEDULER_ADDRESS)."""
    given = text
    if not text:
        text = os.environ.get(ENV, "")
        if not text:
            raise ConvtError(f"--dask: expected a scheduler address (tcp://host:8786), local or local:N, and none "
                             f"was given nor set in {ENV}")
    text = text.strip()
    local = _LOCAL.match(text)
    if local:
        n = int(local.group(1)) if local.group(1) else None
        if n is not None and n < 1:
            raise ConvtError(f"--dask: local:N needs N >= 1 worker processes, got {text!r}")
        from .engine import runtime

        return "local", n or runtime.usable_cores()
    if re.match(r"^[a-z][a-z0-9+.-]*://\S+$", text) or re.match(r"^[\w.-]+:\d+$", text):
        return "scheduler", text
    where = f" (from {ENV})" if not given else ""
    raise ConvtError(f"--dask: expected a scheduler address like tcp://host:8786, local or local:N, got "
                     f"{text!r}{where}")


@contextlib.contextmanager
def connect(address: str | None):
    """A distributed Client for --dask ADDRESS (a LocalCluster started here for local[:N]), closed at the end.
    For the command line: distributed's loggers are quieted while it starts and stops (process-wide, as
    LocalCluster's own silence_logs); a script embedding convt makes its own Client and calls run_job."""
    kind, value = parse_address(address)
    try:
        import dask
        from distributed import Client, LocalCluster
    except ImportError:
        raise ConvtError("--dask needs dask and distributed: pip install 'convt[dask]'") from None
    cluster = client = None
    try:
        with _quiet_logs():
            if kind == "local":
                with dask.config.set(_worker_environment(dask)):
                    # the dashboard on a free port: two jobs at once must not warn about 8787 on stderr
                    cluster = LocalCluster(n_workers=value, threads_per_worker=1, processes=True,
                                           dashboard_address=":0", silence_logs=logging.CRITICAL)
                client = Client(cluster)
                client.register_plugin(OwnProcessGroup())
            else:
                try:
                    client = Client(value, timeout="10s")
                except (OSError, TimeoutError) as e:
                    raise ConvtError(f"--dask {value}: no Dask scheduler answered there ({_first_line(e)})") from None
            yield client
    finally:
        with _quiet_logs():
            if client is not None:
                client.close()
            if cluster is not None:
                cluster.close()


try:
    from distributed import WorkerPlugin as _WorkerPlugin
except ImportError:  # without distributed there is no --dask to start workers for
    _WorkerPlugin = object


class OwnProcessGroup(_WorkerPlugin):
    """Each local worker process (and any the nanny starts again) leaves the command's process group, so that
    Ctrl-C at a terminal, which signals the whole foreground group, reaches the client alone: it stops the job and
    then the cluster, where each worker would otherwise die printing its own KeyboardInterrupt traceback."""

    name = "convt-own-process-group"

    def setup(self, worker):
        try:
            os.setpgrp()
        except OSError:
            pass


def _worker_environment(dask) -> dict:
    """The nanny's environment for the workers it starts, less MALLOC_TRIM_THRESHOLD_: set, it turns off glibc's
    adaptive mmap threshold, and every large temporary buffer of the engine is then mapped and page-faulted
    afresh on each call (2.3x the wall time, measured)."""
    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {})
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    return {"distributed.nanny.pre-spawn-environ": env}


@contextlib.contextmanager
def _quiet_logs():
    """distributed's INFO and WARNING lines (a worker restarted, a connection closed) off stderr, where convt
    prints only its progress and its one Error line; they come back after."""
    loggers = [logging.getLogger(name) for name in ("distributed", "tornado", "asyncio")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _threads(client) -> int:
    return max(1, sum(client.nthreads().values()))


class Slab:
    """A stored input as the workers see it: shape and dtype, and x[b0:b1, ...] read by opening the file in the
    task that asks (dask.array.from_array's getter), cast to the dtype the job computes in."""

    def __init__(self, text: str, label: str, shape, dtype, cast):
        self.text, self.label = text, label
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(cast), len(shape)
        self.stored_dtype = np.dtype(dtype)

    def __getitem__(self, index):
        from .stream import cast_to

        rows = index[0] if isinstance(index, tuple) else index
        b0, b1, _ = rows.indices(self.shape[0])
        ref = io.parse_ref(self.label, self.text)
        source = io.Source(ref)
        try:
            x = source.read(b0, b1)
        finally:
            source.close()
        return cast_to(ref, x, self.dtype, b0, b1 - b0 < self.shape[0])


def shared_input(ref):
    """Refuse what the workers cannot read by themselves; the absolute path they read (the same on every worker
    that shares the storage)."""
    if ref.is_std:
        ref.fail("with --dask the workers read the input themselves, and they cannot read stdin: give a zarr "
                 "store, or an .h5, .npy or .safetensors file on storage every worker sees")
    if io.read_whole(ref):
        ref.fail("with --dask every worker reads its own batch elements, and an .npz member can only be read "
                 "whole: save it as .npy, .h5 or a zarr store")
    path = os.path.abspath(ref.path)
    return path if ref.name is None else f"{path}:{ref.name}"


def dask_array(slab: Slab, chunk: int):
    import dask.array

    return dask.array.from_array(slab, chunks=(chunk, *slab.shape[1:]), asarray=False, fancy=False, lock=False,
                                 meta=np.empty((0,) * slab.ndim, slab.dtype), name=False)


def task_batch(needs, plan, x_ref, x_dtype, out_dtype, max_memory, available_memory, threads: int,
               op: str = "run") -> int:
    """Batch elements per task: at most TASK_BYTES of input and output, within each task's budget (`needs` against
    --max-memory, else what this machine has free shared by its worker threads), aligned to the input's stored
    chunks."""
    from .stream import check_memory, image_bytes

    if not plan.batch:
        return 1

    def shared():
        free = available_memory()
        return None if free is None else free // threads

    fits = check_memory(op, needs, plan.batch, max_memory, shared if available_memory is not None else None)
    chunk = max(1, min(fits, TASK_BYTES // max(1, image_bytes(plan, x_dtype, out_dtype)), plan.batch))
    return aligned(chunk, io.formats.input_format(x_ref).batch_chunk(x_ref))


def aligned(chunk: int, stored: int | None) -> int:
    """Batch elements per task as a multiple of the input's stored chunk where the task holds one or more (each
    task then decompresses only its own chunks: one element from a chunk of 16 decompressed all 16, and cost a
    task 30 ms), else a divisor of it (a chunk is then read whole by the tasks it is split among, no task reading
    two)."""
    if not stored or stored <= 1:
        return chunk
    if chunk >= stored:
        return chunk // stored * stored
    return max(d for d in range(1, chunk + 1) if stored % d == 0)


def compute_blocks(client, blocks: list, done, in_order_write=None):
    """Compute the Delayed `blocks` on the cluster. With in_order_write(i, value), the values are gathered here
    and written in order, IN_FLIGHT blocks ahead per worker thread (memory on the workers stays bounded);
    without, they are computed all at once (each writes its own output) and done(i) follows each as it ends."""
    from distributed import as_completed

    futures: dict = {}
    try:
        if in_order_write is None:
            started = client.compute(blocks)
            futures = dict(enumerate(started))
            index = {f.key: i for i, f in futures.items()}
            for future in as_completed(started):
                _result(future)
                done(index[future.key])
                stop_if_signalled()
            return
        ahead, submitted = IN_FLIGHT * _threads(client), 0
        for i in range(len(blocks)):
            while submitted < min(len(blocks), i + ahead):
                futures[submitted] = client.compute(blocks[submitted])
                submitted += 1
            value = _result(futures.pop(i))
            in_order_write(i, value)
            done(i)
            stop_if_signalled()
    finally:
        if futures:
            client.cancel(list(futures.values()))


def settle(client, prefix: str, timeout: float = 60.0) -> None:
    """Wait until no worker still runs a task whose key starts with `prefix`: a cancelled task runs to its end,
    and one writing into the hidden output would put back what abort() removes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            busy = client.run(_running, prefix)
        except Exception:  # noqa: BLE001 - no workers left to ask: none of them writes
            return
        if not any(busy.values()):
            return
        time.sleep(0.05)


def _running(prefix: str, dask_worker=None) -> int:
    """On a worker: its tasks that occupy a thread (cancelled ones included) whose key starts with prefix."""
    return sum(1 for ts in dask_worker.state.all_running_tasks if str(ts.key).startswith(prefix))


def _result(future):
    """A finished task's value; its failure as convt reports it: a ConvtError as it is, a worker lost too often
    (distributed's KilledWorker) or a lost scheduler as one line."""
    try:
        return future.result()
    except ConvtError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a worker raised, as one line
        name = type(e).__name__
        if name == "KilledWorker":
            raise ConvtError(f"--dask: the workers computing a task died {_first_line(e)}: the job was stopped, and "
                             f"nothing was written") from None
        if name in ("CancelledError", "CommClosedError", "TimeoutError"):
            raise ConvtError(f"--dask: the connection to the scheduler was lost ({name}): the job was stopped, and "
                             f"nothing was written") from None
        raise ConvtError(f"--dask: a task failed on a worker ({name}: {_first_line(e)})") from None


def run_job(client, address, input_ref, filters_ref, output_ref, *, output_shape=None, strides=1, padding="SAME",
            data_format=None, filter_layout="tf", dilations=None, output_padding=None, groups=1, dtype=None,
            force=False, max_memory=None, progress=None, available_memory=None, compression=None,
            compression_level=None, copy_attrs=False, batch_per_task=None, **_ignored) -> dict:
    """run_files' job on a Dask cluster (see the module's docstring); the same summary, plus `dask`.
    batch_per_task: batch elements per task (default: task_batch's, from TASK_BYTES and the budget)."""
    import dataclasses

    import dask

    from . import dask as convt_dask
    from .formats.zarr import Zarr, ZarrWriter
    from .stream import (_dtype_name, _memory_limit, _open_filters, _plan, _refs, _ref_text, _reporter, _summary,
                         _write_options, cast_to, check_copy_attrs, check_space, checked_dtype, copied_attributes,
                         provenance_of,
                         run_needs)
    from .shapes import filter_layout as filter_layout_name

    began = time.perf_counter()
    cast, max_memory = _dtype_name(dtype), _memory_limit(max_memory)
    layout = filter_layout_name("filters", filter_layout)
    report = _reporter(progress)
    options = _write_options(compression, compression_level)
    x_ref, w_ref = _refs(input_ref, filters_ref)
    out_ref = io.parse_ref("OUTPUT", _ref_text("OUTPUT", output_ref), must_exist=False)
    out_format = io.formats.output_format(out_ref)
    check_copy_attrs(copy_attrs, x_ref, out_ref, out_format)
    x_text = shared_input(x_ref)
    if io.same_h5_file(out_ref, x_ref):
        out_ref.fail(f"is in the HDF5 file INPUT '{x_ref}' is read from: with --dask the workers read the input "
                     f"while the output is written, and HDF5 cannot share a file that way: write to another file")
    x_shape, x_dtype = io.read_header(x_ref)
    w_shape, w_dtype, w_load = _open_filters(w_ref, layout)
    plan = _plan(x_ref, x_shape, w_shape, output_shape, strides, padding, data_format, dilations, layout,
                 output_padding=output_padding, groups=groups)
    out_dtype = checked_dtype(cast, (x_ref, x_dtype), (w_ref, w_dtype))
    io.check_output(out_ref, [x_ref, w_ref], bool(force), options)
    w = cast_to(w_ref, w_load(), out_dtype)
    threads = _threads(client)
    chunk = task_batch(run_needs(plan, x_dtype, w_dtype, out_dtype, threads=1), plan, x_ref, x_dtype, out_dtype,
                       max_memory, available_memory, threads)
    if batch_per_task is not None:
        chunk = max(1, int(batch_per_task))
    check_space(out_ref, math.prod(plan.output_shape) * out_dtype.itemsize)
    info = _summary(plan, out_dtype, (x_ref, w_ref, out_ref), layout)
    provenance = provenance_of(x_ref, w_ref, info)
    attrs = copied_attributes(x_ref, copy_attrs, provenance)
    options = dataclasses.replace(options, chunk_batch=min(chunk, max(1, plan.batch)), attrs=attrs)
    x = dask_array(Slab(x_text, x_ref.label, x_shape, x_dtype, out_dtype), chunk)
    y = convt_dask.lazy(x, dask.delayed(w, pure=True), plan, out_dtype)
    blocks = list(y.to_delayed().ravel())
    starts = convt_dask.batch_starts(y)
    sizes = list(y.chunks[0])
    done = [0]

    def tell(i):
        done[0] += sizes[i]
        report(sizes[i], done[0], plan.batch)

    compute_began = time.perf_counter()
    if isinstance(out_format, Zarr):
        writer = ZarrWriter(out_ref, plan.output_shape, out_dtype, provenance, bool(force), options)
        prefix = f"convt-store-{uuid.uuid4().hex}"  # the keys of the tasks that write into the hidden array
        try:
            target = writer.array
            stores = [dask.delayed(_store, pure=False)(block, target, b0, dask_key_name=f"{prefix}-{i}")
                      for i, (block, b0) in enumerate(zip(blocks, starts))]
            compute_blocks(client, stores, tell)
            stop_if_signalled()
            writer.finish()
        except BaseException:
            settle(client, prefix)
            writer.abort()
            raise
    else:
        sink = io.Sink(out_ref, plan.output_shape, out_dtype, provenance, bool(force), options)
        try:
            compute_blocks(client, blocks, tell, lambda i, value: sink.write(value))
            stop_if_signalled()
            sink.commit()
        except BaseException:
            sink.abort()
            raise
    seconds = time.perf_counter() - compute_began
    info.update(seconds=round(seconds, 6), wall_seconds=round(time.perf_counter() - began, 6),
                gflop_per_s=round(plan.flops / seconds / 1e9, 3) if seconds > 0 else None,
                batch_per_chunk=min(chunk, plan.batch), pieces=len(blocks), tile_shape=None,
                dask={"scheduler": address_text(address), "workers": len(client.nthreads()),
                      "threads": threads})
    return info


def _store(block: np.ndarray, target, b0: int) -> int:
    """One task's output written into its own chunks of the hidden zarr array."""
    from .formats.zarr import put

    put(target, block, b0)
    return len(block)


def address_text(address) -> str:
    """The --dask value as the summary gives it: local:N (N resolved), or the scheduler's address."""
    kind, value = parse_address(address)
    return f"local:{value}" if kind == "local" else str(value)


def verify_job(client, address, input_ref, filters_ref, output_ref=None, *, output_shape=None, strides=1,
               padding="SAME", data_format=None, filter_layout="tf", dilations=None, output_padding=None, groups=1,
               dtype=None, probes=None, seed=0, rtol=None, max_memory=None, progress=None, available_memory=None,
               **_ignored):
    """verify_files' check on a Dask cluster: each batch chunk's sums on a worker, combined here into the report
    verify_files gives (the same numbers: verify.AdjointCheck's parts do not depend on the chunks)."""
    import dataclasses

    import dask

    from . import dask as convt_dask
    from .stream import (_dtype_name, _memory_limit, _open_filters, _refs, _ref_text, _reporter, _summary,
                         cast_to, quiet_arithmetic, run_needs, verify_plan, with_hint, with_verify_work)
    from .shapes import filter_layout as filter_layout_name
    from .verify import AdjointCheck

    began = time.perf_counter()
    cast, max_memory = _dtype_name(dtype), _memory_limit(max_memory)
    layout = filter_layout_name("filters", filter_layout)
    report = _reporter(progress)
    x_ref, w_ref = _refs(input_ref, filters_ref)
    y_ref = None if output_ref is None else io.parse_ref("OUTPUT", _ref_text("OUTPUT", output_ref))
    x_text = shared_input(x_ref)
    y_text = None if y_ref is None else shared_input(y_ref)
    x_shape, x_dtype = io.read_header(x_ref)
    y_header = None if y_ref is None else io.read_header(y_ref)
    w_shape, w_dtype, w_load = _open_filters(w_ref, layout)
    plan, out_dtype = verify_plan(x_ref, x_shape, x_dtype, w_ref, w_shape, w_dtype, y_ref, y_header, output_shape,
                                  strides, padding, data_format, dilations, layout, cast, output_padding, groups)
    w = cast_to(w_ref, w_load(), out_dtype)
    check = AdjointCheck(plan, w, out_dtype.name, probes=probes, seed=seed, rtol=rtol, threads=1)  # the flags
    threads = _threads(client)
    needs = with_verify_work(run_needs(plan, x_dtype, w_dtype, out_dtype, y_header, threads=1), plan, out_dtype,
                             probes, 1)
    chunk = task_batch(needs, plan, x_ref, x_dtype, out_dtype, max_memory, available_memory, threads, "verify")
    x = dask_array(Slab(x_text, x_ref.label, x_shape, x_dtype, out_dtype), chunk)
    w_key = dask.delayed(w, pure=True)
    if y_ref is None:
        y = convt_dask.lazy(x, w_key, plan, out_dtype)
    else:
        y = dask_array(Slab(y_text, y_ref.label, y_header[0], y_header[1], y_header[1]), chunk)
    parts = convt_dask.sums(x, y, w_key, plan, check, rtol)
    sizes = list(x.chunks[0])
    found: dict = {}
    done = [0]

    def keep(i, value):
        found[i] = value

    def tell(i):
        done[0] += sizes[i]
        report(sizes[i], done[0], plan.batch)

    compute_blocks(client, parts, tell, keep)
    result = convt_dask.combine([found[i] for i in range(len(parts))], plan, w, out_dtype.name, check.k,
                                check.seed, rtol)
    if y_ref is not None and result.failing_tiles:  # what the first failing element looks like, read here
        x_src, y_src = io.Source(x_ref), io.Source(y_ref)
        try:
            with quiet_arithmetic():
                result = with_hint(result, plan, x_ref, x_src, y_src, w, out_dtype, probes, seed, rtol)
        finally:
            x_src.close()
            y_src.close()
    info = _summary(plan, out_dtype, (x_ref, w_ref, y_ref if y_ref is not None else "(computed)"), layout)
    for key in ("output_bytes", "flops"):
        del info[key]
    info.update(wall_seconds=round(time.perf_counter() - began, 6), batch_per_chunk=min(chunk, plan.batch),
                pieces=len(parts), tile_shape=None,
                dask={"scheduler": address_text(address), "workers": len(client.nthreads()),
                      "threads": threads})
    return dataclasses.replace(result, context=info)
