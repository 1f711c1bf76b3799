"""launcher.name=ray on a real local Ray head: the same network as --nproc 2, and recovery from a
worker killed with SIGKILL, resumed from the last reported checkpoint with the same masks."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_ddp import EXACT, QUICKSTART, _assert_same_network, _final, _update_steps

ROOT = Path(__file__).resolve().parents[1]
# 4 epochs of 64 steps: few checkpoints (each report costs Ray Train ~1-2 s on 2 cores), and time
# to kill a worker after the second epoch's checkpoint is registered.
LONG = [*EXACT, "method.name=rigl", "data.synthetic.train_size=2048", "train.epochs=4",
        "method.update_interval=8"]
TOTAL_STEPS = 256


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same run with --nproc 2 local workers (DDP on gloo), one thread each."""
    run = tmp_path_factory.mktemp("reference") / "nproc"
    command = [sys.executable, "-m", "distsparse.cli", "train", "--nproc", "2", QUICKSTART, *LONG,
               f"run.dir={run}"]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return run


def _ray_command(run: Path, head) -> list[str]:
    return [sys.executable, "-m", "distsparse.cli", "train", QUICKSTART, *LONG, f"run.dir={run}",
            "launcher.name=ray", "launcher.num_workers=2", "launcher.max_failures=2",
            f"launcher.address={head.address}"]


def test_ray_train_equals_nproc(tmp_path, ray_head, reference):
    run = tmp_path / "ray"
    result = subprocess.run(_ray_command(run, ray_head), cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    expected = json.loads((reference / "summary.json").read_text())
    assert summary["launcher"] == "ray" and summary["world_size"] == 2 and summary["completed"]
    assert summary["mask_fingerprint"] == expected["mask_fingerprint"]
    assert (run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file()
    _assert_same_network(_final(reference), _final(run), exact=True)
    assert _update_steps(run) == _update_steps(reference)
    reported = sorted(p.name for p in (tmp_path / "ray_results" / "ray").glob("step_*"))
    assert reported[-1] == f"step_{summary['steps']:09d}"


def _alive_workers(head) -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(address=head.dashboard, filters=[("class_name", "=", "RayTrainWorker"),
                                                          ("state", "=", "ALIVE")])
    return [actor.pid for actor in actors]


def test_a_killed_worker_resumes_from_the_last_reported_checkpoint(tmp_path, ray_head, reference):
    run = tmp_path / "ray"
    driver = subprocess.Popen(_ray_command(run, ray_head), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        storage = tmp_path / "ray_results" / "ray"
        deadline = time.monotonic() + 180
        # Ray Train keeps 2 reported checkpoints: step 0's is deleted once the controller has
        # registered step 128's (a checkpoint directory alone may not be registered yet).
        while not storage.is_dir() or (storage / "step_000000000").exists() \
                or not any(storage.glob("step_*")):
            assert driver.poll() is None and time.monotonic() < deadline, "no checkpoint reported"
            time.sleep(0.05)
        victim = _alive_workers(ray_head)[-1]
        os.kill(victim, signal.SIGKILL)
        output, _ = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, output[-3000:]
    resumed = [int(s) for s in re.findall(r"from the Ray Train checkpoint at step (\d+)", output)]
    assert resumed and 128 <= resumed[0] < TOTAL_STEPS, output[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == TOTAL_STEPS
    assert summary["mask_fingerprint"] == json.loads((reference / "summary.json").read_text())[
        "mask_fingerprint"]
    _assert_same_network(_final(reference), _final(run), exact=True)
    assert _update_steps(run) == _update_steps(reference)  # metrics past the checkpoint were dropped


def test_a_worker_config_error_ends_the_driver_with_one_line(tmp_path, ray_head):
    missing = tmp_path / "no-fashion-mnist"
    command = [sys.executable, "-m", "distsparse.cli", "train", QUICKSTART, "run.progress=false",
               f"data.path={missing}", f"run.dir={tmp_path / 'run'}", "launcher.name=ray",
               "launcher.num_workers=2", "launcher.max_failures=0",
               f"launcher.address={ray_head.address}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert (f"distsparse: error: Ray Train run {tmp_path / 'run'} failed: config key 'data.path' = "
            f"'{missing}': Fashion-MNIST directory not found") in result.stderr
