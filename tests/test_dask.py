"""The Dask path: convt_cli.dask on dask arrays, and `convt run/verify --dask` on a LocalCluster of 2 processes.

Every result is compared with the in-process one, bit for bit: whatever the chunks, the scheduler (threads,
processes, synchronous, distributed) and the threads per worker. The adjoint check gives the in-memory report.
A worker killed midway: the job still ends with the right bits. Ctrl-C on the client: nothing at OUTPUT.
"""

import json
import os
import signal
import subprocess
import sys
import time

import dask.array as da
import numpy as np
import pytest
import zarr
from conftest import convt_command, error_line, invoke
from dask.delayed import Delayed

import convt_cli
from convt_cli import ConvtError, cluster
from convt_cli import dask as convt_dask
from convt_cli.verify import verify_conv_transpose


@pytest.fixture(scope="module")
def client():
    """A LocalCluster of 2 worker processes, one thread each, as `--dask local:2` starts (shared by the module)."""
    with cluster.connect("local:2") as c:
        yield c


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _pair(batch=10, size=8, c_in=4, c_out=5, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, size, size, c_in)).astype(dtype)
    w = (rng.standard_normal((3, 3, c_out, c_in)) / 6).astype(dtype)
    return x, w


@pytest.mark.parametrize("chunks", [1, 3, 10], ids=lambda c: f"batch-chunks-{c}")
def test_the_lazy_array_has_the_shape_dtype_and_chunks_and_gives_the_in_memory_bits(chunks):
    x, w = _pair()
    y = convt_dask.conv_transpose(da.from_array(x, chunks=(chunks, 8, 8, 4)), w, strides=2)
    assert (y.shape, y.dtype) == ((10, 16, 16, 5), np.float32)
    assert y.chunks[0] == da.from_array(x, chunks=(chunks, 8, 8, 4)).chunks[0]
    assert all(len(c) == 1 for c in y.chunks[1:])
    expected = convt_cli.conv_transpose(x, w, strides=2).tobytes()
    for scheduler in ("threads", "sync"):
        assert y.compute(scheduler=scheduler).tobytes() == expected


def test_the_filters_are_one_key_of_the_graph():
    x, w = _pair(batch=12)
    y = convt_dask.conv_transpose(da.from_array(x, chunks=(2, 8, 8, 4)), w, strides=2)
    graph = dict(y.__dask_graph__())
    holding = [k for k, v in graph.items() if isinstance(v, np.ndarray) and v.shape == w.shape]
    tasks = [k for k in graph if isinstance(k, tuple) and str(k[0]).startswith("convt-conv_transpose")]
    assert len(tasks) == 6
    assert len(graph) == 6 + 6 + 1  # the input's chunks, one task per chunk, and the filters once
    assert len(holding) <= 1


def test_channel_chunks_are_joined_and_channels_first_and_groups_run():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 4, 9, 7)).astype(np.float64)  # NCHW, 4 channels in 2 groups
    w = rng.standard_normal((2, 3, 3, 4)).astype(np.float64)  # (*kernel, out / groups, in)
    xd = da.from_array(x, chunks=(2, 2, 9, 7))
    flags = dict(strides=(1, 2), padding="VALID", data_format="NCHW", groups=2)
    y = convt_dask.conv_transpose(xd, w, **flags)
    assert all(len(c) == 1 for c in y.chunks[1:])
    assert y.compute(scheduler="threads").tobytes() == convt_cli.conv_transpose(x, w, **flags).tobytes()


@pytest.mark.parametrize("first", [False, True], ids=["NHWC", "NCHW"])
def test_an_image_chunked_in_space_is_computed_in_tiles_of_the_chunks_times_the_stride(first):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 4, 20, 17) if first else (3, 20, 17, 4))
    w = rng.standard_normal((3, 2, 5, 4))
    flags = dict(strides=(2, 3), dilations=(1, 2), data_format="NCHW" if first else "NHWC")
    y = convt_dask.conv_transpose(da.from_array(x, chunks=(2, 4, 7, 5) if first else (2, 7, 5, 4)), w, **flags)
    spatial = y.chunks[2:] if first else y.chunks[1:3]
    assert spatial == ((14, 14, 12), (15, 15, 15, 6))  # 7 x 2 and 5 x 3 output positions a tile
    expected = convt_cli.conv_transpose(x, w, **flags)
    np.testing.assert_allclose(y.compute(scheduler="threads"), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_spatial_chunks_give_tiles_within_rounding_and_exact_in_int32(seed):
    """Random ranks, layouts, strides, dilations, paddings and chunks: the tiled output against the untiled one
    (and the loop reference's values through it): float64 within rounding, int32 exact, the same bits on every
    scheduler; chunked as the input's largest chunk times the stride."""
    from conftest import random_arrays

    x, w, out_sizes, first, flags = random_arrays(seed)
    rng = np.random.default_rng(seed)
    flags["data_format"] = "channels_first" if first else "channels_last"
    spatial = range(2, x.ndim) if first else range(1, x.ndim - 1)
    chunks = [int(rng.integers(1, n + 1)) if axis in spatial else n for axis, n in enumerate(x.shape)]
    chunks[0] = max(1, x.shape[0] // 2)
    expected = convt_cli.conv_transpose(x, w, out_sizes, **flags)
    y = convt_dask.conv_transpose(da.from_array(x, chunks=tuple(chunks)), w, out_sizes, **flags)
    assert y.shape == expected.shape
    got = y.compute(scheduler="threads")
    assert got.tobytes() == y.compute(scheduler="sync").tobytes()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12 * max(1.0, np.abs(expected).max()))
    if any(chunks[axis] < x.shape[axis] for axis in spatial):  # tiled: tiles of the largest chunk x stride
        for axis, s in zip(spatial, flags["strides"]):
            assert max(y.chunks[axis], default=0) <= max(chunks[axis] * s, 1)
    else:  # chunked along the batch only: one chunk across each spatial axis
        assert all(len(y.chunks[axis]) == 1 for axis in spatial)
    xi, wi = np.round(x * 3).astype(np.int32), np.round(w * 3).astype(np.int32)
    yi = convt_dask.conv_transpose(da.from_array(xi, chunks=tuple(chunks)), wi, out_sizes, **flags)
    assert np.array_equal(yi.compute(scheduler="sync"), convt_cli.conv_transpose(xi, wi, out_sizes, **flags))


def test_mistakes_are_reported_when_the_graph_is_made_with_the_in_memory_messages():
    x, w = _pair()
    xd = da.from_array(x, chunks=(2, 8, 8, 4))
    for call in (lambda f: f(x, w[..., :3], strides=2), lambda f: f(x.astype(np.float64), w),
                 lambda f: f(x, w, padding="NEAR")):
        with pytest.raises(ConvtError) as in_memory:
            call(convt_cli.conv_transpose)
        with pytest.raises(ConvtError) as lazily:
            call(lambda a, *args, **kw: convt_dask.conv_transpose(xd if a is x else da.from_array(a), *args, **kw))
        assert str(lazily.value) == str(in_memory.value)


def test_on_a_cluster_of_processes_the_bits_are_the_in_process_ones(client):
    x, w = _pair(batch=9, size=12, c_in=16, c_out=16, seed=2)  # GEMMs wide enough for BLAS's threads to matter
    expected = convt_cli.conv_transpose(x, w, strides=2, dilations=1).tobytes()
    for chunks in (1, 4, 9):
        y = convt_dask.conv_transpose(da.from_array(x, chunks=(chunks, 12, 12, 16)), w, strides=2)
        assert client.compute(y).result().tobytes() == expected
    assert y.compute(scheduler="processes").tobytes() == expected


def test_a_worker_of_several_threads_gives_the_same_bits():
    from distributed import Client, LocalCluster

    x, w = _pair(batch=9, size=12, c_in=16, c_out=16, seed=2)
    expected = convt_cli.conv_transpose(x, w, strides=2).tobytes()
    with LocalCluster(n_workers=1, threads_per_worker=3, processes=True, dashboard_address=":0") as local, \
            Client(local) as c:
        y = convt_dask.conv_transpose(da.from_array(x, chunks=(1, 12, 12, 16)), w, strides=2)
        assert c.compute(y).result().tobytes() == expected


@pytest.mark.parametrize("chunks", [1, 4, 10])
def test_verify_gives_the_in_memory_report_whatever_the_chunks(chunks):
    x, w = _pair()
    y = convt_cli.conv_transpose(x, w, strides=2)
    xd = da.from_array(x, chunks=(chunks, 8, 8, 4))
    report = convt_dask.verify(xd, w, da.from_array(y, chunks=(5, 16, 16, 5)), strides=2, probes=5, seed=3)
    assert report.passed and report == verify_conv_transpose(x, w, y, strides=2, probes=5, seed=3)
    wrong = y.copy()
    wrong[7, 3, 3, 1] += 0.5
    report = convt_dask.verify(xd, w, wrong, strides=2, probes=5, seed=3)
    assert not report.passed and report == verify_conv_transpose(x, w, wrong, strides=2, probes=5, seed=3)
    assert [t.batch for t in report.failing_tiles] == [7]
    lazy = convt_dask.verify(xd, w, wrong, strides=2, compute=False)
    assert isinstance(lazy, Delayed) and not lazy.compute(scheduler="sync").passed


def _save(folder, batch=24, size=16, channels=8, seed=1):
    x, w = _pair(batch=batch, size=size, c_in=channels, c_out=channels, seed=seed)
    np.save(folder / "x.npy", x)
    np.save(folder / "w.npy", w)
    return x, w


def test_run_job_writes_zarr_from_the_workers_and_other_formats_here(client, folder):
    x, w = _save(folder)
    assert convt_cli.run_files("x.npy", "w.npy", "in_process.npy", strides=2)
    expected = np.load("in_process.npy").tobytes()
    for target in ("y.zarr", "s.zarr:/g/y", "y.npy", "y.h5:/y"):
        info = cluster.run_job(client, "local:2", "x.npy", "w.npy", target, strides=2, max_memory="1M")
        assert info["pieces"] > 3 and info["dask"]["workers"] == 2
        back = convt_cli.io.load(convt_cli.io.parse_ref("OUTPUT", target))
        assert back.tobytes() == expected, target
    assert zarr.open_array("y.zarr", mode="r").chunks[0] == info["batch_per_chunk"]
    assert [p for p in os.listdir(".") if p.startswith(".convt")] == []


def test_run_job_reads_stores_and_h5_in_the_workers_and_verify_job_gives_the_in_process_report(client, folder):
    x, w = _save(folder)
    zarr.create_array("x.zarr", data=x, chunks=(5, 16, 16, 8))
    import h5py

    with h5py.File("x.h5", "w") as f:
        f["x"] = x
    convt_cli.run_files("x.npy", "w.npy", "y.npy", strides=2)
    for source in ("x.zarr", "x.h5:/x"):
        cluster.run_job(client, "local:2", source, "w.npy", "y2.npy", strides=2, force=True, max_memory="1M")
        assert np.load("y2.npy").tobytes() == np.load("y.npy").tobytes()
    here = convt_cli.stream.verify_files("x.npy", "w.npy", "y.npy", strides=2, probes=4, seed=9)
    there = cluster.verify_job(client, "local:2", "x.zarr", "w.npy", "y.npy", strides=2, probes=4, seed=9,
                               max_memory="1M")
    assert there.passed and there == here
    assert there.context["dask"]["workers"] == 2 and there.context["pieces"] > 1
    computed = cluster.verify_job(client, "local:2", "x.npy", "w.npy", None, strides=2, probes=4, seed=9)
    assert computed == convt_cli.stream.verify_files("x.npy", "w.npy", None, strides=2, probes=4, seed=9)


def test_a_worker_killed_midway_leaves_a_complete_correct_output(folder):
    x, w = _save(folder, batch=96, size=32, channels=16)
    convt_cli.run_files("x.npy", "w.npy", "y.npy", strides=2)
    with cluster.connect("local:2") as c:  # its own: this one loses a worker
        killed = []

        def progress(done, total):
            if not killed and done >= total // 4:  # a quarter in: kill one worker process outright
                pid = next(iter(c.run(os.getpid).values()))
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

        info = cluster.run_job(c, "local:2", "x.npy", "w.npy", "y.zarr", strides=2, max_memory="4M",
                               progress=progress)
    assert killed and info["pieces"] >= 12
    assert zarr.open_array("y.zarr", mode="r")[...].tobytes() == np.load("y.npy").tobytes()
    assert [p for p in os.listdir(".") if p.startswith(".convt")] == []


def test_the_cli_runs_and_verifies_on_a_local_cluster(folder):
    _save(folder)
    assert invoke("run", "x.npy", "w.npy", "-o", "y.npy", "--strides", 2).exit_code == 0
    r = subprocess.run(convt_command() + ["run", "x.npy", "w.npy", "-o", "y.zarr", "--strides", "2", "--dask",
                                          "local:2", "--max-memory", "1M", "--json"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    info = json.loads(r.stdout)
    assert info["dask"] == {"scheduler": "local:2", "workers": 2, "threads": 2} and info["pieces"] > 1
    assert zarr.open_array("y.zarr", mode="r")[...].tobytes() == np.load("y.npy").tobytes()
    r = subprocess.run(convt_command() + ["verify", "x.npy", "w.npy", "y.zarr", "--strides", "2", "--dask",
                                          "local:2"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("PASS"), r.stderr
    r = subprocess.run(convt_command() + ["run", "x.npy", "w.npy", "-o", "-", "--strides", "2", "--dask"],
                       capture_output=True, env={**os.environ, "DASK_SCHEDULER_ADDRESS": "local:2"})
    assert r.returncode == 0 and r.stdout == open("y.npy", "rb").read()


@pytest.mark.parametrize("args, message", [
    (["--dask", "nowhere"], "Error: --dask: expected a scheduler address like tcp://host:8786, local or local:N, "
                            "got 'nowhere'"),
    (["--dask", "local:0"], "Error: --dask: local:N needs N >= 1 worker processes, got 'local:0'"),
    (["--dask", "local:2", "--threads", "2"], "Error: --threads: with --dask each task computes on one thread of "
                                              "its worker, and the workers' threads are the cluster's (dask worker "
                                              "--nthreads N): drop --threads"),
])
def test_cli_mistakes_are_one_line_before_any_cluster_starts(folder, args, message):
    _save(folder, batch=2)
    assert error_line(invoke("run", "x.npy", "w.npy", "-o", "y.zarr", *args)) == message
    assert not os.path.exists("y.zarr")


def test_without_an_address_the_environment_gives_it_or_it_is_refused(folder, monkeypatch):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    with pytest.raises(ConvtError, match="none was given nor set in DASK_SCHEDULER_ADDRESS"):
        cluster.parse_address("")
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://10.0.0.5:8786")
    assert cluster.parse_address("") == ("scheduler", "tcp://10.0.0.5:8786")
    assert cluster.parse_address("local:3") == ("local", 3)


def test_inputs_the_workers_cannot_read_are_refused(client, folder):
    _save(folder, batch=2)
    np.savez("x.npz", x=np.load("x.npy"))
    for source, words in (("x.npz:x", "an .npz member can only be read whole"), ("-", "cannot read stdin")):
        with pytest.raises(ConvtError, match=words):
            cluster.run_job(client, "local:2", source, "w.npy", "y.npy")
    assert not os.path.exists("y.npy")


def test_an_interrupted_client_leaves_nothing_at_the_output(folder):
    _save(folder, batch=400, size=32, channels=32)
    process = subprocess.Popen(convt_command() + ["run", "x.npy", "w.npy", "-o", "y.zarr", "--dask", "local:2",
                                                  "--max-memory", "8M"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(p.startswith(".convt-") for p in os.listdir(".")):
        assert process.poll() is None, process.communicate()[1]
        time.sleep(0.05)
    assert any(p.startswith(".convt-") for p in os.listdir("."))  # the hidden output exists: the workers write
    time.sleep(0.5)
    assert process.poll() is None  # still at work (the whole job takes several seconds)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2, err
    assert err.strip().splitlines() == ["Error: interrupted; no output was written"]
    assert not os.path.exists("y.zarr")
    assert [p for p in os.listdir(".") if p.startswith(".convt")] == []


def test_threads_inside_a_worker_never_exceed_its_own(client):
    x, w = _pair(batch=8, size=24, c_in=32, c_out=32)
    y = convt_dask.conv_transpose(da.from_array(x, chunks=(1, 24, 24, 32)), w, strides=2)

    def threads_after():
        return len(os.listdir("/proc/self/task"))  # every thread of the process, BLAS's included

    before = client.run(threads_after)
    client.compute(y).result()
    after = client.run(threads_after)
    assert after == before  # no pool of convt's own, nor BLAS threads, beside the worker's thread


def test_the_api_works_in_a_fresh_interpreter():
    code = ("import numpy as np, dask.array as da, convt_cli.dask as cd; "
            "x = np.ones((4, 3, 3, 2), np.float32); w = np.ones((2, 2, 3, 2), np.float32); "
            "y = cd.conv_transpose(da.from_array(x, chunks=2), w, strides=2).compute(scheduler='sync'); "
            "print(y.shape, float(y.sum()), cd.verify(x, w, y, strides=2).passed)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    # stride 2 = kernel 2: each output element gets one tap per input channel, 2; 4 x 6 x 6 x 3 of them
    assert out.stdout.split() == ["(4,", "6,", "6,", "3)", "864.0", "True"]


def _walk(path):
    return sorted((here, sorted(dirs), sorted(files)) for here, dirs, files in os.walk(path))


def test_a_failing_task_leaves_nothing_in_a_new_or_existing_store(client, folder):
    x = np.ones((40, 16, 16, 8), np.int32)
    x[37] = 2**28  # its products overflow int32's accumulator bound: the task of element 37 fails
    np.save("x.npy", x)
    np.save("w.npy", np.ones((3, 3, 4, 8), np.int32))
    zarr.open_group("s.zarr", mode="w").create_array("keep", data=np.arange(3))
    before = _walk("s.zarr")
    for target in ("new.zarr", "s.zarr:/deep/y"):
        with pytest.raises(ConvtError, match="int32"):
            cluster.run_job(client, "local:2", "x.npy", "w.npy", target, max_memory="1M")
        assert not os.path.exists("new.zarr")
        assert _walk("s.zarr") == before
        assert [p for p in os.listdir(".") if p.startswith(".convt")] == []


def test_local_workers_leave_the_commands_process_group(client):
    groups = client.run(os.getpgrp)
    assert len(groups) == 2 and os.getpgrp() not in groups.values()


def test_ctrl_c_at_a_terminal_prints_one_line_and_leaves_nothing(folder):
    _save(folder, batch=400, size=32, channels=32)
    zarr.open_group("s.zarr", mode="w").create_array("keep", data=np.arange(3))
    before = _walk("s.zarr")
    process = subprocess.Popen(convt_command() + ["run", "x.npy", "w.npy", "-o", "s.zarr:/new/y", "--dask",
                                                  "local:2", "--max-memory", "8M"], stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # its own group, as a shell gives a foreground job
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not os.path.exists("s.zarr/new"):
        assert process.poll() is None, process.communicate()[1]
        time.sleep(0.05)
    time.sleep(1.0)
    assert process.poll() is None
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C at a terminal does: the whole foreground group
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert err.strip().splitlines() == ["Error: interrupted; no output was written"]
    assert _walk("s.zarr") == before


def test_an_h5_output_into_the_h5_input_file_is_refused_with_dask(client, folder):
    import h5py

    x, _ = _save(folder, batch=2)
    with h5py.File("d.h5", "w") as f:
        f["x"] = x
    with pytest.raises(ConvtError, match=r"^OUTPUT 'd.h5:/y': is in the HDF5 file INPUT 'd.h5:/x' is read from: "
                                         r"with --dask .*write to another file$"):
        cluster.run_job(client, "local:2", "d.h5:/x", "w.npy", "d.h5:/y")
    with h5py.File("d.h5", "r") as f:
        assert list(f) == ["x"]


def test_a_failed_verify_on_the_cluster_carries_the_in_process_hint(client, folder):
    _save(folder)
    convt_cli.run_files("x.npy", "w.npy", "y.npy")
    wrong = np.load("y.npy")
    np.save("y_wrong.npy", wrong[:, ::-1])  # flipped along an axis
    here = convt_cli.stream.verify_files("x.npy", "w.npy", "y_wrong.npy")
    there = cluster.verify_job(client, "local:2", "x.npy", "w.npy", "y_wrong.npy")
    assert not there.passed and there == here and there.hint == here.hint and here.hint


def test_unknown_chunk_sizes_are_refused_with_a_message():
    x, w = _pair()
    xd = da.from_array(x, chunks=(2, 8, 8, 4))
    with pytest.raises(ConvtError, match=r"chunk sizes are unknown .*compute_chunk_sizes\(\)"):
        convt_dask.conv_transpose(xd[xd[:, 0, 0, 0] > -100], w)
