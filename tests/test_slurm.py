"""The sbatch scripts in slurm/ on a real one-node SLURM cluster (launch/slurm_local.sh).

Two tasks on the one node stand for two nodes: two torchrun agents meet at the c10d rendezvous,
exactly as one agent per node would. Results are compared with the same run under --nproc 2.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_ddp import EXACT, QUICKSTART, _assert_same_network, _final, _update_steps
from tests.test_ray_train import LONG, TOTAL_STEPS

ROOT = Path(__file__).resolve().parents[1]
TWO_TASKS = ["-n", "2", "--ntasks-per-node=2", "-c", "1"]


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, Path]:
    """--nproc 2 runs of the short and the long config (DDP on gloo, one thread each)."""
    base = tmp_path_factory.mktemp("references")
    runs = {"short": (base / "short", [*EXACT, "method.name=rigl"]), "long": (base / "long", LONG)}
    for run, overrides in runs.values():
        command = [sys.executable, "-m", "distsparse.cli", "train", "--nproc", "2", QUICKSTART,
                   *overrides, f"run.dir={run}"]
        result = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
    return {name: run for name, (run, _) in runs.items()}


def _sbatch(cluster, script: str, run: Path, overrides: list[str], *options: str,
            env: dict[str, str] | None = None) -> str:
    """Submit slurm/SCRIPT for RUN; return the job id."""
    command = ["sbatch", "--parsable", "-o", f"{run}.out", *options, f"slurm/{script}", str(run),
               "configs/quickstart.yaml", *overrides, "backend.name=ddp"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={**cluster.env, "DISTSPARSE_PYTHON": sys.executable,
                                 "OMP_NUM_THREADS": "1", **(env or {})})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def _job(cluster, job_id: str) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "show", "job", job_id], env=cluster.env,
                           capture_output=True, text=True, timeout=30).stdout
    return dict(field.split("=", 1) for field in shown.split() if "=" in field)


def _wait(cluster, job_id: str, run: Path, timeout: float = 300) -> dict[str, str]:
    """Wait until the job ends for good (an end counts once it has lasted 5 s: a job that
    requeues itself may pass through an ended state before PENDING)."""
    deadline, ended_since = time.monotonic() + timeout, None
    while True:
        job = _job(cluster, job_id)
        if job.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            ended_since = ended_since or time.monotonic()
            if time.monotonic() - ended_since >= 5:
                break
        else:
            ended_since = None
        assert time.monotonic() < deadline, f"job {job_id} still {job.get('JobState')}"
        time.sleep(0.5)
    assert job["JobState"] == "COMPLETED", Path(f"{run}.out").read_text()[-3000:]
    return job


def _same_as(reference: Path, run: Path) -> None:
    summary = json.loads((run / "summary.json").read_text())
    assert summary["completed"] and summary["world_size"] == 2
    assert summary["mask_fingerprint"] == json.loads((reference / "summary.json").read_text())[
        "mask_fingerprint"]
    _assert_same_network(_final(reference), _final(run), exact=True)
    assert _update_steps(run) == _update_steps(reference)


def test_torchrun_script_with_two_tasks(tmp_path, slurm_cluster, references):
    run = tmp_path / "torchrun"
    job = _sbatch(slurm_cluster, "torchrun.sbatch", run, [*EXACT, "method.name=rigl"], *TWO_TASKS)
    _wait(slurm_cluster, job, run)
    assert json.loads((run / "summary.json").read_text())["launcher"] == "torchrun"
    _same_as(references["short"], run)


def test_ray_on_slurm_script(tmp_path, slurm_cluster, references):
    run = tmp_path / "ray"
    job = _sbatch(slurm_cluster, "ray.sbatch", run, [*EXACT, "method.name=rigl"], "-N", "1",
                  "-c", "2", env={"DISTSPARSE_WORKERS": "2"})
    _wait(slurm_cluster, job, run)
    assert json.loads((run / "summary.json").read_text())["launcher"] == "ray"
    assert not Path(f"{run}.ray-token").exists()
    assert not Path(f"/tmp/ray-slurm-{job}").exists()
    _same_as(references["short"], run)


def test_sigterm_checkpoints_requeues_and_finishes_like_an_uninterrupted_run(
        tmp_path, slurm_cluster, references):
    run = tmp_path / "preempted"
    job = _sbatch(slurm_cluster, "torchrun.sbatch", run, LONG, *TWO_TASKS)
    deadline = time.monotonic() + 180
    metrics = run / "metrics.jsonl"
    while not (metrics.exists() and '"train"' in metrics.read_text()):
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=TERM", job], env=slurm_cluster.env, check=True, timeout=30)
    final = _wait(slurm_cluster, job, run)
    assert final["Restarts"] == "1"
    log = Path(f"{run}.out").read_text()
    assert "requeueing job" in log and f"resuming {run}" in log
    _same_as(references["long"], run)
    assert json.loads((run / "summary.json").read_text())["steps"] == TOTAL_STEPS
