"""Two simulated nodes on this host: torchrun agents, and a two-node SLURM cluster.

Each "node" is a torchrun agent bound to its own loopback address (127.0.0.1, 127.0.0.2), started
in its own copy of the checkout and importing distsparse from that copy; the two share only the
run directory, as a shared file system would. The agents meet at a c10d rendezvous on node 0's
address. Only global rank 0 may write (node 1's copy stays untouched, each record is written
once), SIGTERM to both agents stops every worker after the same step with a checkpoint, and the
run resumed on the two nodes ends bit for bit as 4 uninterrupted workers on one node (DDP's
gradient buckets are laid out once, at construction: the first step after a restart reduces in
the layout of every other step), with the masks of one uninterrupted process.

The SLURM cluster (launch/slurm_local.sh with 2 nodes) runs one slurmd per node, n1 on 127.0.0.2
and n2 on 127.0.0.3: `sbatch -N 2 slurm/torchrun.sbatch` gives the network of --nproc 2, and so
does a job preempted mid-run (SIGTERM), requeued and resumed on the two nodes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import free_port
from tests.services import SlurmCluster, skip_or_fail, stop_slurm
from tests.test_ddp import EXACT, QUICKSTART, _assert_same_network, _final, _update_steps
from tests.test_ray_train import LONG, TOTAL_STEPS
from tests.test_slurm import _sbatch, _same_as, _wait

ROOT = Path(__file__).resolve().parents[1]
ADDRESSES = ("127.0.0.1", "127.0.0.2")
PER_NODE = 2
WORLD = len(ADDRESSES) * PER_NODE
DDP = ["backend.name=ddp", "launcher.name=torchrun", f"launcher.num_workers={WORLD}"]


def _copy_checkout(node: Path) -> Path:
    """The package and configs (not .venv) in a node's own directory."""
    for tree in ("distsparse", "configs"):
        shutil.copytree(ROOT / tree, node / tree, ignore=shutil.ignore_patterns("__pycache__"))
    return node


def _node_env(copy: Path) -> dict[str, str]:
    """The node's environment: its copy first on the import path; gloo on the loopback device."""
    return {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1",
            "GLOO_SOCKET_IFNAME": "lo"}


def _snapshot(tree: Path) -> dict[str, tuple[int, int]]:
    """Every file under tree (bytecode caches aside) with its size and modification time."""
    return {str(p.relative_to(tree)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in tree.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def _start_agents(copies: list[Path], logs: Path, argv: list[str]) -> list[subprocess.Popen]:
    """One torchrun agent per node; is_host names the node that serves the rendezvous store
    (torchrun's own guess calls every loopback address 'this host')."""
    port, run_id = free_port(), f"multinode{time.monotonic_ns()}"
    agents = []
    for node, (address, copy) in enumerate(zip(ADDRESSES, copies)):
        command = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={len(ADDRESSES)}",
                   f"--nproc-per-node={PER_NODE}", "--rdzv-backend=c10d",
                   f"--rdzv-endpoint={ADDRESSES[0]}:{port}", f"--rdzv-id={run_id}",
                   f"--rdzv-conf=is_host={int(node == 0)}", f"--local-addr={address}",
                   f"--log-dir={logs / f'node{node}'}", "--redirects=3",
                   "-m", "distsparse.cli", "train", *argv]
        agents.append(subprocess.Popen(command, cwd=copy, env=_node_env(copy), text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    return agents


def _worker_logs(logs: Path, node: int) -> dict[int, tuple[str, str]]:
    """Local rank -> (stdout, stderr) of the node's workers, from torchrun's --log-dir."""
    found = {}
    for stdout in (logs / f"node{node}").rglob("stdout.log"):
        found[int(stdout.parent.name)] = (stdout.read_text(), stdout.with_name("stderr.log").read_text())
    assert sorted(found) == list(range(PER_NODE)), found
    return found


def _one_node(nproc: int, *argv: str) -> None:
    """Train with --nproc NPROC local workers on this node (one thread each)."""
    command = [sys.executable, "-m", "distsparse.cli", "train", "--nproc", str(nproc), *argv]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_two_nodes_stop_together_resume_and_equal_one_node(tmp_path):
    copies = [_copy_checkout(tmp_path / f"node{n}") for n in range(len(ADDRESSES))]
    for copy in copies:
        imported = subprocess.run([sys.executable, "-c", "import distsparse; print(distsparse.__file__)"],
                                  cwd=copy, env=_node_env(copy), capture_output=True, text=True)
        assert imported.stdout.strip() == str(copy / "distsparse" / "__init__.py"), imported.stderr
    before = [_snapshot(copy) for copy in copies]
    run, logs = tmp_path / "shared" / "run", tmp_path / "logs"

    # Launch 1, stopped: SIGTERM to both agents once training has logged.
    agents = _start_agents(copies, logs / "first", ["configs/quickstart.yaml", *LONG, *DDP,
                                                    f"run.dir={run}"])
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + 180
    while not (metrics.exists() and '"train"' in metrics.read_text()):
        assert all(a.poll() is None for a in agents) and time.monotonic() < deadline, \
            [a.communicate()[0][-2000:] for a in agents if a.poll() is not None]
        time.sleep(0.05)
    for agent in agents:
        agent.send_signal(signal.SIGTERM)
    for agent in agents:  # torchrun itself exits 1 after forwarding a signal
        agent.communicate(timeout=120)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by_signal"] == "SIGTERM" and not summary["completed"]
    assert summary["world_size"] == WORLD and 0 < summary["steps"] < TOTAL_STEPS
    stopped_at = summary["steps"]
    assert int(_final(run)["step"]) == stopped_at
    first = {node: _worker_logs(logs / "first", node) for node in range(len(ADDRESSES))}
    # Every worker ended cleanly after the agreed step: one stuck in a collective with a peer
    # that had stopped would fail with a gloo error, not leave quietly.
    for node_logs in first.values():
        for _, stderr in node_logs.values():
            assert "Traceback" not in stderr, stderr[-2000:]
    assert f"stopped by SIGTERM at step {summary['steps']} with a checkpoint" in first[0][0][1]

    # Launch 2: --resume on the same two nodes.
    agents = _start_agents(copies, logs / "second", ["--resume", str(run)])
    outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], [o[-2000:] for o in outputs]
    second = {node: _worker_logs(logs / "second", node) for node in range(len(ADDRESSES))}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == TOTAL_STEPS

    # Global rank 0 (node 0, local rank 0) is the only one that reports or writes.
    for launch in (first, second):
        assert str(run) in launch[0][0][0]
        assert [launch[n][r][0] for n, r in ((0, 1), (1, 0), (1, 1))] == ["", "", ""]
    assert [_snapshot(copy) for copy in copies] == before
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == TOTAL_STEPS
    assert len(list((run / "tensorboard").rglob("events.out.tfevents.*"))) == 2  # one per launch

    # Bit for bit the network of 4 uninterrupted workers on one node.
    one_node = tmp_path / "one_node"
    _one_node(WORLD, QUICKSTART, *LONG, f"run.dir={one_node}")
    _assert_same_network(_final(one_node), _final(run), exact=True)
    assert _update_steps(run) == _update_steps(one_node)
    # The masks of one uninterrupted process (no batch norm), the weights up to rounding: 4 ranks
    # sum gradients in another order than 1.
    one_process = tmp_path / "one_process"
    _one_node(1, QUICKSTART, *LONG, f"run.dir={one_process}")
    _assert_same_network(_final(one_process), _final(run), exact=False)
    assert _update_steps(run) == _update_steps(one_process)
    fingerprints = {json.loads((r / "summary.json").read_text())["mask_fingerprint"]
                    for r in (run, one_node, one_process)}
    assert len(fingerprints) == 1


@pytest.fixture(scope="module")
def two_node_slurm(tmp_path_factory) -> Iterator[SlurmCluster]:
    """launch/slurm_local.sh with two nodes, n1 on 127.0.0.2 and n2 on 127.0.0.3 (one slurmd
    each), on ports of its own: the session's one-node cluster may be running beside it."""
    state = tmp_path_factory.mktemp("slurm-two-nodes")
    env = {**os.environ, "SLURMCTLD_PORT": str(free_port()), "SLURMD_PORT": str(free_port())}
    result = subprocess.run([str(ROOT / "launch" / "slurm_local.sh"), "start", str(state), "2"],
                            env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        stop_slurm(state)
        skip_or_fail(f"could not start a two-node SLURM cluster: {result.stderr.strip()[-500:]}")
    try:
        yield SlurmCluster({**os.environ, "SLURM_CONF": str(state / "slurm.conf")})
    finally:
        stop_slurm(state)


def test_sbatch_on_two_slurm_nodes_equals_one_node(tmp_path, two_node_slurm):
    """One torchrun agent on each node (slurm/torchrun.sbatch), meeting at n1's NodeAddr."""
    shown = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %o %t"], env=two_node_slurm.env,
                           capture_output=True, text=True, timeout=30).stdout.split("\n")
    assert shown[:2] == ["n1 127.0.0.2 idle", "n2 127.0.0.3 idle"], shown
    reference = tmp_path / "nproc2"
    _one_node(2, QUICKSTART, *EXACT, "method.name=rigl", f"run.dir={reference}")
    run = tmp_path / "two_nodes"
    job = _sbatch(two_node_slurm, "torchrun.sbatch", run, [*EXACT, "method.name=rigl"], "-N", "2")
    assert _wait(two_node_slurm, job, run)["NodeList"] == "n[1-2]"
    assert json.loads((run / "summary.json").read_text())["launcher"] == "torchrun"
    _same_as(reference, run)


def _logged_steps(events: Path) -> list[int]:
    """The steps of the train/loss scalars in one TensorBoard events file (one per launch)."""
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return [event.step for event in accumulator.Scalars("train/loss")]


def test_preempted_on_two_slurm_nodes_requeues_and_resumes_like_an_uninterrupted_run(
        tmp_path, two_node_slurm):
    """SIGTERM to the job's steps as a preemption sends it (tests/test_slurm.py does the same on
    one node): both agents' workers checkpoint after one agreed step, the script requeues the job
    and its second attempt resumes on the two nodes from that step."""
    run = tmp_path / "preempted"
    job = _sbatch(two_node_slurm, "torchrun.sbatch", run, LONG, "-N", "2")
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + 180
    while not (metrics.exists() and '"train"' in metrics.read_text()):
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=TERM", job], env=two_node_slurm.env, check=True,
                   timeout=30)
    reference = tmp_path / "nproc2"  # trained while the job requeues
    _one_node(2, QUICKSTART, *LONG, f"run.dir={reference}")
    final = _wait(two_node_slurm, job, run)
    assert final["Restarts"] == "1" and final["NodeList"] == "n[1-2]"
    log = Path(f"{run}.out").read_text()
    stopped = [int(step) for step in
               re.findall(r"stopped by SIGTERM at step (\d+) with a checkpoint", log)]
    assert len(stopped) == 1 and 0 < stopped[0] < TOTAL_STEPS, log[-3000:]
    assert "requeueing job" in log and f"attempt 1: resuming {run}" in log

    # The run's records: the first launch logged up to the stop, the second from the step after
    # it (train records every log_every steps), and no step twice.
    every = int(re.search(r"log_every: (\d+)", (run / "config.yaml").read_text()).group(1))
    launches = sorted((run / "tensorboard").rglob("events.out.tfevents.*"),
                      key=lambda events: events.stat().st_mtime_ns)
    assert len(launches) == 2
    first, second = (_logged_steps(events) for events in launches)
    assert first[-1] <= stopped[0] and second[0] == (stopped[0] // every + 1) * every
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == sorted(set(steps)) == first + second and steps[-1] == TOTAL_STEPS
    _same_as(reference, run)
