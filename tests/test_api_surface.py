"""The Python API's surface beside TF's: `name=` taken and ignored, output_shape in every spelling TF takes,
and what `dir(convt_cli)` lists.

Matrix: conv_transpose and conv × name (keyword, positional, None) ; output_shape as a list, tuple, range, numpy
int32/int64 array, numpy integer scalars in a list, 0-d integer arrays in a list, an object with __array__ only,
an object with numpy() only (what a TF tensor offers), full N+2 and spatial N ; refused: floats (Python, numpy
scalar, float array), bools (Python, numpy, bool array), strings, 0-d and 2-d arrays, an unsized iterable, each
with its one-line message naming output_shape.
"""

import inspect

import numpy as np
import pytest

import convt_cli
from convt_cli import ConvtError

X = np.arange(2 * 5 * 6 * 3, dtype=np.float32).reshape(2, 5, 6, 3) / 100
W = np.linspace(-1, 1, 3 * 3 * 4 * 3, dtype=np.float32).reshape(3, 3, 4, 3)


class HasArray:
    """An array-like known only by __array__ (no __len__, no __iter__)."""

    def __init__(self, values, dtype=np.int64):
        self.values, self.dtype = values, dtype

    def __array__(self, dtype=None, copy=None):
        return np.array(self.values, dtype=dtype or self.dtype)

    def __repr__(self):
        return f"HasArray({self.values})"


class HasNumpy:
    """Like a TF EagerTensor: .numpy() gives the array; its items are not ints (iterating gives 0-d tensors)."""

    def __init__(self, values):
        self.values = values

    def numpy(self):
        return np.array(self.values, dtype=np.int32)

    def __len__(self):
        return len(self.values)

    def __iter__(self):
        return iter([HasNumpy(v) for v in self.values])

    def __repr__(self):
        return f"HasNumpy({self.values})"


def test_conv_transpose_takes_name_and_ignores_it():
    want = convt_cli.conv_transpose(X, W, [2, 10, 12, 4], 2, "SAME")
    for got in (convt_cli.conv_transpose(X, W, [2, 10, 12, 4], 2, "SAME", name="up"),
                convt_cli.conv_transpose(X, W, [2, 10, 12, 4], 2, "SAME", None, None, "up"),
                convt_cli.conv_transpose(X, W, [2, 10, 12, 4], 2, "SAME", name=None)):
        np.testing.assert_array_equal(got, want)
    names = list(inspect.signature(convt_cli.conv_transpose).parameters)
    assert names[:8] == ["input", "filters", "output_shape", "strides", "padding", "data_format", "dilations", "name"]


def test_conv_takes_name_and_ignores_it():
    y = np.ones((2, 10, 12, 4), np.float32)
    want = convt_cli.conv(y, W, 2, "SAME")
    for got in (convt_cli.conv(y, W, 2, "SAME", name="down"), convt_cli.conv(y, W, 2, "SAME", None, None, "down"),
                convt_cli.conv(y, W, 2, "SAME", name=None, threads=1)):
        np.testing.assert_array_equal(got, want)
    names = list(inspect.signature(convt_cli.conv).parameters)
    assert names[:7] == ["input", "filters", "strides", "padding", "data_format", "dilations", "name"]


@pytest.mark.parametrize(
    "output_shape",
    [
        [2, 10, 12, 4],
        (2, 10, 12, 4),
        range(2, 3),  # replaced below: a range is a sequence too
        np.array([2, 10, 12, 4]),
        np.array([2, 10, 12, 4], np.int32),
        [np.int64(2), np.int32(10), np.int16(12), np.uint8(4)],
        [np.array(2), np.array(10), 12, np.array(4, np.int32)],
        HasArray([2, 10, 12, 4]),
        HasArray([2, 10, 12, 4], np.int32),
        HasNumpy([2, 10, 12, 4]),
        np.array([10, 12]),
        HasArray([10, 12]),
        HasNumpy([10, 12]),
    ],
    ids=lambda v: type(v).__name__,
)
def test_output_shape_takes_any_sequence_or_array_of_ints(output_shape):
    if isinstance(output_shape, range):
        output_shape = range(10, 13, 2)  # (10, 12)
    got = convt_cli.conv_transpose(X, W, output_shape, strides=2)
    np.testing.assert_array_equal(got, convt_cli.conv_transpose(X, W, [2, 10, 12, 4], strides=2))


@pytest.mark.parametrize(
    "output_shape,message",
    [
        ([2, 10, 2.5, 4], "output_shape[2] must be an integer, got 2.5"),
        ([2, 10, 12.0, 4], "output_shape[2] must be an integer, got 12.0"),
        ([2, 10, np.float64(12), 4], "output_shape[2] must be an integer, got 12.0"),
        (np.array([2.0, 10, 12, 4]), "output_shape[0] must be an integer, got 2.0"),
        (HasArray([2, 10, 12.5, 4], np.float32), "output_shape[0] must be an integer, got 2.0"),
        ([2, 10, True, 4], "output_shape[2] must be an integer, got True"),
        ([2, 10, np.True_, 4], "output_shape[2] must be an integer, got True"),
        (np.array([True, False]), "output_shape[0] must be an integer, got True"),
        ([2, "10", 12, 4], "output_shape[1] must be an integer, got '10'"),
        (np.array(["2", "10"]), "output_shape[0] must be an integer, got '2'"),
        ("2,10,12,4", "output_shape must be a sequence of integers, got '2,10,12,4'"),
        (b"\x02\x0a\x0c\x04", "output_shape must be a sequence of integers, got b'\\x02\\n\\x0c\\x04'"),
        (12, "output_shape must be a sequence of integers, got 12"),
        (2.5, "output_shape must be a sequence of integers, got 2.5"),
        (iter([2, 10, 12, 4]), "output_shape must be a sequence of integers, got <list_iterator"),
        (np.array(12), "output_shape must be one-dimensional, got 0-d shape (): 12"),
        (HasArray(12), "output_shape must be one-dimensional, got 0-d shape (): 12"),
        (np.array([[2, 10], [12, 4]]),
         "output_shape must be one-dimensional, got 2-d shape (2, 2): [[2, 10], [12, 4]]"),
    ],
    ids=lambda v: repr(v)[:30],
)
def test_output_shape_refuses_what_is_not_integers(output_shape, message):
    with pytest.raises(ConvtError) as e:
        convt_cli.conv_transpose(X, W, output_shape, strides=2)
    assert str(e.value).startswith("conv_transpose: " + message), str(e.value)
    assert "\n" not in str(e.value)


def test_dir_lists_the_public_names():
    names = dir(convt_cli)
    for name in ("conv_transpose", "conv", "run_files", "ConvtError", "__version__"):
        assert name in names
    assert set(convt_cli.__all__) <= set(names)
    assert names == sorted(names)


def test_every_listed_name_resolves():
    for name in convt_cli.__all__:
        assert getattr(convt_cli, name) is not None
    with pytest.raises(AttributeError, match="has no attribute 'conv2d'"):
        convt_cli.conv2d  # noqa: B018
