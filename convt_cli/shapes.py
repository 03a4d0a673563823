"""Argument normalization and all integer shape/padding math: no arrays, no I/O.

Everything here works on Python ints and tuples. The public entry points are `plan_conv_transpose` and
`plan_conv`, which validate every argument and return a frozen `Plan` that the engine trusts; the per-axis
helpers (`legal_output_range`, `pads_for`, ...) are small pure functions that the tests check exhaustively.

Per spatial axis, with I the transposed op's input size (= the forward conv's output size), O its output size
(= the forward conv's input size), K the kernel size, s the stride, d the dilation and eff = (K-1)*d + 1:

    output[o] += input[i] * filters[k]   for o = i*s + k*d - lo,   0 <= o < O

which is exactly TF's Conv*DBackpropInput; `pads_for` gives lo (and hi) as TF computes them.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

CHANNELS_LAST_NAMES = {1: "NWC", 2: "NHWC", 3: "NDHWC"}
CHANNELS_FIRST_NAMES = {1: "NCW", 2: "NCHW", 3: "NCDHW"}


def _fail(op: str, message: str):
    from .errors import ConvtError

    raise ConvtError(f"{op}: {message}")


def _unwrap(value):
    """A tensor (`.numpy()`) or another array-like (`__array__`) as the NumPy value it holds, without importing
    NumPy here; anything else as it is."""
    if isinstance(value, (str, bytes, list, tuple, numbers.Number)):
        return value
    to_numpy = getattr(value, "numpy", None)
    if callable(to_numpy):
        return to_numpy()
    return value.__array__() if hasattr(value, "__array__") else value


def _int(op: str, label: str, value) -> int:
    value = _unwrap(value)
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        value = value.item()  # a NumPy scalar or 0-d array: Python's int, float, bool or str
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _fail(op, f"{label} must be an integer, got {value!r}")
    return int(value)


def _int_sequence(op: str, label: str, value) -> tuple[int, ...]:
    """A list, tuple, 1-d array, tensor or array-like of integers (TF takes a list or a tensor) -> ints."""
    value = _unwrap(value)
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        _fail(op, f"{label} must be a sequence of integers, got {value!r}")
    ndim = getattr(value, "ndim", 1)
    if ndim != 1:
        shown = value.tolist() if callable(getattr(value, "tolist", None)) else value
        _fail(op, f"{label} must be one-dimensional, got {ndim}-d shape {tuple(value.shape)}: {shown!r}")
    return tuple(_int(op, f"{label}[{j}]", v) for j, v in enumerate(value))


# ---------------------------------------------------------------------------------------------------------
# Normalization: the many spellings of each argument become one frozen spec.


def normalize_data_format(op: str, data_format, n: int) -> bool:
    """Return True for channels-first. Accepts None, TF's strings for N <= 3, channels_last/channels_first."""
    if data_format is None:
        return False
    if not isinstance(data_format, str):
        _fail(op, f"data_format must be a string or None, got {data_format!r}")
    name = data_format.strip().upper()
    if name == "CHANNELS_LAST" or name == CHANNELS_LAST_NAMES.get(n):
        return False
    if name == "CHANNELS_FIRST" or name == CHANNELS_FIRST_NAMES.get(n):
        return True
    expected = [f"'{CHANNELS_LAST_NAMES[n]}'", f"'{CHANNELS_FIRST_NAMES[n]}'"] if n in CHANNELS_LAST_NAMES else []
    expected += ["'channels_last'", "'channels_first'"]
    fits = [r for r, names in ((1, "NWC NCW"), (2, "NHWC NCHW"), (3, "NDHWC NCDHW")) if name in names.split()]
    why = f" (it is for {fits[0]} spatial dims)" if fits else ""
    _fail(
        op,
        f"data_format={data_format!r} does not fit {n} spatial dim{'s' if n != 1 else ''} "
        f"(input rank {n + 2}){why}: expected {', '.join(expected[:-1])} or {expected[-1]}",
    )


def _spatial_positions(n: int, channels_first: bool) -> tuple[int, ...]:
    return tuple(range(2, n + 2)) if channels_first else tuple(range(1, n + 1))


def _non_spatial_positions(n: int, channels_first: bool) -> tuple[int, int]:
    """(batch, channel) positions in a full N+2 list in data_format order."""
    return (0, 1) if channels_first else (0, n + 1)


def normalize_window(op: str, label: str, value, n: int, channels_first: bool) -> tuple[int, ...]:
    """strides or dilations: None, an int, or a list of length 1, N or N+2 (data_format order) -> N ints >= 1."""
    if value is None:
        return (1,) * n
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        values = (int(value),) * n
        labels = [label] * n
    else:
        given = _int_sequence(op, label, value)
        if len(given) == 1:
            values, labels = given * n, [f"{label}[0]"] * n
        elif len(given) == n:
            values, labels = given, [f"{label}[{j}]" for j in range(n)]
        elif len(given) == n + 2:
            for pos, what in zip(_non_spatial_positions(n, channels_first), ("batch", "channel")):
                if given[pos] != 1:
                    _fail(op, f"{label}[{pos}]={given[pos]} is the {what} entry and must be 1")
            positions = _spatial_positions(n, channels_first)
            values = tuple(given[p] for p in positions)
            labels = [f"{label}[{p}]" for p in positions]
        else:
            _fail(
                op,
                f"{label} must have length 1, N={n} or N+2={n + 2}, got length {len(given)}: {list(given)}",
            )
    for lab, v in zip(labels, values):
        if v < 1:
            _fail(op, f"{lab}={v} must be >= 1")
    return tuple(values)


PADDING_NAMES = {"SAME": "SAME", "VALID": "VALID", "SAME_UPPER": "SAME_UPPER", "SAME_LOWER": "SAME_LOWER"}
ONNX_SAME = ("SAME_UPPER", "SAME_LOWER")  # ONNX's auto_pad: with an output_shape, ONNX's rule (see pads_for)


def normalize_padding(op: str, padding, n: int, channels_first: bool):
    """'SAME' / 'VALID' in any case, or explicit (lo, hi) pairs: N of them, or N+2 in data_format order (TF's
    spellings, with TF's behaviour). Beyond TF: 'SAME_UPPER' (SAME) and 'SAME_LOWER' (the odd pad first) as
    ONNX names them, an integer p (p on both sides of every axis) and one flat (lo, hi) for every axis."""
    if isinstance(padding, str):
        name = padding.strip().upper()
        if name in PADDING_NAMES:
            return PADDING_NAMES[name]
        _fail(op, f"padding={padding!r} is not a padding: expected 'SAME', 'VALID', 'SAME_LOWER', an integer or "
                  f"{n} (lo, hi) pairs")
    value = _unwrap(padding)
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        value = value.item()
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        padding = [(int(value), int(value))] * n
    elif (hasattr(value, "__len__") and len(value) == 2 and not isinstance(value, (str, bytes))
          and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)):
        padding = [(int(value[0]), int(value[1]))] * n  # one (lo, hi) for every axis
    if not hasattr(padding, "__len__"):
        _fail(op, f"padding must be 'SAME', 'VALID', 'SAME_LOWER', an integer or {n} (lo, hi) pairs, got "
                  f"{padding!r}")
    pairs = []
    for j, pair in enumerate(padding):
        got = _int_sequence(op, f"padding[{j}]", pair)
        if len(got) != 2:
            _fail(op, f"padding[{j}] must be a (lo, hi) pair, got {list(got)}")
        pairs.append(got)
    if len(pairs) == n + 2:
        for pos, what in zip(_non_spatial_positions(n, channels_first), ("batch", "channel")):
            if pairs[pos] != (0, 0):
                _fail(op, f"padding[{pos}]={list(pairs[pos])} is the {what} pair and must be (0, 0)")
        pairs = [pairs[p] for p in _spatial_positions(n, channels_first)]
    elif len(pairs) != n:
        _fail(op, f"explicit padding must have N={n} or N+2={n + 2} (lo, hi) pairs, got {len(pairs)}")
    for j, (lo, hi) in enumerate(pairs):
        if lo < 0 or hi < 0:
            _fail(op, f"padding for spatial axis {j} is ({lo}, {hi}): pads must be >= 0")
    return tuple(pairs)


@dataclass(frozen=True)
class ConvSpec:
    """Normalized flags: per spatial axis, in spatial order."""

    n: int
    channels_first: bool
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    padding: object  # "SAME", "SAME_UPPER", "SAME_LOWER", "VALID" or a tuple of N (lo, hi) pairs

    def axis_padding(self, j: int):
        return self.padding if isinstance(self.padding, str) else self.padding[j]

    @property
    def data_format(self) -> str:
        names = CHANNELS_FIRST_NAMES if self.channels_first else CHANNELS_LAST_NAMES
        return names.get(self.n, "channels_first" if self.channels_first else "channels_last")


def normalize_spec(op, n, strides=1, padding="SAME", data_format=None, dilations=None) -> ConvSpec:
    channels_first = normalize_data_format(op, data_format, n)
    return ConvSpec(
        n=n,
        channels_first=channels_first,
        strides=normalize_window(op, "strides", strides, n, channels_first),
        dilations=normalize_window(op, "dilations", dilations, n, channels_first),
        padding=normalize_padding(op, padding, n, channels_first),
    )


# ---------------------------------------------------------------------------------------------------------
# Per-axis integer math. `padding` is "SAME", "SAME_UPPER", "SAME_LOWER", "VALID" or a (lo, hi) pair.


def effective_kernel(k: int, d: int) -> int:
    return (k - 1) * d + 1


def _trunc_div(a: int, b: int) -> int:
    # C++ integer division, as in TF's GetWindowedOutputSizeVerbose
    q = abs(a) // b
    return q if a >= 0 else -q


def _same(padding) -> bool:
    return padding in ("SAME", "SAME_UPPER", "SAME_LOWER")


def forward_size(o: int, k: int, s: int, d: int, padding) -> int:
    """Output size of the forward conv on an input of size o (TF's rule; may be negative = illegal)."""
    if _same(padding):
        return _trunc_div(o + s - 1, s)
    p = 0 if padding == "VALID" else padding[0] + padding[1]
    return _trunc_div(o + p - effective_kernel(k, d) + s, s)


def legal_output_range(i: int, k: int, s: int, d: int, padding, op: int = 0):
    """(min, max) of the transposed output sizes O >= 0 with forward_size(O) == i, or None if there is none.
    ONNX's SAME_UPPER and SAME_LOWER also take what ONNX's output_shape takes: 1 <= O <= (I-1)*s + eff + op (a
    total pad >= 0)."""
    if _same(padding):
        if i == 0:
            return 0, 0
        if padding in ONNX_SAME:
            return 1, max(i * s, (i - 1) * s + effective_kernel(k, d) + op)
        return (i - 1) * s + 1, i * s
    p = 0 if padding == "VALID" else padding[0] + padding[1]
    eff = effective_kernel(k, d)
    if i == 0:  # truncation toward zero: -s < O + p - eff + s < s
        lo, hi = eff - p - 2 * s + 1, eff - p - 1
    else:
        lo, hi = (i - 1) * s + eff - p, i * s + eff - 1 - p
    lo = max(lo, 0)
    return (lo, hi) if lo <= hi else None


def default_output_size(i: int, k: int, s: int, d: int, padding) -> int:
    """I*s for SAME, (I-1)*s + eff - lo - hi otherwise (TF's usual choice), never below 0."""
    if _same(padding):
        return i * s
    p = 0 if padding == "VALID" else padding[0] + padding[1]
    return max(0, (i - 1) * s + effective_kernel(k, d) - p)


def pads_for(i: int, o: int, k: int, s: int, d: int, padding, op: int = 0) -> tuple[int, int]:
    """(lo, hi) padding of the forward conv between an input of size o and an output of size i. SAME's total is
    (I-1)*s + eff - O, at least 0, its odd unit at the end (SAME, SAME_UPPER) or the start (SAME_LOWER); with
    ONNX's output_padding op it is (I-1)*s + eff + op - O (ONNX's output_shape rule), and hi is then the forward
    conv's, (I-1)*s + eff - O - lo."""
    if _same(padding):
        full = (i - 1) * s + effective_kernel(k, d)
        total = max(0, full + op - o)
        lo = total - total // 2 if padding == "SAME_LOWER" else total // 2
        return lo, (total - lo if op == 0 else full - o - lo)
    if padding == "VALID":
        return 0, 0
    return tuple(padding)


def padded_output(i: int, k: int, s: int, d: int, padding, op: int) -> tuple[int, tuple[int, int]]:
    """(O, (lo, hi)) with PyTorch's and ONNX's output_padding op: explicit (lo, hi) or VALID give O =
    (I-1)*s + eff - lo - hi + op; SAME, SAME_UPPER and SAME_LOWER give O = I*s with a total pad of
    (I-1)*s + eff + op - O (at least 0) split as pads_for splits it (ONNX's auto_pad with output_padding). The
    pair returned is the forward conv's (hi = (I-1)*s + eff - O - lo, negative when the output reaches past the
    last tap: those positions are zero, as in PyTorch).

    >>> padded_output(12, 1, 1, 2, (0, 0), 1), padded_output(5, 3, 2, 1, (1, 1), 1)
    ((13, (0, -1)), (10, (1, 0)))
    >>> padded_output(4, 3, 2, 1, "SAME", 1)
    (8, (1, 0))
    """
    full = (i - 1) * s + effective_kernel(k, d)
    if _same(padding):
        o = i * s
        lo = pads_for(i, o, k, s, d, padding, op)[0]
    else:
        lo, hi = (0, 0) if padding == "VALID" else padding
        o = full - lo - hi + op
    return o, (lo, full - o - lo)


def rule_text(padding) -> str:
    if padding in ONNX_SAME:
        return f"{padding} needs 1 <= O <= max(I*s, (I-1)*s+eff+output_padding) with eff=(K-1)*d+1"
    if _same(padding):
        return f"{padding} needs (I-1)*s+1 <= O <= I*s"
    if padding == "VALID":
        return "VALID needs (I-1)*s+eff <= O <= I*s+eff-1 with eff=(K-1)*d+1"
    return "explicit (lo, hi) needs (O+lo+hi-eff)//s+1 == I with eff=(K-1)*d+1"


def padding_text(padding) -> str:
    return padding if isinstance(padding, str) else f"({padding[0]}, {padding[1]})"


# ---------------------------------------------------------------------------------------------------------
# Plans: every shape and pad, validated, before any data is touched.


@dataclass(frozen=True)
class Plan:
    """The validated shapes of one conv_transpose or conv call.

    `input_spatial`/`output_spatial` are the op's own input and output (for conv_transpose the output is the
    larger one); `pads[j]` = (lo, hi) of the forward convolution on axis j (hi < 0 when output_padding reaches
    past the last tap); `legal_ranges[j]` = the legal conv_transpose output sizes on axis j (None for conv);
    `groups` = G: input channel c pairs with output channels g*out/G .. (g+1)*out/G - 1 only, g = c // (in/G);
    `output_padding` = as given (None: TF's rules).
    """

    op: str
    spec: ConvSpec
    batch: int
    in_channels: int
    out_channels: int
    input_spatial: tuple[int, ...]
    kernel: tuple[int, ...]
    output_spatial: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]
    legal_ranges: tuple | None = None
    groups: int = 1
    output_padding: tuple[int, ...] | None = None

    def _full(self, spatial, channels):
        if self.spec.channels_first:
            return (self.batch, channels, *spatial)
        return (self.batch, *spatial, channels)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._full(self.input_spatial, self.in_channels)

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self._full(self.output_spatial, self.out_channels)

    @property
    def filters_shape(self) -> tuple[int, ...]:
        if self.op == "conv_transpose":
            return (*self.kernel, self.out_channels // self.groups, self.in_channels)
        return (*self.kernel, self.in_channels, self.out_channels)

    @property
    def flops(self) -> int:
        """2 * multiply-adds over every (input element, tap, output channel of its group), clipped taps
        included."""
        small = self.input_spatial if self.op == "conv_transpose" else self.output_spatial
        return (2 * self.batch * math.prod(small) * math.prod(self.kernel) * self.in_channels * self.out_channels
                // self.groups)

    def group_plan(self, together: int = 1) -> Plan:
        """The plan of `together` groups as one (block-diagonal filters): their in and out channels, groups 1."""
        if self.groups == together:
            return replace(self, groups=1)
        return replace(self, in_channels=self.in_channels // self.groups * together,
                       out_channels=self.out_channels // self.groups * together, groups=1)


def _check_ranks(op: str, input_shape, filters_shape, filters_layout: str) -> int:
    input_shape = tuple(input_shape)
    filters_shape = tuple(filters_shape)
    if len(input_shape) < 3:
        _fail(
            op,
            f"input must have rank >= 3 (batch, spatial..., channels), got rank {len(input_shape)} "
            f"with shape {input_shape}",
        )
    n = len(input_shape) - 2
    if len(filters_shape) != n + 2:
        _fail(
            op,
            f"filters must have rank {n + 2} like the input ({filters_layout}), got rank {len(filters_shape)} "
            f"with shape {filters_shape}",
        )
    for j, k in enumerate(filters_shape[:n]):
        if k < 1:
            _fail(op, f"filters.shape[{j}]={k}: kernel sizes must be >= 1 (filters shape {filters_shape})")
    return n


def _split(shape, n, channels_first):
    shape = tuple(int(v) for v in shape)
    if channels_first:
        return shape[0], shape[1], shape[2:]
    return shape[0], shape[-1], shape[1:-1]


def _common(op, input_shape, filters_shape, strides, padding, data_format, dilations, in_axis: int):
    """What both ops validate alike; `in_axis` is the filters axis that pairs with the input's channels."""
    layout = "out_channels, in_channels" if in_axis == -1 else "in_channels, out_channels"
    n = _check_ranks(op, input_shape, filters_shape, f"spatial..., {layout}")
    spec = normalize_spec(op, n, strides, padding, data_format, dilations)
    batch, c_in, in_spatial = _split(input_shape, n, spec.channels_first)
    kernel = tuple(int(v) for v in tuple(filters_shape)[:n])
    filter_c_in, c_out = int(filters_shape[in_axis]), int(filters_shape[-3 - in_axis])
    if filter_c_in != c_in:
        _fail(
            op,
            f"filters.shape[{in_axis}]={filter_c_in} (in_channels) must equal the input's channels {c_in} "
            f"(filters are spatial + [{layout}]; input shape {tuple(input_shape)}, data_format {spec.data_format})",
        )
    return n, spec, batch, c_in, in_spatial, kernel, c_out


def normalize_groups(op: str, groups, c_in: int) -> int:
    """groups: an integer >= 1 that divides the input's channels."""
    g = _int(op, "groups", groups)
    if g < 1:
        _fail(op, f"groups={g} must be >= 1")
    if c_in % g:
        _fail(op, f"groups={g} must divide the input's {c_in} channels")
    return g


def normalize_output_padding(op: str, value, spec: ConvSpec) -> tuple[int, ...]:
    """output_padding: an int or N ints, each 0 <= op < max(stride, dilation) (PyTorch's and ONNX's rule)."""
    n = spec.n
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        values, labels = (int(value),) * n, ["output_padding"] * n
    else:
        values = _int_sequence(op, "output_padding", value)
        if len(values) == 1:
            values, labels = values * n, ["output_padding[0]"] * n
        elif len(values) == n:
            labels = [f"output_padding[{j}]" for j in range(n)]
        else:
            _fail(op, f"output_padding must be an integer or have length N={n}, got length {len(values)}: "
                      f"{list(values)}")
    for j, (label, v, s, d) in enumerate(zip(labels, values, spec.strides, spec.dilations)):
        if not 0 <= v < max(s, d):
            _fail(op, f"{label}={v} on spatial axis {j} must be >= 0 and smaller than the stride {s} or the "
                      f"dilation {d}")
    return values


def plan_conv_transpose(
    input_shape, filters_shape, output_shape=None, strides=1, padding="SAME", data_format=None, dilations=None,
    *, output_padding=None, groups=1,
) -> Plan:
    """Validate a conv_transpose call on shapes alone.

    Args:
        input_shape: (batch, *spatial, in_channels), or (batch, in_channels, *spatial) channels-first.
        filters_shape: (*kernel, out_channels / groups, in_channels), whatever the data_format.
        output_shape: None, the N spatial sizes, or the full N+2 shape in data_format order.
        output_padding: None (TF's rules), or PyTorch's and ONNX's: an int or N ints (see padded_output);
            an output_shape given too must agree with it, but for SAME_UPPER and SAME_LOWER, where the two
            together are ONNX's output_shape rule (see pads_for).
        groups: G, as PyTorch and ONNX group channels (depthwise when G = in_channels).

    Returns:
        A Plan.

    >>> plan_conv_transpose((8, 32, 32, 256), (4, 4, 128, 256), strides=2).output_shape
    (8, 64, 64, 128)
    >>> plan_conv_transpose((1, 5, 6), (3, 2, 6), None, 2, 1, output_padding=1, groups=3).output_shape
    (1, 10, 6)
    """
    op = "conv_transpose"
    n, spec, batch, c_in, in_spatial, kernel, c_out = _common(
        op, input_shape, filters_shape, strides, padding, data_format, dilations, in_axis=-1
    )
    groups = normalize_groups(op, groups, c_in)
    c_out *= groups
    padded = None
    if output_padding is not None:
        output_padding = normalize_output_padding(op, output_padding, spec)
        padded = [padded_output(in_spatial[j], kernel[j], spec.strides[j], spec.dilations[j], spec.axis_padding(j),
                                output_padding[j]) for j in range(n)]
        for j, (o, _) in enumerate(padded):
            if o < 0:
                _fail(op, f"the output on spatial axis {j} would have size {o}: padding "
                          f"{padding_text(spec.axis_padding(j))} with output_padding {output_padding[j]} removes "
                          f"more than input size {in_spatial[j]}, kernel {kernel[j]}, stride {spec.strides[j]}, "
                          f"dilation {spec.dilations[j]} make")

    axes = [(in_spatial[j], kernel[j], spec.strides[j], spec.dilations[j], spec.axis_padding(j)) for j in range(n)]
    if output_shape is None and padded is not None:
        out_spatial = tuple(o for o, _ in padded)
        labels = [f"output size on spatial axis {j}" for j in range(n)]
    elif output_shape is None:
        out_spatial = tuple(default_output_size(*a) for a in axes)
        labels = [f"default output size on spatial axis {j}" for j in range(n)]
    else:
        given = _int_sequence(op, "output_shape", output_shape)
        if len(given) == n + 2:
            b_pos, c_pos = _non_spatial_positions(n, spec.channels_first)
            if given[b_pos] != batch:
                _fail(op, f"output_shape[{b_pos}]={given[b_pos]} (batch) must equal the input's batch size {batch}")
            if given[c_pos] != c_out:
                times = f"groups * filters.shape[-2] = {groups} * {c_out // groups}" if groups > 1 else \
                    "filters.shape[-2]"
                _fail(op, f"output_shape[{c_pos}]={given[c_pos]} (channels) must equal {times}={c_out} "
                          f"(out_channels)")
            positions = _spatial_positions(n, spec.channels_first)
        elif len(given) == n:
            positions = tuple(range(n))
        else:
            _fail(
                op,
                f"output_shape must have N+2={n + 2} entries (the full shape in data_format order) or N={n} "
                f"(spatial sizes only), got {len(given)}: {list(given)}",
            )
        out_spatial = tuple(given[p] for p in positions)
        labels = [f"output_shape[{p}]" for p in positions]
        for label, o in zip(labels, out_spatial):
            if o < 0:
                _fail(op, f"{label}={o} must be >= 0")

    onnx = spec.padding in ONNX_SAME and output_shape is not None  # ONNX's output_shape, with output_padding
    if padded is not None and not onnx:
        for j, (label, o) in enumerate(zip(labels, out_spatial)):
            if o != padded[j][0]:
                _fail(op, f"{label}={o} disagrees with output_padding[{j}]={output_padding[j]}, which makes the "
                          f"output {padded[j][0]} on spatial axis {j}: give one or the other")
        return Plan(op, spec, batch, c_in, c_out, in_spatial, kernel, out_spatial, tuple(p for _, p in padded),
                    tuple((o, o) for o in out_spatial), groups, output_padding)
    ops = output_padding or (0,) * n
    ranges = []
    for label, o, (i, k, s, d, pad), op_j in zip(labels, out_spatial, axes, ops):
        legal = legal_output_range(i, k, s, d, pad, op_j)
        if legal is None or not legal[0] <= o <= legal[1]:
            sizes = "no output size is legal" if legal is None else f"legal sizes are {legal[0]}..{legal[1]}"
            _fail(
                op,
                f"{label}={o} is not reachable from input size {i} with kernel {k}, stride {s}, dilation {d}, "
                f"padding {padding_text(pad)}: {sizes} ({rule_text(pad)})",
            )
        ranges.append(legal)
    pads = tuple(pads_for(i, o, k, s, d, pad, op_j) for o, (i, k, s, d, pad), op_j in zip(out_spatial, axes, ops))
    return Plan(op, spec, batch, c_in, c_out, in_spatial, kernel, out_spatial, pads, tuple(ranges), groups,
                output_padding)


def plan_conv(input_shape, filters_shape, strides=1, padding="SAME", data_format=None, dilations=None) -> Plan:
    """Validate a forward conv call (tf.nn.convolution) on shapes alone.

    Args:
        input_shape: (batch, *spatial, in_channels), or (batch, in_channels, *spatial) channels-first.
        filters_shape: (*kernel, in_channels, out_channels), whatever the data_format.

    Returns:
        A Plan.

    >>> plan_conv((8, 64, 64, 128), (4, 4, 128, 256), strides=2).output_shape
    (8, 32, 32, 256)
    """
    op = "conv"
    n, spec, batch, c_in, in_spatial, kernel, c_out = _common(
        op, input_shape, filters_shape, strides, padding, data_format, dilations, in_axis=-2
    )
    out_spatial, pads = [], []
    for j in range(n):
        o, k, s, d, pad = in_spatial[j], kernel[j], spec.strides[j], spec.dilations[j], spec.axis_padding(j)
        i = forward_size(o, k, s, d, pad)
        if i < 0:
            _fail(
                op,
                f"input spatial axis {j} has size {o}, too small for kernel {k} with dilation {d} and padding "
                f"{padding_text(pad)}: the output size would be negative (needs at least "
                f"{max(0, effective_kernel(k, d) - 2 * s + 1 - (0 if isinstance(pad, str) else sum(pad)))})",
            )
        out_spatial.append(i)
        pads.append(pads_for(i, o, k, s, d, pad))
    return Plan(op, spec, batch, c_in, c_out, in_spatial, kernel, tuple(out_spatial), tuple(pads))


def tap_span(i: int, o: int, tap: int, s: int, d: int, lo: int):
    """Inputs [i0, i1) that tap `tap` sends inside [0, o), and the first output o0 = i0*s + tap*d - lo.

    None when the tap lands wholly in the padding.
    """
    shift = tap * d - lo  # output position of input 0
    i0 = max(0, -(shift // s) if shift < 0 else 0)  # ceil(-shift / s) for negative shift
    i1 = min(i, (o - 1 - shift) // s + 1) if o > 0 else 0
    if i0 >= i1:
        return None
    return i0, i1, i0 * s + shift


@dataclass(frozen=True)
class AxisPhase:
    """One stride phase of one spatial axis of conv_transpose.

    Output positions o = q*s + residue - lo for q in [q0, q1) (that is o0, o0+s, ...) receive exactly the taps
    k with k*d % s == residue, each from input i = q - shift with shift = k*d // s.
    """

    residue: int
    taps: tuple[int, ...]
    shifts: tuple[int, ...]
    q0: int
    q1: int
    o0: int


def axis_phases(i: int, o: int, k: int, s: int, d: int, lo: int) -> tuple[AxisPhase, ...]:
    """The phases of one axis that reach [0, o); o = i*s + k*d - lo rewritten as o + lo = (i + shift)*s + residue."""
    by_residue: dict[int, list[int]] = {}
    for tap in range(k):
        by_residue.setdefault(tap * d % s, []).append(tap)
    reach = i + (k - 1) * d // s  # q < i + max shift
    phases = []
    for residue in sorted(by_residue):
        span = tap_span(reach, o, residue, s, 1, lo)
        if span is None:
            continue
        taps = tuple(by_residue[residue])
        phases.append(AxisPhase(residue, taps, tuple(t * d // s for t in taps), *span))
    return tuple(phases)


# ---------------------------------------------------------------------------------------------------------
# Filter layouts: how other frameworks store transposed-convolution filters, read as convt's (*kernel, out, in).

FILTER_LAYOUTS = {  # name: (axes, whose)
    "tf": ("[*k, out, in]", "TensorFlow's tf.nn.conv_transpose, convt's own"),
    "torch": ("[in, out/groups, *k]", "PyTorch's ConvTranspose weight, no flip"),
    "onnx": ("[in, out/groups, *k]", "ONNX ConvTranspose's W, no flip"),
    "jax": ("[*k, in, out]", "JAX's lax.conv_transpose rhs (HWIO) with transpose_kernel=False, flipped"),
}


def filter_layout(op: str, layout) -> str:
    """The layout's name, checked: one of FILTER_LAYOUTS (any case)."""
    name = layout.strip().lower() if isinstance(layout, str) else None
    if name not in FILTER_LAYOUTS:
        _fail(op, f"filter_layout must be one of {', '.join(repr(k) for k in FILTER_LAYOUTS)}, got {layout!r}")
    return name


def filter_axes(layout: str, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(perm, flipped): np.transpose(w, perm) brings filters stored in `layout` (of rank ndim = N + 2) to
    (*kernel, out, in); then the spatial axes in `flipped` are reversed.

    >>> filter_axes("torch", 4), filter_axes("jax", 4)
    (((2, 3, 1, 0), ()), ((0, 1, 3, 2), (0, 1)))
    """
    if layout in ("torch", "onnx"):  # [in, out, *k]
        return (*range(2, ndim), 1, 0), ()
    if layout == "jax":  # [*k, in, out], correlated as it is: swapped and flipped
        return (*range(ndim - 2), ndim - 1, ndim - 2), tuple(range(ndim - 2))
    return tuple(range(ndim)), ()


def layout_rank_problem(layout: str, shape) -> str | None:
    """What is wrong with filters of `shape` stored in `layout` before they can be read as (*kernel, out, in):
    another framework's filters need a kernel axis and both channel axes (a bias, say, has not). None: nothing."""
    if layout == "tf" or len(shape) >= 3:
        return None
    return (f"filters given in layout {layout} {FILTER_LAYOUTS[layout][0]} must have rank >= 3 (kernel axes and two "
            f"channel axes), got rank {len(shape)} with shape {tuple(shape)}")


def filters_shape_as_tf(layout: str, shape) -> tuple[int, ...]:
    """The (*kernel, out, in) shape of filters of `shape` stored in `layout`.

    >>> filters_shape_as_tf("torch", (8, 4, 3, 3))
    (3, 3, 4, 8)
    """
    perm, _ = filter_axes(layout, len(shape))
    return tuple(shape[a] for a in perm)


def input_window(o0: int, o1: int, i: int, k: int, s: int, d: int, lo: int) -> tuple[int, int]:
    """The input positions [i0, i1) whose terms can land in the output positions [o0, o1) on one axis (term
    (j, t) lands at o = j*s + t*d - lo); every term that lands there is from that window. Empty (i0 == i1) when
    no term lands there.

    >>> input_window(0, 4, 8, 3, 2, 1, 1), input_window(4, 8, 8, 3, 2, 1, 1), input_window(0, 16, 8, 3, 2, 1, 1)
    ((0, 3), (2, 5), (0, 8))
    """
    first = max(0, -(-(o0 + lo - (k - 1) * d) // s))  # j*s + (k-1)*d - lo >= o0
    last = min(i, (o1 - 1 + lo) // s + 1)  # j*s - lo <= o1 - 1
    return first, max(first, last)


def tile_window(o0: int, o1: int, i: int, k: int, s: int, d: int, lo: int) -> tuple[int, int, int]:
    """(i0, i1, lo_t) on one axis for the output tile [o0, o1): the input positions [i0, i1) that reach it
    (input_window's, started early when needed so that lo_t >= 0: such a first position lands before the tile)
    and the tile's own low pad lo_t = lo + o0 - i0*s. The tile is then conv_transpose of input[i0:i1] with low
    pad lo_t and output size o1 - o0: term (j, t) of the window lands at j*s + t*d - lo_t in the tile, exactly
    where term (i0 + j, t) lands in the whole output less o0. Empty window (i0 == i1): the tile is zeros.

    >>> tile_window(0, 4, 8, 3, 2, 1, 1), tile_window(4, 8, 8, 3, 2, 1, 1), tile_window(1, 2, 3, 1, 4, 1, 0)
    ((0, 3, 1), (2, 5, 1), (0, 0, 1))
    """
    first, last = input_window(o0, o1, i, k, s, d, lo)
    i0 = min(first, (o0 + lo) // s)  # (o0 + lo) // s: the last start with lo_t >= 0
    i1 = i0 if last == first else last
    return i0, i1, lo + o0 - i0 * s


def tile_starts(o: int, size: int) -> list[tuple[int, int]]:
    """[o0, o1) of the tiles of `size` (the last one shorter) that cover [0, o) once each.

    >>> tile_starts(10, 4), tile_starts(0, 4)
    ([(0, 4), (4, 8), (8, 10)], [])
    """
    return [(o0, min(o, o0 + size)) for o0 in range(0, o, max(1, size))]


def tile_plan(plan: Plan, box) -> tuple[Plan, tuple[tuple[int, int], ...]]:
    """(the plan of the output tile `box` ([o0, o1) per spatial axis) of one batch element, the input window it
    reads ([i0, i1) per axis)): an ordinary conv_transpose plan with the tile's own pads (see tile_window; hi is
    the forward conv's, negative where the tile reaches past the window's last tap)."""
    window, pads = [], []
    for (o0, o1), i, k, s, d, (lo, _) in zip(box, plan.input_spatial, plan.kernel, plan.spec.strides,
                                               plan.spec.dilations, plan.pads):
        i0, i1, lo_t = tile_window(o0, o1, i, k, s, d, lo)
        window.append((i0, i1))
        pads.append((lo_t, (i1 - i0 - 1) * s + effective_kernel(k, d) - (o1 - o0) - lo_t))
    sub = replace(plan, batch=1, input_spatial=tuple(i1 - i0 for i0, i1 in window),
                  output_spatial=tuple(o1 - o0 for o0, o1 in box), pads=tuple(pads),
                  legal_ranges=tuple((o1 - o0, o1 - o0) for o0, o1 in box))
    return sub, tuple(window)


def split_sizes(sizes, budget: int) -> tuple[int, ...]:
    """Per axis, a block of at most `budget` cells of an array of `sizes`, as close to a cube as halving
    allows: the largest block (the first of equals) is halved, rounding up, until the block fits. Blocks cut
    this way have the least surface for their volume: the halo a block needs from its neighbours stays small.

    >>> split_sizes((128, 128), 4096), split_sizes((512, 512, 512), 16384), split_sizes((7,), 100)
    ((64, 64), (16, 32, 32), (7,))
    """
    blocks = [max(1, int(n)) for n in sizes]
    budget = max(1, int(budget))
    while math.prod(blocks) > budget:
        axis = blocks.index(max(blocks))
        blocks[axis] = -(-blocks[axis] // 2)
    return tuple(blocks)


def block_sizes(sizes, budget: int) -> tuple[int, ...]:
    """Per axis, a block of at most `budget` cells of an array of `sizes`: trailing axes whole as far as they fit,
    the next one cut to fit, the ones before it 1 (rows of whole rows): HDF5 chunks.

    >>> block_sizes((128, 128), 4096), block_sizes((512, 512, 512), 16384), block_sizes((7,), 100)
    ((32, 128), (1, 32, 512), (7,))
    """
    sizes, inner = [max(1, int(n)) for n in sizes], 1
    for axis in range(len(sizes) - 1, -1, -1):
        if inner * sizes[axis] <= budget:
            inner *= sizes[axis]
            continue
        sizes[axis] = max(1, budget // inner)
        sizes[:axis] = [1] * axis
        break
    return tuple(sizes)
