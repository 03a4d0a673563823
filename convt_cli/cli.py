"""The `convt` command line: the only module that imports click.

Each command reads, plans, computes and writes; every user mistake becomes one `Error: ...` line on stderr
and exit code 2 (1 is kept for `verify` finding a mismatch).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time

import click

from . import __version__
from .errors import ConvtError

EXIT_MISMATCH, EXIT_TROUBLE = 1, 2
DTYPES = ["float16", "bfloat16", "float32", "float64", "int32", "complex64", "complex128"]


class _Interrupted(Exception):
    """Ctrl-C, carried past click, which would print an empty line for it."""


class ConvtGroup(click.Group):
    """Translates every user mistake (ours or click's) into a single `Error:` line and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise _Interrupted from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except (ConvtError, click.ClickException) as e:
            message = e.format_message() if isinstance(e, click.ClickException) else str(e)
            click.echo(f"Error: {' '.join(message.split())}", err=True)
            code = EXIT_TROUBLE
        except (_Interrupted, KeyboardInterrupt, click.exceptions.Abort):
            if sys.stderr.isatty():  # off the line where the terminal echoed ^C; a log gets just the one line
                click.echo(err=True)
            click.echo("Error: interrupted; no output was written", err=True)
            code = EXIT_TROUBLE
        except MemoryError:  # the estimate said it would fit (or --max-memory allowed it), the system disagreed
            click.echo("Error: out of memory; no output was written: pass a smaller --max-memory to work in "
                       "smaller pieces, or use a lower-precision --dtype", err=True)
            code = EXIT_TROUBLE
        except BrokenPipeError:
            code = EXIT_TROUBLE  # the reader went away; nothing more can be said on stdout
        code = code or 0
        if standalone_mode:
            sys.exit(code)
        return code


def _ints(param: str, text: str | None):
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ConvtError(f"{param}: expected comma-separated integers like 2 or 1,2,2,1, got '{text}'") from None
    return values


def _padding(text: str):
    if text.strip().upper() in ("SAME", "VALID"):
        return text.strip().upper()
    pairs = []
    for part in text.split(","):
        lo, sep, hi = part.partition(":")
        try:
            if not sep:
                raise ValueError
            pairs.append((int(lo), int(hi)))
        except ValueError:
            raise ConvtError(
                f"--padding: expected SAME, VALID or lo:hi per spatial axis like 0:1,1:1, got '{text}'"
            ) from None
    return pairs


def conv_options(f):
    """The flags shared by run, shape and verify: the arguments of tf.nn.conv_transpose."""
    options = [
        click.option("--output-shape", metavar="S",
                     help="Full shape in data-format order (8,64,64,128) or spatial only (64,64). "
                          "Default: I*s (SAME) or (I-1)*s+(K-1)*d+1 (VALID) per axis."),
        click.option("--strides", metavar="S", default="1", show_default=True,
                     help="One value, one per spatial axis, or N+2 in data-format order (2 or 1,2,2,1)."),
        click.option("--padding", metavar="P", default="SAME", show_default=True,
                     help="SAME, VALID (any case), or lo:hi per spatial axis (0:1,1:1)."),
        click.option("--data-format", metavar="F",
                     help="NWC/NCW, NHWC/NCHW, NDHWC/NCDHW, channels_last or channels_first. "
                          "Default: channels-last."),
        click.option("--dilations", metavar="D", default="1", show_default=True,
                     help="Like --strides."),
        click.option("--dtype", type=click.Choice(DTYPES, case_sensitive=False),
                     help="Cast input and filters to this dtype before computing."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


max_memory_option = click.option(
    "--max-memory", metavar="SIZE",
    help="Memory budget (512M, 2G, 1.5GiB or bytes; powers of 1024). Default: the available memory "
         "(MemAvailable). Work that exceeds it streams over the batch axis in pieces that fit; refused, from "
         "the headers before any data is read, only when one batch element does not fit.")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bar (shown on a terminal's stderr "
                                                                 "when the work streams in pieces).")


def _plan_args(output_shape, strides, padding, data_format, dilations):
    return dict(
        output_shape=_ints("--output-shape", output_shape),
        strides=_ints("--strides", strides),
        padding=_padding(padding),
        data_format=data_format,
        dilations=_ints("--dilations", dilations),
    )


def _refs(input_ref, filters_ref):
    from .io import parse_ref

    x_ref, w_ref = parse_ref("INPUT", input_ref), parse_ref("FILTERS", filters_ref)
    if x_ref.is_std and w_ref.is_std:
        raise ConvtError("FILTERS '-': stdin is already the INPUT; give FILTERS as a file")
    return x_ref, w_ref


def _open(ref):
    """(shape, dtype, load): the header now, the data on demand; stdin can only be read whole, at once."""
    from . import io

    if ref.is_std:
        a = io.load(ref)
        return a.shape, a.dtype, lambda: a
    shape, dtype = io.read_header(ref)
    return shape, dtype, lambda: io.load(ref)


def _dtype_text(dtype) -> str:
    # numpy's names for these (void64, str672, bytes168) say nothing about what the file holds
    if dtype.names:
        return f"{dtype} (structured)"
    kinds = {"U": "text", "S": "bytes", "V": "raw bytes", "O": "Python objects or variable-length data"}
    return f"{dtype.str} ({kinds[dtype.kind]})" if dtype.kind in kinds else dtype.name


def _checked_dtype(cast, *refs_and_dtypes):
    """The dtype the run computes in: --dtype, else the shared dtype of INPUT and FILTERS."""
    import numpy as np

    from .engine import COMPUTE_DTYPES

    for ref, dtype in refs_and_dtypes:
        castable = dtype.kind in "biufc" or dtype.name == "bfloat16"
        if dtype.name not in COMPUTE_DTYPES and not (cast and castable):
            hint = "; pass --dtype float32 (or another) to cast it" if castable else ""
            ref.fail(f"dtype {_dtype_text(dtype)} is not supported: expected one of {', '.join(COMPUTE_DTYPES)}{hint}")
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


def _cast(ref, a, dtype, b0: int = 0, piece: bool = False):
    """a as dtype. numpy turns nan, inf and out-of-range values into arbitrary int32s without a word: refused.
    `a` is batch elements b0.. of the array; `piece` says that it is not all of them (the count is the piece's)."""
    import numpy as np

    if a.dtype == dtype:
        return a
    if dtype.kind == "i" and a.dtype.kind != "b":
        info = np.iinfo(dtype)
        with np.errstate(invalid="ignore"):
            bad = ~((a >= info.min) & (a <= info.max))  # nan compares false
        count = int(np.count_nonzero(bad))
        if count:
            where = [int(i) for i in np.argwhere(bad)[0]]
            value = a[tuple(where)]
            where[0] += b0
            within = f" in batch elements {b0}..{b0 + len(a) - 1}" if piece else ""
            raise ConvtError(
                f"--dtype {dtype.name}: {ref.label} holds {count} value{'s' if count > 1 else ''}{within} that "
                f"{'are' if count > 1 else 'is'} not finite or outside {dtype.name} ({value} at {where}): "
                f"{dtype.name} cannot represent {'them' if count > 1 else 'it'}"
            )
    with np.errstate(all="ignore"):  # float16 overflow gives inf, as TF's cast does; not a warning line
        return a.astype(dtype)


_SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}


def _size(param: str, text: str | None) -> int | None:
    """Bytes from 512M, 2G, 1.5GiB, 100 (units are powers of 1024, with or without B / iB, any case)."""
    import re

    if text is None:
        return None
    found = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([KMGTP])(?:I?B)?|B)?\s*", text, flags=re.IGNORECASE)
    if not found:
        raise ConvtError(f"{param}: expected a size like 512M, 2G, 1.5GiB or a number of bytes, got '{text}'")
    from fractions import Fraction

    return int(Fraction(found[1]) * _SIZE_UNITS[(found[2] or "").upper()])


def _bytes_text(n: int) -> str:
    for unit in ("PiB", "TiB", "GiB", "MiB", "KiB"):
        scale = _SIZE_UNITS[unit[0]]
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _available_memory() -> int | None:
    """MemAvailable of /proc/meminfo: what can be allocated without swapping; None where it is not known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(op: str, needs, batch: int, max_memory: int | None) -> int:
    """The number of batch elements to hold at once: the whole batch when it fits, else the most that fit (the
    run then streams over the batch axis). Refuses, before anything is read or allocated, only when a single
    batch element does not fit.

    needs(b) -> {part: bytes} for b batch elements at once (growing with b); the limit is --max-memory, else
    the available memory.
    """
    parts = needs(batch)
    total = sum(parts.values())
    available = _available_memory()
    limit = max_memory if max_memory is not None else available
    if total <= sys.maxsize and (limit is None or total <= limit):
        return max(1, batch)
    if limit is None or limit > sys.maxsize:
        limit, why = sys.maxsize, "more than this machine can address"
    elif max_memory is not None:
        seen = f" (available: {_bytes_text(available)})" if available is not None else ""
        why = f"--max-memory is {_bytes_text(max_memory)}{seen}"
    else:
        why = f"only {_bytes_text(available)} is available"
    fits, too_many = 0, batch + 1  # the largest batch that fits, by bisection: needs() may not be linear
    while too_many - fits > 1:
        mid = (fits + too_many) // 2
        fits, too_many = (mid, too_many) if sum(needs(mid).values()) <= limit else (fits, mid)
    if fits >= 1:
        return fits
    more = "a larger --max-memory" if max_memory is not None else "--max-memory SIZE if more can be had (swap)"
    one = needs(1)
    listed = ", ".join(f"{name} {_bytes_text(n)}" for name, n in one.items())
    raise ConvtError(
        f"{op} needs about {_bytes_text(sum(one.values()))} for even one batch element ({listed}) but {why}: "
        f"use a lower-precision --dtype, smaller arrays, or {more}"
    )


def _check_space(ref, nbytes: int) -> None:
    """Refuse before computing an output the disk cannot hold (a full disk during the write is handled too)."""
    from .io import free_space

    free = free_space(ref)
    if free is not None and free < nbytes:
        ref.fail(f"needs about {_bytes_text(nbytes)} but only {_bytes_text(free)} is free where it goes: free "
                 f"some space or write it elsewhere")


def _needs(plan, x_dtype, w_dtype, dtype, output=None, whole=()):
    """needs(b) for check_memory: b batch elements of the arrays as read, their casts to dtype, and the output
    with the engine's work (or, given output=(shape, dtype), the output as read). `whole` names the arrays that
    are held whole whatever b ("input", "output": stdin and .npz members are read at once)."""
    import dataclasses
    import math

    from .engine import estimate_bytes

    def needs(batch):
        p = dataclasses.replace(plan, batch=batch)
        x_n, w_n = math.prod(p.input_shape), math.prod(p.filters_shape)
        held = {"input": math.prod(plan.input_shape) * x_dtype.itemsize if "input" in whole else 0,
                "output": math.prod(plan.output_shape) * output[1].itemsize if output and "output" in whole else 0}
        cast = (x_n if x_dtype != dtype else 0) + (w_n if w_dtype != dtype else 0)
        if output is None:
            work = estimate_bytes(p, dtype)
        else:
            work = math.prod((batch, *output[0][1:])) * output[1].itemsize
        return {"input": max(x_n * x_dtype.itemsize, held["input"]), "filters": w_n * w_dtype.itemsize,
                "output and work": work + cast * dtype.itemsize + held["output"]}

    return needs


def _with_verify_work(needs, plan, dtype, probes):
    """needs plus verify's own arrays, roughly: in float64 (complex128 for complex data) about five arrays the
    size of a group of batch elements (about 2**20 values, at least one element of OUTPUT, INPUT or the probe
    field), two of about 2**20 values, and the filters contracted with the probes."""
    import math

    from .verify import DEFAULT_PROBES

    k = probes or DEFAULT_PROBES
    item = 16 if dtype.kind == "c" else 8
    per_element = max(1, math.prod(plan.output_shape[1:]), math.prod(plan.input_shape[1:]),
                      k * math.prod(plan.output_spatial))
    taps_by_c_in = math.prod(plan.kernel) * plan.in_channels

    def with_work(batch):
        parts = needs(batch)
        group = min(batch, max(1, 2**20 // per_element)) * per_element
        parts["verify's work"] = item * (5 * group + 2 * 2**20 + 3 * math.prod(plan.filters_shape)
                                         + 2 * k * taps_by_c_in) if batch else 0
        return parts

    return with_work


def _quiet_arithmetic():
    """nan and inf propagate as in TF, and verify reports them; numpy's RuntimeWarnings about them would be
    stray lines on stderr."""
    import numpy as np

    return np.errstate(all="ignore")


def _summary(plan, dtype, args, refs):
    info = {
        "input": str(refs[0]), "filters": str(refs[1]),
        "input_shape": list(plan.input_shape), "filters_shape": list(plan.filters_shape),
        "output_shape": list(plan.output_shape), "dtype": dtype.name,
        "strides": list(plan.spec.strides), "dilations": list(plan.spec.dilations),
        "padding": plan.spec.padding if isinstance(plan.spec.padding, str) else [list(p) for p in plan.spec.padding],
        "data_format": plan.spec.data_format,
        "pads": [list(p) for p in plan.pads],
        "legal_output_sizes": [list(r) for r in plan.legal_ranges],
        "flops": plan.flops,
        "output_bytes": int(dtype.itemsize) * _prod(plan.output_shape),
    }
    if len(refs) > 2:
        info["output"] = str(refs[2])
    return info


def _timing(plan, seconds: float) -> dict:
    return {"seconds": round(seconds, 6),
            "gflop_per_s": round(plan.flops / seconds / 1e9, 3) if seconds > 0 else None}


def _prod(values):
    out = 1
    for v in values:
        out *= int(v)
    return out


@click.group(cls=ConvtGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="convt")
def cli():
    """Transposed convolution exactly as TensorFlow's tf.nn.conv_transpose, on .npy/.npz/.h5 arrays.

    Arrays are given as PATH.npy, PATH.npz[:NAME], PATH.h5[:/group/dataset], or - for a .npy stream on
    stdin (stdout for -o -). Exit codes: 0 success, 1 verify found a mismatch, 2 usage or input trouble.

    \b
    Example:
      convt run x.npy w.npy --strides 2 -o y.npy
    """


@cli.command()
@click.argument("input_ref", metavar="INPUT")
@click.argument("filters_ref", metavar="FILTERS")
@click.option("-o", "--output", "output_ref", required=True, metavar="OUTPUT",
              help="Where to write: .npy, .npz[:NAME], .h5[:/group/dataset], or - for stdout.")
@conv_options
@click.option("--force", is_flag=True, help="Replace an existing output file or dataset.")
@max_memory_option
@quiet_option
@click.option("--fail-fast", is_flag=True, help="With many tensors: stop at the first that fails.")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON summary, one line per tensor (on stderr when the array goes to stdout).")
def run(input_ref, filters_ref, output_ref, output_shape, strides, padding, data_format, dilations, dtype, force,
        max_memory, quiet, fail_fast, as_json):
    """Compute conv_transpose(INPUT, FILTERS) and write it to OUTPUT.

    FILTERS are spatial + [out_channels, in_channels] (TF's behaviour): the last axis matches INPUT's channels.
    Many tensors at once: INPUT an HDF5 group (every dataset in it, the same names under the OUTPUT group), or
    a quoted glob with an OUTPUT template using {stem}, {name} or {index}. A bad item is reported and the
    others still run (exit 2 at the end); --fail-fast stops at the first.

    \b
    Examples:
      convt run x.npy w.npy --strides 2 -o y.npy
      convt run data.h5:/layer1/x w.npy --strides 2 --padding valid -o out.h5:/layer1/y
      convt run - w.npy --strides 2 -o - < x.npy | convt info -
      convt run data.h5:/inputs/ w.npy --strides 2 -o out.h5:/outputs/
      convt run 'in/*.npy' w.npy --strides 2 -o 'out/{stem}.npy'
    """
    from . import io

    items = io.expand_items(input_ref, output_ref)
    if items is None:
        info = _run_one(input_ref, filters_ref, output_ref, output_shape, strides, padding, data_format, dilations,
                        dtype, force, max_memory, quiet)
        if as_json:
            click.echo(json.dumps(info), err=output_ref == "-")
        return
    failed = 0
    for item_in, item_out in items:
        try:
            info = _run_one(item_in, filters_ref, item_out, output_shape, strides, padding, data_format, dilations,
                            dtype, force, max_memory, quiet)
        except ConvtError as e:
            failed += 1
            message = " ".join(str(e).split())
            if not message.startswith(("INPUT ", "OUTPUT ", "FILTERS ")):
                message = f"INPUT '{item_in}': {message}"  # which of the many it was
            click.echo(f"Error: {message}", err=True)
            info = {"input": item_in, "output": item_out, "error": message}
            if fail_fast:
                if as_json:
                    click.echo(json.dumps(info))
                break
        if as_json:
            click.echo(json.dumps(info))
    if failed:
        sys.exit(EXIT_TROUBLE)


PIECE_BYTES = 8 << 20  # input + output of one piece of `run`: enough per piece to keep every thread busy


def _run_one(input_ref, filters_ref, output_ref, output_shape, strides, padding, data_format, dilations, dtype,
             force, max_memory, quiet) -> dict:
    """One INPUT -> OUTPUT: plan, check, then compute and write in batch chunks that fit the memory budget."""
    from . import io
    from .engine import run_conv_transpose
    from .shapes import plan_conv_transpose

    x_ref, w_ref = _refs(input_ref, filters_ref)
    out_ref = io.parse_ref("OUTPUT", output_ref, must_exist=False)
    io.check_output(out_ref, [x_ref, w_ref], force)
    args = _plan_args(output_shape, strides, padding, data_format, dilations)
    max_memory = _size("--max-memory", max_memory)
    x_src = io.Source(x_ref, whole=io.same_h5_file(out_ref, x_ref))
    try:
        w_shape, w_dtype, w_load = _open(w_ref)
        plan = plan_conv_transpose(x_src.shape, w_shape, **args)  # every shape error before any data is read
        out_dtype = _checked_dtype(dtype, (x_ref, x_src.dtype), (w_ref, w_dtype))
        whole = ("input",) if x_src.whole else ()
        chunk = check_memory("run", _needs(plan, x_src.dtype, w_dtype, out_dtype, whole=whole), plan.batch,
                             max_memory)
        # pieces of about PIECE_BYTES even when all would fit: the output need never be held whole
        per_image = (_prod(plan.input_shape[1:]) * x_src.dtype.itemsize + _prod(plan.output_shape[1:]) *
                     out_dtype.itemsize)
        chunk = min(chunk, max(1, PIECE_BYTES // max(1, per_image)))
        _check_space(out_ref, _prod(plan.output_shape) * out_dtype.itemsize)
        w = _cast(w_ref, w_load(), out_dtype)
        info = _summary(plan, out_dtype, args, (x_ref, w_ref, out_ref))
        provenance = {
            "convt_version": __version__,
            "convt_op": "conv_transpose",
            "convt_input": str(x_ref),
            "convt_filters": str(w_ref),
            "convt_parameters": {k: info[k] for k in ("output_shape", "strides", "padding", "data_format",
                                                       "dilations", "dtype", "pads")},
        }
        sink = io.Sink(out_ref, plan.output_shape, out_dtype, provenance, force)
        seconds = 0.0
        try:
            with _progress(plan.batch, chunk, quiet, "convt run") as bar:
                for b0 in range(0, plan.batch, chunk):
                    b1 = min(plan.batch, b0 + chunk)
                    x = _cast(x_ref, x_src.read(b0, b1), out_dtype, b0, chunk < plan.batch)
                    start = time.perf_counter()
                    with _quiet_arithmetic():
                        y = run_conv_transpose(plan, x, w)
                    seconds += time.perf_counter() - start
                    del x
                    sink.write(y)
                    del y
                    bar.update(b1 - b0)
                    _stop_if_signalled()
            _stop_if_signalled()
            sink.commit()
        except BaseException:
            sink.abort()
            raise
    finally:
        x_src.close()
    info.update(_timing(plan, seconds), batch_per_chunk=min(chunk, plan.batch))
    return info


class _NoBar:
    def update(self, n):
        pass


@contextlib.contextmanager
def _progress(total: int, chunk: int, quiet: bool, label: str):
    """Click's progress bar on stderr, only when the work comes in pieces and stderr is a terminal."""
    if quiet or chunk >= total or not sys.stderr.isatty():
        yield _NoBar()
        return
    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        yield bar


@cli.command()
@click.argument("input_ref", metavar="INPUT")
@click.argument("filters_ref", metavar="FILTERS")
@conv_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def shape(input_ref, filters_ref, output_shape, strides, padding, data_format, dilations, dtype, as_json):
    """Print the output shape, legal output sizes, pads, FLOPs and bytes, reading headers only.

    \b
    Example:
      convt shape x.npy w.npy --strides 2 --padding valid
    """
    from .shapes import plan_conv_transpose

    x_ref, w_ref = _refs(input_ref, filters_ref)
    args = _plan_args(output_shape, strides, padding, data_format, dilations)
    (x_shape, x_dtype, _), (w_shape, w_dtype, _) = _open(x_ref), _open(w_ref)
    plan = plan_conv_transpose(x_shape, w_shape, **args)
    out_dtype = _checked_dtype(dtype, (x_ref, x_dtype), (w_ref, w_dtype))
    info = _summary(plan, out_dtype, args, (x_ref, w_ref))
    if as_json:
        click.echo(json.dumps(info))
        return
    ranges = ", ".join(f"{lo}..{hi}" for lo, hi in info["legal_output_sizes"])
    pads = ", ".join(f"{lo}:{hi}" for lo, hi in info["pads"])
    click.echo(f"output shape  {tuple(info['output_shape'])} {info['dtype']} ({info['data_format']})")
    click.echo(f"legal sizes   {ranges} (per spatial axis)")
    click.echo(f"pads          {pads} (lo:hi of the forward convolution)")
    click.echo(f"flops         {info['flops']:,}")
    click.echo(f"output bytes  {info['output_bytes']:,}")


@cli.command()
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per file.")
def info(files, as_json):
    """List the arrays in each file: shape and dtype (and chunks for HDF5 datasets); - reads stdin.

    \b
    Examples:
      convt info samples/input.npy samples/batch.h5
      convt run - w.npy -o - < x.npy | convt info -
    """
    from .io import list_arrays

    for path in files:
        arrays = list_arrays(path)
        if as_json:
            click.echo(json.dumps({"file": path, "arrays": arrays}))
            continue
        for a in arrays:
            name = f"{path}:{a['name']}" if a["name"] else path
            chunks = f"  chunks {tuple(a['chunks'])}" if a.get("chunks") else ""
            shape = "(empty dataspace)" if a["shape"] is None else tuple(a["shape"])
            click.echo(f"{name}  {shape} {a['dtype']}{chunks}")


@cli.command()
@click.argument("input_ref", metavar="INPUT")
@click.argument("filters_ref", metavar="FILTERS")
@click.argument("output_ref", metavar="[OUTPUT]", required=False)
@conv_options
@click.option("--probes", type=click.IntRange(min=1), help="Number of random probes (default 8).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the probes.")
@click.option("--rtol", type=click.FloatRange(min=0), help="Tolerance on each probe's residual (default: derived "
              "from the dtype and the number of terms per output element).")
@max_memory_option
@quiet_option
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON.")
def verify(input_ref, filters_ref, output_ref, output_shape, strides, padding, data_format, dilations, dtype, probes,
           seed, rtol, max_memory, quiet, as_json):
    """Check that OUTPUT is conv_transpose(INPUT, FILTERS) through the adjoint identity.

    For random probes x it compares <OUTPUT, x> with <INPUT, conv(x, FILTERS)>, never computing
    conv_transpose itself, so it can check results from TensorFlow, an accelerator, or convt. Without OUTPUT,
    convt computes the output and checks that. Exit code 0: passed; 1: mismatch (or non-finite output); 2: trouble.

    \b
    Examples:
      convt verify x.npy w.npy y.npy --strides 2
      convt verify x.npy w.npy --strides 2 --probes 16 --seed 7 --json
    """
    from . import io
    from .engine import run_conv_transpose
    from .shapes import plan_conv_transpose
    from .verify import AdjointCheck

    x_ref, w_ref = _refs(input_ref, filters_ref)
    y_ref = None if output_ref is None else io.parse_ref("OUTPUT", output_ref)
    if y_ref is not None and y_ref.is_std and (x_ref.is_std or w_ref.is_std):
        raise ConvtError("OUTPUT '-': stdin is already used; give OUTPUT as a file")
    args = _plan_args(output_shape, strides, padding, data_format, dilations)
    max_memory = _size("--max-memory", max_memory)
    sources = [io.Source(x_ref)]
    try:
        x_src = sources[0]
        w_shape, w_dtype, w_load = _open(w_ref)
        y_src = None if y_ref is None else io.Source(y_ref)
        if y_src is not None:
            sources.append(y_src)
            if args["output_shape"] is None:
                args["output_shape"] = list(y_src.shape)
        plan = plan_conv_transpose(x_src.shape, w_shape, **args)
        if y_src is not None and tuple(y_src.shape) != plan.output_shape:
            y_ref.fail(f"has shape {tuple(y_src.shape)} but --output-shape asks for {plan.output_shape}")
        out_dtype = _checked_dtype(dtype, (x_ref, x_src.dtype), (w_ref, w_dtype))
        if y_src is not None and y_src.dtype.name != out_dtype.name:
            y_ref.fail(f"has dtype {y_src.dtype.name} but INPUT and FILTERS compute in {out_dtype.name}")
        whole = tuple(name for name, src in (("input", x_src), ("output", y_src)) if src is not None and src.whole)
        needs = _needs(plan, x_src.dtype, w_dtype, out_dtype, None if y_src is None else (y_src.shape, y_src.dtype),
                       whole=whole)
        chunk = check_memory("verify", _with_verify_work(needs, plan, out_dtype, probes), plan.batch, max_memory)
        w = _cast(w_ref, w_load(), out_dtype)
        check = AdjointCheck(plan, w, out_dtype.name, probes=probes, seed=seed, rtol=rtol)
        with _progress(plan.batch, chunk, quiet, "convt verify") as bar, _quiet_arithmetic():
            for b0 in range(0, plan.batch, chunk):
                b1 = min(plan.batch, b0 + chunk)
                x = _cast(x_ref, x_src.read(b0, b1), out_dtype, b0, chunk < plan.batch)
                y = run_conv_transpose(plan, x, w) if y_src is None else y_src.read(b0, b1)
                check.add(x, y, batch_offset=b0)
                del x, y
                bar.update(b1 - b0)
                _stop_if_signalled()
            report = check.report()
    finally:
        for src in sources:
            src.close()
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    else:
        click.echo(report.summary())
    if not report.passed:
        sys.exit(EXIT_MISMATCH)


_signalled: list[int] = []


def _terminated(signum, frame):
    # SIGTERM (what schedulers send) cleans up exactly as Ctrl-C does. Raised inside a finalizer (h5py closes
    # objects in weakref callbacks) the exception is swallowed, so the signal is also recorded for
    # _stop_if_signalled to find before anything is committed.
    _signalled.append(signum)
    raise KeyboardInterrupt


def _stop_if_signalled() -> None:
    if _signalled:
        raise KeyboardInterrupt


def main():
    import signal

    signal.signal(signal.SIGTERM, _terminated)
    signal.signal(signal.SIGINT, _terminated)
    cli.main(prog_name="convt")
