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

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distsparse.engine.stop_signal import StopSignal
from tests.conftest import free_port
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


WORLD = 2
SIGNALLED = {1: (0, 3), 3: (1, 5)}
"""check_every -> (the rank that receives SIGTERM, the step after which it arrives)."""


def _agreement_worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    calls = []
    reduce = dist.all_reduce

    def recording(tensor, *args, **kwargs):
        calls.append({"device": tensor.device.type, "async": kwargs.get("async_op", False),
                      "side_group": kwargs.get("group") not in (None, dist.group.WORLD)})
        return reduce(tensor, *args, **kwargs)

    dist.all_reduce = recording
    stopped = {}
    for check_every, (signalled_rank, signal_step) in SIGNALLED.items():
        with StopSignal(check_every) as signals:
            for step in range(1, 40):
                if rank == signalled_rank and step == signal_step:
                    signals.received = signal.SIGTERM
                if signals.agreed(step):
                    stopped[check_every] = step
                    break
    torch.save({"stopped": stopped, "calls": calls}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_ranks_agree_on_the_stop_step_without_a_collective_on_the_device_group(tmp_path):
    mp.spawn(_agreement_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    # Posted at the first check after the signal, read at the next one.
    assert [r["stopped"] for r in ranks] == [{1: 4, 3: 9}] * WORLD
    # Checks only every check_every steps: 4 for check_every=1, 3 (steps 3, 6, 9) for 3.
    assert [len(r["calls"]) for r in ranks] == [7, 7]
    assert all(call == {"device": "cpu", "async": True, "side_group": True}
               for r in ranks for call in r["calls"])


def test_one_process_stops_after_the_step_that_saw_the_signal():
    with StopSignal(check_every=5) as signals:
        assert not signals.agreed(1)
        signals.received = signal.SIGUSR1
        assert signals.agreed(2)
    with pytest.raises(ValueError, match="check_every"):
        StopSignal(check_every=0)
