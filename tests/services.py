"""Start and stop the local services the orchestration tests use, through launch/ helpers."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def skip_or_fail(reason: str) -> None:
    """Skip a test whose service cannot start here; in CI (CI=true) fail instead."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and a service did not start: {reason}")
    pytest.skip(reason)


@dataclass(frozen=True)
class RayHead:
    """Where the test Ray head listens; its variables are exported into os.environ."""

    address: str
    dashboard: str
    env: dict[str, str]



def _parse(output: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


def start_ray_head(state: Path, python: str = sys.executable) -> RayHead:
    """launch/ray_local.sh start with `python` for the head, its workers and job entrypoints;
    skip (fail under CI=true) when Ray is missing or cannot start."""
    # Not imported here: Ray reads RAY_AUTH_MODE once, and the head's mode is exported below.
    if importlib.util.find_spec("ray") is None:
        skip_or_fail("ray is not installed (launch/install.sh installs ray[default,train])")
    env = {**os.environ, "DISTSPARSE_PYTHON": python, "RAY_PORT": str(free_port()),
           "RAY_DASHBOARD_PORT": str(free_port()), "RAY_NUM_CPUS": "2"}
    result = subprocess.run([str(ROOT / "launch" / "ray_local.sh"), "start", str(state)], env=env,
                            capture_output=True, text=True, timeout=180)
    if result.returncode != 0:
        stop_ray_head(state)
        skip_or_fail(f"could not start a Ray head: {result.stderr.strip()[-500:]}")
    variables = _parse(result.stdout)
    exported = {key: variables[key] for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    os.environ.update(exported)
    return RayHead(variables["RAY_ADDRESS"], variables["RAY_DASHBOARD"], exported)


def stop_ray_head(state: Path) -> None:
    """launch/ray_local.sh stop: ends the head's process session only."""
    env = {**os.environ, "DISTSPARSE_PYTHON": sys.executable}
    subprocess.run([str(ROOT / "launch" / "ray_local.sh"), "stop", str(state)], env=env,
                   capture_output=True, timeout=120)
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        os.environ.pop(key, None)


@dataclass(frozen=True)
class SlurmCluster:
    """A running local SLURM cluster; `env` has SLURM_CONF for the client commands."""

    env: dict[str, str]


def start_slurm(state: Path) -> SlurmCluster:
    """launch/slurm_local.sh start; skip (fail under CI=true) when it cannot start (no root, no
    apt-get)."""
    env = {**os.environ, "SLURMCTLD_PORT": str(free_port()), "SLURMD_PORT": str(free_port())}
    result = subprocess.run([str(ROOT / "launch" / "slurm_local.sh"), "start", str(state)],
                            env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        stop_slurm(state)
        skip_or_fail(f"could not start a local SLURM cluster: {result.stderr.strip()[-500:]}")
    return SlurmCluster({**os.environ, **_parse(result.stdout)})


def stop_slurm(state: Path) -> None:
    """launch/slurm_local.sh stop: ends the daemons it started."""
    subprocess.run([str(ROOT / "launch" / "slurm_local.sh"), "stop", str(state)],
                   capture_output=True, timeout=120)
