"""The `convt` command line: the only module that imports click.

Each command parses its flags, calls the library (stream.py for files, io.py for listings) and prints what it
returns; every user mistake becomes one `Error: ...` line on stderr and exit code 2 (1 is kept for `verify`
finding a mismatch). NumPy loads only once a command runs, so that `convt --help` starts as fast as click alone.
"""

from __future__ import annotations

import contextlib
import json
import sys

import click

from . import __version__
from .dtype_names import DTYPES
from .errors import ConvtError
from .interrupts import terminate

EXIT_MISMATCH, EXIT_TROUBLE = 1, 2

def _available_memory():
    """The budget's default (MemAvailable), looked up here at each run so that it can be stood in for."""
    from .stream import mem_available

    return mem_available()


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


# ---------------------------------------------------------------------------------------------------------
# Flag types: each value is parsed by click, and a bad one is named by its flag, like every other Error: line


class _FlagError(click.BadParameter):
    """`--strides: expected ..., got 'x'` rather than click's `Invalid value for '--strides': ...`."""

    def format_message(self) -> str:
        flag = max(self.param.opts, key=len) if self.param is not None else self.param_hint
        return f"{flag}: {self.message}"


class _Flag(click.ParamType):
    def fail(self, message, param=None, ctx=None):
        raise _FlagError(message, ctx=ctx, param=param)


class IntList(_Flag):
    """Comma-separated integers (2 or 1,2,2,1) -> [int]."""

    name = "integers"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            return [int(v) for v in value.split(",")]
        except ValueError:
            self.fail(f"expected comma-separated integers like 2 or 1,2,2,1, got '{value}'", param, ctx)


class Padding(_Flag):
    """SAME, VALID (any case) or lo:hi per spatial axis (0:1,1:1) -> "SAME", "VALID" or [(lo, hi)]."""

    name = "padding"

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        if value.strip().upper() in ("SAME", "VALID"):
            return value.strip().upper()
        pairs = []
        for part in value.split(","):
            lo, sep, hi = part.partition(":")
            try:
                if not sep:
                    raise ValueError
                pairs.append((int(lo), int(hi)))
            except ValueError:
                self.fail(f"expected SAME, VALID or lo:hi per spatial axis like 0:1,1:1, got '{value}'", param, ctx)
        return pairs


class Size(_Flag):
    """512M, 2G, 1.5GiB or bytes (powers of 1024) -> bytes."""

    name = "size"

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        from .stream import SIZE_EXPECTED, size_bytes  # only when the flag is given: its import loads NumPy

        size = size_bytes(value)
        if size is None:
            self.fail(f"expected {SIZE_EXPECTED}, got '{value}'", param, ctx)
        return size


def conv_options(f):
    """The flags shared by run, shape and verify: the arguments of tf.nn.conv_transpose."""
    options = [
        click.option("--output-shape", metavar="S", type=IntList(),
                     help="Full shape in data-format order (8,64,64,128) or spatial only (64,64). "
                          "Default: I*s (SAME) or (I-1)*s+(K-1)*d+1 (VALID) per axis."),
        click.option("--strides", metavar="S", type=IntList(), default="1", show_default=True,
                     help="One value, one per spatial axis, or N+2 in data-format order (2 or 1,2,2,1)."),
        click.option("--padding", metavar="P", type=Padding(), default="SAME", show_default=True,
                     help="SAME, VALID (any case), or lo:hi per spatial axis (0:1,1:1)."),
        click.option("--data-format", metavar="F",
                     help="NWC/NCW, NHWC/NCHW, NDHWC/NCDHW, channels_last or channels_first. "
                          "Default: channels-last."),
        click.option("--dilations", metavar="D", type=IntList(), default="1", show_default=True,
                     help="Like --strides."),
        click.option("--dtype", type=click.Choice(DTYPES, case_sensitive=False),
                     help="Cast input and filters to this dtype before computing."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


max_memory_option = click.option(
    "--max-memory", metavar="SIZE", type=Size(),
    help="Memory budget (512M, 2G, 1.5GiB or bytes; powers of 1024). Default: the available memory "
         "(MemAvailable). Work that exceeds it streams over the batch axis in pieces that fit; refused, from "
         "the headers before any data is read, only when one batch element does not fit.")
threads_option = click.option(
    "--threads", metavar="N", type=click.IntRange(min=1),
    help="Threads to compute on. Default: CONVT_NUM_THREADS, else every usable core. The result is bitwise "
         "the same for any number.")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bar (shown on a terminal's stderr "
                                                                 "when the work streams in pieces).")


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


class _Bar:
    """The library's progress(done, total): a _progress bar opened at the first piece, whose size tells whether
    more follow; close() ends it, before the next tensor's."""

    def __init__(self, quiet: bool, label: str):
        self.quiet, self.label = quiet, label
        self._stack, self._bar, self._done = contextlib.ExitStack(), None, 0

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            self._bar, self._done = self._stack.enter_context(_progress(total, done, self.quiet, self.label)), 0
        self._bar.update(done - self._done)
        self._done = done

    def close(self) -> None:
        self._stack.close()
        self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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
@threads_option
@quiet_option
@click.option("--fail-fast", is_flag=True, help="With many tensors: stop at the first that fails.")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON summary, one line per tensor (on stderr when the array goes to stdout).")
def run(input_ref, filters_ref, output_ref, output_shape, strides, padding, data_format, dilations, dtype, force,
        max_memory, threads, quiet, fail_fast, as_json):
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
    from . import io, stream

    with _Bar(quiet, "convt run") as bar:
        options = dict(output_shape=output_shape, strides=strides, padding=padding, data_format=data_format,
                       dilations=dilations, dtype=dtype, force=force, max_memory=max_memory, threads=threads,
                       progress=bar, available_memory=_available_memory)
        items = io.expand_items(input_ref, output_ref)
        if items is None:
            info = stream.run_files(input_ref, filters_ref, output_ref, **options)
            bar.close()
            if as_json:
                click.echo(json.dumps(info), err=output_ref == "-")
            return
        failed = False
        for info in stream.run_many(items, filters_ref, **options):
            bar.close()
            if "error" in info:
                failed = True
                click.echo(f"Error: {info['error']}", err=True)
            if as_json:
                click.echo(json.dumps(info))
            if "error" in info and fail_fast:
                break
    if failed:
        sys.exit(EXIT_TROUBLE)


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
    from .stream import plan_files

    info = plan_files(input_ref, filters_ref, output_shape=output_shape, strides=strides, padding=padding,
                      data_format=data_format, dilations=dilations, dtype=dtype)
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
@threads_option
@quiet_option
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON.")
def verify(input_ref, filters_ref, output_ref, output_shape, strides, padding, data_format, dilations, dtype, probes,
           seed, rtol, max_memory, threads, quiet, as_json):
    """Check that OUTPUT is conv_transpose(INPUT, FILTERS) through the adjoint identity.

    For random probes x it compares <OUTPUT, x> with <INPUT, conv(x, FILTERS)>, never computing
    conv_transpose itself, so it can check results from TensorFlow, an accelerator, or convt. Without OUTPUT,
    convt computes the output and checks that. Exit code 0: passed; 1: mismatch (or non-finite output); 2: trouble.

    \b
    Examples:
      convt verify x.npy w.npy y.npy --strides 2
      convt verify x.npy w.npy --strides 2 --probes 16 --seed 7 --json
    """
    from .stream import verify_files

    with _Bar(quiet, "convt verify") as bar:
        report = verify_files(input_ref, filters_ref, output_ref, output_shape=output_shape, strides=strides,
                              padding=padding, data_format=data_format, dilations=dilations, dtype=dtype,
                              probes=probes, seed=seed, rtol=rtol, max_memory=max_memory, threads=threads,
                              progress=bar, available_memory=_available_memory)
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    else:
        click.echo(report.summary())
    if not report.passed:
        sys.exit(EXIT_MISMATCH)


def main():
    import signal

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)
    cli.main(prog_name="convt")
