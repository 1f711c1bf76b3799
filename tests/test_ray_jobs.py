"""`distsparse submit / status / stop` against a real Ray head on 127.0.0.1."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.test_ddp import EXACT

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/quickstart.yaml"  # relative: inside the uploaded working directory


def _cli(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distsparse.cli", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _wait_for_end(job_id: str, dashboard: str) -> str:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        status = _cli("status", job_id, "--address", dashboard).stdout
        if status.split()[1] in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not end: {status}")


def test_submitted_ray_train_run_succeeds_with_a_complete_run_directory(tmp_path, ray_head):
    run = tmp_path / "submitted"
    result = _cli("submit", CONFIG, *EXACT, "method.name=rigl", f"run.dir={run}",
                  "launcher.name=ray", "launcher.num_workers=2", "--address", ray_head.dashboard,
                  "--follow")
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    job_id = result.stdout.splitlines()[0]
    assert f"job {job_id} SUCCEEDED" in result.stderr
    assert _cli("status", job_id, "--address", ray_head.dashboard).stdout.split()[:2] == \
        [job_id, "SUCCEEDED"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["launcher"] == "ray" and summary["world_size"] == 2 and summary["completed"]
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.pt").is_file()
    kinds = {json.loads(line)["kind"] for line in (run / "metrics.jsonl").read_text().splitlines()}
    assert {"train", "eval", "mask_update"} <= kinds


def test_a_data_path_missing_on_the_cluster_fails_the_job_with_the_config_error(tmp_path, ray_head):
    """The data path can only be checked where the job runs: the job fails and says why."""
    missing = tmp_path / "no-fashion-mnist"
    result = _cli("submit", CONFIG, "train.max_steps=2", "run.progress=false",
                  f"data.path={missing}", f"run.dir={tmp_path / 'bad'}",
                  "--address", ray_head.dashboard)
    assert result.returncode == 0, result.stderr[-2000:]
    job_id = result.stdout.strip()
    status = _wait_for_end(job_id, ray_head.dashboard)
    assert status.split()[1] == "FAILED", status
    assert f"error: config key 'data.path' = '{missing}'" in status, status
    logs = _cli("status", job_id, "--logs", "--address", ray_head.dashboard).stdout
    assert f"distsparse: error: config key 'data.path' = '{missing}'" in logs


def test_an_invalid_config_is_refused_before_anything_is_submitted(tmp_path, ray_head):
    result = _cli("submit", CONFIG, "method.sparsity=1.5", f"run.dir={tmp_path / 'never'}",
                  "--address", ray_head.dashboard)
    assert result.returncode == 2
    assert result.stderr.strip() == ("distsparse: error: config key 'method.sparsity' = 1.5: "
                                     "expected a value in [0, 1)")
    assert result.stdout == ""
    relative = _cli("submit", CONFIG, "run.name=relative", "--address", ray_head.dashboard)
    assert relative.returncode == 2 and "config key 'run.dir'" in relative.stderr


def test_stop_ends_a_running_job(tmp_path, ray_head):
    result = _cli("submit", CONFIG, *EXACT, "train.epochs=1000", f"run.dir={tmp_path / 'long'}",
                  "--address", ray_head.dashboard)
    job_id = result.stdout.strip()
    deadline = time.monotonic() + 120
    while not (tmp_path / "long" / "checkpoints" / "last.pt").exists():
        assert time.monotonic() < deadline, "the job never started training"
        time.sleep(0.5)
    stopped = _cli("stop", job_id, "--address", ray_head.dashboard)
    assert stopped.returncode == 0 and stopped.stdout.strip() == f"{job_id} stopping"
    assert _wait_for_end(job_id, ray_head.dashboard).split()[1] == "STOPPED"
