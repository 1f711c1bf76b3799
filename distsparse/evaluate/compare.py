"""Compare runs: one table across run directories, plots against sparsity, prune potential.

Prune potential follows "Lost in Pruning" (Liebenwein et al., MLSys 2021, arXiv 2103.03014):
per method and test distribution, the largest prune ratio whose error is within delta of the
dense network's (lucaslie/torchprune `paper/lost/script/generalization.py`,
`src/experiment/experiment/logger.py` `compute_stats`). As there, every corruption at every
severity is its own test distribution, and the prune ratio is also given over all parameters of
the model (torchprune's size); beside it, ours over the masked weights (a run's sparsity). The
prune potential of a suite's mean corruption top-1 is kept as a summary row.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from distsparse.errors import CheckpointError, ConfigError, DistsparseError  # noqa: E402
from distsparse.evaluate.metrics import prune_potential  # noqa: E402

__all__ = ["COLUMNS", "METRICS", "compare_runs", "distribution_top1", "load_run_results"]

METRICS = ("top1", "prune_potential")
COLUMNS = (
    "run", "method", "target_sparsity", "sparsity", "prune_ratio_all_parameters", "test_top1",
    "train_flops_ratio", "suite", "mean_corruption_top1", "shift_top1", "agreement",
)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def load_run_results(run_dir: Path) -> dict[str, Any]:
    """One table row from RUN_DIR/summary.json and, when present, RUN_DIR/evaluation.json."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise CheckpointError(f"run directory {run_dir} has no summary.json (is the run finished?)")
    summary = _read_json(summary_path)
    missing = [key for key in ("method", "sparsity", "test_top1") if key not in summary]
    if missing:
        raise CheckpointError(f"{summary_path} lacks {', '.join(missing)}")
    evaluation_path = run_dir / "evaluation.json"
    evaluation = _read_json(evaluation_path) if evaluation_path.is_file() else {}
    sparsity = float(summary["sparsity"])
    return {
        "run": str(run_dir),
        "method": str(summary["method"]),
        "target_sparsity": summary.get("target_sparsity"),
        "sparsity": sparsity,
        "prune_ratio_all_parameters": 0.0 if sparsity == 0.0
        else evaluation.get("prune_ratio_all_parameters"),
        "test_top1": float(summary["test_top1"]),
        "train_flops_ratio": summary.get("train_flops_ratio"),
        "suite": evaluation.get("suite"),
        "mean_corruption_top1": evaluation.get("mean_corruption_top1"),
        "shift_top1": evaluation.get("shift_top1"),
        "agreement": evaluation.get("clean_agreement"),
        "evaluation": evaluation,
    }


def distribution_top1(row: dict[str, Any]) -> dict[str, float]:
    """Top-1 of a run per test distribution: clean, every corruption at every severity
    (`gaussian_noise/3`), each shift (`shift:rotate_translate`), then the summary: the mean over
    its corruption suite (`corruptions[default]`, keyed by suite so only equal suites meet)."""
    evaluation = row["evaluation"]
    result = {"clean": evaluation.get("clean_top1", row["test_top1"])}
    records = evaluation.get("distributions", [])
    for record in records:
        if record["kind"] == "corruption":
            result[f"{record['name']}/{record['severity']}"] = record["top1"]
    for record in records:
        if record["kind"] == "shift":
            result[f"shift:{record['name']}"] = record["top1"]
    if evaluation.get("mean_corruption_top1") is not None:
        result[f"corruptions[{evaluation['suite']}]"] = evaluation["mean_corruption_top1"]
    return result


def _is_dense(row: dict[str, Any]) -> bool:
    return row["method"] == "dense" or row["sparsity"] == 0.0


Potentials = dict[str, dict[str, float | None]]


def _prune_potentials(rows: list[dict[str, Any]],
                      delta: float) -> tuple[list[str], Potentials, Potentials]:
    """Distributions, and method -> distribution -> prune potential with the prune ratio over the
    masked weights and over all parameters (None where a run lacks the parameter counts)."""
    dense = [distribution_top1(r) for r in rows if _is_dense(r)]
    if not dense:
        raise DistsparseError(
            "--metric prune_potential needs a dense reference among the run directories "
            "(a run with method 'dense' or sparsity 0)"
        )
    dense_error = {}
    for name in dict.fromkeys(k for d in dense for k in d):
        values = [d[name] for d in dense if name in d]
        dense_error[name] = 1.0 - sum(values) / len(values)
    masked: Potentials = {}
    everything: Potentials = {}
    for method in dict.fromkeys(r["method"] for r in rows if not _is_dense(r)):
        per_run = [(r["sparsity"], r["prune_ratio_all_parameters"], distribution_top1(r))
                   for r in rows if r["method"] == method and not _is_dense(r)]
        masked[method], everything[method] = {}, {}
        for name, reference in dense_error.items():
            points = [(ratio, all_ratio, 1.0 - top1[name])
                      for ratio, all_ratio, top1 in per_run if name in top1]
            if not points:
                continue
            masked[method][name] = prune_potential([(r, e) for r, _, e in points], reference, delta)
            known = all(all_ratio is not None for _, all_ratio, _ in points)
            everything[method][name] = (
                prune_potential([(a, e) for _, a, e in points], reference, delta)
                if known else None)
    return list(dense_error), masked, everything


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _markdown_table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = [f"| {' | '.join(headers)} |", "|---" * len(headers) + "|"]
    lines += [f"| {' | '.join(_cell(v) for v in row)} |" for row in rows]
    return lines


def _csv(headers: list[str], rows: list[list[Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(headers)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return buffer.getvalue().encode("utf-8")


def _plot(rows: list[dict[str, Any]], panels: list[tuple[str, str]]) -> bytes:
    """One panel per (key, title): key against measured sparsity, one line per method (dense runs
    as a dashed level); the axes zoom to the data, where the methods' differences are."""
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.4), squeeze=False)
    for axis, (key, title) in zip(axes[0], panels):
        plotted = False
        for index, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
            points = sorted((r["sparsity"], r[key])
                            for r in rows if r["method"] == method and r[key] is not None)
            if not points:
                continue
            plotted = True
            if method == "dense":
                for number, (_, value) in enumerate(points):
                    axis.axhline(value, color="black", linestyle="--", linewidth=1,
                                 label=None if number else "dense")
            else:
                axis.plot(*zip(*points), marker="o", color=f"C{index}", label=method)
        if plotted:
            axis.legend(fontsize=8)
            axis.margins(0.08)
        else:
            axis.text(0.5, 0.5, "no run has an evaluation.json\n(run `distsparse evaluate RUN_DIR`)",
                      ha="center", va="center", transform=axis.transAxes)
        axis.set(title=title, xlabel="sparsity (fraction of zeros)", ylabel="top-1")
        axis.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def compare_runs(run_dirs: list[Path], out_dir: Path = Path("runs/compare"), metric: str = "top1",
                 delta: float = 0.005) -> dict[str, Any]:
    """Write compare.md, compare.csv, accuracy_vs_sparsity.png and robustness_vs_sparsity.png to
    OUT_DIR (with metric prune_potential also prune_potential.csv, and its table in compare.md).

    delta is a fraction, in the units of error (0.005 = 0.5 percentage points, the paper's
    COMM_LEVEL). All inputs are read and checked before anything is written.
    """
    if metric not in METRICS:
        raise ConfigError(f"--metric {metric!r}: expected one of {', '.join(METRICS)}")
    if not run_dirs:
        raise DistsparseError("compare needs at least one run directory")
    rows = [load_run_results(Path(d)) for d in run_dirs]
    table = [[row[c] for c in COLUMNS] for row in rows]
    lines = ["# Runs compared", "", *_markdown_table(list(COLUMNS), table)]
    files = {
        "compare.csv": _csv(list(COLUMNS), table),
        "accuracy_vs_sparsity.png": _plot(rows, [("test_top1", "clean test top-1")]),
        "robustness_vs_sparsity.png": _plot(rows, [("mean_corruption_top1", "mean corruption top-1"),
                                                   ("shift_top1", "shift top-1")]),
    }
    result: dict[str, Any] = {"rows": [{c: row[c] for c in COLUMNS} for row in rows]}
    if metric == "prune_potential":
        distributions, masked, everything = _prune_potentials(rows, delta)
        headers = ["test distribution",
                   *(f"{m}{part}" for m in masked for part in ("", " (all parameters)"))]
        pp_rows = [[d, *(table[m].get(d) for m in masked for table in (masked, everything))]
                   for d in distributions]
        lines += [
            "", f"## Prune potential (delta = {delta * 100:g} percentage points of error)", "",
            "Per test distribution (every corruption at every severity on its own, as torchprune), "
            "the largest prune ratio whose error is at most the dense error + delta; 0 if none. "
            "`METHOD`: the ratio over the masked weights (the run's sparsity); `METHOD (all "
            "parameters)`: over every parameter of the model, torchprune's (empty where a run has "
            "no evaluation.json). `corruptions[SUITE]`: the summary row, on the suite's mean "
            "corruption top-1.", "",
            *_markdown_table(headers, pp_rows),
        ]
        files["prune_potential.csv"] = _csv(headers, pp_rows)
        result["prune_potential"] = masked
        result["prune_potential_all_parameters"] = everything
        result["delta"] = delta
    files["compare.md"] = ("\n".join(lines) + "\n").encode("utf-8")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DistsparseError(f"--out {out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        _write_atomic(out_dir / name, data)
    result["files"] = sorted(str(out_dir / name) for name in files)
    return result
