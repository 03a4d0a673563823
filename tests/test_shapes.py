"""Argument normalization and per-axis shape math, without arrays.

Matrix: hypothesis over (I, O, K, s, d, padding) for legal_output_range / forward_size / pads_for against
brute force; input_window (the input positions that reach an output block) and split_sizes (verify's tile
blocks) against brute force; every spelling of strides, dilations, padding, data_format and output_shape; every
error rule, with its exact message.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from loop_reference import conv_transpose_loop

from convt_cli import ConvtError, conv_transpose
from convt_cli.shapes import (
    default_output_size,
    forward_size,
    input_window,
    legal_output_range,
    pads_for,
    plan_conv,
    plan_conv_transpose,
    split_sizes,
    tap_span,
)

paddings = st.one_of(st.sampled_from(["SAME", "VALID"]), st.tuples(st.integers(0, 6), st.integers(0, 6)))


def _windows(o, k, s, d, padding):
    """Count forward-conv window positions by walking them (valid for o + pads >= eff)."""
    eff = (k - 1) * d + 1
    if padding == "SAME":
        out = -(-o // s)
        total = max(0, (out - 1) * s + eff - o)
        lo, hi = total // 2, total - total // 2
    else:
        lo, hi = (0, 0) if padding == "VALID" else padding
    return len(range(-lo, o + hi - eff + 1, s))


@settings(max_examples=500)
@given(st.integers(0, 12), st.integers(1, 6), st.integers(1, 5), st.integers(1, 4), paddings)
def test_legal_output_range_is_exactly_the_sizes_tf_accepts(i, k, s, d, padding):
    accepted = [o for o in range(0, 120) if forward_size(o, k, s, d, padding) == i]  # legal o < i*s + eff + 3
    legal = legal_output_range(i, k, s, d, padding)
    if legal is None:
        assert accepted == []
    else:
        assert accepted == list(range(legal[0], legal[1] + 1))


@settings(max_examples=500)
@given(st.integers(0, 40), st.integers(1, 6), st.integers(1, 5), st.integers(1, 4), paddings)
def test_forward_size_counts_the_windows(o, k, s, d, padding):
    p = 0 if isinstance(padding, str) else sum(padding)
    if padding != "SAME" and o + p < (k - 1) * d + 1:
        return  # TF's truncating quirk below one window; covered by the exact cases below
    assert forward_size(o, k, s, d, padding) == _windows(o, k, s, d, padding)


@pytest.mark.parametrize(
    "o,k,s,d,padding,want",
    [(1, 3, 2, 1, "VALID", 0), (0, 3, 2, 1, "VALID", 0), (0, 5, 2, 1, "VALID", -1), (0, 3, 1, 1, "SAME", 0)],
)
def test_forward_size_truncates_toward_zero_like_tf(o, k, s, d, padding, want):
    assert forward_size(o, k, s, d, padding) == want


@settings(max_examples=500)
@given(st.integers(1, 12), st.integers(1, 6), st.integers(1, 5), st.integers(1, 4), st.data())
def test_same_pads_center_the_windows(i, k, s, d, data):
    o = data.draw(st.integers((i - 1) * s + 1, i * s))
    lo, hi = pads_for(i, o, k, s, d, "SAME")
    eff = (k - 1) * d + 1
    assert lo + hi == max(0, (i - 1) * s + eff - o)
    assert hi - lo in (0, 1)  # the odd pad goes at the end, as in TF


@settings(max_examples=300)
@given(st.integers(0, 12), st.integers(1, 6), st.integers(1, 5), st.integers(1, 4), paddings)
def test_default_output_size_is_legal(i, k, s, d, padding):
    legal = legal_output_range(i, k, s, d, padding)
    if legal is not None:
        assert legal[0] <= default_output_size(i, k, s, d, padding) <= legal[1]


@settings(max_examples=300)
@given(st.integers(0, 8), st.integers(0, 20), st.integers(0, 5), st.integers(1, 4), st.integers(1, 3),
       st.integers(0, 6))
def test_tap_span_is_the_set_of_inputs_landing_inside(i, o, t, s, d, lo):
    want = [ii for ii in range(i) if 0 <= ii * s + t * d - lo < o]
    span = tap_span(i, o, t, s, d, lo)
    got = [] if span is None else list(range(span[0], span[1]))
    assert got == want
    if span:
        assert span[2] == span[0] * s + t * d - lo


@pytest.mark.parametrize(
    "i,k,s,padding,want",
    [(6, 3, 2, "SAME", (11, 12)), (6, 3, 2, "VALID", (13, 14)), (4, 3, 2, (1, 2), (6, 7)), (0, 3, 2, "SAME", (0, 0)),
     (0, 3, 2, "VALID", (0, 2)), (1, 1, 1, (3, 3), None)],
)
def test_legal_output_range_examples(i, k, s, padding, want):
    assert legal_output_range(i, k, s, 1, padding) == want


def test_plan_defaults_full_and_spatial_output_shape_agree():
    args = ((8, 32, 32, 256), (4, 4, 128, 256))
    a = plan_conv_transpose(*args, strides=2)
    b = plan_conv_transpose(*args, [64, 64], strides=2)
    c = plan_conv_transpose(*args, np.array([8, 64, 64, 128]), strides=[1, 2, 2, 1])
    assert a == b == c
    assert a.output_shape == (8, 64, 64, 128)
    assert a.pads == ((1, 1), (1, 1))
    assert a.legal_ranges == ((63, 64), (63, 64))
    assert a.flops == 2 * 8 * 32 * 32 * 16 * 128 * 256


def test_array_likes_and_numpy_integers_wherever_ints_are_listed():
    class Tensor:  # what a TF tensor offers: numpy(), whose items are not Python ints
        def __init__(self, values):
            self.values = values

        def numpy(self):
            return np.array(self.values, np.int32)

    want = plan_conv_transpose((2, 5, 6, 3), (3, 3, 4, 3), [2, 9, 12, 4], [2, 2], [(1, 1), (0, 1)])
    got = plan_conv_transpose((2, 5, 6, 3), (3, 3, 4, 3), Tensor([2, 9, 12, 4]), np.array([2, 2], np.int8),
                              [np.array([1, 1]), (np.int64(0), np.uint16(1))])
    assert got == want and all(type(v) is int for v in got.output_shape + got.spec.strides)


@pytest.mark.parametrize(
    "spelling", ["NCHW", "nchw", "channels_first", "CHANNELS_FIRST"],
)
def test_channels_first_spellings(spelling):
    plan = plan_conv_transpose((2, 3, 5, 6), (3, 3, 4, 3), None, [1, 1, 2, 3], "valid", spelling, 2)
    assert plan.output_shape == (2, 4, 9 + 4, 15 + 4 - 3 + 2)[:2] + (13, 20)
    assert plan.spec.strides == (2, 3) and plan.spec.dilations == (2, 2)
    assert plan.spec.padding == "VALID"


def test_valid_default_and_explicit_padding_forms():
    p = plan_conv_transpose((1, 4, 5, 2), (3, 2, 1, 2), None, 2, "VALID")
    assert p.output_shape == (1, 9, 10, 1)
    q = plan_conv_transpose((1, 4, 5, 2), (3, 2, 1, 2), None, 2, [(1, 0), (0, 1)])
    r = plan_conv_transpose((1, 4, 5, 2), (3, 2, 1, 2), None, 2, [[0, 0], [1, 0], [0, 1], [0, 0]])
    assert q == r and q.output_shape == (1, 8, 9, 1) and q.pads == ((1, 0), (0, 1))


def test_four_spatial_dims_plan():
    p = plan_conv_transpose((1, 2, 3, 4, 5, 6), (1, 2, 3, 1, 7, 6), None, 2, "SAME", "channels_last")
    assert p.output_shape == (1, 4, 6, 8, 10, 7)


def test_conv_plan_output_sizes():
    p = plan_conv((2, 13, 14, 4), (3, 3, 4, 5), strides=2, padding="VALID")
    assert p.output_shape == (2, 6, 6, 5)
    s = plan_conv((2, 13, 14, 4), (3, 3, 4, 5), strides=2, padding="SAME")
    assert s.output_shape == (2, 7, 7, 5) and s.pads == ((1, 1), (0, 1))


X, F = (2, 5, 6, 3), (3, 3, 4, 3)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(input_shape=(5, 3)), "conv_transpose: input must have rank >= 3 (batch, spatial..., channels), got "
                                   "rank 2 with shape (5, 3)"),
        (dict(filters_shape=(3, 4, 3)), "conv_transpose: filters must have rank 4 like the input (spatial..., "
                                        "out_channels, in_channels), got rank 3 with shape (3, 4, 3)"),
        (dict(filters_shape=(3, 3, 4, 2)), "conv_transpose: filters.shape[-1]=2 (in_channels) must equal the input's "
                                           "channels 3 (filters are spatial + [out_channels, in_channels]; input "
                                           "shape (2, 5, 6, 3), data_format NHWC)"),
        (dict(filters_shape=(0, 3, 4, 3)), "conv_transpose: filters.shape[0]=0: kernel sizes must be >= 1"),
        (dict(output_shape=[3, 10, 12, 4]), "conv_transpose: output_shape[0]=3 (batch) must equal the input's batch "
                                            "size 2"),
        (dict(output_shape=[2, 10, 12, 5]), "conv_transpose: output_shape[3]=5 (channels) must equal "
                                            "filters.shape[-2]=4 (out_channels)"),
        (dict(output_shape=[2, 10, 13, 4]), "conv_transpose: output_shape[2]=13 is not reachable from input size 6 "
                                            "with kernel 3, stride 2, dilation 1, padding SAME: legal sizes are "
                                            "11..12 (SAME needs (I-1)*s+1 <= O <= I*s)"),
        (dict(output_shape=[8, 12], padding="VALID"), "conv_transpose: output_shape[0]=8 is not reachable from input "
                                                      "size 5 with kernel 3, stride 2, dilation 1, padding VALID: "
                                                      "legal sizes are 11..12 (VALID needs (I-1)*s+eff <= O <= "
                                                      "I*s+eff-1 with eff=(K-1)*d+1)"),
        (dict(output_shape=[8, 13], padding=[(1, 1), (0, 0)]), "conv_transpose: output_shape[0]=8 is not reachable "
                                                               "from input size 5 with kernel 3, stride 2, dilation 1, "
                                                               "padding (1, 1): legal sizes are 9..10"),
        (dict(output_shape=[10, 12, 4]), "conv_transpose: output_shape must have N+2=4 entries (the full shape in "
                                         "data_format order) or N=2 (spatial sizes only), got 3: [10, 12, 4]"),
        (dict(output_shape=[10, -1]), "conv_transpose: output_shape[1]=-1 must be >= 0"),
        (dict(output_shape=[10, 12.0]), "conv_transpose: output_shape[1] must be an integer, got 12.0"),
        (dict(output_shape="10,12"), "conv_transpose: output_shape must be a sequence of integers, got '10,12'"),
        (dict(output_shape=np.array([[10, 12]])), "conv_transpose: output_shape must be one-dimensional, got 2-d "
                                                  "shape (1, 2): [[10, 12]]"),
        (dict(output_shape=[10, np.float32(12)]), "conv_transpose: output_shape[1] must be an integer, got 12.0"),
        (dict(strides=[2, np.float64(1.5)]), "conv_transpose: strides[1] must be an integer, got 1.5"),
        (dict(strides=0), "conv_transpose: strides=0 must be >= 1"),
        (dict(strides=[2, -1]), "conv_transpose: strides[1]=-1 must be >= 1"),
        (dict(strides=[1, 2, 3]), "conv_transpose: strides must have length 1, N=2 or N+2=4, got length 3: [1, 2, 3]"),
        (dict(strides=[2, 2, 2, 1]), "conv_transpose: strides[0]=2 is the batch entry and must be 1"),
        (dict(strides=[1, 2, 2, 2]), "conv_transpose: strides[3]=2 is the channel entry and must be 1"),
        (dict(strides="2"), "conv_transpose: strides must be a sequence of integers, got '2'"),
        (dict(strides=1.5), "conv_transpose: strides must be a sequence of integers, got 1.5"),
        (dict(dilations=[1, 0]), "conv_transpose: dilations[1]=0 must be >= 1"),
        (dict(padding="SMAE"), "conv_transpose: padding='SMAE' is not a padding: expected 'SAME', 'VALID', "
                               "'SAME_LOWER', an integer or 2 (lo, "
                               "hi) pairs"),
        (dict(padding=[(1, 1)]), "conv_transpose: explicit padding must have N=2 or N+2=4 (lo, hi) pairs, got 1"),
        (dict(padding=[(1, 1), (1, -1)]), "conv_transpose: padding for spatial axis 1 is (1, -1): pads must be >= 0"),
        (dict(padding=[(1, 1, 1), (1, 1)]), "conv_transpose: padding[0] must be a (lo, hi) pair, got [1, 1, 1]"),
        (dict(padding=[(1, 0), (1, 1), (1, 1), (0, 0)]), "conv_transpose: padding[0]=[1, 0] is the batch pair and "
                                                         "must be (0, 0)"),
        (dict(padding=None), "conv_transpose: padding must be 'SAME', 'VALID', 'SAME_LOWER', an integer or 2 (lo, hi) "
                            "pairs, got None"),
        (dict(data_format="NWC"), "conv_transpose: data_format='NWC' does not fit 2 spatial dims (input rank 4) (it "
                                  "is for 1 spatial dims): expected 'NHWC', 'NCHW', 'channels_last' or "
                                  "'channels_first'"),
        (dict(data_format="NHCW"), "conv_transpose: data_format='NHCW' does not fit 2 spatial dims (input rank 4): "
                                   "expected 'NHWC', 'NCHW', 'channels_last' or 'channels_first'"),
        (dict(data_format=3), "conv_transpose: data_format must be a string or None, got 3"),
    ],
)
def test_conv_transpose_errors_name_parameter_expected_and_got(kwargs, message):
    args = dict(input_shape=X, filters_shape=F, strides=2)
    args.update(kwargs)
    with pytest.raises(ConvtError) as e:
        plan_conv_transpose(**args)
    assert str(e.value).startswith(message), str(e.value)


def test_four_spatial_dims_take_only_generic_formats():
    with pytest.raises(ConvtError) as e:
        plan_conv_transpose((1, 2, 2, 2, 2, 1), (1, 1, 1, 1, 1, 1), data_format="NDHWC")
    assert str(e.value) == ("conv_transpose: data_format='NDHWC' does not fit 4 spatial dims (input rank 6) (it is "
                            "for 3 spatial dims): expected 'channels_last' or 'channels_first'")


def test_pads_too_large_for_any_output():
    with pytest.raises(ConvtError, match=r"padding \(3, 3\): no output size is legal"):
        plan_conv_transpose((1, 1, 1), (1, 1, 1), None, 1, [(3, 3)])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(filters_shape=(3, 3, 4, 5)), "conv: filters.shape[-2]=4 (in_channels) must equal the input's channels 3 "
                                           "(filters are spatial + [in_channels, out_channels]"),
        (dict(input_shape=(1, 1, 1, 3), padding="VALID"), "conv: input spatial axis 0 has size 1, too small for kernel "
                                                          "3 with dilation 1 and padding VALID: the output size would "
                                                          "be negative"),
        (dict(strides=[1, 0]), "conv: strides[1]=0 must be >= 1"),
    ],
)
def test_conv_errors(kwargs, message):
    args = dict(input_shape=(2, 5, 6, 3), filters_shape=(3, 3, 3, 4))
    args.update(kwargs)
    with pytest.raises(ConvtError) as e:
        plan_conv(**args)
    assert str(e.value).startswith(message), str(e.value)


@settings(max_examples=1000)
@given(st.integers(0, 12), st.integers(1, 6), st.integers(1, 5), st.integers(1, 4), st.integers(-3, 8), st.data())
def test_input_window_holds_every_term_that_lands_in_the_block(i, k, s, d, lo, data):
    """Term (j, t) lands at o = j*s + t*d - lo; the window of [o0, o1) is exactly the j with a term there, up to
    the j in between whose taps all jump over the block (a dilation wider than the block)."""
    o0 = data.draw(st.integers(-5, 40))
    o1 = data.draw(st.integers(o0, o0 + 20))
    i0, i1 = input_window(o0, o1, i, k, s, d, lo)
    assert 0 <= i0 <= i1 <= max(i, i0) and (i1 == i0 or i1 <= i)
    reaching = {j for j in range(i) for t in range(k) if o0 <= j * s + t * d - lo < o1}
    assert reaching <= set(range(i0, i1))
    slack = (k - 1) * d // s + 1  # a dilated kernel's taps can step over a narrow block
    if reaching:
        assert min(reaching) - i0 <= slack and i1 - 1 - max(reaching) <= slack
        if d == 1:  # consecutive taps: no gaps, the window is exactly the terms' inputs
            assert (i0, i1) == (min(reaching), max(reaching) + 1)
    else:
        assert i1 - i0 <= slack
    if i1 > i0:
        lo_t = lo + o0 - i0 * s  # the block's own low pad: term (j, t) at local o - o0 = (j - i0)*s + t*d - lo_t
        assert all(o - o0 == (j - i0) * s + t * d - lo_t for j in range(i0, i1) for t in range(k)
                   for o in [j * s + t * d - lo])


@given(st.lists(st.integers(0, 300), min_size=1, max_size=4), st.integers(1, 5000))
def test_split_sizes_fits_the_budget_and_stays_near_a_cube(sizes, budget):
    blocks = split_sizes(sizes, budget)
    assert len(blocks) == len(sizes)
    assert all(1 <= b <= max(1, n) for b, n in zip(blocks, sizes))
    assert np.prod(blocks) <= budget
    cut = [b for b, n in zip(blocks, sizes) if b < max(1, n)]
    assert not cut or max(blocks) <= 2 * min(cut) + 1  # only the largest blocks are halved
    # halving stopped as soon as it fit: doubling the last cut back would not fit
    if cut:
        assert any(np.prod(blocks) * 2 > budget or b * 2 > max(1, n) for b, n in zip(blocks, sizes) if b == max(cut))


# ---------------------------------------------------------------------------------------------------------
# Padding spellings beyond TF's: SAME_UPPER / SAME_LOWER (ONNX), an integer, one (lo, hi) for every axis


@settings(max_examples=300)
@given(st.integers(1, 9), st.integers(1, 5), st.integers(1, 4), st.integers(1, 3), st.data())
def test_same_lower_is_same_with_the_odd_pad_first(i, k, s, d, data):
    lo_range = plan_conv_transpose((1, i, 1), (k, 1, 1), None, s, "SAME", dilations=d).legal_ranges[0]
    o = data.draw(st.integers(*lo_range))
    same = plan_conv_transpose((1, i, 1), (k, 1, 1), [o], s, "SAME", dilations=d)
    lower = plan_conv_transpose((1, i, 1), (k, 1, 1), [o], s, "same_lower", dilations=d)
    upper = plan_conv_transpose((1, i, 1), (k, 1, 1), [o], s, "Same_Upper", dilations=d)
    assert upper.pads == same.pads and upper.output_shape == same.output_shape
    full = (i - 1) * s + (k - 1) * d + 1
    total = max(0, full - o)  # ONNX: the larger half at the beginning
    assert lower.pads == ((total - total // 2, total // 2),) and same.pads == ((total // 2, total - total // 2),)
    # ONNX's names also take what ONNX's output_shape takes: any size with a total pad >= 0
    assert lower.legal_ranges == upper.legal_ranges == ((1, max(i * s, full)),)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.data())
def test_onnx_output_shape_with_output_padding_crops_the_full_result_as_onnx_says(i, k, s, d, data):
    op = data.draw(st.integers(0, max(s, d) - 1))
    full = (i - 1) * s + (k - 1) * d + 1
    o = data.draw(st.integers(1, full + op))
    total = full + op - o  # ONNX: total_padding = stride*(I-1) + output_padding + eff - output_shape
    rng = np.random.default_rng([i, k, s, d, op, o])
    x, w = rng.standard_normal((1, i, 2)), rng.standard_normal((k, 3, 2))
    for name, lo in (("SAME_LOWER", total - total // 2), ("SAME_UPPER", total // 2)):
        got = conv_transpose(x, w, [o], s, name, dilations=d, output_padding=op)
        whole = conv_transpose_loop(x, w, (full + op + lo,), s, [(0, 0)], False, d)  # uncropped, zeros after
        np.testing.assert_allclose(got, whole[:, lo:lo + o], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("padding, pads", [(2, ((2, 2), (2, 2))), (np.int64(1), ((1, 1), (1, 1))),
                                           ((0, 3), ((0, 3), (0, 3))), ([1, 2], ((1, 2), (1, 2))),
                                           ([(1, 2), (3, 4)], ((1, 2), (3, 4)))])
def test_an_integer_or_one_pair_pads_every_axis(padding, pads):
    assert plan_conv_transpose((1, 6, 6, 2), (3, 3, 2, 2), None, 2, padding).pads == pads


@pytest.mark.parametrize("padding, message", [
    (-1, "padding for spatial axis 0 is (-1, -1): pads must be >= 0"),
    (True, "padding must be 'SAME', 'VALID', 'SAME_LOWER', an integer or 2 (lo, hi) pairs, got True"),
    ((1, 2, 3), "padding[0] must be a sequence of integers, got 1"),
])
def test_the_new_spellings_are_checked_like_the_old(padding, message):
    with pytest.raises(ConvtError) as e:
        plan_conv_transpose((1, 6, 6, 2), (3, 3, 2, 2), None, 2, padding)
    assert str(e.value) == f"conv_transpose: {message}"
