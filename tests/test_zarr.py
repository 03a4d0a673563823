"""zarr stores as inputs and outputs: runs against .npy runs (bits), stores read back by the zarr package itself,
arrays inside existing stores, groups as many tensors, replacing, refusing, and what a failure leaves (nothing)."""

import json
import os

import ml_dtypes
import numpy as np
import pytest
import zarr
from conftest import error_line, invoke

from convt_cli import io
from convt_cli.formats import zarr as zarr_format
from convt_cli.stream import run_files


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _pair(batch=6, size=8, c_in=4, c_out=5, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, size, size, c_in)).astype(dtype)
    w = (rng.standard_normal((3, 3, c_out, c_in)) / 6).astype(dtype)
    np.save("x.npy", x)
    np.save("w.npy", w)
    return x, w


def _tree(path):
    """Every file below a folder with its bytes: what a store holds."""
    out = {}
    for here, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(here, name), "rb") as f:
                out[os.path.relpath(os.path.join(here, name), path)] = f.read()
    return out


def _hidden(path="."):
    return [os.path.join(here, n) for here, dirs, files in os.walk(path) for n in dirs + files
            if n.startswith(".convt-")]


def test_a_run_into_a_new_store_gives_the_bits_of_a_npy_run_with_its_provenance():
    _pair()
    assert invoke("run", "x.npy", "w.npy", "-o", "y.npy", "--strides", 2).exit_code == 0
    r = invoke("run", "x.npy", "w.npy", "-o", "y.zarr", "--strides", 2)
    assert r.exit_code == 0, r.output
    a = zarr.open_array("y.zarr", mode="r")
    assert a.metadata.zarr_format == 3
    assert a[...].tobytes() == np.load("y.npy").tobytes()
    assert a.attrs["convt_op"] == "conv_transpose" and a.attrs["convt_input"] == "x.npy"
    assert a.attrs["convt_parameters"]["strides"] == [2, 2]
    assert _hidden() == []


def test_outputs_are_chunked_along_the_pieces_of_the_run():
    _pair(batch=12, size=16)
    r = invoke("run", "x.npy", "w.npy", "-o", "y.zarr", "--max-memory", "300K", "--json")
    assert r.exit_code == 0, r.output
    chunk = json.loads(r.stdout)["batch_per_chunk"]
    assert 1 <= chunk < 12
    assert zarr.open_array("y.zarr", mode="r").chunks == (chunk, 16, 16, 5)
    np.testing.assert_array_equal(zarr.open_array("y.zarr", mode="r")[...],
                                  np.asarray(io.load(io.parse_ref("X", "y.zarr"))))


def test_a_tiled_run_chunks_along_its_tiles_and_reads_its_windows_from_a_store():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 48, 40, 8)).astype(np.float32)
    w = (rng.standard_normal((3, 3, 8, 8)) / 9).astype(np.float32)
    zarr.create_array("x.zarr", data=x, chunks=(1, 7, 40, 8))
    np.save("w.npy", w)
    assert invoke("run", "x.zarr", "w.npy", "-o", "whole.npy", "--strides", 2).exit_code == 0
    r = invoke("run", "x.zarr", "w.npy", "-o", "y.zarr", "--strides", 2, "--max-memory", "1M", "--json")
    assert r.exit_code == 0, r.output
    tile = json.loads(r.stdout)["tile_shape"]
    assert tile is not None and tile[0] < 96
    y = zarr.open_array("y.zarr", mode="r")
    assert y.chunks == (1, *tile, 8)
    whole = np.load("whole.npy")
    assert np.abs(y[...] - whole).max() <= 1e-6 * np.abs(whole).max()
    r = invoke("run", "x.zarr", "w.npy", "-o", "y.npy", "--strides", 2, "--max-memory", "1M")
    assert np.load("y.npy").tobytes() == y[...].tobytes()  # the same tiling, the same bits, whatever the format


def test_an_array_inside_an_existing_store_leaves_the_others_as_they_were():
    x, _ = _pair()
    root = zarr.open_group("s.zarr", mode="w")
    root.create_array("keep/a", data=np.arange(10.0), chunks=(5,))
    before = _tree("s.zarr")
    r = invoke("run", "x.npy", "w.npy", "-o", "s.zarr:/out/deep/y")
    assert r.exit_code == 0, r.output
    after = _tree("s.zarr")
    assert {k: v for k, v in after.items() if k in before} == before
    assert invoke("run", "x.npy", "w.npy", "-o", "y.npy").exit_code == 0
    assert zarr.open_group("s.zarr", mode="r")["out/deep/y"][...].tobytes() == np.load("y.npy").tobytes()
    assert _hidden() == []


def test_force_replaces_an_array_and_nothing_else():
    _pair()
    root = zarr.open_group("s.zarr", mode="w")
    root.create_array("y", data=np.zeros(3), chunks=(3,))
    root.create_array("z", data=np.ones(4), chunks=(4,))
    line = error_line(invoke("run", "x.npy", "w.npy", "-o", "s.zarr:/y"))
    assert line == "Error: OUTPUT 's.zarr:/y': array 'y' exists: pass --force to replace it"
    assert invoke("run", "x.npy", "w.npy", "-o", "s.zarr:/y", "--force").exit_code == 0
    assert invoke("run", "x.npy", "w.npy", "-o", "y.npy").exit_code == 0
    group = zarr.open_group("s.zarr", mode="r")
    assert group["y"][...].tobytes() == np.load("y.npy").tobytes()
    np.testing.assert_array_equal(group["z"][...], np.ones(4))
    assert _hidden() == []


def test_a_store_of_one_root_array_is_replaced_whole_with_force():
    _pair()
    zarr.create_array("y.zarr", data=np.zeros(3))
    assert "exists: pass --force" in error_line(invoke("run", "x.npy", "w.npy", "-o", "y.zarr"))
    assert invoke("run", "x.npy", "w.npy", "-o", "y.zarr", "--force").exit_code == 0
    assert zarr.open_array("y.zarr", mode="r").shape == (6, 8, 8, 5)
    assert _hidden() == []


@pytest.mark.parametrize("target, message", [
    ("s.zarr", "is a zarr store of 2 arrays: name an array inside it, as s.zarr:/output"),
    ("s.zarr:/g", "'g' is a group: name an array, as s.zarr:/g/output"),
    ("s.zarr:/g/a/b", "'g/a' is an array, so 'g/a/b' cannot be made inside it"),
    ("one.zarr:/y", "holds one array at its root, so it has no group to hold 'y'"),
    ("plain.zarr", "exists and is not a zarr store (a folder without zarr.json)"),
    ("s.zarr:/__x", "'__x' cannot name a zarr array or group"),
])
def test_outputs_a_store_cannot_take_are_refused_before_any_work(target, message):
    _pair()
    root = zarr.open_group("s.zarr", mode="w")
    root.create_array("g/a", data=np.zeros(3))
    root.create_array("b", data=np.zeros(3))
    zarr.create_array("one.zarr", data=np.zeros(3))
    os.mkdir("plain.zarr")
    before = {p: _tree(p) for p in ("s.zarr", "one.zarr", "plain.zarr")}
    line = error_line(invoke("run", "x.npy", "w.npy", "-o", target, "--force"))
    assert line == f"Error: OUTPUT '{target}': {message}" or (message in line and line.startswith("Error: OUTPUT"))
    assert {p: _tree(p) for p in before} == before
    assert _hidden() == []


def test_a_failure_midway_leaves_a_store_as_it_was(monkeypatch):
    _pair(batch=12, size=16)
    root = zarr.open_group("s.zarr", mode="w")
    root.create_array("keep", data=np.arange(5.0))
    before = _tree("s.zarr")
    calls = []
    put = zarr_format.ZarrWriter.put

    def failing(self, chunk, start):
        calls.append(start)
        if len(calls) == 2:
            raise KeyboardInterrupt
        put(self, chunk, start)

    monkeypatch.setattr(zarr_format.ZarrWriter, "put", failing)
    for target in ("s.zarr:/new/group/y", "fresh.zarr", "fresh.zarr:/g/y"):
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            run_files("x.npy", "w.npy", target, max_memory="300K")
        assert len(calls) == 2
        assert _tree("s.zarr") == before
        assert not os.path.exists("fresh.zarr")
        assert _hidden() == []


def test_a_group_of_arrays_runs_as_many_tensors_into_a_group():
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((3, 3, 2, 3)) / 5).astype(np.float32)
    np.save("w.npy", w)
    root = zarr.open_group("in.zarr", mode="w")
    xs = {"a": rng.standard_normal((2, 4, 4, 3)).astype(np.float32),
          "sub/b": rng.standard_normal((3, 5, 5, 3)).astype(np.float32)}
    for name, x in xs.items():
        root.create_array(name, data=x)
        np.save(name.replace("/", "_") + ".npy", x)
    r = invoke("run", "in.zarr:/", "w.npy", "-o", "out.zarr:/results/")
    assert r.exit_code == 0, r.output
    out = zarr.open_group("out.zarr", mode="r")
    for name in xs:
        assert invoke("run", name.replace("/", "_") + ".npy", "w.npy", "-o", "one.npy", "--force").exit_code == 0
        assert out[f"results/{name}"][...].tobytes() == np.load("one.npy").tobytes()
    listed = invoke("info", "out.zarr").stdout.splitlines()
    assert [line.split()[0] for line in listed] == ["out.zarr:/results/a", "out.zarr:/results/sub/b"]


def test_info_shape_and_verify_read_stores():
    _pair()
    assert invoke("run", "x.npy", "w.npy", "-o", "s.zarr:/g/y", "--compression", "gzip").exit_code == 0
    info = json.loads(invoke("info", "s.zarr", "--json").stdout)
    (array,) = info["arrays"]
    assert (array["name"], array["shape"], array["dtype"], array["compression"]) == \
        ("/g/y", [6, 8, 8, 5], "float32", "gzip")
    assert "convt_version" in array["attributes"]
    np.save("w5.npy", np.ones((2, 2, 3, 5), np.float32))
    shape = json.loads(invoke("shape", "s.zarr:/g/y", "w5.npy", "--strides", 2, "--json").stdout)
    assert shape["input_shape"] == [6, 8, 8, 5] and shape["output_shape"] == [6, 16, 16, 3]
    r = invoke("verify", "x.npy", "w.npy", "s.zarr:/g/y", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["passed"] is True, r.output
    arr = zarr.open_group("s.zarr", mode="r+")["g/y"]
    arr[0, 0, 0, 0] = arr[0, 0, 0, 0] + 1.0
    assert invoke("verify", "x.npy", "w.npy", "s.zarr:/g/y").exit_code == 1


def test_bfloat16_is_stored_as_tagged_uint16_and_read_back_as_bfloat16():
    x, w = _pair(dtype=ml_dtypes.bfloat16)
    assert invoke("run", "x.npy", "w.npy", "-o", "y.npy").exit_code == 0
    assert invoke("run", "x.npy", "w.npy", "-o", "y.zarr").exit_code == 0
    stored = zarr.open_array("y.zarr", mode="r")
    assert stored.dtype == np.uint16 and stored.attrs["dtype"] == "bfloat16"
    back = io.load(io.parse_ref("INPUT", "y.zarr"))
    assert back.dtype == ml_dtypes.bfloat16
    assert back.tobytes() == np.load("y.npy").tobytes()


@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.complex64, np.float16])
def test_other_dtypes_go_through_a_store_unchanged(dtype):
    a = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    io.write(io.parse_ref("OUTPUT", "a.zarr", must_exist=False), a, {"by": "test"})
    back = io.load(io.parse_ref("INPUT", "a.zarr"))
    assert back.dtype == np.dtype(dtype) and back.tobytes() == a.tobytes()


def test_zarr_v2_stores_are_read():
    x, _ = _pair()
    zarr.create_array("v2.zarr", data=x, chunks=(2, 8, 8, 4), zarr_format=2)
    assert invoke("run", "v2.zarr", "w.npy", "-o", "a.npy").exit_code == 0
    assert invoke("run", "x.npy", "w.npy", "-o", "b.npy").exit_code == 0
    assert np.load("a.npy").tobytes() == np.load("b.npy").tobytes()


def test_consolidated_metadata_lists_a_new_array():
    _pair()
    root = zarr.open_group("s.zarr", mode="w")
    root.create_array("a", data=np.zeros(3))
    zarr.consolidate_metadata("s.zarr")
    assert invoke("run", "x.npy", "w.npy", "-o", "s.zarr:/y").exit_code == 0
    consolidated = zarr.open_consolidated("s.zarr", mode="r")
    assert sorted(name for name, _ in consolidated.members()) == ["a", "y"]


def test_an_input_folder_that_is_no_store_is_refused():
    _pair()
    os.mkdir("d.zarr")
    line = error_line(invoke("run", "d.zarr", "w.npy", "-o", "y.npy"))
    assert line == ("Error: INPUT 'd.zarr': is a folder, expected a .npy, .npz, HDF5 or .safetensors file or a zarr "
                    "store")
    zarr.open_group("g.zarr", mode="w").create_array("q/a", data=np.zeros((2, 3)))
    assert error_line(invoke("run", "g.zarr:/nope", "w.npy", "-o", "y.npy")) == \
        "Error: INPUT 'g.zarr:/nope': has no array or group 'nope'"
    assert error_line(invoke("run", "g.zarr:/q/a/", "w.npy", "-o", "y.npy")).startswith("Error: INPUT")
    assert not os.path.exists("y.npy")


def test_names_inside_a_store_complete_as_groups_and_arrays():
    from convt_cli.completion import complete_array_ref

    root = zarr.open_group("s.zarr", mode="w")
    root.create_array("g/y", data=np.zeros(2))
    root.create_array("g/z", data=np.zeros(2))
    root.create_array("top", data=np.zeros(2))
    assert [c.value for c in complete_array_ref("s.zarr:/")] == ["s.zarr:/g/", "s.zarr:/top"]
    assert [c.value for c in complete_array_ref("s.zarr:/g/")] == ["s.zarr:/g/y", "s.zarr:/g/z"]
    assert [c.value for c in complete_array_ref("s.zarr:/g/z")] == ["s.zarr:/g/z"]
    assert complete_array_ref("missing.zarr:/") == []


def test_attributes_are_copied_from_h5_to_a_store_as_json():
    import h5py

    x, _ = _pair()
    with h5py.File("x.h5", "w") as f:
        f["x"] = x
        f["x"].attrs["units"] = "counts"
        f["x"].attrs["scale"] = np.float32(0.5)
        f["x"].attrs["axes"] = np.array([1, 2, 3])
    assert invoke("run", "x.h5:/x", "w.npy", "-o", "y.zarr", "--copy-attrs").exit_code == 0
    attrs = zarr.open_array("y.zarr", mode="r").attrs
    assert (attrs["units"], attrs["scale"], attrs["axes"]) == ("counts", 0.5, [1, 2, 3])
    assert attrs["convt_input"] == "x.h5:/x"


def test_a_damaged_chunk_is_one_error_line_in_run_and_verify():
    _pair()
    assert invoke("run", "x.npy", "w.npy", "-o", "y.zarr").exit_code == 0
    chunk = next(os.path.join(here, f) for here, _, files in os.walk("y.zarr/c") for f in files)
    with open(chunk, "r+b") as f:
        f.truncate(100)
    for args in (["run", "y.zarr", "w5.npy", "-o", "z.npy"], ["verify", "x.npy", "w.npy", "y.zarr"]):
        np.save("w5.npy", np.ones((3, 3, 2, 5), np.float32))
        line = error_line(invoke(*args))
        assert line.startswith("Error: ") and "cannot be read (" in line and "damaged or unreadable" in line
    assert not os.path.exists("z.npy")


def test_an_array_added_to_a_v2_store_is_v2_and_takes_gzip():
    _pair()
    zarr.open_group("v2.zarr", mode="w", zarr_format=2).create_array("a", data=np.zeros(3))
    r = invoke("run", "x.npy", "w.npy", "-o", "v2.zarr:/out/y", "--compression", "gzip", "--compression-level", 7)
    assert r.exit_code == 0, r.output
    y = zarr.open_group("v2.zarr", mode="r")["out/y"]
    assert y.metadata.zarr_format == 2 and "GZip" in repr(y.compressors) and "level=7" in repr(y.compressors)
    assert invoke("run", "x.npy", "w.npy", "-o", "y.npy").exit_code == 0
    assert y[...].tobytes() == np.load("y.npy").tobytes()


def test_copy_attrs_from_a_store_made_by_convt_into_h5():
    import h5py

    _pair()
    np.save("w5.npy", np.ones((3, 3, 2, 5), np.float32))
    assert invoke("run", "x.npy", "w.npy", "-o", "y.zarr").exit_code == 0
    zarr.open_array("y.zarr", mode="r+").attrs["meta"] = {"site": "A", "run": 3}
    r = invoke("run", "y.zarr", "w5.npy", "-o", "z.h5:/z", "--copy-attrs")
    assert r.exit_code == 0, r.output
    with h5py.File("z.h5", "r") as f:
        attrs = dict(f["z"].attrs)
    assert json.loads(attrs["meta"]) == {"site": "A", "run": 3}
    assert attrs["convt_input"] == "y.zarr"  # convt's own, of this run


def test_a_new_store_is_as_readable_as_any_new_file():
    _pair()
    old = os.umask(0o022)
    try:
        assert invoke("run", "x.npy", "w.npy", "-o", "y.zarr").exit_code == 0
        assert invoke("run", "x.npy", "w.npy", "-o", "y.npy").exit_code == 0
    finally:
        os.umask(old)
    assert os.stat("y.zarr").st_mode & 0o777 == 0o755
    assert os.stat("y.npy").st_mode & 0o777 == 0o644


def test_a_compression_a_store_cannot_take_names_the_store():
    _pair()
    line = error_line(invoke("run", "x.npy", "w.npy", "-o", "y.zarr", "--compression", "lzf"))
    assert line.startswith("Error: --compression lzf: OUTPUT 'y.zarr' is a zarr store, which takes only gzip")
