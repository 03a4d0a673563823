"""conv_transpose and verify on dask arrays: lazy, chunked along the batch, computed by convt on Dask's workers.

    import dask.array as da, convt_cli.dask
    x = da.from_zarr("in.zarr")                      # (batch, *spatial, channels), chunked along the batch
    y = convt_cli.dask.conv_transpose(x, w, strides=2)  # lazy: shape, dtype and chunks known, nothing computed
    y.to_zarr("out.zarr")                            # or y.compute(), da.store(...), with any scheduler
    report = convt_cli.dask.verify(x, w, y, strides=2)  # the adjoint check, a reduction over the chunks

An input chunked along the batch only: each output chunk is the conv_transpose of one input chunk (its batch
elements), bitwise the in-process result whatever the chunks (batch elements are independent in the engine). An
input chunked along spatial axes too: the output comes in spatial tiles (`tiled`), each from the input window
that reaches it, as convt run tiles an image larger than memory. The filters go into the graph once, as one key
that every task depends on, so a worker receives them once, not once per task. verify joins spatial chunks.

Threads: Dask's own threads are the parallelism. Each task computes on one thread (the engine's bits never depend
on its threads), so a worker of N threads keeps N cores busy and never more, on every scheduler: threads,
processes, distributed.

dask is imported here, and only here: `pip install 'convt[dask]'`.
"""

from __future__ import annotations

import numpy as np

from .errors import ConvtError


def _dask():
    try:
        import dask
        import dask.array
    except ImportError:
        raise ConvtError("the dask path needs dask: pip install 'convt[dask]'") from None
    return dask


def _as_dask(x, name: str):
    dask = _dask()
    if not isinstance(x, dask.array.Array):
        x = dask.array.asarray(x)
    if x.ndim < 1:
        raise ConvtError(f"{name}: expected an array with a batch axis, got a scalar")
    if any(np.isnan(c) for chunks in x.chunks for c in chunks):
        raise ConvtError(f"{name}: the input's chunk sizes are unknown (as after boolean indexing): call "
                         f"x.compute_chunk_sizes() first")
    return x


def _batch_chunks(x, name: str):
    """x as a dask array chunked along its first axis only (the others whole)."""
    x = _as_dask(x, name)
    if any(len(c) > 1 for c in x.chunks[1:]):
        x = x.rechunk({axis: -1 for axis in range(1, x.ndim)})
    return x


def _plan(op: str, x_shape, w: np.ndarray, output_shape, strides, padding, data_format, dilations, filter_layout,
          output_padding, groups):
    from .engine.layout import plan_with_layout, tf_filters

    w, layout = tf_filters(op, w, filter_layout)
    plan = plan_with_layout(tuple(x_shape), w.shape, output_shape, strides, padding, data_format, dilations, layout,
                            output_padding=output_padding, groups=groups)
    return plan, w


def conv_transpose(input, filters, output_shape=None, strides=1, padding="SAME", data_format=None, dilations=None,
                   name=None, *, filter_layout="tf", output_padding=None, groups=1):
    """convt_cli.conv_transpose of a dask array, as a lazy dask array.

    Args:
        input: a dask.array (anything else is wrapped by dask.array.asarray), chunked along the batch axis and
            any spatial axes (chunks along the channels are joined).
        filters: a NumPy array (or what np.asarray takes), as for convt_cli.conv_transpose; it is one key of the
            graph, sent to each worker once.
        output_shape, strides, padding, data_format, dilations, name, filter_layout, output_padding, groups: as for
            convt_cli.conv_transpose; output_shape's batch, when given, is the input's.

    Returns:
        A dask.array of the output's shape and dtype, chunked along the batch as the input is, and (an input chunked
        along spatial axes) along them in tiles of the input's largest chunk times the stride; one chunk across the
        channels. Every argument is checked now, with the same messages as in memory.
    """
    from .engine.dtypes import check_dtypes

    dask = _dask()
    x = _as_dask(input, "conv_transpose")
    w = filters if isinstance(filters, np.ndarray) else np.asarray(filters)
    check_dtypes("conv_transpose", x.dtype, w.dtype)
    plan, w = _plan("conv_transpose", x.shape, w, output_shape, strides, padding, data_format, dilations,
                    filter_layout, output_padding, groups)
    first = plan.spec.channels_first
    channel = 1 if first else x.ndim - 1
    if len(x.chunks[channel]) > 1:
        x = x.rechunk({channel: -1})  # a tile takes every channel
    w_key = dask.delayed(w, pure=True)
    dtype = x.dtype.newbyteorder("=")
    if all(len(x.chunks[axis]) == 1 for axis in _spatial_axes(plan)):
        return lazy(x, w_key, plan, dtype)
    return tiled(x, w_key, plan, dtype)


def _spatial_axes(plan) -> range:
    n = len(plan.input_spatial)
    return range(2, n + 2) if plan.spec.channels_first else range(1, n + 1)


def tiled(x, w_key, plan, dtype):
    """conv_transpose of an x chunked along spatial axes too: the output in spatial tiles, one task per batch chunk
    and tile (shapes.tile_plan: each tile from the input window that reaches it, its halo read across the input's
    chunks, with its own pads). Along each axis the tiles are the input's largest chunk times the stride: as many
    tiles as input chunks, and the output chunked by them. The bits are those of this tiling on every run and
    scheduler; against an untiled run, the same for int32 and within float rounding (each tile's strategy follows
    its shape), as convt run's tiles."""
    import itertools

    import dask.array

    from .engine.layout import at, shaped
    from .shapes import tile_plan, tile_starts

    first = plan.spec.channels_first
    axes = _spatial_axes(plan)
    sizes = [max(x.chunks[axis]) * s for axis, s in zip(axes, plan.spec.strides)]
    boxes = [tile_starts(o, t) for o, t in zip(plan.output_spatial, sizes)]
    starts = batch_starts(x)
    grid = np.empty((len(x.chunks[0]), *(len(b) for b in boxes)), dtype=object)
    for (j, (b0, nb)), where in itertools.product(enumerate(zip(starts, x.chunks[0])),
                                                  itertools.product(*(range(len(b)) for b in boxes))):
        box = tuple(b[k] for b, k in zip(boxes, where))
        sub, window = tile_plan(plan, box)
        part = x[(slice(b0, b0 + nb), *at(first, tuple(slice(i0, i1) for i0, i1 in window)))]
        shape = (nb, *shaped(first, tuple(o1 - o0 for o0, o1 in box), plan.out_channels))
        block = dask.delayed(_tile, pure=True)(part, w_key, sub)
        grid[(j, *where)] = dask.array.from_delayed(block, shape, dtype=dtype, meta=np.empty((0,) * x.ndim, dtype))
    grid = np.expand_dims(grid, 1 if first else grid.ndim)  # the channel axis: one block across
    return dask.array.block(grid.tolist())


def _tile(x: np.ndarray, w: np.ndarray, sub) -> np.ndarray:
    """One output tile of a batch chunk from its input window, on one thread."""
    from . import engine

    return engine.prepare(sub, w).run(np.ascontiguousarray(x), threads=1)


def lazy(x, w_key, plan, dtype):
    """The dask array of conv_transpose under `plan` of x (chunked along the batch only), the filters given as one
    Delayed key (sent to a worker once); each chunk computed on one thread."""
    import dask.array

    chunks = (x.chunks[0], *((int(n),) for n in plan.output_shape[1:]))
    return dask.array.map_blocks(_chunk, x, w_key, plan, dtype=dtype, chunks=chunks,
                                 meta=np.empty((0,) * x.ndim, dtype), token="convt-conv_transpose")


def _chunk(x: np.ndarray, w: np.ndarray, plan) -> np.ndarray:
    """One input chunk's output, on one thread (Dask's threads are the parallelism), as convt run computes a
    piece: the plan's batch is the whole input's, and any chunk of it runs."""
    from . import engine

    return engine.prepare(plan, w).run(x, threads=1)


def verify(input, filters, output, strides=1, padding="SAME", data_format=None, dilations=None, probes=None, seed=0,
           rtol=None, *, filter_layout="tf", output_padding=None, groups=1, compute=True):
    """convt_cli.verify.verify_conv_transpose on dask arrays: each batch chunk's sums on a worker, combined into the
    report verify_conv_transpose gives in memory (the same numbers, whatever the chunks).

    input and output may be dask arrays or anything dask.array.asarray takes; the output is rechunked along the
    batch as the input is. compute=False returns a dask Delayed of the report instead.
    """
    from .engine.dtypes import check_dtypes
    from .verify import AdjointCheck

    dask = _dask()
    x = _batch_chunks(input, "verify")
    y = _batch_chunks(output, "verify")
    w = filters if isinstance(filters, np.ndarray) else np.asarray(filters)
    check_dtypes("verify", x.dtype, w.dtype)
    if x.ndim >= 3 and y.ndim != x.ndim:
        raise ConvtError(f"verify: output_shape {tuple(y.shape)} must have rank {x.ndim} like the input (batch, "
                         f"spatial and channels in data_format order), got rank {y.ndim}")
    plan, w = _plan("verify", x.shape, w, y.shape, strides, padding, data_format, dilations, filter_layout,
                    output_padding, groups)
    if y.dtype.name != x.dtype.name:
        raise ConvtError(f"verify: output dtype {y.dtype.name} must match the input and filters dtype {x.dtype.name}")
    check = AdjointCheck(plan, w, x.dtype.name, probes=probes, seed=seed, rtol=rtol, threads=1)  # checks the flags
    w_key = dask.delayed(w, pure=True)
    parts = sums(x, y.rechunk({0: x.chunks[0]}), w_key, plan, check, rtol)
    report = dask.delayed(combine, pure=True)(parts, plan, w_key, x.dtype.name, check.k, check.seed, rtol)
    return report.compute() if compute else report


def batch_starts(x) -> list[int]:
    """The first batch element of each of x's batch chunks."""
    return np.cumsum((0, *x.chunks[0][:-1])).tolist()


def sums(x, y, w_key, plan, check, rtol) -> list:
    """Delayed chunk_sums of each batch chunk of x and y (chunked alike), for `check`'s dtype, probes and seed."""
    import dask

    return [dask.delayed(chunk_sums, pure=True)(xb, yb, w_key, plan, check.dtype, check.k, check.seed, rtol, int(b0))
            for xb, yb, b0 in zip(x.to_delayed().ravel(), y.to_delayed().ravel(), batch_starts(x))]


def chunk_sums(x, y, w, plan, dtype, probes, seed, rtol, offset):
    """One batch chunk's part of the check: what AdjointCheck.add keeps of it."""
    from .verify import AdjointCheck

    check = AdjointCheck(plan, w, dtype, probes=probes, seed=seed, rtol=rtol, threads=1)
    check.add(x, y, batch_offset=offset)
    return check.nonfinite, check.parts


def combine(parts, plan, w, dtype, probes, seed, rtol):
    """The report of chunk_sums' parts (any order), as one AdjointCheck fed every chunk gives it."""
    from .verify import AdjointCheck

    check = AdjointCheck(plan, w, dtype, probes=probes, seed=seed, rtol=rtol, threads=1)
    for nonfinite, chunk_parts in parts:
        check.nonfinite += nonfinite
        check.parts.extend(chunk_parts)
    return check.report()
