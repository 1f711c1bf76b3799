"""Ray across two simulated nodes on this host, and launcher.placement_strategy.

The Ray cluster (launch/ray_local.sh) has a head on 127.0.0.2 and a worker node on 127.0.0.3, one
CPU each, each node with its own ports, temp dir and process session, both on a Python that has
distsparse's dependencies but not distsparse (as on a cluster: jobs and their Ray Train workers
import the uploaded copy). A run submitted with `distsparse submit` places its two Ray Train
workers one per node (STRICT_SPREAD); SIGKILL of the worker node's every process (raylet, agents,
its Ray Train worker: a node failure) after a reported checkpoint, then the node started again:
the run resumes from the last reported checkpoint on both nodes and ends bit for bit as --nproc 2
on one node. `sbatch -N 2 slurm/ray.sbatch` on the two-node SLURM cluster spreads its workers over
the two nodes (SPREAD) and ends as --nproc 2 too.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from distsparse.cli import main
from distsparse.config import load_config
from distsparse.errors import ConfigError
from tests.conftest import free_port
from tests.services import skip_or_fail
from tests.test_ddp import QUICKSTART
from tests.test_multinode import two_node_slurm  # noqa: F401 (a fixture)
from tests.test_ray_jobs import _python_without_distsparse
from tests.test_ray_train import LONG, TOTAL_STEPS, reference  # noqa: F401 (a fixture)
from tests.test_slurm import _sbatch, _same_as, _wait

ROOT = Path(__file__).resolve().parents[1]
RAY_LOCAL = str(ROOT / "launch" / "ray_local.sh")
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
STRATEGIES = ("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK")
# Ray Train's controller lists each worker group it starts: "- (ip=127.0.0.3, pid=812)
# world_rank=0, local_rank=0, node_rank=0".
WORKER_LINE = re.compile(r"\(ip=([\d.]+), pid=(\d+)\) world_rank=(\d+)")

SCALING = """import json, sys
from distsparse.config import load_config
from distsparse.orchestrate.ray_train import scaling_config
found = {}
for strategy in [None, *sys.argv[1:]]:
    key = [] if strategy is None else [f"launcher.placement_strategy={strategy}"]
    scaling = scaling_config(load_config(None, ["launcher.num_workers=2", *key]).launcher)
    found[str(strategy)] = [scaling.placement_strategy, scaling.num_workers, scaling.use_gpu]
print(json.dumps(found))
"""


def test_placement_strategy_reaches_ray_trains_scaling_config():
    # A subprocess: importing Ray here would fix RAY_AUTH_MODE for the Ray tests after this one.
    result = subprocess.run([sys.executable, "-c", SCALING, *STRATEGIES], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout) == {"None": ["PACK", 2, False],
                                         **{s: [s, 2, False] for s in STRATEGIES}}


@pytest.mark.parametrize("value", ["spread", "EVERYWHERE", "1"])
def test_an_unknown_placement_strategy_is_one_line_naming_the_key(tmp_path, capsys, value):
    expected = (f"config key 'launcher.placement_strategy' = '{value}': expected one of PACK, "
                "SPREAD, STRICT_SPREAD, STRICT_PACK")
    with pytest.raises(ConfigError) as raised:
        load_config(QUICKSTART, [f"launcher.placement_strategy={value}"])
    assert str(raised.value) == expected
    run = tmp_path / "run"
    status = main(["train", QUICKSTART, "launcher.name=ray", f"launcher.placement_strategy={value}",
                   f"run.dir={run}"])
    assert status == 2 and capsys.readouterr().err == f"distsparse: error: {expected}\n"
    assert not run.exists()


def _worker_groups(log: str) -> list[list[str]]:
    """The node address of each worker, by world rank, of every worker group Ray Train started."""
    groups: list[list[str]] = []
    workers = {pid: (address, rank) for address, pid, rank in WORKER_LINE.findall(log)}
    for address, rank in workers.values():  # once per worker: Ray may repeat a line
        if rank == "0":
            groups.append([])
        groups[-1].append(address)
    return groups


def test_ray_sbatch_on_two_slurm_nodes_spreads_the_workers_and_equals_one_node(
        tmp_path, two_node_slurm, reference):  # noqa: F811 (fixtures)
    """Two CPUs a node: PACK could put both workers on one; the script's SPREAD must not."""
    run = tmp_path / "ray"
    job = _sbatch(two_node_slurm, "ray.sbatch", run, LONG, "-N", "2", "-c", "2")
    assert _wait(two_node_slurm, job, run)["NodeList"] == "n[1-2]"
    log = Path(f"{run}.out").read_text()
    assert [sorted(group) for group in _worker_groups(log)] == [[HEAD_IP, WORKER_IP]], log[-3000:]
    assert json.loads((run / "summary.json").read_text())["launcher"] == "ray"
    assert not Path(f"{run}.ray-token").exists()
    _same_as(reference, run)


@dataclass(frozen=True)
class RayCluster:
    """Two Ray nodes started by launch/ray_local.sh: the head's job server at `dashboard`."""

    dashboard: str
    env: dict[str, str]
    head: Path
    worker: Path
    worker_env: dict[str, str]

    def join(self) -> None:
        """Start the worker node (again); ray_local.sh refuses if Ray changed its address."""
        result = subprocess.run([RAY_LOCAL, "join", str(self.worker), self.env["RAY_ADDRESS"]],
                                env=self.worker_env, capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout == f"RAY_NODE_IP={WORKER_IP}\n"


def _daemons(state: Path) -> set[tuple[int, str]]:
    """The GCS server and raylet of a node started by ray_local.sh (in its process session)."""
    session = (state / "session").read_text().strip()
    listed = subprocess.run(["ps", "-eo", "pid=,sid=,comm="], capture_output=True, text=True)
    return {(int(pid), name) for pid, sid, name in (line.split(None, 2) for line in
                                                    listed.stdout.splitlines())
            if sid == session and name in ("gcs_server", "raylet")}


@pytest.fixture(scope="module")
def two_node_ray(tmp_path_factory) -> Iterator[RayCluster]:
    """A head on 127.0.0.2 and a worker node on 127.0.0.3, one CPU each, on ports of their own;
    both stopped afterwards whatever happens."""
    if importlib.util.find_spec("ray") is None:
        skip_or_fail("ray is not installed (launch/install.sh installs ray[default,train])")
    python = _python_without_distsparse(tmp_path_factory.mktemp("cluster-python"))
    head, worker = tmp_path_factory.mktemp("ray-head"), tmp_path_factory.mktemp("ray-worker")
    base = {**os.environ, "DISTSPARSE_PYTHON": python, "RAY_NUM_CPUS": "1"}
    head_env = {**base, "RAY_NODE_IP": HEAD_IP, "RAY_PORT": str(free_port()),
                "RAY_DASHBOARD_PORT": str(free_port()), "RAY_CLIENT_PORT": str(free_port()),
                "RAY_AGENT_PORT": str(free_port())}
    try:
        started = subprocess.run([RAY_LOCAL, "start", str(head)], env=head_env,
                                 capture_output=True, text=True, timeout=180)
        if started.returncode != 0:
            skip_or_fail(f"could not start a Ray head: {started.stderr.strip()[-500:]}")
        variables = dict(line.split("=", 1) for line in started.stdout.splitlines())
        assert variables["RAY_ADDRESS"].startswith(f"{HEAD_IP}:")
        auth = {key: variables[key]
                for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
        cluster = RayCluster(variables["RAY_DASHBOARD"], {**os.environ, **auth}, head, worker,
                             {**base, **auth, "RAY_NODE_IP": WORKER_IP,
                              "RAY_AGENT_PORT": str(free_port())})
        cluster.join()
        yield cluster
    finally:
        for state in (worker, head):
            subprocess.run([RAY_LOCAL, "stop", str(state)], env=base, capture_output=True,
                           timeout=120)


def _registered_step(storage: Path) -> int | None:
    """The step of the latest checkpoint Ray Train's controller has registered, if any."""
    try:
        snapshot = json.loads((storage / "checkpoint_manager_snapshot.json").read_text())
        return snapshot["latest_checkpoint_result"]["metrics"]["step"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return None


def test_a_submitted_run_spreads_over_two_nodes_and_survives_a_node_failure(
        tmp_path, two_node_ray, reference):  # noqa: F811 (fixtures)
    run, out, err = tmp_path / "run", tmp_path / "follow.out", tmp_path / "follow.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        follow = subprocess.Popen(
            [sys.executable, "-m", "distsparse.cli", "submit", "configs/quickstart.yaml", *LONG,
             f"run.dir={run}", "launcher.name=ray", "launcher.num_workers=2",
             "launcher.max_failures=2", "launcher.placement_strategy=STRICT_SPREAD", "--address",
             two_node_ray.dashboard, "--follow"], cwd=ROOT, env=two_node_ray.env, stdout=stdout,
            stderr=stderr, text=True)
    try:
        # A node failure once a checkpoint past step 0 is registered: SIGKILL of the worker
        # node's every process, none of the head's; then the node comes back (a new raylet).
        storage, deadline = tmp_path / "ray_results" / "run", time.monotonic() + 180
        while (registered := _registered_step(storage)) is None or registered == 0:
            assert follow.poll() is None and time.monotonic() < deadline, \
                err.read_text()[-2000:] + out.read_text()[-3000:]
            time.sleep(0.05)
        head_daemons, worker_daemons = _daemons(two_node_ray.head), _daemons(two_node_ray.worker)
        assert {name for _, name in head_daemons} == {"gcs_server", "raylet"}
        assert {name for _, name in worker_daemons} == {"raylet"}
        killed = subprocess.run([RAY_LOCAL, "kill", str(two_node_ray.worker)],
                                env=two_node_ray.worker_env, capture_output=True, text=True,
                                timeout=60)
        assert killed.returncode == 0, killed.stderr
        assert not any(Path(f"/proc/{pid}").exists() for pid, _ in worker_daemons)
        two_node_ray.join()
        follow.wait(timeout=300)
    finally:
        if follow.poll() is None:
            follow.kill()
    log = out.read_text()
    job_id = log.splitlines()[0]
    assert follow.returncode == 0, err.read_text()[-2000:] + log[-3000:]
    assert f"job {job_id} SUCCEEDED" in err.read_text()
    assert _daemons(two_node_ray.head) == head_daemons  # the head never went down
    # Both worker groups, before and after the failure, one worker on each node.
    groups = _worker_groups(log)
    assert len(groups) == 2 and all(sorted(g) == [HEAD_IP, WORKER_IP] for g in groups), groups
    resumed = [int(s) for s in re.findall(r"from the Ray Train checkpoint at step (\d+)", log)]
    assert resumed and registered <= resumed[0] < TOTAL_STEPS and resumed[0] % 64 == 0, log[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["launcher"] == "ray" and summary["steps"] == TOTAL_STEPS
    _same_as(reference, run)
