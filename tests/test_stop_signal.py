"""SIGTERM (SLURM preemption) stops a run at the next step with a checkpoint; resuming it gives
the uninterrupted run's network bit for bit."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.test_ddp import QUICKSTART, _assert_same_network, _final, _update_steps
from tests.test_ray_train import LONG, TOTAL_STEPS

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _train(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distsparse.cli", "train", *argv], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_checkpoints_at_the_next_step_and_the_run_resumes_exactly(tmp_path):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    reference = _train(QUICKSTART, *LONG, f"run.dir={whole}")
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-2000:]
    run = _train(QUICKSTART, *LONG, f"run.dir={stopped}")
    metrics = stopped / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and '"train"' in metrics.read_text()):
        assert run.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 0, err[-2000:]
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["stopped_by_signal"] == "SIGTERM" and not summary["completed"]
    assert 0 < summary["steps"] < TOTAL_STEPS
    assert _checkpoint_step(stopped) == summary["steps"]
    assert f"stopped by SIGTERM at step {summary['steps']} with a checkpoint" in err
    resumed = _train("--resume", str(stopped))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
    assert json.loads((stopped / "summary.json").read_text())["completed"]
    _assert_same_network(_final(whole), _final(stopped), exact=True)
    assert _update_steps(whole) == _update_steps(stopped)


def _checkpoint_step(run: Path) -> int:
    """The step of the run's last checkpoint."""
    return int(_final(run)["step"])
