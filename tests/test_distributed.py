"""Scale-out on Dask: the same store from a cluster as in process, killed workers, Ctrl-C,
worker errors; the model built once per worker process.

Identical bytes: a worker process runs torch with one thread (Dask's nanny sets
OMP_NUM_THREADS=1 for the processes it starts); an fp32 encoder run with another thread
count rounds differently (other reduction splits: seen here, up to 1 fp16 ulp). So the
in-process reference runs with one thread too (OMP_NUM_THREADS=1 for the CLI,
``torch.set_num_threads(1)`` here): then the stores are identical byte for byte.

Functions of this module sent to workers are pickled by value: a worker importing this
module would import conftest, which sets torch's thread count (2) in the worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from functools import partial
from pathlib import Path

import cloudpickle
import numpy as np
import psutil
import pytest
import torch
from sam_factory import TINY_VIT_B, perturb_
from test_cli_embed import NAPARI_SAM, napari_sam, random_vit_t_checkpoint

from napari_sam.engine.build import build_sam
from napari_sam.engine.distributed import (
    ModelSpec,
    StoreWork,
    WorkerError,
    open_cluster,
    precompute_on_cluster,
    run_tasks,
)
from napari_sam.engine.store import EmbeddingStore, read_store_info
from napari_sam.engine.store_format import _open_group
from napari_sam.engine.volume import run_generator
from napari_sam.model import build_model

cloudpickle.register_pickle_by_value(sys.modules[__name__])

def stack(n=3, h=96, w=160):
    z, y, x = np.mgrid[:n, :h, :w]
    return ((((y - 40) ** 2 + (x - 60 - 9 * z) ** 2) <= 400) * 3000 + 7 * x + 3 * y).astype(np.uint16)


def store_arrays(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    group = _open_group(path, mode="r")
    return np.asarray(group["features"]), np.asarray(group["done"]), dict(group.attrs)


def assert_every_item_valid(path: Path) -> int:
    """Every item's flag is set and is the crc32 of its stored bytes (read with zarr, not
    with the store's own code); returns the number of items."""
    features, done, _ = store_arrays(path)
    assert (done >= 0).all(), f"missing items: {np.flatnonzero(done < 0)}"
    for item, crc in enumerate(done):
        assert zlib.crc32(np.ascontiguousarray(features[item]).tobytes()) == crc, f"item {item}"
    return len(done)


# ---------------------------------------------------------------- the engine on a cluster
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    torch.save(perturb_(build_model(TINY_VIT_B), seed=2).state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def client():
    with open_cluster(workers=2) as client:
        yield client


def _count_builds() -> None:
    """Run on each worker: count ModelSpec.build calls in that process."""
    from napari_sam.engine import distributed

    if not hasattr(distributed, "builds"):
        distributed.builds = []
        build = distributed.ModelSpec.build
        distributed.ModelSpec.build = lambda spec: distributed.builds.append(spec) or build(spec)


def _builds() -> int:
    from napari_sam.engine import distributed

    return len(distributed.builds)


def test_a_cluster_writes_the_store_an_in_process_run_writes(tmp_path, client, tiny_checkpoint):
    vol = stack()
    np.save(tmp_path / "in.npy", vol)
    spec = ModelSpec(TINY_VIT_B, tiny_checkpoint, device="cpu", precision="fp32")
    model = build_sam(TINY_VIT_B, tiny_checkpoint, device="cpu", precision="fp32")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (see the module docstring)
    try:
        here = EmbeddingStore.open(tmp_path / "here.zarr", vol, model, tiling="on", tile_shape=64, halo=8)
        run_generator(here.precompute())
    finally:
        torch.set_num_threads(threads)
    there = EmbeddingStore.open(tmp_path / "there.zarr", vol, model, tiling="on", tile_shape=64, halo=8)
    assert there.n_items == 18 and there.signature == here.signature
    client.run(_count_builds)
    work = StoreWork.of(there, partial(np.load, str(tmp_path / "in.npy"), mmap_mode="r"), spec)
    progress = list(precompute_on_cluster(there, client, work, center=1))
    assert sorted(p.index for p in progress) == list(range(18)) and progress[-1].n_ready == 18
    assert there.ready.all()
    builds = client.run(_builds)
    assert sum(builds.values()) >= 1 and max(builds.values()) == 1, builds  # once per process
    a, b = store_arrays(tmp_path / "here.zarr"), store_arrays(tmp_path / "there.zarr")
    assert a[0].tobytes() == b[0].tobytes() and (a[1] == b[1]).all() and a[2] == b[2]
    assert assert_every_item_valid(tmp_path / "there.zarr") == 18


def test_cancel_stops_within_a_second_and_a_rerun_completes(tmp_path, client, tiny_checkpoint):
    vol = stack(n=6)
    np.save(tmp_path / "in.npy", vol)
    spec = ModelSpec(TINY_VIT_B, tiny_checkpoint, device="cpu", precision="fp32")
    model = build_sam(TINY_VIT_B, tiny_checkpoint, device="cpu", precision="fp32")
    store = EmbeddingStore.open(tmp_path / "s.zarr", vol, model)
    work = StoreWork.of(store, partial(np.load, str(tmp_path / "in.npy"), mmap_mode="r"), spec)
    cancel = threading.Event()
    jobs = precompute_on_cluster(store, client, work, cancel=cancel)
    next(jobs)
    cancel.set()
    start = time.perf_counter()
    result = run_generator(jobs)
    assert time.perf_counter() - start < 1.5 and result.cancelled
    time.sleep(1)  # tasks already running finish, cancelled ones never start
    assert EmbeddingStore.open(tmp_path / "s.zarr", vol, model).status.state == "reused"
    result = run_generator(precompute_on_cluster(store, client, work))
    assert not result.cancelled and result.n_ready == 6 and store.ready.all()
    assert assert_every_item_valid(tmp_path / "s.zarr") == 6


def _unreadable_input():
    raise ValueError("cannot read the input\nsecond line")


def test_a_failing_task_is_one_line(tmp_path, client, tiny_checkpoint):
    with pytest.raises(WorkerError, match=r"^a task failed on a worker: ZeroDivisionError") as info:
        list(run_tasks(client, lambda x: 1 / x, [1, 0, 2]))
    assert "\n" not in str(info.value)
    vol = stack(n=2)
    model = build_sam(TINY_VIT_B, tiny_checkpoint, device="cpu", precision="fp32")
    store = EmbeddingStore.open(tmp_path / "s.zarr", vol, model)
    work = StoreWork.of(store, _unreadable_input, ModelSpec(TINY_VIT_B, tiny_checkpoint, device="cpu"))
    with pytest.raises(WorkerError, match=r"ValueError: cannot read the input$"):
        run_generator(precompute_on_cluster(store, client, work))
    assert not store.ready.any()


# ---------------------------------------------------------------- the installed command
@pytest.fixture
def vit_t(tmp_path_factory):
    return ["--model", "vit_t", "--checkpoint", random_vit_t_checkpoint(tmp_path_factory),
            "--device", "cpu", "--precision", "fp32", "--quiet"]


def one_thread():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_workers_write_the_store_of_an_in_process_run(tmp_path, vit_t):
    """A 2D image (tiled: 3 tiles) embedded in process and by 2 worker processes."""
    np.save(tmp_path / "image.npy", stack(n=1, h=64)[0])
    tiling = ["--tiling", "on", "--tile-shape", "64", "--halo", "8"]
    here = napari_sam("embed", tmp_path / "image.npy", "--store", tmp_path / "a.zarr", *vit_t, *tiling,
                      env=one_thread())
    assert here.returncode == 0, here.stderr
    there = napari_sam("embed", tmp_path / "image.npy", "--store", tmp_path / "b.zarr", *vit_t, *tiling,
                       "--workers", "2", env=one_thread())
    assert there.returncode == 0, there.stderr
    assert "3/3 tiles ready" in there.stderr and "Traceback" not in there.stderr
    a, b = store_arrays(tmp_path / "a.zarr"), store_arrays(tmp_path / "b.zarr")
    assert a[0].shape == (3, 256, 64, 64) and a[2]["napari_sam_store"]["data"]["shape"] == [1, 64, 160]
    assert a[0].tobytes() == b[0].tobytes() and (a[1] == b[1]).all() and a[2] == b[2]
    rerun = napari_sam("embed", tmp_path / "image.npy", "--store", tmp_path / "b.zarr", *vit_t)
    assert rerun.returncode == 0 and "reusing" in rerun.stderr and "(0 encoded" in rerun.stderr


def worker_pids(proc: subprocess.Popen) -> list[int]:
    """The Dask worker processes the CLI started (multiprocessing spawn children)."""
    return [p.pid for p in psutil.Process(proc.pid).children(recursive=True)
            if "spawn_main" in " ".join(p.cmdline())]


def wait_for_items(proc: subprocess.Popen, store: Path, n: int, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while (info := read_store_info(store)) is None or info["n_ready"] < n:
        if proc.poll() is not None:
            pytest.fail(f"exited first: {proc.communicate()}")
        if time.monotonic() > deadline:
            pytest.fail(f"not {n} items stored in {timeout} s")
        time.sleep(0.1)


def test_a_worker_killed_mid_run_loses_only_its_task(tmp_path, vit_t):
    np.save(tmp_path / "in.npy", stack(n=3, h=64, w=64))
    args = [str(NAPARI_SAM), "embed", str(tmp_path / "in.npy"), "--store", str(tmp_path / "s.zarr"),
            *map(str, vit_t)]
    proc = subprocess.Popen([*args, "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_for_items(proc, tmp_path / "s.zarr", 1)
        pids = worker_pids(proc)
        assert len(pids) == 2
        os.kill(pids[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "Traceback" not in err
    if proc.returncode != 0:  # failing is allowed, cleanly: one line
        assert proc.returncode == 1 and err.strip().splitlines()[-1].startswith("napari-sam embed: error:")
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=240, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert "3/3 slices ready" in rerun.stderr
    assert assert_every_item_valid(tmp_path / "s.zarr") == 3


def test_ctrl_c_closes_the_cluster_and_keeps_the_store(tmp_path, vit_t):
    """Ctrl-C in a terminal reaches the whole foreground process group: the CLI and its
    workers (here: its own session, so that the test runner is not hit)."""
    np.save(tmp_path / "in.npy", stack(n=6, h=64, w=64))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([str(NAPARI_SAM), "embed", str(tmp_path / "in.npy"), "--store",
                                 str(tmp_path / "s.zarr"), *map(str, vit_t), "--workers", "2"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        wait_for_items(proc, tmp_path / "s.zarr", 1)
        workers = [psutil.Process(pid) for pid in worker_pids(proc)]
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    line, = [line for line in err.strip().splitlines() if "napari-sam" in line]
    assert "interrupted" in line and "resume" in line and "Traceback" not in err
    time.sleep(1)
    assert not [w.pid for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    _, done, _ = store_arrays(tmp_path / "s.zarr")
    features = store_arrays(tmp_path / "s.zarr")[0]
    assert (done >= 0).sum() >= 1
    for item in np.flatnonzero(done >= 0):  # what is flagged is whole
        assert zlib.crc32(features[item].tobytes()) == done[item]


FULL_DISK = '''
import errno, os
if os.environ.get("NAPARI_SAM_TEST_FLAGS_BEFORE_FULL"):
    from napari_sam.engine import store_files
    budget, set_flag = [int(os.environ["NAPARI_SAM_TEST_FLAGS_BEFORE_FULL"])], store_files._StoreFiles._set_flag
    def full(self, item, value, raise_errors=False):
        if value >= 0:
            if budget[0] == 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            budget[0] -= 1
        return set_flag(self, item, value, raise_errors)
    store_files._StoreFiles._set_flag = full
'''


def test_an_error_in_a_worker_is_one_line_and_a_rerun_resumes(tmp_path, vit_t):
    """Each worker process's disk is 'full' after its first item (sitecustomize, loaded by
    every process started with this PYTHONPATH, workers included)."""
    np.save(tmp_path / "in.npy", stack(n=3, h=64, w=64))
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(FULL_DISK)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "NAPARI_SAM_TEST_FLAGS_BEFORE_FULL": "1"}
    args = ["embed", tmp_path / "in.npy", "--store", tmp_path / "s.zarr", *vit_t]
    failed = napari_sam(*args, "--workers", "2", env=env)
    assert failed.returncode == 1, failed.stderr
    line = failed.stderr.strip().splitlines()[-1]
    assert line.startswith("napari-sam embed: error: a task failed on a worker: StoreWriteError")
    assert "No space left on device" in line and "run the same command again" in line
    assert "Traceback" not in failed.stderr
    n_before = read_store_info(tmp_path / "s.zarr")["n_ready"]
    assert 1 <= n_before < 3
    rerun = napari_sam(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert f"({3 - n_before} encoded" in rerun.stderr
    assert assert_every_item_valid(tmp_path / "s.zarr") == 3


def test_an_unreachable_scheduler_is_one_line_before_the_model_loads(tmp_path):
    np.save(tmp_path / "in.npy", stack(n=2, h=64, w=64))
    run = napari_sam("embed", tmp_path / "in.npy", "--store", tmp_path / "s.zarr", "--model", "vit_t",
                     "--checkpoint", tmp_path / "none.pt", "--scheduler", "tcp://127.0.0.1:9")
    assert run.returncode == 2, run.stderr
    line, = run.stderr.strip().splitlines()
    assert line.startswith("napari-sam embed: error: cannot start or reach the Dask cluster "
                           "(--scheduler tcp://127.0.0.1:9)")
    assert not (tmp_path / "s.zarr").exists()


def _square_after(x: int) -> int:
    import time

    time.sleep(0.5 if x else 0.0)
    return x * x


def _results_held(dask_worker) -> list:
    return list(dask_worker.data.values())


def test_a_result_lost_with_its_worker_is_computed_again():
    """A task that ended on a worker killed before the client fetched its result: the
    scheduler runs it again and run_tasks waits for it (it is not a failed task)."""
    import os
    import signal
    import time

    with open_cluster(workers=2) as own:
        results = run_tasks(own, _square_after, [0, 1, 2, 3])
        got = [next(results)]  # task 0; the others finish meanwhile, their results unfetched
        deadline = time.monotonic() + 60
        while not all(s.status == "finished" for s in own.futures.values()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        held = own.run(_results_held)  # {worker address: results it holds}
        victim = next(a for a, values in held.items() if set(values) - {0})  # unfetched ones
        lost = {k for k, ws in own.who_has().items() if list(ws) == [victim]}
        pid = own.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
        while not any(own.futures[k].status != "finished" for k in lost if k in own.futures):
            assert time.monotonic() < deadline  # the client has heard that they are lost
            time.sleep(0.05)
        got += list(results)
    assert sorted(got) == [(0, 0), (1, 1), (2, 4), (3, 9)]
