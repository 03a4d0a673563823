""".safetensors files (PyTorch weights as they are shared), and pickles refused.

Matrix: a file written by the safetensors package itself (NumPy API) holding several tensors, named with dots as
PyTorch names them, float32 and bfloat16: `convt run` and `convt verify` with --filter-layout torch against the
same arrays from .npy; batch slices read alone; `convt info` lists every tensor; an output .safetensors read back
by the safetensors package with convt's provenance as metadata; the mistakes (no such tensor, several and none
named, an existing file with other tensors, a dtype the format has not); .pt/.pth/.ckpt files, torch.save's zip and
a bare pickle refused with the conversion to safetensors, exact.
"""

import json
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import error_line, invoke
from convt_cli import io


@pytest.fixture
def weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    arrays = {
        "decoder.0.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),  # [in, out/groups, kh, kw]
        "decoder.0.bias": np.zeros(12, np.float32),
        "x": rng.standard_normal((3, 8, 5, 6)).astype(np.float32),
        "x.bf16": rng.standard_normal((3, 8, 5, 6)).astype(ml_dtypes.bfloat16),
        "w.bf16": rng.standard_normal((8, 3, 3, 3)).astype(ml_dtypes.bfloat16),
    }
    save_file(arrays, "model.safetensors", metadata={"format": "pt"})
    for name in ("x", "decoder.0.weight", "x.bf16", "w.bf16"):
        np.save(f"{name}.npy", arrays[name])
    return arrays


FLAGS = ["--filter-layout", "torch", "--data-format", "NCHW", "--groups", "4", "--strides", "2", "--padding", "1",
         "--output-padding", "1"]


@pytest.mark.parametrize("x, w", [("x", "decoder.0.weight"), ("x.bf16", "w.bf16")])
def test_tensors_run_and_verify_as_the_same_arrays_in_npy(weights, x, w):
    r = invoke("run", f"model.safetensors:{x}", f"model.safetensors:{w}", "-o", "st.npy", *FLAGS)
    assert r.exit_code == 0, r.output
    assert invoke("run", f"{x}.npy", f"{w}.npy", "-o", "plain.npy", *FLAGS).exit_code == 0
    got, want = np.load("st.npy"), np.load("plain.npy")
    assert got.shape == (3, 12, 10, 12) and got.tobytes() == want.tobytes()
    r = invoke("verify", f"model.safetensors:{x}", f"model.safetensors:{w}", "st.npy", *FLAGS)
    assert r.exit_code == 0, r.output


def test_batch_slices_are_read_alone_and_bfloat16_stays_bfloat16(weights):
    for name in ("x", "x.bf16"):
        source = io.Source(io.parse_ref("INPUT", f"model.safetensors:{name}"))
        assert not source.whole and source.dtype == weights[name].dtype
        for b0, b1 in ((0, 1), (1, 3), (2, 2), (0, 3)):
            assert source.read(b0, b1).tobytes() == weights[name][b0:b1].tobytes()
        source.close()


def test_info_lists_every_tensor(weights):
    r = invoke("info", "model.safetensors", "--json")
    assert r.exit_code == 0, r.output
    listed = json.loads(r.stdout)["arrays"]
    assert sorted((a["name"], tuple(a["shape"]), a["dtype"]) for a in listed) == sorted(
        (k, v.shape, v.dtype.name) for k, v in weights.items())


def test_an_output_is_a_safetensors_file_with_convts_provenance(weights):
    r = invoke("run", "model.safetensors:x", "model.safetensors:decoder.0.weight", "-o", "out.safetensors:up",
               *FLAGS)
    assert r.exit_code == 0, r.output
    back = load_file("out.safetensors")  # the safetensors package reads what convt wrote
    assert list(back) == ["up"]
    assert invoke("run", "x.npy", "decoder.0.weight.npy", "-o", "p.npy", *FLAGS).exit_code == 0
    assert back["up"].tobytes() == np.load("p.npy").tobytes()
    from safetensors import safe_open

    with safe_open("out.safetensors", framework="np") as f:
        meta = f.metadata()
    assert meta["convt_input"] == "model.safetensors:x" and json.loads(meta["convt_parameters"])["groups"] == 4
    r = invoke("run", "model.safetensors:x", "model.safetensors:decoder.0.weight", "-o", "out.safetensors", *FLAGS)
    assert error_line(r) == ("Error: OUTPUT 'out.safetensors': exists and holds other tensors (up): convt writes "
                             "whole .safetensors files, so write the output to a new file")
    r = invoke("run", "model.safetensors:x", "model.safetensors:decoder.0.weight", "-o", "out.safetensors:up", *FLAGS)
    assert error_line(r) == "Error: OUTPUT 'out.safetensors:up': exists: pass --force to replace it"
    r = invoke("run", "model.safetensors:x", "model.safetensors:decoder.0.weight", "-o", "out.safetensors:up",
               "--force", *FLAGS)
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("ref, message", [
    ("model.safetensors", "Error: INPUT 'model.safetensors': holds 5 tensors: name one, as "
                          "model.safetensors:decoder.0.bias"),
    ("model.safetensors:decoder.1.weight", "Error: INPUT 'model.safetensors:decoder.1.weight': has no tensor "
                                           "'decoder.1.weight': it holds decoder.0.bias, decoder.0.weight, w.bf16, "
                                           "x, x.bf16"),
])
def test_tensor_mistakes(weights, ref, message):
    r = invoke("run", ref, "decoder.0.weight.npy", "-o", "y.npy", *FLAGS)
    assert error_line(r) == message and not os.path.exists("y.npy")


def test_complex128_has_no_safetensors_type(weights):
    np.save("c.npy", np.ones((1, 4, 2), np.complex128))
    np.save("cw.npy", np.ones((3, 2, 2), np.complex128))
    r = invoke("run", "c.npy", "cw.npy", "-o", "c.safetensors")
    assert error_line(r) == ("Error: OUTPUT 'c.safetensors': a .safetensors file cannot hold complex128: write "
                             ".npy, .npz or .h5, or cast with --dtype")
    assert not [p for p in os.listdir(".") if p.startswith(("c.safetensors", ".convt"))]


def _advice(path, target):
    return (f"is a pickle (as torch.save writes .pt, .pth and .bin files), which convt never loads: unpickling runs "
            f"code. Convert its tensors to safetensors once, where PyTorch is installed: python -c \"import torch; "
            f"from safetensors.torch import save_file; t = torch.load('{path}', weights_only=True); "
            f"save_file({{k: v.contiguous() for k, v in (t if isinstance(t, dict) else {{'weight': t}}).items()}}, "
            f"'{target}')\", then pass {target}:NAME (convt info lists the names)")


@pytest.mark.parametrize("path, content", [
    ("model.pt", b"PK\x03\x04anything"),
    ("model.pth", b"\x80\x02}q\x00."),
    ("last.ckpt", b"whatever"),
    ("pytorch_model.bin", "torch zip"),
    ("old.bin", b"\x80\x02}q\x00."),  # a pickle of protocol 2, as torch.save wrote before its zip format
    ("disguised.safetensors", b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00}\x94."),
    ("disguised.npy", b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00}\x94."),
])
def test_pickles_are_refused_with_the_conversion(tmp_path, monkeypatch, path, content):
    import zipfile

    monkeypatch.chdir(tmp_path)
    if content == "torch zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
            z.writestr("archive/data/0", b"\0" * 16)
    else:
        with open(path, "wb") as f:
            f.write(content)
    stem, suffix = os.path.splitext(path)
    target = stem + ("-converted" if suffix == ".safetensors" else "") + ".safetensors"  # never over the pickle
    np.save("w.npy", np.ones((3, 3, 2, 2), np.float32))
    r = invoke("run", path, "w.npy", "-o", "y.npy")
    assert error_line(r) == f"Error: INPUT '{path}': {_advice(path, target)}"
    r = invoke("info", path)
    assert error_line(r) == f"Error: FILE '{path}': {_advice(path, target)}"
    r = invoke("run", "w.npy", f"{path}:weight", "-o", "y.npy")  # a name inside it: still a pickle
    assert error_line(r) == f"Error: FILTERS '{path}:weight': {_advice(path, target)}"


@pytest.mark.parametrize("content", [
    (128).to_bytes(8, "little") + b" " * 128,  # a header length of 128, whose first byte is a pickle's PROTO
    (128).to_bytes(8, "little"),  # cut short after the length
    (0x0280).to_bytes(8, "little") + b"{",
])
def test_a_damaged_safetensors_file_is_not_called_a_pickle(tmp_path, monkeypatch, content):
    monkeypatch.chdir(tmp_path)
    with open("bad.safetensors", "wb") as f:
        f.write(content)
    r = invoke("info", "bad.safetensors")
    assert "pickle" not in error_line(r) and error_line(r).startswith("Error: FILE 'bad.safetensors': is not a")


def test_force_replaces_a_damaged_safetensors_output(weights):
    open("o.safetensors", "wb").close()
    r = invoke("run", "model.safetensors:x", "model.safetensors:decoder.0.weight", "-o", "o.safetensors", *FLAGS)
    assert error_line(r) == "Error: OUTPUT 'o.safetensors': exists: pass --force to replace it"
    r = invoke("run", "model.safetensors:x", "model.safetensors:decoder.0.weight", "-o", "o.safetensors", "--force",
               *FLAGS)
    assert r.exit_code == 0, r.output
    assert list(load_file("o.safetensors")) == ["output"]
