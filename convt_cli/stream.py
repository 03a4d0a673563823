"""File to file: what `convt run`, `convt verify` and `convt shape` do with arrays in files, as library functions.

`run_files` plans from the headers alone, checks the memory budget and the free space, prepares the filters once,
then reads the input a piece of the batch at a time, computes the piece and appends it to an atomic io.Sink, which
makes the output visible only when it is whole; reading and writing run on their own threads beside the compute,
which takes the pieces side by side, one per thread (`overlapped`). A batch element larger than the budget is
computed in spatial tiles instead (`spatial_tiles`, shapes.tile_plan: each tile's input window read alone, its
output written in place). `run_many` does that for
many (input, output) pairs, reporting each pair's mistake and going on with the next; `verify_files` feeds the
adjoint check piece by piece, or tile by tile on its own grid, the same way; `plan_files` is the plan alone.
Batch pieces never change a bit of the result: the engine's blocks are fixed by the shapes, and verify's probes
are drawn per batch element; tiles give the same bits on every run for a given tiling.

Nothing here prints. A user's mistake raises ConvtError (a ValueError), whose message names the parameter; the
memory, dtype and overwrite messages use the CLI's spelling of the keyword arguments (--max-memory, --dtype,
--force), which the CLI passes through unchanged. KeyboardInterrupt and MemoryError propagate after the Sink has
removed what it wrote.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
import os
import queue
import re
import sys
import threading
import time
from fractions import Fraction

import numpy as np

from . import __version__, engine, io
from .engine import runtime
from .dtype_names import DTYPES
from .errors import ConvtError
from .interrupts import stop_if_signalled
from .engine.layout import as_tf_filters, at, plan_with_layout, shaped
from .shapes import filter_layout as filter_layout_name
from .shapes import effective_kernel, filters_shape_as_tf, layout_rank_problem, tile_plan, tile_starts

PIECE_BYTES = 8 << 20  # input + output of one piece of a run: enough per piece to keep every thread busy
AHEAD = 3  # pieces read ahead, and written behind, beyond one per thread, where the budget has room for them

_SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}
_PROVENANCE = ("output_shape", "strides", "padding", "padding_given", "data_format", "dilations", "dtype", "pads",
               "filter_layout", "output_padding", "groups")


# ---------------------------------------------------------------------------------------------------------
# The public entry points


def run_files(input_ref, filters_ref, output_ref, *, output_shape=None, strides=1, padding="SAME", data_format=None,
              filter_layout="tf", dilations=None, output_padding=None, groups=1, dtype=None, force=False,
              max_memory=None, threads=None, progress=None, available_memory=None, compression=None,
              compression_level=None, copy_attrs=False) -> dict:
    """Compute conv_transpose of two arrays in files and write it to a file, as `convt run` does.

    The input is read, computed and written a piece of the batch at a time (about PIECE_BYTES of input and
    output, fewer batch elements when the memory budget asks for it), so the output is never held whole; the
    result is bitwise the same as the whole array's. The output appears only when complete (a temporary file
    renamed into place, or a hidden .h5 dataset moved into place); .h5 outputs carry provenance attributes.

    Args:
        input_ref: "x.npy", "x.npz[:NAME]", "x.h5[:/group/dataset]" or "-" (stdin, read whole); the array is
            (batch, *spatial, in_channels), or (batch, in_channels, *spatial) channels-first.
        filters_ref: a reference as above to (*kernel, out_channels, in_channels), whatever the data_format;
            or stored in filter_layout: "torch" or "onnx" ([in, out/groups, *kernel]) or "jax" ([*kernel, in, out]),
            read as the former.
        output_ref: where to write: .npy, .npz[:NAME], .h5[:/group/dataset], or "-" for stdout.
        output_shape, strides, padding, data_format, dilations, output_padding, groups: as for conv_transpose
            (Python values: strides=2 or [1, 2, 2, 1], padding="VALID", 1 or [(0, 1), (1, 1)]).
        dtype: None (input and filters must share a dtype), or a name of dtype_names.DTYPES (any case) or a
            NumPy dtype to cast both to before computing.
        force: replace an existing output file or dataset.
        max_memory: the memory budget: bytes (an int) or a size like "512M", "2G", "1.5GiB" (powers of 1024);
            None: what available_memory reports.
        threads: threads to compute on; None: CONVT_NUM_THREADS, else every usable core. At most the usable
            cores in tiles (the tiling is sized for them), and 1 under an address-space limit (RLIMIT_AS).
        progress: None, a callable progress(done, total) called after each piece is written with the batch
            elements done and the batch size (in tiles: the tiles done and their number), or an object with
            update(n) (a tqdm or Click bar) given each piece's size (1 per tile); called in order, one call at a
            time, from convt's writer thread when the pieces overlap.
        available_memory: a function returning the bytes that can be allocated without swapping, or None where
            that is unknown (no limit); None: MemAvailable of /proc/meminfo. For a caller that knows better (a
            container's limit, which MemAvailable does not show).
        compression: None, "gzip" or "lzf" (.h5 outputs; .npz outputs take "gzip"), with compression_level
            (gzip: 0-9). .h5 outputs are then chunked along the batch pieces the run writes.
        copy_attrs: copy the input dataset's attributes to the output dataset (.h5 to .h5; provenance wins).

    Returns:
        The summary `convt run --json` prints (see SUMMARY_KEYS): schema_version, convt_version, input, filters,
        output, shapes, dtype, the parameters as resolved (padding: the (lo, hi) pairs, padding_given: as
        spelled), legal_output_sizes, flops, output_bytes, seconds (computing only), wall_seconds (the whole
        call: reading, computing, writing), gflop_per_s (over seconds), batch_per_chunk, pieces, and tile_shape
        (the output tile of one batch element computed in spatial tiles, or None).

    Raises:
        ConvtError: a bad argument, file, shape or dtype, an existing output without force, too little memory
            for one batch element, too little disk. Nothing is left behind, as after KeyboardInterrupt.

    >>> import os, tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     x, w, y = (os.path.join(folder, name) for name in ("x.npy", "w.npy", "y.npy"))
    ...     np.save(x, np.ones((2, 5, 5, 3), np.float32)); np.save(w, np.ones((3, 3, 4, 3), np.float32))
    ...     run_files(x, w, y, strides=2, max_memory="64M")["output_shape"]
    [2, 10, 10, 4]
    """
    began = time.perf_counter()
    cast, max_memory, threads = _dtype_name(dtype), _memory_limit(max_memory), streaming_threads(threads)
    layout = filter_layout_name("filters", filter_layout)
    report = _reporter(progress)
    options = _write_options(compression, compression_level)
    x_ref, w_ref = _refs(input_ref, filters_ref)
    out_ref = io.parse_ref("OUTPUT", _ref_text("OUTPUT", output_ref), must_exist=False)
    out_format = io.formats.output_format(out_ref)  # an unknown output suffix, before any file is opened
    check_copy_attrs(copy_attrs, x_ref, out_ref, out_format)
    x_src = io.Source(x_ref, whole=io.same_h5_file(out_ref, x_ref))
    try:
        w_shape, w_dtype, w_load = _open_filters(w_ref, layout)
        plan = _plan(x_ref, x_src.shape, w_shape, output_shape, strides, padding, data_format, dilations, layout,
                     output_padding=output_padding, groups=groups)
        out_dtype = checked_dtype(cast, (x_ref, x_src.dtype), (w_ref, w_dtype))
        # every mistake the headers and flags show, then the output's own: 'exists' never hides a flag's mistake
        io.check_output(out_ref, [x_ref, w_ref], bool(force), options)
        whole = ("input",) if x_src.whole else ()

        def needs(ahead):
            return run_needs(plan, x_src.dtype, w_dtype, out_dtype, whole=whole, threads=threads, overlap=ahead)

        w = cast_to(w_ref, w_load(), out_dtype)  # before the pieces are sized: whether its taps are finite
        chunk, tile, ahead, _ = _pieces(plan, needs, (x_src.dtype, w_dtype, out_dtype), x_ref, x_src.whole,
                                        max_memory, available_memory, threads, lambda: _finite(w))
        check_space(out_ref, math.prod(plan.output_shape) * out_dtype.itemsize)
        info = _summary(plan, out_dtype, (x_ref, w_ref, out_ref), layout)
        compute = _conv_transpose_of(plan, w, threads) if tile is None else None
        provenance = provenance_of(x_ref, w_ref, info)
        attrs = copied_attributes(x_ref, copy_attrs, provenance)
        chunks = None if tile is None else (1, *shaped(plan.spec.channels_first, tuple(tile), plan.out_channels))
        options = dataclasses.replace(options, chunk_batch=min(chunk, plan.batch), chunks=chunks, attrs=attrs)
        sink = io.Sink(out_ref, plan.output_shape, out_dtype, provenance, bool(force), options)
        try:
            if tile is not None and not sink.boxes:
                out_ref.fail(f"one batch element does not fit the memory budget, so it is computed in spatial "
                             f"tiles, which a {out_format.title} output cannot take in place: write .npy, .h5, "
                             f".safetensors or stdout, or raise --max-memory")
            if tile is None:
                pieces = [(b0, min(plan.batch, b0 + chunk)) for b0 in range(0, plan.batch, chunk)]
                seconds = overlapped(
                    pieces, lambda p: cast_to(x_ref, x_src.read(*p), out_dtype, p[0], chunk < plan.batch),
                    lambda p, x, n: compute(x, n), lambda p, y: sink.write(y),
                    lambda p: report(p[1] - p[0], p[1], plan.batch), ahead, threads)
            else:
                seconds = _run_tiles(plan, tile, x_src, x_ref, w, sink, tiled_threads(threads), report, ahead)
            stop_if_signalled()
            sink.commit()
        except BaseException:
            sink.abort()
            raise
    finally:
        x_src.close()
    info.update(seconds=round(seconds, 6), wall_seconds=round(time.perf_counter() - began, 6),
                gflop_per_s=round(plan.flops / seconds / 1e9, 3) if seconds > 0 else None,
                **_pieces_info(plan, chunk, tile))
    return info


def check_copy_attrs(copy_attrs: bool, x_ref, out_ref, out_format) -> None:
    """Refuse --copy-attrs where the input has no attributes or the output cannot hold them."""
    if copy_attrs and not out_format.has_attributes:
        out_ref.fail(f"--copy-attrs: a {out_format.title} output holds no attributes: write to .h5 or .zarr")
    if copy_attrs and (x_ref.is_std or not io.formats.input_format(x_ref).has_attributes):
        x_ref.fail("--copy-attrs: the input holds no attributes to copy (only .h5 datasets and zarr arrays have "
                   "them)")


def copied_attributes(x_ref, copy_attrs: bool, provenance: dict) -> dict:
    """What --copy-attrs copies: the input's attributes, but for those the provenance replaces anyway (an input
    convt made has its own convt_*, which another format may not hold: a zarr array's JSON object in .h5)."""
    if not copy_attrs:
        return {}
    return {k: v for k, v in io.attributes(x_ref).items() if k not in provenance}


def provenance_of(x_ref, w_ref, info: dict) -> dict:
    """The attributes an output that has attributes (.h5, zarr) records of the run that made it."""
    return {"convt_version": __version__, "convt_op": "conv_transpose", "convt_input": str(x_ref),
            "convt_filters": str(w_ref), "convt_parameters": {k: info[k] for k in _PROVENANCE}}


def _pieces_info(plan, chunk, tile) -> dict:
    """batch_per_chunk, pieces and tile_shape for the summaries: batch pieces, or spatial tiles of one element."""
    if tile is None:
        return dict(batch_per_chunk=min(chunk, plan.batch), pieces=-(-plan.batch // chunk) if plan.batch else 0,
                    tile_shape=None)
    count = math.prod(len(tile_starts(o, t)) for o, t in zip(plan.output_spatial, tile))
    return dict(batch_per_chunk=1, pieces=plan.batch * count, tile_shape=list(tile))


def _finite(w: np.ndarray) -> bool:
    """Whether filters hold no inf or nan: then no run of them goes to "taps" (engine.estimate_bytes)."""
    return bool(np.isfinite(w).all()) if w.dtype.kind in "fcV" else True


def _pieces(plan, needs, dtypes, x_ref, x_whole: bool, max_memory, available_memory, threads, finite=None):
    """(batch elements per piece, None, ahead, False), or (1, the output tile shape, ahead, finite) when one batch
    element does not fit the budget and its tiles do (spatial_tiles; finite: whether they were sized for filters
    without inf or nan). `needs(overlap)` is run_needs' function with `overlap` pieces read and written ahead;
    `ahead`: how many fit (AHEAD where the pieces fit as large as with one, 1 for tiles; 0: the pieces take turns,
    as one element that fits alone still beats tiles, which change the strategy and so the bits). dtypes: the
    input's and filters' as read, the one computed in. finite(): whether the filters hold no inf or nan, asked
    only for tiles."""
    limit = _limit(max_memory, available_memory)
    for ahead in (1, 0):
        try:
            chunk = check_memory("run", needs(ahead), plan.batch, max_memory, available_memory,
                                 whole={"input": x_ref})
        except ConvtError as e:
            refused = e
            continue
        chunk = min(chunk, piece_batch(plan, dtypes[0], dtypes[2]))
        if ahead and (limit is None or sum(needs(AHEAD)(chunk).values()) <= limit):
            ahead = AHEAD  # room for more pieces in flight, as large: the threads wait less on a slow write
        return chunk, None, ahead, False
    clean = finite() if finite is not None and limit is not None and not x_whole else False
    # sized for every usable core whatever --threads says (a tiled run computes on no more: tiled_threads): a
    # tiling, and so the bits, the same for any thread count
    sizing = runtime.usable_cores()
    found = [(None if limit is None or x_whole else spatial_tiles(plan, *dtypes, limit, sizing, overlap=ahead,
                                                                 finite=clean), ahead) for ahead in (1, 0)]
    for tile, ahead in found:
        if tile == tuple(plan.output_spatial):  # the whole element fits after all (the tile's tighter estimate)
            return 1, None, ahead, False
    for tile, ahead in found:
        if tile is not None:
            return 1, tile, ahead, clean
    raise refused


def streaming_threads(threads, computes: bool = True) -> int:
    """The threads a file-to-file call computes on: `threads` resolved, but 1 under an address-space limit (each
    thread costs a malloc arena of 64 MiB of it and OpenBLAS's buffers, which no budget sees; OpenBLAS ends the
    process when it cannot allocate them: for a call that `computes`, this thread's are allocated here, first)."""
    if address_space_left() is None:
        return runtime.resolve_threads(threads)
    if computes:
        runtime.warm_blas()
    return 1


def tiled_threads(threads: int) -> int:
    """The threads of a run in tiles: no more than the usable cores its tiles were sized for (_pieces)."""
    return min(threads, runtime.usable_cores())


def _limit(max_memory, available_memory) -> int | None:
    """The budget: max_memory, else what available_memory() (default mem_available) reports."""
    return max_memory if max_memory is not None else (available_memory or mem_available)()


TILE_PLANS = 2  # prepared filters kept for this many kinds of tile at once (first, inner, last along an axis)


def tile_needs(plan, tile, x_dtype, w_dtype, dtype, threads, overlap=0, finite=False) -> dict:
    """{part: bytes} held at once while computing the output tiles of `tile` shape: the largest input window as
    read and cast, the filters as read and cast, and the engine's output and work for one tile at a time, with
    the prepared filters of TILE_PLANS kinds of tile; with `overlap`, one tile computed per thread, each with its
    window, its output, one thread's work and the prepared filters it holds, and `overlap` more windows and output
    tiles (see run_needs); with `finite` (filters without inf or nan), not the workspace of "taps", which only such
    filters use."""
    first, _ = tile_plan(dataclasses.replace(plan, batch=1), tuple((0, min(o, t)) for o, t in zip(
        plan.output_spatial, tile)))
    # the widest window of any tile: the terms landing in t positions come from ceil((t + eff - 1) / s) inputs,
    # and tile_window may start one earlier
    widest = tuple(min(i, -(-(min(o, t) + effective_kernel(k, d) - 1) // s) + 1) for o, t, i, k, s, d in zip(
        plan.output_spatial, tile, plan.input_spatial, plan.kernel, plan.spec.strides, plan.spec.dilations))
    sub = dataclasses.replace(first, input_spatial=widest)
    x_n, w_n = math.prod(sub.input_shape), math.prod(sub.filters_shape)
    cast = (x_n if x_dtype != dtype else 0) + (w_n if w_dtype != dtype else 0)
    lanes = runtime.resolve_threads(threads) if overlap else 1
    prepared = engine.prepared_bytes(sub, dtype)
    one = engine.estimate_bytes(sub, dtype, threads=1 if overlap else threads, finite_filters=finite)
    parts = {"input": x_n * x_dtype.itemsize, "filters": w_n * w_dtype.itemsize,
             "output and work": one + (TILE_PLANS - 1) * prepared + cast * dtype.itemsize}
    if overlap:
        window = x_n * (x_dtype.itemsize + (dtype.itemsize if x_dtype != dtype else 0))
        # each other thread: its window, its output and work, and the prepared filters of a tile kind the cache
        # may have let go of meanwhile
        parts["tiles computed side by side"] = (lanes - 1) * (window + one)
        parts["reading and writing ahead"] = overlap * (window + math.prod(sub.output_shape) * dtype.itemsize)
    return parts


def spatial_tiles(plan, x_dtype, w_dtype, dtype, limit: int, threads, overlap=0,
                  finite=False) -> tuple[int, ...] | None:
    """The output tile shape for one batch element that does not fit `limit` bytes: the trailing spatial axes whole
    as far as they fit, the next one cut to the most that fits (a multiple of its stride, so that the inner tiles
    share one plan), the ones before it 1 -- slabs, whose rows are contiguous in the file; None when not even one
    output position fits."""
    def fits(sizes) -> bool:
        return sum(tile_needs(plan, sizes, x_dtype, w_dtype, dtype, threads, overlap, finite).values()) <= limit

    found = _largest_tile(plan.output_spatial, plan.spec.strides, fits)
    if found is None and fits((1,) * len(plan.output_spatial)):  # not even one stride's rows: one position
        found = _largest_tile(plan.output_spatial, (1,) * len(plan.output_spatial), fits)
    return found


def _tiles(plan, tile) -> list:
    """(box, its tile plan, its input window) for each output tile of `tile` shape of a batch element, in order."""
    boxes = itertools.product(*(tile_starts(o, t) for o, t in zip(plan.output_spatial, tile)))
    return [(box, *tile_plan(plan, box)) for box in boxes]


def _run_tiles(plan, tile, x_src, x_ref, w, sink, threads, report, ahead=1) -> float:
    """Each batch element's output a tile at a time (tile_plan: its input window, read alone, and its own pads),
    written in place, reading and writing overlapped with the compute; the seconds spent computing."""
    first = plan.spec.channels_first
    pieces = [(b, *piece) for b in range(plan.batch) for piece in _tiles(plan, tile)]  # (b, box, sub, window)
    prepared = {}

    def read(piece):
        b, _, _, window = piece
        return cast_to(x_ref, x_src.read_box(b, b + 1, _box_index(first, window)), w.dtype, b, True)

    done = [0]

    def tell(piece):
        done[0] += 1
        report(1, done[0], len(pieces))

    kept = threading.Lock()  # the compute threads share the prepared filters

    def compute(piece, x, n):
        with kept:
            prepared_filters = _prepared(prepared, piece[2], w)
        return prepared_filters.run(x, threads=n)

    return overlapped(pieces, read, compute, lambda piece, y: sink.write_box(y, piece[0], _box_index(first, piece[1])),
                      tell, ahead, threads)


def overlapped(pieces: list, read, compute, write, done, ahead: int = 1, threads: int = 1) -> float:
    """For each piece in order: read(piece) on a reader thread, compute(piece, x, threads) on the compute threads,
    write(piece, y) and then done(piece) on a writer thread, in order: while pieces are computed, the next is read
    and the last written. With `ahead` and threads > 1 the pieces are computed side by side, one per thread
    (`lanes`, on the engine's worker threads, each computing with threads=1): pieces of a few MB keep every core
    busy that way with no wait between them, and the engine's bits do not depend on its threads. At most
    lanes + ahead pieces' inputs and as many outputs exist at once (the memory budget counts them: run_needs,
    tile_needs); with ahead=0, one of each, computed with `threads` (reading piece k+1 then overlaps only
    writing k). A failure or KeyboardInterrupt anywhere stops them all and is raised here, after every thread has
    ended (so that the caller's abort never races a write). Under an address-space limit, and for one piece, the
    pieces take turns on this thread. Returns the seconds spent in compute (per lane)."""
    if address_space_left() is not None or len(pieces) < 2:
        # under an address-space limit no threads: each one's malloc arena reserves 64 MiB of it
        return _in_turn(pieces, read, lambda piece, x: compute(piece, x, threads), write, done)
    lanes = max(1, min(threads, len(pieces))) if ahead else 1
    inner = 1 if lanes > 1 else threads
    stop = threading.Event()
    inputs, outputs = (threading.Semaphore(lanes + ahead if ahead else 1) for _ in range(2))  # alive at once
    inbox: queue.Queue = queue.Queue()
    ready: dict = {}  # piece index -> its output, until the writer takes it
    turn, taking = threading.Condition(), threading.Lock()
    state = {"next": 0, "seconds": 0.0}
    failed: list[BaseException] = []

    def acquire(slots) -> bool:
        while not slots.acquire(timeout=0.05):
            if stop.is_set():
                return False
        return not stop.is_set()

    def reader():
        try:
            for piece in pieces:
                if not acquire(inputs):
                    return
                inbox.put(read(piece))
        except BaseException as e:  # given to the main thread, which raises it
            failed.append(e)
            stop.set()

    def lane():
        while True:
            # an output slot, then the next input, under one lock: slots go to the pieces in order, so the piece
            # the writer waits for always holds one (no deadlock)
            with taking:
                if state["next"] == len(pieces) or not acquire(outputs):
                    return
                x = _take(inbox, stop)
                if x is None:
                    return
                k = state["next"]
                state["next"] += 1
            try:
                y, spent = _timed(compute, pieces[k], x, inner)
            except BaseException:
                stop.set()
                raise
            del x
            inputs.release()
            with turn:
                ready[k] = y
                state["seconds"] += spent
                turn.notify_all()
            del y

    def writer():
        try:
            for k, piece in enumerate(pieces):
                with turn:
                    while k not in ready:
                        if stop.is_set():
                            return
                        turn.wait(0.05)
                    y = ready.pop(k)
                write(piece, y)
                del y
                outputs.release()
                done(piece)
        except BaseException as e:
            failed.append(e)
            stop.set()

    helpers = [threading.Thread(target=reader, name="convt-reader", daemon=True),
               threading.Thread(target=writer, name="convt-writer", daemon=True)]
    for thread in helpers:
        thread.start()
    try:
        runtime.run_tasks([(lane,)] * lanes, lanes, stop)
        while helpers[1].is_alive() and not stop.is_set():  # the last pieces written
            helpers[1].join(timeout=0.05)
            stop_if_signalled()
    finally:
        stop.set()
        for thread in helpers:
            thread.join()
    if failed:
        raise failed[0]
    stop_if_signalled()
    return state["seconds"] / lanes


def _in_turn(pieces: list, read, compute, write, done) -> float:
    """overlapped's work on this thread alone: each piece read, computed and written in turn."""
    seconds = 0.0
    for piece in pieces:
        x = read(piece)
        y, spent = _timed(compute, piece, x)
        seconds += spent
        del x
        write(piece, y)
        del y
        done(piece)
        stop_if_signalled()
    return seconds


def _timed(compute, piece, x, *args):
    """(compute(piece, x, *args), the seconds it took), floating-point warnings off as for every piece."""
    start = time.perf_counter()
    with quiet_arithmetic():
        y = compute(piece, x, *args)
    return y, time.perf_counter() - start


def _take(box, stop):
    """The next item of a queue, or None once `stop` is set."""
    while True:
        try:
            return box.get(timeout=0.05)
        except queue.Empty:
            if stop.is_set():
                return None


def _box_index(first: bool, box) -> tuple:
    """The index, after the batch axis, of a spatial box ([a, b) per axis) with every channel."""
    return at(first, tuple(slice(a, b) for a, b in box))


def run_many(items, filters_ref, run=None, **options):
    """run_files for each (input_ref, output_ref) pair, with the same filters and options; a pair's mistake is
    reported and the others still run (stop iterating to stop).

    Args:
        items: (input_ref, output_ref) pairs, such as io.expand_items(input, output) makes of an HDF5 group
            ("data.h5:/inputs/" to "out.h5:/outputs/") or a glob with an output template ("in/*.npy" to
            "out/{stem}.npy").
        filters_ref: as for run_files.
        run: what runs each pair (default run_files; the CLI's --dask gives cluster.run_job, bound to its client).
        **options: run_files' keyword arguments, for every pair.

    Yields:
        Per pair, in order: run_files' summary, or {"input", "output", "error"} for a ConvtError, whose message
        starts with the reference it is about ("INPUT 'in/b.npy': ..."). Other exceptions propagate.

    >>> list(run_many([], "w.npy"))
    []
    """
    for item_in, item_out in items:
        stop_if_signalled()  # a signal held while the last item was cleaned up or moved into place
        try:
            info = (run or run_files)(item_in, filters_ref, item_out, **options)
        except ConvtError as e:
            info = _item_error(item_in, item_out, e)
        yield info
    stop_if_signalled()


def _item_error(item_in, item_out, error: ConvtError) -> dict:
    """One item's mistake as run_many and verify_many yield it, its message naming the item."""
    message = " ".join(str(error).split())
    if not message.startswith(("INPUT '", "OUTPUT '", "FILTERS '")):
        message = f"INPUT '{item_in}': {message}"  # which of the many it was
    return {"input": item_in, "output": item_out, "error": message}


def verify_many(items, filters_ref, verify=None, **options):
    """verify_files (or `verify`, taking its arguments) for each (input_ref, output_ref) pair (output_ref None:
    computed), with the same filters and options; a pair's mistake is reported and the others are still checked.

    Yields:
        Per pair, in order: the report's to_dict() (with input, filters, output and passed), or {"input",
        "output", "error"} for a ConvtError, whose message names the reference it is about.
    """
    for item_in, item_out in items:
        stop_if_signalled()
        try:
            info = (verify or verify_files)(item_in, filters_ref, item_out, **options).to_dict()
        except ConvtError as e:
            info = _item_error(item_in, item_out, e)
        yield info
    stop_if_signalled()


def verify_files(input_ref, filters_ref, output_ref=None, *, output_shape=None, strides=1, padding="SAME",
                 data_format=None, filter_layout="tf", dilations=None, output_padding=None, groups=1, dtype=None,
                 probes=None, seed=0, rtol=None, max_memory=None, threads=None, progress=None, available_memory=None):
    """The adjoint check of verify.py on arrays in files, as `convt verify` does, a piece of the batch at a time.

    Args:
        input_ref, filters_ref: as for run_files.
        output_ref: the claimed conv_transpose(INPUT, FILTERS) to check, or None to compute it here (on the
            engine, piece by piece) and check that. Its shape is the output_shape unless one is given.
        output_shape, strides, padding, data_format, dilations, output_padding, groups, dtype, max_memory,
            threads, progress, available_memory: as for run_files (the budget also counts verify's own arrays).
        probes, seed, rtol: as for verify.verify_conv_transpose.

    Returns:
        A verify.VerifyReport (passed, per-probe a, b and residual, tolerance, seed); it prints nothing.

    Raises:
        ConvtError: as run_files, and an OUTPUT whose shape or dtype does not fit the flags.

    >>> import os, tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     x, w = os.path.join(folder, "x.npy"), os.path.join(folder, "w.npy")
    ...     np.save(x, np.ones((2, 5, 5, 3), np.float32)); np.save(w, np.ones((3, 3, 4, 3), np.float32))
    ...     verify_files(x, w, strides=2).output_shape
    (2, 10, 10, 4)
    """
    from .verify import AdjointCheck

    began = time.perf_counter()
    cast, max_memory, threads = _dtype_name(dtype), _memory_limit(max_memory), streaming_threads(threads)
    layout = filter_layout_name("filters", filter_layout)
    report = _reporter(progress)
    x_ref, w_ref = _refs(input_ref, filters_ref)
    y_ref = None if output_ref is None else io.parse_ref("OUTPUT", _ref_text("OUTPUT", output_ref))
    if y_ref is not None and y_ref.is_std and (x_ref.is_std or w_ref.is_std):
        raise ConvtError("OUTPUT '-': stdin is already used; give OUTPUT as a file")
    sources = [io.Source(x_ref)]
    try:
        x_src = sources[0]
        w_shape, w_dtype, w_load = _open_filters(w_ref, layout)
        y_src = None if y_ref is None else io.Source(y_ref)
        if y_src is not None:
            sources.append(y_src)
        plan, out_dtype = verify_plan(x_ref, x_src.shape, x_src.dtype, w_ref, w_shape, w_dtype, y_ref,
                                      None if y_src is None else (y_src.shape, y_src.dtype), output_shape, strides,
                                      padding, data_format, dilations, layout, cast, output_padding, groups)
        whole = tuple(name for name, src in (("input", x_src), ("output", y_src)) if src is not None and src.whole)
        needs = run_needs(plan, x_src.dtype, w_dtype, out_dtype, None if y_src is None else (y_src.shape, y_src.dtype),
                          whole=whole, threads=threads)
        w = cast_to(w_ref, w_load(), out_dtype)
        tile = None
        try:
            chunk = check_memory("verify", with_verify_work(needs, plan, out_dtype, probes, threads), plan.batch,
                                 max_memory, available_memory, whole={"input": x_ref, "output": y_ref})
        except ConvtError:  # one batch element does not fit: tiles of it, on verify's own grid of tiles
            limit = _limit(max_memory, available_memory)
            tile = None if limit is None or whole else verify_tiles(
                plan, (x_src.dtype, w_dtype, out_dtype), None if y_src is None else y_src.dtype, limit, probes,
                threads, _finite(w))
            if tile is None:
                raise
            chunk = 1
        chunk = min(chunk, piece_batch(plan, x_src.dtype, out_dtype))
        if y_src is not None and max_memory is not None and tile is None:  # pieces no larger than run's
            run = run_needs(plan, x_src.dtype, w_dtype, out_dtype, whole=whole, threads=threads)
            chunk = min(chunk, max(1, _most_that_fit(run, chunk, max_memory)))
        check = AdjointCheck(plan, w, out_dtype.name, probes=probes, seed=seed, rtol=rtol, threads=threads)
        compute = _conv_transpose_of(plan, w, threads) if y_src is None and tile is None else None
        with quiet_arithmetic():
            if tile is not None:
                _verify_tiles(plan, tile, x_src, x_ref, y_src, w, check, threads, report)
            for b0 in range(0, plan.batch if tile is None else 0, chunk):
                b1 = min(plan.batch, b0 + chunk)
                x = cast_to(x_ref, x_src.read(b0, b1), out_dtype, b0, chunk < plan.batch)
                y = compute(x) if y_src is None else y_src.read(b0, b1)
                check.add(x, y, batch_offset=b0)
                del x, y
                report(b1 - b0, b1, plan.batch)
                stop_if_signalled()
            result = check.report()
            if y_src is not None and tile is None:
                result = with_hint(result, plan, x_ref, x_src, y_src, w, out_dtype, probes, seed, rtol)
    finally:
        for src in sources:
            src.close()
    info = _summary(plan, out_dtype, (x_ref, w_ref, y_ref if y_ref is not None else "(computed)"), layout)
    for key in ("output_bytes", "flops"):
        del info[key]
    info.update(wall_seconds=round(time.perf_counter() - began, 6), **_pieces_info(plan, chunk, tile))
    return dataclasses.replace(result, context=info)


def with_hint(result, plan, x_ref, x_src, y_src, w, out_dtype, probes, seed, rtol):
    """A failed check of someone else's output, with what the first failing batch element looks like (likely_cause:
    the usual mix-ups of layout, flip, stride or padding), read from the sources again."""
    if not result.failing_tiles:
        return result
    b = result.failing_tiles[0].batch
    x = cast_to(x_ref, x_src.read(b, b + 1), out_dtype, b, True)
    hint = likely_cause(plan, x, w, y_src.read(b, b + 1), b, dict(probes=probes, seed=seed, rtol=rtol,
                                                                    dtype=out_dtype.name))
    return dataclasses.replace(result, hint=hint)


def verify_plan(x_ref, x_shape, x_dtype, w_ref, w_shape, w_dtype, y_ref, y_header, output_shape, strides, padding,
                data_format, dilations, layout, cast, output_padding, groups):
    """(plan, dtype computed in) of a verify, refusing an OUTPUT (y_header: its shape and dtype, or None) whose
    shape or dtype the flags cannot give."""
    shape_of_output = y_header is not None and output_shape is None
    if shape_of_output:
        output_shape = list(y_header[0])
    beyond_tf = dict(output_padding=output_padding, groups=groups)
    try:
        plan = plan_with_layout(x_shape, w_shape, output_shape, strides, padding, data_format, dilations, layout,
                                **beyond_tf)
    except ConvtError as e:  # the output's own shape, when it gave it, is what does not fit
        if shape_of_output:  # unless INPUT and FILTERS do not fit each other whatever the output
            _plan(x_ref, x_shape, w_shape, None, strides, padding, data_format, dilations, layout, **beyond_tf)
            y_ref.fail(f"has shape {tuple(y_header[0])}, which INPUT '{x_ref}' cannot give under these flags: {e}")
        raise ConvtError(f"{x_ref.label} '{x_ref}': {e}") from None
    if y_header is not None and tuple(y_header[0]) != plan.output_shape:
        y_ref.fail(f"has shape {tuple(y_header[0])} but --output-shape asks for {plan.output_shape}")
    out_dtype = checked_dtype(cast, (x_ref, x_dtype), (w_ref, w_dtype))
    if y_header is not None and y_header[1].name != out_dtype.name:
        hint = f": pass --dtype {y_header[1].name} to compute in its dtype" if y_header[1].name in DTYPES else ""
        y_ref.fail(f"has dtype {y_header[1].name} but INPUT and FILTERS compute in {out_dtype.name}{hint}")
    return plan, out_dtype


def verify_tiles(plan, dtypes, y_dtype, limit: int, probes, threads, finite=False) -> tuple[int, ...] | None:
    """The output tile shape for verify of one batch element that does not fit `limit` bytes: whole tiles of
    verify's own grid (verify.tile_sizes), so that the report is the one a whole check makes: the trailing axes
    whole as far as they fit, the next one cut to the most grid tiles that fit, the ones before it one grid tile.
    With y_dtype None the output is computed here, a tile at a time, as run computes it (tile_needs)."""
    from .verify import tile_sizes, work_bytes

    x_dtype, w_dtype, dtype = dtypes
    blocks = tile_sizes(plan, probes or 8)
    one = dataclasses.replace(plan, batch=1)
    fixed = work_bytes(one, dtype, probes, threads, 1)

    def fits(sizes) -> bool:
        parts = tile_needs(plan, sizes, x_dtype, w_dtype, dtype, threads, finite=finite)
        if y_dtype is not None:  # the output as read, not computed
            parts["output and work"] = math.prod(sizes) * plan.out_channels * y_dtype.itemsize
        return sum(parts.values()) + fixed <= limit

    return _largest_tile(plan.output_spatial, blocks, fits)


def _largest_tile(spatial, steps, fits) -> tuple[int, ...] | None:
    """The largest tile shape that fits: axes after m whole, axis m a multiple of steps[m] (or whole), the axes
    before m one step; over m = 0, 1, ... the first that fits. None when not even one step on every axis does."""
    for m in range(len(spatial)):
        def sizes(n):
            return (*steps[:m], min(spatial[m], n * steps[m]), *spatial[m + 1:])

        if not fits(sizes(1)):
            continue
        good, bad = 1, -(-spatial[m] // steps[m]) + 1
        while bad - good > 1:  # bisection: the work is not linear in the size
            mid = (good + bad) // 2
            good, bad = (mid, bad) if fits(sizes(mid)) else (good, mid)
        return sizes(good)
    return None


def _verify_tiles(plan, tile, x_src, x_ref, y_src, w, check, threads, report) -> None:
    """check.add on each batch element a tile at a time: the tile's input window and output box read alone (or
    its output computed from the window, as run computes it)."""
    first = plan.spec.channels_first
    tiles = _tiles(plan, tile)
    prepared, done, total = {}, 0, plan.batch * len(tiles)
    for b in range(plan.batch):
        for box, sub, window in tiles:
            x = cast_to(x_ref, x_src.read_box(b, b + 1, _box_index(first, window)), w.dtype, b, True)
            if y_src is not None:
                y = y_src.read_box(b, b + 1, _box_index(first, box))
            else:
                y = _prepared(prepared, sub, w).run(x, threads=threads)
            check.add(x, y, batch_offset=b, box=box, window=window)
            del x, y
            done += 1
            report(1, done, total)
            stop_if_signalled()


def _prepared(cache: dict, sub, w):
    """engine.prepare(sub, w), kept for the last TILE_PLANS kinds of tile."""
    key = (sub.input_spatial, sub.output_spatial, sub.pads)
    if key not in cache:
        while len(cache) >= TILE_PLANS:
            cache.pop(next(iter(cache)))
        cache[key] = engine.prepare(sub, w)
    return cache[key]


def likely_cause(plan, x, w, y, batch_index: int, flags: dict) -> str:
    """What a failing batch element's output matches instead, among the usual mix-ups (a flipped kernel, the
    filters' two channel axes swapped, the padding's odd pad on the other side), each checked by verify's own
    identity on that element alone; or that none of them explains it. (When SAME and VALID both reach an output
    size their pads are the same, so that is never the cause.)"""
    from .verify import AdjointCheck

    if not np.isfinite(w).all():
        return "FILTERS hold values that are not finite (inf or nan)"
    if not np.isfinite(x).all():
        return f"INPUT's batch element {batch_index} holds values that are not finite (inf or nan)"
    one = dataclasses.replace(plan, batch=1)
    candidates = [("the kernel flipped (a correlation where a convolution was meant, or the reverse)", one,
                   w[tuple(slice(None, None, -1) for _ in plan.kernel)])]
    if plan.in_channels == plan.out_channels and plan.in_channels > 1 and plan.groups == 1:
        candidates.append(("the filters' last two axes swapped ([*k, in, out] read as [*k, out, in])", one,
                           np.swapaxes(w, -1, -2)))
    if plan.output_padding is None and any(lo != hi for lo, hi in plan.pads):  # SAME's odd pad at the start
        swapped = tuple((hi, lo) for lo, hi in plan.pads)
        spelled = ",".join(f"{lo}:{hi}" for lo, hi in swapped)
        candidates.append((f"the padding split the other way (--padding {spelled})",
                           dataclasses.replace(one, pads=swapped), w))
    for label, candidate, filters in candidates:
        check = AdjointCheck(candidate, filters, flags["dtype"], probes=flags["probes"], seed=flags["seed"],
                             rtol=flags["rtol"])
        check.add(x, y, batch_offset=batch_index)
        if check.report().passed:
            return f"batch element {batch_index} matches with {label}"
    tried = ", ".join(label.split(" (")[0] for label, _, _ in candidates)
    return f"none of the usual mix-ups explains batch element {batch_index} (tried: {tried})"


def plan_files(input_ref, filters_ref, *, output_shape=None, strides=1, padding="SAME", data_format=None,
               filter_layout="tf", dilations=None, output_padding=None, groups=1, dtype=None, max_memory=None,
               threads=None, available_memory=None) -> dict:
    """The plan of run_files from the headers alone, as `convt shape --json` prints it. The data is not read; the
    filters are, when one batch element does not fit and tiles are sized (see tile_needs), as a run sizes them.

    Args:
        input_ref, filters_ref, output_shape, strides, padding, data_format, dilations, output_padding, groups,
            dtype, max_memory, threads, available_memory: as for run_files.

    Returns:
        run_files' summary without what only a run knows (output, seconds), plus memory_bytes (what the run holds
        at once for one piece), and batch_per_chunk and pieces under the budget (None, with memory_error saying
        why, when not even one batch element fits).

    >>> import os, tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     x, w = os.path.join(folder, "x.npy"), os.path.join(folder, "w.npy")
    ...     np.save(x, np.ones((2, 5, 5, 3), np.float32)); np.save(w, np.ones((3, 3, 4, 3), np.float32))
    ...     plan_files(x, w, strides=2, padding="VALID")["output_shape"]
    [2, 11, 11, 4]
    """
    cast, max_memory = _dtype_name(dtype), _memory_limit(max_memory)
    threads = streaming_threads(threads, computes=False)
    layout = filter_layout_name("filters", filter_layout)
    x_ref, w_ref = _refs(input_ref, filters_ref)
    (x_shape, x_dtype, _), (w_shape, w_dtype, w_load) = _open(x_ref), _open_filters(w_ref, layout)
    plan = _plan(x_ref, x_shape, w_shape, output_shape, strides, padding, data_format, dilations, layout,
                 output_padding=output_padding, groups=groups)
    out_dtype = checked_dtype(cast, (x_ref, x_dtype), (w_ref, w_dtype))
    info = _summary(plan, out_dtype, (x_ref, w_ref), layout)
    whole = ("input",) if io.read_whole(x_ref) else ()

    def needs(ahead):
        return run_needs(plan, x_dtype, w_dtype, out_dtype, whole=whole, threads=threads, overlap=ahead)

    try:
        chunk, tile, ahead, clean = _pieces(plan, needs, (x_dtype, w_dtype, out_dtype), x_ref, bool(whole),
                                            max_memory, available_memory, threads, lambda: _finite(w_load()))
    except ConvtError as e:
        info.update(memory_error=str(e), memory_bytes=sum(needs(False)(min(1, plan.batch)).values()),
                    batch_per_chunk=None, pieces=None, tile_shape=None)
        return info
    held = needs(ahead)(min(chunk, plan.batch)) if tile is None else tile_needs(
        plan, tile, x_dtype, w_dtype, out_dtype, threads, overlap=ahead, finite=clean)
    info.update(memory_bytes=sum(held.values()), **_pieces_info(plan, chunk, tile))
    return info


# ---------------------------------------------------------------------------------------------------------
# The memory budget and the disk


SIZE_EXPECTED = "a size like 512M, 2G, 1.5GiB or a number of bytes"


def size_bytes(text: str) -> int | None:
    """Bytes from 512M, 2G, 1.5GiB, 100 (units are powers of 1024, with or without B / iB, any case); None for
    text that is not a size.

    >>> size_bytes("1.5K"), size_bytes("lots")
    (1536, None)
    """
    found = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([KMGTP])(?:I?B)?|B)?\s*", text, flags=re.IGNORECASE)
    if not found:
        return None
    return int(Fraction(found[1]) * _SIZE_UNITS[(found[2] or "").upper()])


def parse_size(param: str, text: str | None) -> int | None:
    """size_bytes(text), None for None, a ConvtError naming `param` for text that is not a size."""
    if text is None:
        return None
    size = size_bytes(text)
    if size is None:
        raise ConvtError(f"{param}: expected {SIZE_EXPECTED}, got '{text}'")
    return size


def bytes_text(n: int) -> str:
    for unit in ("PiB", "TiB", "GiB", "MiB", "KiB"):
        scale = _SIZE_UNITS[unit[0]]
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


AS_MARGIN = 64 << 20  # address space a run takes beside its budget: BLAS's buffers, worker threads' stacks


def mem_available() -> int | None:
    """MemAvailable of /proc/meminfo: what can be allocated without swapping; None where it is not known. Under an
    address-space limit (RLIMIT_AS, ulimit -v), no more than what is left of it, less AS_MARGIN."""
    found = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    room = address_space_left()
    if room is not None:
        found = max(0, room - AS_MARGIN) if found is None else min(found, max(0, room - AS_MARGIN))
    return found


def address_space_left() -> int | None:
    """What an address-space limit (RLIMIT_AS) leaves of it now; None without one."""
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/status") as f:
            size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        return max(0, limit - size)
    except (ImportError, OSError, ValueError, StopIteration):
        return None


def image_bytes(plan, x_dtype, out_dtype) -> int:
    """Bytes of input and output of one batch element."""
    return (math.prod(plan.input_shape[1:]) * x_dtype.itemsize
            + math.prod(plan.output_shape[1:]) * out_dtype.itemsize)


def piece_batch(plan, x_dtype, out_dtype) -> int:
    """Batch elements per piece when memory is plenty: about PIECE_BYTES of input and output, so that the output
    need never be held whole."""
    return max(1, PIECE_BYTES // max(1, image_bytes(plan, x_dtype, out_dtype)))


def check_memory(op: str, needs, batch: int, max_memory: int | None, available_memory=None, whole=None) -> int:
    """The number of batch elements to hold at once: the whole batch when it fits, else the most that fit (the
    run then streams over the batch axis). Refuses, before anything is read or allocated, only when a single
    batch element does not fit.

    needs(b) -> {part: bytes} for b batch elements at once (growing with b); the limit is max_memory, else
    what available_memory() (default mem_available) reports. `whole` maps the parts that are held whole whatever
    b ("input", "output") to their references, for the message.

    >>> check_memory("run", lambda b: {"input": 100 * b}, 8, max_memory=350)
    3
    """
    parts = needs(batch)
    total = sum(parts.values())
    available = (available_memory or mem_available)()
    limit = max_memory if max_memory is not None else available
    if total <= sys.maxsize and (limit is None or total <= limit):
        return max(1, batch)
    if limit is None or limit > sys.maxsize:
        limit, why = sys.maxsize, "more than this machine can address"
    elif max_memory is not None:
        seen = f" (available: {bytes_text(available)})" if available is not None else ""
        why = f"--max-memory is {bytes_text(max_memory)}{seen}"
    else:
        capped = " (what the address-space limit, ulimit -v, leaves)" if address_space_left() is not None else ""
        why = f"only {bytes_text(available)} is available{capped}"
    fits = _most_that_fit(needs, batch, limit)
    if fits >= 1:
        return fits
    more = "a larger --max-memory" if max_memory is not None else "--max-memory SIZE if more can be had (swap)"
    one = needs(1)
    listed = ", ".join(f"{name} {bytes_text(n)}" for name, n in one.items())
    held = [ref for part, ref in (whole or {}).items() if ref is not None and io.read_whole(ref)]
    if held:
        which = " and ".join(f"{ref.label} '{ref}'" for ref in held)
        raise ConvtError(
            f"{op} needs about {bytes_text(sum(one.values()))} at once ({listed}) but {why}: {which} cannot be read "
            f"in pieces (stdin and .npz members are read whole): save {'them' if len(held) > 1 else 'it'} as .npy "
            f"or .h5, which are read a piece at a time, or use {more}")
    fixed = one.get("verify's work", 0)
    if fixed and sum(one.values()) - fixed <= limit:  # it would fit but for verify's own arrays
        raise ConvtError(
            f"{op} needs about {bytes_text(sum(one.values()))} for even one batch element ({listed}) but {why}: "
            f"its own working space ({bytes_text(fixed)}) does not shrink with the pieces: use --max-memory "
            f"{-(-sum(one.values()) // 2**20)}M or more")
    raise ConvtError(
        f"{op} needs about {bytes_text(sum(one.values()))} for even one batch element ({listed}) but {why}: "
        f"use a lower-precision --dtype, smaller arrays, or {more}"
    )


def _most_that_fit(needs, batch: int, limit: int) -> int:
    """The largest b <= batch with sum(needs(b)) <= limit (0 if none), by bisection: needs() may not be linear."""
    fits, too_many = 0, batch + 1
    while too_many - fits > 1:
        mid = (fits + too_many) // 2
        fits, too_many = (mid, too_many) if sum(needs(mid).values()) <= limit else (fits, mid)
    return fits


def run_needs(plan, x_dtype, w_dtype, dtype, output=None, whole=(), threads=None, overlap=0):
    """needs(b) for check_memory: b batch elements of the arrays as read, their casts to dtype, and the output
    with the engine's work (or, given output=(shape, dtype), the output as read). `whole` names the arrays that
    are held whole whatever b ("input", "output": stdin and .npz members are read at once). With `overlap` > 0
    (run's reading and writing beside the compute: `overlapped`), one piece computed per thread (each with one
    thread's work, the prepared filters shared), and `overlap` more pieces of input and of output."""
    lanes = runtime.resolve_threads(threads)

    def needs(batch):
        if not (overlap and batch):
            return _needs(batch, threads)
        parts = _needs(batch, 1)
        one = dataclasses.replace(plan, batch=batch)
        piece = 0 if "input" in whole else math.prod(one.input_shape) * (
            x_dtype.itemsize + (dtype.itemsize if x_dtype != dtype else 0))
        lane = piece + engine.estimate_bytes(one, dtype, threads=1) - engine.prepared_bytes(one, dtype)
        parts["pieces computed side by side"] = (lanes - 1) * lane
        parts["reading and writing ahead"] = overlap * (piece + math.prod(one.output_shape) * dtype.itemsize)
        return parts

    def _needs(batch, threads):
        p = dataclasses.replace(plan, batch=batch)
        x_n, w_n = math.prod(p.input_shape), math.prod(p.filters_shape)
        held = {"input": math.prod(plan.input_shape) * x_dtype.itemsize if "input" in whole else 0,
                "output": math.prod(plan.output_shape) * output[1].itemsize if output and "output" in whole else 0}
        cast = (x_n if x_dtype != dtype else 0) + (w_n if w_dtype != dtype else 0)
        if output is None:
            work = engine.estimate_bytes(p, dtype, threads=threads)
        else:
            work = math.prod((batch, *output[0][1:])) * output[1].itemsize
        return {"input": max(x_n * x_dtype.itemsize, held["input"]), "filters": w_n * w_dtype.itemsize,
                "output and work": work + cast * dtype.itemsize + held["output"]}

    return needs


def with_verify_work(needs, plan, dtype, probes, threads):
    """needs plus verify's own arrays: each of its threads works on one tile at a time (verify.work_bytes)."""
    from .verify import work_bytes

    def with_work(batch):
        parts = needs(batch)
        parts["verify's work"] = work_bytes(plan, dtype, probes, threads, batch) if batch else 0
        return parts

    return with_work


def check_space(ref, nbytes: int) -> None:
    """Refuse before computing an output the disk cannot hold (a full disk during the write is handled too)."""
    free, copied = io.free_space(ref), io.rewritten_bytes(ref)
    if free is not None and free < nbytes + copied and copied:
        ref.fail(f"needs about {bytes_text(nbytes + copied)} (the output, {bytes_text(nbytes)}, and a new copy of "
                 f"the file it goes into, {bytes_text(copied)}) but only {bytes_text(free)} is free where it goes: "
                 f"free some space or write it elsewhere")
    if free is not None and free < nbytes and ref.is_std:
        ref.fail(f"needs about {bytes_text(nbytes)} of temporary space in '{io.spool_folder()}' (the output is "
                 f"spooled there whole before it goes to stdout, so that a failure puts nothing on stdout) but "
                 f"only {bytes_text(free)} is free: set TMPDIR to a folder with room, or write to a file")
    if free is not None and free < nbytes:
        ref.fail(f"needs about {bytes_text(nbytes)} but only {bytes_text(free)} is free where it goes: free "
                 f"some space or write it elsewhere")


# ---------------------------------------------------------------------------------------------------------
# dtypes of files


def _dtype_text(dtype) -> str:
    # numpy's names for these (void64, str672, bytes168) say nothing about what the file holds
    if dtype.names:
        return f"{dtype} (structured)"
    kinds = {"U": "text", "S": "bytes", "V": "raw bytes", "O": "Python objects or variable-length data"}
    return f"{dtype.str} ({kinds[dtype.kind]})" if dtype.kind in kinds else dtype.name


def checked_dtype(cast, *refs_and_dtypes):
    """The dtype the run computes in: `cast` (a name of DTYPES), else the shared dtype of INPUT and FILTERS."""
    for ref, dtype in refs_and_dtypes:
        castable = dtype.kind in "biufc" or dtype.name == "bfloat16"
        if dtype.name not in DTYPES and not (cast and castable):
            hint = "; pass --dtype float32 (or another) to cast it" if castable else ""
            ref.fail(f"dtype {_dtype_text(dtype)} is not supported: expected one of {', '.join(DTYPES)}{hint}")
    if cast:
        if cast.lower() == "bfloat16":
            import ml_dtypes

            target = np.dtype(ml_dtypes.bfloat16)
        else:
            target = np.dtype(cast.lower())
        for ref, dtype in refs_and_dtypes:
            if dtype.kind == "c" and target.kind != "c":
                raise ConvtError(
                    f"--dtype {target.name}: {ref.label} is {dtype.name} and casting it to a real dtype would drop "
                    f"the imaginary part: use --dtype complex64 or complex128"
                )
        return target
    (x_ref, x_dtype), (w_ref, w_dtype) = refs_and_dtypes
    if x_dtype.name != w_dtype.name:
        raise ConvtError(
            f"INPUT is {x_dtype.name} but FILTERS is {w_dtype.name}: they must share a dtype; "
            f"pass --dtype {x_dtype.name} (or another) to cast both"
        )
    return x_dtype.newbyteorder("=")  # big-endian in, native out


def cast_to(ref, a, dtype, b0: int = 0, piece: bool = False):
    """a as dtype. A cast that changes what a value is, rather than rounding it, is refused: to int32, nan, inf
    and out-of-range values (numpy makes arbitrary int32s of them); to a float or complex dtype, finite values
    beyond its range (they would become inf). `a` is batch elements b0.. of the array; `piece` says that it is
    not all of them (the count is the piece's)."""
    if a.dtype == dtype:
        return a
    if dtype.kind == "i" and a.dtype.kind != "b":
        info = np.iinfo(dtype)
        with np.errstate(invalid="ignore"):
            bad = ~((a >= info.min) & (a <= info.max))  # nan compares false
        _refuse_cast(ref, a, dtype, bad, b0, piece, "not finite or outside", f"{dtype.name} cannot represent {{them}}")
    with np.errstate(all="ignore"):
        out = a.astype(dtype)
    if a.dtype.kind in "iufc" or a.dtype.name == "bfloat16":  # to a float or complex dtype: overflow to inf
        bad = np.isfinite(a)
        bad &= ~np.isfinite(out)
        _refuse_cast(ref, a, dtype, bad, b0, piece, "finite but beyond the range of",
                     "the cast would turn {them} into inf; scale the data, or use a wider --dtype")
    return out


def _refuse_cast(ref, a, dtype, bad, b0, piece, what, outcome) -> None:
    count = int(np.count_nonzero(bad))
    if not count:
        return
    where = [int(i) for i in np.argwhere(bad)[0]]
    value = a[tuple(where)]
    where[0] += b0
    within = f" in batch elements {b0}..{b0 + len(a) - 1}" if piece else ""
    them = "them" if count > 1 else "it"
    raise ConvtError(
        f"--dtype {dtype.name}: {ref.label} holds {count} value{'s' if count > 1 else ''}{within} that "
        f"{'are' if count > 1 else 'is'} {what} {dtype.name} ({value} at {where}): {outcome.format(them=them)}"
    )


def quiet_arithmetic():
    """nan and inf propagate as in TF, and verify reports them; numpy's RuntimeWarnings about them would be
    stray lines on stderr."""
    return np.errstate(all="ignore")


# ---------------------------------------------------------------------------------------------------------
# Arguments and the engine


def _ref_text(label: str, value) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise ConvtError(f"{label}: expected a file reference like x.npy, x.npz:name or x.h5:/group/data, got "
                         f"{value!r}")
    return value


def _refs(input_ref, filters_ref):
    x_ref = io.parse_ref("INPUT", _ref_text("INPUT", input_ref))
    w_ref = io.parse_ref("FILTERS", _ref_text("FILTERS", filters_ref))
    if x_ref.is_std and w_ref.is_std:
        raise ConvtError("FILTERS '-': stdin is already the INPUT; give FILTERS as a file")
    return x_ref, w_ref


def _plan(x_ref, x_shape, w_shape, output_shape, strides, padding, data_format, dilations, layout="tf",
          **beyond_tf):
    """plan_conv_transpose, whose mistakes name the INPUT they are about, for one file as for many."""
    try:
        return plan_with_layout(x_shape, w_shape, output_shape, strides, padding, data_format, dilations, layout,
                                **beyond_tf)
    except ConvtError as e:
        raise ConvtError(f"{x_ref.label} '{x_ref}': {e}") from None


def _write_options(compression, level) -> io.WriteOptions:
    if compression is not None and compression not in ("gzip", "lzf"):
        raise ConvtError(f"compression: expected None, 'gzip' or 'lzf', got {compression!r}")
    if level is not None:
        if compression != "gzip":
            raise ConvtError(f"--compression-level: applies to --compression gzip only, got level {level!r} with "
                             f"{'no compression' if compression is None else repr(compression)}")
        if not isinstance(level, numbers.Integral) or isinstance(level, bool) or not 0 <= level <= 9:
            raise ConvtError(f"--compression-level: expected an integer 0..9, got {level!r}")
    return io.WriteOptions(compression=compression, level=None if level is None else int(level))


def _open_filters(ref, layout: str):
    """_open for FILTERS stored in `layout` (a checked name): the (*kernel, out, in) shape, and a view in that
    order."""
    shape, dtype, load = _open(ref)
    if layout == "tf":
        return shape, dtype, load
    problem = layout_rank_problem(layout, shape)
    if problem:
        ref.fail(problem)
    return filters_shape_as_tf(layout, shape), dtype, lambda: as_tf_filters(load(), layout)


def _open(ref):
    """(shape, dtype, load): the header now, the data on demand; stdin can only be read whole, at once."""
    if ref.is_std:
        a = io.load(ref)
        return a.shape, a.dtype, lambda: a
    shape, dtype = io.read_header(ref)
    return shape, dtype, lambda: io.load(ref)


def _dtype_name(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        name = value.strip().lower()
    else:
        try:
            name = np.dtype(value).name
        except TypeError:
            name = None
    if name not in DTYPES:
        raise ConvtError(f"dtype: expected None or one of {', '.join(DTYPES)}, got {value!r}")
    return name


def _memory_limit(value) -> int | None:
    if value is None or isinstance(value, str):
        return parse_size("max_memory", value)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0:
        return int(value)
    raise ConvtError(f"max_memory: expected None, a number of bytes >= 0 or a size like 512M, 2G, 1.5GiB, got "
                     f"{value!r}")


def _reporter(progress):
    """report(n, done, total) after each piece of n batch elements, in whichever form `progress` takes."""
    if progress is None:
        return lambda n, done, total: None
    if callable(getattr(progress, "update", None)):
        return lambda n, done, total: progress.update(n)
    if callable(progress):
        return lambda n, done, total: progress(done, total)
    raise ConvtError(f"progress: expected None, a callable progress(done, total) or an object with update(n), got "
                     f"{progress!r}")


def _conv_transpose_of(plan, w, threads):
    """x -> conv_transpose(x, w) under plan, for every piece: the filters (Winograd's transform of them included)
    prepared once per run, not once per piece."""
    prepared = engine.prepare(plan, w)
    return lambda x, n=threads: prepared.run(x, threads=n)


# of the --json summaries; 2: resolved padding pairs, padding_given, wall_seconds, pieces; 3: output_padding, groups
SCHEMA_VERSION = 3


def _summary(plan, dtype, refs, layout="tf") -> dict:
    given = plan.spec.padding
    info = {
        "schema_version": SCHEMA_VERSION, "convt_version": __version__,
        "input": str(refs[0]), "filters": str(refs[1]),
        "input_shape": list(plan.input_shape), "filters_shape": list(plan.filters_shape),
        "filter_layout": layout,
        "output_shape": list(plan.output_shape), "dtype": dtype.name,
        "strides": list(plan.spec.strides), "dilations": list(plan.spec.dilations),
        "padding": [list(p) for p in plan.pads],
        "padding_given": given if isinstance(given, str) else [list(p) for p in given],
        "data_format": plan.spec.data_format,
        "pads": [list(p) for p in plan.pads],
        "output_padding": None if plan.output_padding is None else list(plan.output_padding),
        "groups": plan.groups,
        "legal_output_sizes": [list(r) for r in plan.legal_ranges],
        "flops": plan.flops,
        "output_bytes": int(dtype.itemsize) * math.prod(int(v) for v in plan.output_shape),
    }
    if len(refs) > 2:
        info["output"] = str(refs[2])
    return info
