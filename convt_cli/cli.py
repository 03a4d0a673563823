"""The `convt` command line: the only module that imports click.

Each command parses its flags, calls the library (stream.py for files, io.py for listings) and prints what it
returns; every user mistake becomes one `Error: ...` line on stderr and exit code 2 (1 is kept for `verify`
finding a mismatch). NumPy loads only once a command runs, so that `convt --help` starts as fast as click alone.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import sys

import click
from click.shell_completion import BashComplete, CompletionItem, add_completion_class

from . import __version__, completion
from .dtype_names import DTYPES
from .errors import ConvtError
from .interrupts import caused_by_signal, deferred, install, stop_if_signalled

EXIT_MISMATCH, EXIT_TROUBLE = 1, 2
EXIT_PIPE = 128 + 13  # what a shell reports for a tool that SIGPIPE ended, as `cat` or `gzip` in `... | head`

def _available_memory():
    """The budget's default (MemAvailable), looked up here at each run so that it can be stood in for."""
    from .stream import mem_available

    return mem_available()


class _Interrupted(Exception):
    """Ctrl-C, carried past click, which would print an empty line for it; its text says what was written."""

    def __init__(self, written: str = "no output was written"):
        super().__init__(written)
        self.written = written


class _PipeClosed(Exception):
    """BrokenPipeError, carried past click, which would exit 1 for it: the code of a verify mismatch."""


class ConvtGroup(click.Group):
    """Translates every user mistake (ours or click's) into a single `Error:` line and exit code 2."""

    def make_context(self, *args, **kwargs):
        try:  # click would print a blank line for an interrupt while it parses
            return super().make_context(*args, **kwargs)
        except KeyboardInterrupt as e:
            raise _Interrupted(getattr(e, "written", "no output was written")) from None

    def invoke(self, ctx):
        try:
            stop_if_signalled()  # one held while click loaded and parsed
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            raise _Interrupted(getattr(e, "written", "no output was written")) from None
        except BrokenPipeError:
            raise _PipeClosed from None
        except Exception as e:
            if isinstance(e, (_Interrupted, _PipeClosed)) or not caused_by_signal(e):
                raise
            raise _Interrupted() from None  # a signal that came out wrapped in another exception

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:  # bare `convt` or `convt run`: the usage, as written
            e.show()
            code = EXIT_TROUBLE
        except (ConvtError, click.ClickException) as e:
            message = e.format_message() if isinstance(e, click.ClickException) else str(e)
            click.echo(f"Error: {' '.join(message.split())}", err=True)
            code = EXIT_TROUBLE
        except (_Interrupted, KeyboardInterrupt, click.exceptions.Abort) as e:
            if sys.stderr.isatty():  # off the line where the terminal echoed ^C; a log gets just the one line
                click.echo(err=True)
            written = getattr(e, "written", "no output was written")
            click.echo(f"Error: interrupted; {written}", err=True)
            code = EXIT_TROUBLE
        except MemoryError:  # the estimate said it would fit (or --max-memory allowed it), the system disagreed
            click.echo("Error: out of memory; no output was written: pass a smaller --max-memory to work in "
                       "smaller pieces, or use a lower-precision --dtype", err=True)
            code = EXIT_TROUBLE
        except (_PipeClosed, BrokenPipeError):  # the reader went away (`| head`): quietly, as tools in a pipeline do
            _drop_stdout()
            code = EXIT_PIPE
        code = code or 0
        if standalone_mode:
            sys.exit(code)
        return code


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush finds no closed pipe to complain about."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


# ---------------------------------------------------------------------------------------------------------
# Shell completion: completion.py says what a word completes to, these hand it to click


def _items(candidates) -> list[CompletionItem]:
    return [CompletionItem(c.value, type=c.type) for c in candidates]


def _complete(candidates):
    """A completion.py function as a click shell_complete= callback."""
    return lambda ctx, param, incomplete: _items(candidates(incomplete))


_array_ref = _complete(completion.complete_array_ref)  # INPUT, FILTERS, [OUTPUT], -o


@add_completion_class
class _BashComplete(BashComplete):
    """click's bash completion, also for words bash splits at ':' or '=' (data.h5:/in, --padding=S)."""

    _kept = ""

    def get_completion_args(self):
        args, incomplete, self._kept = completion.bash_words(*super().get_completion_args())
        return args, incomplete

    def format_completion(self, item):
        return f"{item.type},{completion.bash_value(item.value, self._kept)}"


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
    """Comma-separated integers (2 or 1,2,2,1) -> [int]; `example` is what the message shows for this flag."""

    name = "integers"

    def __init__(self, example: str = "2 or 1,2,2,1"):
        self.example = example

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            return [int(v) for v in value.split(",")]
        except ValueError:
            self.fail(f"expected comma-separated integers like {self.example}, got '{value}'", param, ctx)


class Padding(_Flag):
    """SAME, VALID, SAME_UPPER, SAME_LOWER (any case), p (every side), lo:hi (every axis) or lo:hi per spatial axis
    (0:1,1:1) -> the name, p, (lo, hi) or [(lo, hi)]."""

    name = "padding"

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        if value.strip().upper() in ("SAME", "VALID", "SAME_UPPER", "SAME_LOWER"):
            return value.strip().upper()
        if re.fullmatch(r"[+-]?[0-9]+", value.strip()):  # ASCII digits: str.isdigit() takes '²', int() does not
            return int(value)
        pairs = []
        for part in value.split(","):
            lo, sep, hi = part.partition(":")
            try:
                if not sep:
                    raise ValueError
                pairs.append((int(lo), int(hi)))
            except ValueError:
                self.fail(f"expected SAME, VALID, SAME_LOWER, p, lo:hi, or lo:hi per spatial axis like 0:1,1:1, got "
                          f"'{value}'", param, ctx)
        return pairs[0] if len(pairs) == 1 else pairs

    def shell_complete(self, ctx, param, incomplete):
        return _items(completion.complete_padding(incomplete))


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
        click.option("--output-shape", metavar="S", type=IntList("8,64,64,128 (full) or 64,64 (spatial)"),
                     help="Full shape in data-format order (8,64,64,128) or spatial only (64,64). "
                          "Default: I*s (SAME) or (I-1)*s+(K-1)*d+1 (VALID) per axis."),
        click.option("--strides", metavar="S", type=IntList(), default="1", show_default=True,
                     help="One value, one per spatial axis, or N+2 in data-format order (2 or 1,2,2,1)."),
        click.option("--padding", metavar="P", type=Padding(), default="SAME", show_default=True,
                     help="SAME, VALID (any case), or lo:hi per spatial axis (0:1,1:1); beyond TF: SAME_LOWER "
                          "(the odd pad first; SAME_UPPER is SAME), p (p:p on every axis), lo:hi (every axis)."),
        click.option("--data-format", metavar="F", shell_complete=_complete(completion.complete_data_format),
                     help="NWC/NCW, NHWC/NCHW, NDHWC/NCDHW, channels_last or channels_first. "
                          "Default: channels-last."),
        click.option("--dilations", metavar="D", type=IntList(), default="1", show_default=True,
                     help="Like --strides."),
        click.option("--dtype", type=click.Choice(DTYPES, case_sensitive=False),
                     help="Cast input and filters to this dtype before computing."),
        click.option("--filter-layout", type=click.Choice(["tf", "torch", "onnx", "jax"], case_sensitive=False),
                     default="tf", show_default=True,
                     help="How FILTERS is stored: tf [*k, out, in]; torch and onnx [in, out/groups, *k] (PyTorch's "
                          "and ONNX's ConvTranspose weight, not flipped); jax [*k, in, out] (lax.conv_transpose's "
                          "rhs with transpose_kernel=False, flipped; with transpose_kernel=True it is tf)."),
        click.option("--output-padding", metavar="P", type=IntList("1 or 1,0"),
                     help="Beyond TF: PyTorch's and ONNX's output_padding, one value or one per spatial axis, each "
                          "below the stride or the dilation: the output grows by it at the end."),
        click.option("--groups", metavar="G", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Beyond TF: PyTorch's and ONNX's groups; FILTERS' out axis holds out_channels/G "
                          "(depthwise: G = input channels)."),
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
dask_option = click.option(
    "--dask", "dask_address", metavar="[ADDRESS]", is_flag=False, flag_value="", default=None,
    help="Compute on a Dask cluster: a scheduler's address (tcp://host:8786; --dask alone: "
         "DASK_SCHEDULER_ADDRESS), or local[:N] for N worker processes started here. The workers read the input "
         "themselves (zarr, .h5, .npy on storage they all see) and write a zarr output; other outputs are gathered "
         "here. Each task computes on one thread of its worker; --max-memory is each task's budget.")
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


@cli.command(no_args_is_help=True)
@click.argument("input_ref", metavar="INPUT", shell_complete=_array_ref)
@click.argument("filters_ref", metavar="FILTERS", shell_complete=_array_ref)
@click.option("-o", "--output", "output_ref", required=True, metavar="OUTPUT", shell_complete=_array_ref,
              help="Where to write: .npy, .npz[:NAME], .h5[:/group/dataset], or - for stdout.")
@conv_options
@click.option("--force", is_flag=True, help="Replace an existing output file or dataset.")
@max_memory_option
@threads_option
@quiet_option
@click.option("--fail-fast", is_flag=True, help="With many tensors: stop at the first that fails.")
@click.option("--compression", type=click.Choice(["gzip", "lzf"], case_sensitive=False),
              help="Compress the output: .h5 gzip or lzf (chunked along the batch pieces), .npz gzip (deflate).")
@click.option("--compression-level", metavar="N", type=click.IntRange(0, 9),
              help="gzip level, 0 (none) to 9 (smallest). Default: 4 for .h5, 6 for .npz.")
@click.option("--copy-attrs", is_flag=True, help="Copy the input dataset's attributes to the output dataset "
                                                 "(.h5 to .h5; convt's provenance attributes win).")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON summary, one line per tensor, {\"error\": ...} for one that failed (on stderr "
                   "when the array goes to stdout).")
@dask_option
def run(input_ref, filters_ref, output_ref, output_shape, strides, padding, data_format, dilations, dtype,
        filter_layout, output_padding, groups, force, max_memory, threads, quiet, fail_fast, compression,
        compression_level, copy_attrs, as_json, dask_address):
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
      convt run data.zarr w.npy --strides 2 -o out.zarr --dask tcp://scheduler:8786
    """
    from . import io, stream

    with _cluster(dask_address, threads) as runners, _Bar(quiet, "convt run") as bar:
        options = dict(output_shape=output_shape, strides=strides, padding=padding, data_format=data_format,
                       dilations=dilations, dtype=dtype, filter_layout=filter_layout,
                       output_padding=output_padding, groups=groups, force=force,
                       max_memory=max_memory, threads=threads,
                       progress=bar, available_memory=_available_memory,
                       compression=compression and compression.lower(), compression_level=compression_level,
                       copy_attrs=copy_attrs)
        with _json_error(as_json, output_ref == "-", input=input_ref, output=output_ref):
            items = io.expand_items(input_ref, output_ref)
        if items is None:
            with _json_error(as_json, output_ref == "-", input=input_ref, output=output_ref):
                output_ref = io.fill_template(input_ref, output_ref)
                info = runners.run(input_ref, filters_ref, output_ref, **options)
            bar.close()
            if as_json:
                click.echo(json.dumps(info), err=output_ref == "-")
            return
        failed, tried, written = False, 0, []
        try:
            for info in stream.run_many(items, filters_ref, run=runners.run, **options):
                tried += 1
                bar.close()
                with deferred(reraise=False):  # an item's lines whole: run_many acts on the signal next
                    if "error" in info:
                        failed = True
                        click.echo(f"Error: {info['error']}", err=True)
                    else:
                        written.append(info["output"])
                    if as_json:
                        click.echo(json.dumps(info))
                if "error" in info and fail_fast:
                    break
        except KeyboardInterrupt:
            raise _Interrupted(_written_before(written, items, tried)) from None
    if failed:
        sys.exit(EXIT_TROUBLE)


@contextlib.contextmanager
def _cluster(dask_address, threads):
    """What runs and verifies the files: in this process (stream's functions), or with --dask on a cluster whose
    client is open for the whole command (cluster's, the client bound)."""
    import types

    from . import stream

    if dask_address is None:
        yield types.SimpleNamespace(run=stream.run_files, verify=stream.verify_files)
        return
    if threads is not None:
        raise ConvtError("--threads: with --dask each task computes on one thread of its worker, and the workers' "
                         "threads are the cluster's (dask worker --nthreads N): drop --threads")
    from . import cluster

    with cluster.connect(dask_address) as client:
        yield types.SimpleNamespace(run=functools.partial(cluster.run_job, client, dask_address),
                                    verify=functools.partial(cluster.verify_job, client, dask_address))


@contextlib.contextmanager
def _json_error(as_json: bool, err: bool = False, **fields):
    """With --json, a mistake is also one JSON line, {**fields, "error": message}: every tensor tried gets its
    line, whether it failed alone or as one of many. (A flag click cannot parse stops before any is tried.)"""
    try:
        yield
    except ConvtError as e:
        if as_json:
            click.echo(json.dumps({**fields, "error": " ".join(str(e).split())}), err=err)
        raise


def _written_before(written: list[str], items: list, tried: int) -> str:
    """What an interrupted many-tensor run leaves: the outputs finished, the item cut short, the ones not begun."""
    cut = f"'{items[tried][0]}' was not" if tried < len(items) else "nothing was cut short"
    rest = len(items) - tried - 1
    after = f", nor the {rest} after it" if rest > 0 else ""
    if not written:
        return f"no output was written ({cut}{after})"
    shown = written if len(written) <= 4 else [*written[:2], "...", written[-1]]
    return f"{len(written)} of {len(items)} outputs were written ({', '.join(shown)}); {cut}{after}"


@cli.command(no_args_is_help=True)
@click.argument("input_ref", metavar="INPUT", shell_complete=_array_ref)
@click.argument("filters_ref", metavar="FILTERS", shell_complete=_array_ref)
@conv_options
@max_memory_option
@threads_option
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def shape(input_ref, filters_ref, output_shape, strides, padding, data_format, dilations, dtype, filter_layout,
          output_padding, groups, max_memory, threads, as_json):
    """Print the output shape, legal output sizes, pads, FLOPs, bytes and the memory a run needs, reading headers
    only.

    \b
    Example:
      convt shape x.npy w.npy --strides 2 --padding valid
    """
    from .stream import plan_files

    stop_if_signalled()  # one held while NumPy loaded
    with _json_error(as_json, input=input_ref, filters=filters_ref):
        info = plan_files(input_ref, filters_ref, output_shape=output_shape, strides=strides, padding=padding,
                          data_format=data_format, dilations=dilations, dtype=dtype,
                          filter_layout=filter_layout, output_padding=output_padding, groups=groups,
                          max_memory=max_memory, threads=threads, available_memory=_available_memory)
    if as_json:
        click.echo(json.dumps(info))
        return
    ranges = ", ".join(f"{lo}..{hi}" for lo, hi in info["legal_output_sizes"])
    pads = ", ".join(f"{lo}:{hi}" for lo, hi in info["pads"])
    click.echo(f"output shape  {tuple(info['output_shape'])} {info['dtype']} ({info['data_format']})")
    click.echo(f"legal sizes   {ranges} (per spatial axis)")
    click.echo(f"pads          {pads} (lo:hi of the forward convolution)")
    if info["groups"] > 1:
        click.echo(f"groups        {info['groups']} (filters {tuple(info['filters_shape'])} as [*k, out/groups, in])")
    click.echo(f"flops         {info['flops']:,}")
    click.echo(f"output bytes  {info['output_bytes']:,}")
    if info["batch_per_chunk"] is None:
        click.echo(f"memory        does not fit: {info['memory_error']}")
        return
    pieces = info["pieces"]
    per = info["batch_per_chunk"]
    how = ("in one piece" if pieces <= 1
           else f"in {pieces:,} pieces of {per:,} batch element{'s' if per != 1 else ''}")
    if info["tile_shape"] is not None:
        how = f"in {pieces:,} spatial tiles of {'x'.join(map(str, info['tile_shape']))} output positions"
    click.echo(f"memory        {info['memory_bytes']:,} bytes at once, {how}")


@cli.command(no_args_is_help=True)
@click.argument("files", nargs=-1, required=True, metavar="FILE...", shell_complete=_array_ref)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per file ({\"error\": ...} for one "
                                                       "that cannot be read).")
def info(files, as_json):
    """List the arrays in each file: shape, dtype, and for HDF5 datasets chunks, compression, byte order,
    attributes and links; - reads stdin, a quoted glob lists every file it matches. A file that cannot be read
    gets its own Error: line, the others are still listed (exit 2 at the end).

    \b
    Examples:
      convt info samples/input.npy samples/batch.h5
      convt info 'samples/*.npy'
      convt run - w.npy -o - < x.npy | convt info -
    """
    try:
        failed = _list_files(files, as_json)
    except KeyboardInterrupt:
        raise _Interrupted("the listing stops here") from None
    if failed:
        sys.exit(EXIT_TROUBLE)


def _list_files(files, as_json: bool) -> bool:
    """info's listing, file by file; True when a file could not be listed."""
    from .io import expand_files, list_arrays, parse_ref

    failed = False
    for pattern in files:
        paths = expand_files(pattern)
        if not paths:
            paths, failed = [], True
            _info_error(pattern, f"FILE '{pattern}': the pattern matches no file", as_json)
        for path in paths:
            stop_if_signalled()  # one held while NumPy or h5py loaded, or inside the last file's h5py calls
            try:
                arrays = list_arrays(path)
            except ConvtError as e:
                failed = True
                _info_error(path, str(e), as_json)
                continue
            if as_json:
                click.echo(json.dumps({"file": path, "arrays": arrays}))
                continue
            base = path if path == "-" else parse_ref("FILE", path).path  # PATH of PATH:NAME
            for a in arrays:
                click.echo(_info_line(base, a))
    return failed


def _info_error(path: str, message: str, as_json: bool) -> None:
    message = " ".join(message.split())
    click.echo(f"Error: {message}", err=True)
    if as_json:
        click.echo(json.dumps({"file": path, "error": message}))


def _info_line(path: str, a: dict) -> str:
    """One array, as `h5ls -v` would say it in a line: name, shape, dtype, then what the file stores about it."""
    name = f"{path}:{a['name']}" if a["name"] else path
    if a.get("kind") in ("soft link", "external link"):
        return f"{name}  -> {a['target']} ({a['kind']})"
    if a.get("kind") == "group":
        return f"{name}/  (group)"
    shape = "(empty dataspace)" if a["shape"] is None else tuple(a["shape"])
    parts = [f"{name}  {shape} {a['dtype']}"]
    if a.get("byteorder") == ">":
        parts.append("big-endian")
    if a.get("chunks"):
        parts.append(f"chunks {tuple(a['chunks'])}")
    if a.get("compression"):
        level = a.get("compression_opts")
        parts.append(f"{a['compression']}" + (f" level {level}" if level is not None else "")
                     + (" shuffle" if a.get("shuffle") else ""))
    if a.get("attributes"):
        parts.append("attributes " + ", ".join(sorted(a["attributes"])))
    return "  ".join(parts)


@cli.command(no_args_is_help=True)
@click.argument("input_ref", metavar="INPUT", shell_complete=_array_ref)
@click.argument("filters_ref", metavar="FILTERS", shell_complete=_array_ref)
@click.argument("output_ref", metavar="[OUTPUT]", required=False, shell_complete=_array_ref)
@conv_options
@click.option("--probes", type=click.IntRange(min=1), help="Number of random probes (default 8).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the probes.")
@click.option("--rtol", type=click.FloatRange(min=0), help="Tolerance on each probe's residual (default: derived "
              "from the dtype and the number of terms per output element).")
@max_memory_option
@threads_option
@quiet_option
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON.")
@dask_option
def verify(input_ref, filters_ref, output_ref, output_shape, strides, padding, data_format, dilations, dtype,
           filter_layout, output_padding, groups, probes, seed, rtol, max_memory, threads, quiet, as_json,
           dask_address):
    """Check that OUTPUT is conv_transpose(INPUT, FILTERS) through the adjoint identity.

    For random probes x it compares <OUTPUT, x> with <INPUT, conv(x, FILTERS)>, never computing
    conv_transpose itself, so it can check results from TensorFlow, an accelerator, or convt. Without OUTPUT,
    convt computes the output and checks that. Many at once, as `run` makes them: INPUT a quoted glob with an
    OUTPUT template, or an HDF5 group with an OUTPUT group; one line per item. Exit code 0: passed; 1: a
    mismatch (or non-finite output); 2: trouble (with many: 2 if any item was trouble, else 1 if any failed).

    \b
    Examples:
      convt verify x.npy w.npy y.npy --strides 2
      convt verify x.npy w.npy --strides 2 --probes 16 --seed 7 --json
      convt verify 'in/*.npy' w.npy 'out/{stem}.npy' --strides 2
    """
    from . import io
    from .stream import verify_many

    options = dict(output_shape=output_shape, strides=strides, padding=padding, data_format=data_format,
                   dilations=dilations, dtype=dtype, filter_layout=filter_layout, output_padding=output_padding,
                   groups=groups, probes=probes, seed=seed,
                   rtol=rtol, max_memory=max_memory,
                   threads=threads, available_memory=_available_memory)
    with _json_error(as_json, input=input_ref, filters=filters_ref, output=output_ref):
        items = io.expand_items(input_ref, output_ref)
    with _cluster(dask_address, threads) as runners:
        if items is not None:
            _verify_many(functools.partial(verify_many, verify=runners.verify), items, filters_ref, options, quiet,
                         as_json)
            return
        with _Bar(quiet, "convt verify") as bar, _json_error(as_json, input=input_ref, filters=filters_ref,
                                                              output=output_ref):
            report = runners.verify(input_ref, filters_ref, output_ref, progress=bar, **options)
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    else:
        click.echo(report.summary())
    if not report.passed:
        sys.exit(EXIT_MISMATCH)


def _verify_many(verify_many, items, filters_ref, options, quiet, as_json) -> None:
    """One line per item (`OUTPUT: PASS: ...`, or its JSON); exit 2 if any item was trouble, else 1 if any failed."""
    mismatch = trouble = False
    checked = 0
    with _Bar(quiet, "convt verify") as bar:
        try:
            for info in verify_many(items, filters_ref, progress=bar, **options):
                checked += 1
                bar.close()
                with deferred(reraise=False):
                    if "error" in info:
                        trouble = True
                        click.echo(f"Error: {info['error']}", err=True)
                    else:
                        mismatch |= not info["passed"]
                        if not as_json:
                            item_in, item_out = items[checked - 1]
                            click.echo(f"{item_out or item_in + ' (computed)'}: {info['summary']}")
                    if as_json:
                        click.echo(json.dumps(info))
        except KeyboardInterrupt:
            raise _Interrupted(f"{checked} of {len(items)} items were checked") from None
    if trouble or mismatch:
        sys.exit(EXIT_TROUBLE if trouble else EXIT_MISMATCH)


def main():
    install()  # already done by the `convt` command's entry point (__main__.main), which comes here
    try:
        cli.main(prog_name="convt")
    finally:
        _ignore_signals()


def _ignore_signals() -> None:
    """The work is done and said: a signal now must not kill the exit. (Python puts back the default handlers
    when it shuts down, tens of milliseconds in which SIGINT or SIGTERM would end it with 130 or 143 after a
    complete run; it leaves ignored signals ignored.)"""
    import signal

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
