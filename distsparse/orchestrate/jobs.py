"""`distsparse submit / status / stop`: a training run as a Ray job (ray.job_submission).

`submit` validates the config here first (keys, types, ranges: a bad one never becomes a job),
then uploads the working directory and runs `python -m distsparse.cli train CONFIG [overrides]`
on the cluster. What only the cluster can check (data.path, a checkpoint to resume) fails the job;
the error line is in its logs and in `distsparse status`.
"""
from __future__ import annotations

import asyncio
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distsparse.config import load_config, run_directory
from distsparse.errors import ConfigError, DistsparseError

__all__ = ["WORKING_DIR_EXCLUDES", "job_status", "stop_job", "submit_run"]

WORKING_DIR_EXCLUDES = [".git", ".venv", "/runs", "/data", "*.beton", "/benchmarks/out",
                        "__pycache__", ".pytest_cache"]
"""Never uploaded with the working directory (run outputs, environments, data). Ray reads these
as gitignore patterns: a leading `/` anchors at the top, so `/data` keeps `distsparse/data/`."""


def _client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise DistsparseError(f"cannot reach the Ray job server at {address or '$RAY_ADDRESS'}: "
                              f"{str(exc).strip().splitlines()[0]}") from None


def submit_run(config_path: Path, overrides: list[str], address: str | None, working_dir: Path,
               follow: bool) -> int:
    """Submit a training run as a Ray job; print its id; with `follow`, stream its logs.

    Returns 0, or with `follow` 0 if the job SUCCEEDED and 1 otherwise.
    """
    config = load_config(config_path, overrides)
    if not run_directory(config).is_absolute():
        raise ConfigError(f"config key 'run.dir' = {config.run.dir!r}: submit needs an absolute "
                          "path on the cluster (a relative one lands in the job's temporary copy "
                          "of the working directory)")
    working_dir = working_dir.resolve()
    try:
        relative_config = config_path.resolve().relative_to(working_dir)
    except ValueError:
        raise ConfigError(f"config file {config_path} is outside the uploaded working directory "
                          f"{working_dir} (see --working-dir)") from None
    entrypoint = shlex.join(["python", "-m", "distsparse.cli", "train", str(relative_config),
                             *overrides])
    client = _client(address)
    job_id = client.submit_job(
        entrypoint=entrypoint,
        runtime_env={"working_dir": str(working_dir), "excludes": WORKING_DIR_EXCLUDES},
        metadata={"run_dir": str(run_directory(config))},
    )
    print(job_id, flush=True)
    if not follow:
        return 0
    asyncio.run(_print_logs(client, job_id))
    status = client.get_job_status(job_id)
    print(f"distsparse: job {job_id} {status.value}", file=sys.stderr)
    return 0 if status.value == "SUCCEEDED" else 1


async def _print_logs(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def _ask(job_id: str, request: Callable[[str], Any]) -> Any:
    """A job SDK request about job_id; the SDK's error (e.g. no such job) as one line."""
    try:
        return request(job_id)
    except RuntimeError as exc:
        raise DistsparseError(f"job {job_id}: {str(exc).strip().splitlines()[0]}") from None


def job_status(job_id: str, address: str | None, logs: bool) -> int:
    """Print a job's status, its message (a failed job's ends with its last log lines), and with
    `logs` the whole log; returns 0."""
    client = _client(address)
    info = _ask(job_id, client.get_job_info)
    print(f"{job_id} {info.status.value}")
    if info.message:
        print(info.message.rstrip())
    if logs:
        print(client.get_job_logs(job_id), end="")
    return 0


def stop_job(job_id: str, address: str | None) -> int:
    """Ask the cluster to stop a job; print whether it was running; returns 0."""
    stopped = _ask(job_id, _client(address).stop_job)
    print(f"{job_id} {'stopping' if stopped else 'was not running'}")
    return 0
