"""Scaling out: one job per GPU from a pool (locks, queueing), torchrun over two nodes, and Make's commands."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from pneumothorax.io import paths
from pneumothorax.pipeline import gpu_pool
from pneumothorax.train import checkpoints

RECORD = (
    "import json, os, sys, time; start = time.time(); time.sleep(0.6); "
    "print(json.dumps({'job': sys.argv[1], 'gpus': os.environ['CUDA_VISIBLE_DEVICES'], "
    "'start': start, 'end': time.time()}))"
)


def _pool_job(job: int, ids: str, lock_dir, per_job: int = 1, outer: str | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "pneumothorax.pipeline.gpu_pool", "--gpus", ids, "--per-job", str(per_job)]
    command += ["--lock-dir", str(lock_dir), "--", sys.executable, "-c", RECORD, str(job)]
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if outer is not None:
        env["CUDA_VISIBLE_DEVICES"] = outer
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_five_jobs_queue_on_a_pool_of_two_fake_gpus(tmp_path):
    started = time.time()
    jobs = [_pool_job(k, "0,1", tmp_path) for k in range(5)]
    runs = [json.loads(job.communicate(timeout=60)[0]) for job in jobs]
    assert all(job.returncode == 0 for job in jobs) and len(runs) == 5
    assert {run["gpus"] for run in runs} <= {"0", "1"}
    for a in runs:  # no GPU ever runs two jobs at once
        overlapping = [b for b in runs if b is not a and b["start"] < a["end"] and a["start"] < b["end"]]
        assert all(b["gpus"] != a["gpus"] for b in overlapping)
    for a in runs:  # and never more than two jobs run at one instant (checked when each job starts)
        assert sum(b["start"] <= a["start"] < b["end"] for b in runs) <= 2
    assert time.time() - started >= 3 * 0.6  # five 0.6 s jobs on two GPUs take three rounds at least


def test_a_job_takes_several_gpus_at_once(tmp_path):
    runs = [json.loads(j.communicate(timeout=60)[0]) for j in [_pool_job(k, "0,1,2", tmp_path, 2) for k in range(2)]]
    assert sorted(len(run["gpus"].split(",")) for run in runs) == [2, 2]
    first, second = sorted(runs, key=lambda run: run["start"])
    assert second["start"] >= first["end"] - 0.05  # 2 + 2 GPUs do not fit in 3: the second job waited
    with pytest.raises(gpu_pool.PoolError, match="needs 3 GPU"):
        gpu_pool.run(["true"], ["0", "1"], per_job=3, lock_dir=tmp_path)


def test_the_training_process_itself_holds_the_gpu(tmp_path):
    """The pool becomes the command (exec): no wrapper can die and free the GPU under a running job."""
    sleeper = (
        "import os, sys, time; print(os.getpid(), os.environ['PNEUMOTHORAX_POOL_JOBS'], flush=True); time.sleep(30)"
    )
    command = [sys.executable, "-m", "pneumothorax.pipeline.gpu_pool", "--gpus", "7", "--lock-dir", str(tmp_path)]
    held = subprocess.Popen([*command, "--", sys.executable, "-c", sleeper], stdout=subprocess.PIPE, text=True)
    pid, jobs = held.stdout.readline().split()
    assert int(pid) == held.pid and jobs == "1"  # the job's process is the pool's: it holds the lock itself
    assert gpu_pool._try_lock(tmp_path / "gpu7.lock") is None  # GPU 7 is taken while it runs
    held.kill()  # killed while holding GPU 7: the kernel drops its lock
    held.wait()
    with gpu_pool.claimed(["7"], 1, tmp_path, say=False) as mine:
        assert list(mine) == ["7"]


def test_pool_ids_are_positions_in_an_outer_cuda_visible_devices(tmp_path):
    """Under SLURM or docker CUDA_VISIBLE_DEVICES is set already: GPUS=1 is its second entry, locked by that name."""
    job = _pool_job(0, "1", tmp_path, outer="4,6")
    run = json.loads(job.communicate(timeout=60)[0])
    assert run["gpus"] == "6" and (tmp_path / "gpu6.lock").exists() and not (tmp_path / "gpu1.lock").exists()
    wrong = _pool_job(0, "2", tmp_path, outer="4,6")
    _, err = wrong.communicate(timeout=60)
    assert (
        wrong.returncode == 2
        and "GPUS id 2 is not one of the 2 GPU(s) this job may use (CUDA_VISIBLE_DEVICES=4,6)" in err
    )
    env = gpu_pool.job_env({"PATH": "/bin"}, ["4", "6"], 2)
    assert env == {
        "PATH": "/bin",
        "CUDA_VISIBLE_DEVICES": "4,6",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "PNEUMOTHORAX_POOL_JOBS": "2",
    }


def test_the_lock_folder_is_shared_by_every_user(tmp_path, monkeypatch):
    shared = tmp_path / "locks"
    with gpu_pool.claimed(["0"], 1, shared, say=False):
        assert stat.S_IMODE(shared.stat().st_mode) == 0o1777  # world-writable and sticky, as /tmp
        assert stat.S_IMODE((shared / "gpu0.lock").stat().st_mode) == 0o666  # another user opens it too

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(gpu_pool.os, "open", denied)
    with pytest.raises(gpu_pool.PoolError, match="another user's lock file .* set GPU_LOCKS to a folder every user"):
        gpu_pool._try_lock(shared / "gpu1.lock")


def test_auto_workers_share_the_cores_between_the_pools_jobs(monkeypatch):
    from pneumothorax.data import datasets

    monkeypatch.setattr(datasets.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("PNEUMOTHORAX_POOL_JOBS", raising=False)
    assert datasets.resolve_workers("auto") == 15
    monkeypatch.setenv("PNEUMOTHORAX_POOL_JOBS", "4")  # four folds on four GPUs at once
    assert datasets.resolve_workers("auto") == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # and each fold on two processes
    assert datasets.resolve_workers("auto") == 1
    assert datasets.resolve_workers(6) == 6


def _make_plan(*args: str) -> str:
    cmd = ["make", "--no-print-directory", "-C", str(paths.ROOT), "-n", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout


@pytest.mark.make
def test_make_wraps_training_in_the_pool_and_torchrun_over_nodes(tmp_path):
    where = [f"MODELS_DIR={tmp_path}", f"PROCESSED_DIR={tmp_path}/p", "DATA_DIR=/nonexistent", "EXP=tiny"]
    plan = _make_plan("train", "oof", "infer", "GPUS=0,1,2,3", "NPROC=2", *where).splitlines()
    pooled = [line for line in plan if "03_train" in line or "04_train" in line]
    assert len(pooled) == 4 and all(
        "-m pneumothorax.pipeline.gpu_pool --gpus 0,1,2,3 --per-job 2" in line for line in pooled
    )
    # every other GPU job takes one GPU of the pool too (test inference used to land on a busy GPU 0)
    single = [" ".join(line.split()) for line in plan if "05_predict_oof" in line or "06_infer" in line]
    assert len(single) == 2 and all(
        "gpu_pool --gpus 0,1,2,3 --per-job 1 -- .venv/bin/python" in line for line in single
    )
    nodes = _make_plan("train-seg", "FOLD=1", "NNODES=2", "NPROC=4", "RDZV_ENDPOINT=node1:29500", "LAUNCH=srun", *where)
    line = next(line for line in nodes.splitlines() if "04_train_segmentation" in line)
    assert line.startswith("srun ") and "--nproc_per_node=4 --nnodes=2" in line
    assert "--rdzv_backend=c10d --rdzv_endpoint=node1:29500 --rdzv_id=tiny-fold1" in line


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(*launch: str, exp, processed) -> list[str]:
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    script = [str(paths.ROOT / "scripts" / "04_train_segmentation.py"), "--config", "tiny", "--fold", "0"]
    return [torchrun, *launch, *script, "--processed", str(processed), "--exp-dir", str(exp.root), "--device", "cpu"]


@pytest.mark.trains
def test_one_fold_over_two_nodes_equals_two_processes_on_one(processed, exp, tmp_path):
    """Two torchrun launches with --nnodes=2 (c10d rendezvous on localhost, gloo) train one tiny fold; so does
    one launch of two processes (gloo DDP), which writes its outputs once (rank 0) and the same weights."""
    import shutil

    from pneumothorax.io.paths import ExperimentDir

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = _free_port()
    nodes = [
        f"--nnodes=2 --nproc_per_node=1 --node_rank={rank} --rdzv_backend=c10d "
        f"--rdzv_endpoint=127.0.0.1:{port} --rdzv_id=test-2-nodes".split()
        for rank in (0, 1)
    ]
    launched = [
        subprocess.Popen(_torchrun(*n, exp=exp, processed=processed), env=env, stderr=subprocess.PIPE, text=True)
        for n in nodes
    ]
    errors = [p.communicate(timeout=900)[1] for p in launched]
    assert [p.returncode for p in launched] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    single = ExperimentDir(tmp_path / "single-node", 64)
    single.root.mkdir()
    shutil.copy(exp.folds, single.folds)
    one = subprocess.run(
        _torchrun("--standalone", "--nproc_per_node=2", exp=single, processed=processed),
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    out = single.segmenter(0).root
    assert len(pd.read_csv(out / "metrics.csv")) == 3  # 2 epochs + SWA, written once (rank 0 only)
    assert (out / "model.pt").exists() and len(list(out.glob("*.tmp"))) == 0
    assert (out / "train.log").read_text().count("done:") == 1
    a = checkpoints.load_checkpoint(exp.segmenter(0).model)["state_dict"]
    b = checkpoints.load_checkpoint(single.segmenter(0).model)["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)  # the same two ranks, the same sums
