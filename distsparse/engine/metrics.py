"""Run records: metrics.jsonl (one JSON object a line) and TensorBoard scalars."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

__all__ = ["MetricsLog", "read_metrics", "truncate_metrics"]


class MetricsLog:
    """Appends records to metrics.jsonl and their numbers to TensorBoard under `<kind>/<key>`."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.file = self.path.open("a", encoding="utf-8")
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, kind: str, step: int, **values: Any) -> None:
        """Write one record of a kind (train, eval, mask_update) at a step."""
        record = {"kind": kind, "step": step, **values}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        """Flush and close both outputs."""
        self.file.close()
        self.writer.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Drop records after `last_step` (written after the checkpoint a run resumes from).

    A mask update is logged with the index of the step that makes it, before that step counts:
    the update logged as step s happens after the checkpoint of step s, so it goes too.
    """
    path = run_dir / "metrics.jsonl"
    kept = [r for r in read_metrics(run_dir)
            if r["step"] < last_step or (r["step"] == last_step and r["kind"] != "mask_update")]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)
