"""What every benchmark records: machine, versions, load, settings; Markdown tables; RESULTS.md.

Imported by the scripts in this folder (run as `python benchmarks/<script>.py`, so this folder is
on sys.path). Numbers are appended, never rewritten: RESULTS.md is the history of what was measured.
"""
from __future__ import annotations

import datetime
import multiprocessing
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "REPO", "RESULTS", "append_results", "command_line", "distsparse_command", "environment",
    "load_average", "markdown_table", "mean_cell", "run_info", "run_ranks",
]

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "RESULTS.md"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.rstrip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def load_average() -> str:
    """`uptime`'s 1/5/15-minute load averages (other work may share the machine)."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def environment() -> dict[str, str]:
    """Machine and versions: CPU model and cores, Python, torch, distsparse commit (+ local edits)."""
    import torch

    # A copy without .git (a lent GPU machine) names its commit in DISTSPARSE_COMMIT.
    commit = _git("rev-parse", "--short", "HEAD") or os.environ.get("DISTSPARSE_COMMIT", "unknown")
    # Porcelain lines are "XY path": two status columns, a space, then the path.
    dirty = [line[3:] for line in _git("status", "--porcelain", "--", "distsparse").splitlines()]
    if dirty:
        commit += f" + uncommitted edits in {', '.join(sorted(dirty))}"
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{_cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": f"{torch.__version__} (threads {torch.get_num_threads()}, "
                 f"cuda {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'})",
        "distsparse": commit,
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; cells are formatted with str()."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def mean_cell(values: Sequence[float], digits: int, spread: bool = False) -> str:
    """The mean of values as a table cell, with the sample standard deviation if `spread`."""
    mean = statistics.fmean(values)
    if spread and len(values) > 1:
        return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"
    return f"{mean:.{digits}f}"


def append_results(title: str, info: Mapping[str, Any], body: str, path: Path = RESULTS) -> None:
    """Append a section: title, a bullet per info item, then the body (tables, notes)."""
    if not path.exists():
        path.write_text(
            "# Benchmark results\n\nAppended by the scripts in this folder (see README.md); "
            "newest last. Compare numbers only within one section (same run, same machine).\n",
            encoding="utf-8",
        )
    bullets = "\n".join(f"- {key}: {value}" for key, value in info.items())
    with path.open("a", encoding="utf-8") as out:
        out.write(f"\n## {title}\n\n{bullets}\n\n{body.rstrip()}\n")


def distsparse_command() -> list[str]:
    """The `distsparse` CLI beside this Python (the .venv's), else on PATH, else `python -m`."""
    script = Path(sys.executable).parent / "distsparse"
    found = script if script.is_file() else shutil.which("distsparse")
    return [str(found)] if found else [sys.executable, "-m", "distsparse.cli"]


def run_ranks(worker: Callable[..., None], world_size: int, *arguments: Any,
              timeout: float = 3600) -> Any:
    """Spawn `worker(rank, port, *arguments, queue)` on world_size ranks; return what one puts.

    The workers rendezvous on a free loopback port; rank 0 puts its result on the queue.
    """
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    workers = [context.Process(target=worker, args=(rank, port, *arguments, queue))
               for rank in range(world_size)]
    for process in workers:
        process.start()
    result = queue.get(timeout=timeout)
    for process in workers:
        process.join()
    return result


def command_line() -> str:
    """How this script was invoked (for the record)."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(REPO)
    except ValueError:
        pass
    return " ".join(["python", str(script), *sys.argv[1:]])


def run_info(load_before: str, settings: str, extra: Mapping[str, Any]) -> dict[str, Any]:
    """A record's header: environment(), load before/after, command line, settings, then `extra`."""
    info: dict[str, Any] = environment()
    info["load average (1/5/15 min) before / after"] = f"{load_before}  /  {load_average()}"
    info["command"] = command_line()
    info["settings"] = settings
    info.update(extra)
    return info
