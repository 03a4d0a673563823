"""Filters stored as other frameworks store them (--filter-layout, filter_layout=): read once at the edge as
[*k, out, in].

Matrix: layouts torch and onnx ([in, out, *k], no flip) against the same filters in tf's layout, rank 1-3,
both data formats, float32 and float64, through conv_transpose, verify_conv_transpose, run_files and the CLI;
a layout mistake told in the layout the filters were given in; the JSON summary names the layout.
"""

import json

import numpy as np
import pytest

from conftest import invoke
from convt_cli import ConvtError, conv_transpose
from convt_cli.verify import verify_conv_transpose


def _torch_weight(w_tf: np.ndarray) -> np.ndarray:
    """[*k, out, in] -> PyTorch's [in, out, *k], written out by hand (the inverse of what convt reads)."""
    n = w_tf.ndim - 2
    return np.ascontiguousarray(np.transpose(w_tf, (n + 1, n, *range(n))))


@pytest.mark.parametrize("layout", ["torch", "onnx", "TORCH"])
@pytest.mark.parametrize("rank, first", [(1, False), (2, False), (2, True), (3, True)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_and_onnx_weights_give_the_tf_numbers(layout, rank, first, dtype):
    rng = np.random.default_rng([rank, first])
    spatial = (5, 4, 3)[:rank]
    x = rng.standard_normal((2, 3, *spatial) if first else (2, *spatial, 3)).astype(dtype)
    w = rng.standard_normal((*(3, 2, 2)[:rank], 4, 3)).astype(dtype)
    flags = dict(strides=2, padding="SAME", data_format="channels_first" if first else "channels_last")
    want = conv_transpose(x, w, **flags)
    got = conv_transpose(x, _torch_weight(w), filter_layout=layout, **flags)
    assert got.tobytes() == want.tobytes()
    assert verify_conv_transpose(x, _torch_weight(w), want, filter_layout=layout, **flags).passed


def test_a_mistake_is_told_in_the_layout_the_filters_were_given_in():
    x = np.ones((2, 5, 5, 3), np.float32)
    with pytest.raises(ConvtError) as e:
        conv_transpose(x, np.ones((4, 3, 3, 3), np.float32), strides=2, filter_layout="torch")
    assert str(e.value).endswith("(filters given in layout torch [in, out/groups, *k] with shape (4, 3, 3, 3), read as "
                                 "[*k, out, in] (3, 3, 3, 4))")
    with pytest.raises(ConvtError) as e:
        conv_transpose(x, np.ones((3, 3, 4, 3), np.float32), filter_layout="keras")
    assert str(e.value) == "conv_transpose: filter_layout must be one of 'tf', 'torch', 'onnx', 'jax', got 'keras'"


def test_the_cli_reads_torch_weights_for_run_verify_and_shape(work):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 5, 5, 3)).astype(np.float32)
    w = rng.standard_normal((3, 3, 4, 3)).astype(np.float32)
    np.save("xl.npy", x)
    np.save("wl.npy", _torch_weight(w))
    r = invoke("run", "xl.npy", "wl.npy", "-o", "yl.npy", "--strides", "2", "--filter-layout", "torch", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["filter_layout"] == "torch" and json.loads(r.stdout)["filters_shape"] == [3, 3, 4, 3]
    assert np.load("yl.npy").tobytes() == conv_transpose(x, w, strides=2).tobytes()
    r = invoke("verify", "xl.npy", "wl.npy", "yl.npy", "--strides", "2", "--filter-layout", "onnx")
    assert r.exit_code == 0 and r.stdout.startswith("PASS"), r.output
    r = invoke("shape", "xl.npy", "wl.npy", "--strides", "2", "--filter-layout", "torch", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["output_shape"] == [2, 10, 10, 4], r.output
    r = invoke("run", "xl.npy", "wl.npy", "-o", "bad.npy", "--filter-layout", "keras")
    assert r.exit_code == 2 and r.stderr.startswith("Error: Invalid value for '--filter-layout'"), r.output
    np.save("wl2.npy", _torch_weight(rng.standard_normal((3, 3, 4, 5)).astype(np.float32)))  # in=5: not x's 3
    r = invoke("run", "xl.npy", "wl2.npy", "-o", "bad.npy", "--filter-layout", "torch")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.output
    assert "(filters given in layout torch [in, out/groups, *k] with shape (5, 4, 3, 3)" in r.stderr


def test_the_cli_takes_the_other_frameworks_padding_spellings(work):
    """--padding same_lower, an integer, one lo:hi for every axis: the numbers of the explicit pads they mean."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, 5, 4, 3)).astype(np.float32)
    w = rng.standard_normal((4, 3, 2, 3)).astype(np.float32)
    np.save("xp.npy", x)
    np.save("wp.npy", w)
    for spelled, pads in (("same_lower", [(1, 1), (1, 0)]), ("SAME_UPPER", [(1, 1), (0, 1)]), ("1", [(1, 1)] * 2),
                          ("0:2", [(0, 2)] * 2)):
        r = invoke("run", "xp.npy", "wp.npy", "-o", "yp.npy", "--strides", "2", "--padding", spelled, "--force",
                   "--json")
        assert r.exit_code == 0, r.output
        summary = json.loads(r.stdout)
        assert summary["padding"] == [list(p) for p in pads]
        want = conv_transpose(x, w, summary["output_shape"], strides=2, padding=pads)
        assert np.load("yp.npy").tobytes() == want.tobytes()
        r = invoke("verify", "xp.npy", "wp.npy", "yp.npy", "--strides", "2", "--padding", spelled)
        assert r.exit_code == 0, r.output


@pytest.mark.parametrize("layout", ["torch", "onnx", "jax"])
@pytest.mark.parametrize("shape", [(9,), (), (4, 3)])
def test_filters_without_kernel_and_channel_axes_are_named_not_crashed_on(work, layout, shape):
    # a bias passed as the weight, say
    np.save("b.npy", np.ones(shape, np.float32))
    axes = {"torch": "[in, out/groups, *k]", "onnx": "[in, out/groups, *k]", "jax": "[*k, in, out]"}[layout]
    told = (f"filters given in layout {layout} {axes} must have rank >= 3 (kernel axes and two channel axes), got "
            f"rank {len(shape)} with shape {shape}")
    r = invoke("run", "x.npy", "b.npy", "--filter-layout", layout, "-o", "y.npy")
    assert r.exit_code == 2 and r.stderr == f"Error: FILTERS 'b.npy': {told}\n"
    with pytest.raises(ConvtError) as e:
        conv_transpose(np.ones((1, 4, 4, 3), np.float32), np.ones(shape, np.float32), filter_layout=layout)
    assert str(e.value) == f"conv_transpose: {told}"
