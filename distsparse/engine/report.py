"""End-of-run outputs: summary.json, the training plot, and the table printed to the terminal."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from distsparse.engine.metrics import read_metrics  # noqa: E402

__all__ = ["format_table", "plot_run", "write_summary"]


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """Write summary.json atomically."""
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, run_dir / "summary.json")


def plot_run(run_dir: Path, layer_density: dict[str, float]) -> Path:
    """training.png: sparsity over steps, test top-1 over epochs, final density per layer."""
    records = read_metrics(run_dir)
    sparsity = [(r["step"], r["sparsity"]) for r in records if r["kind"] in ("train", "mask_update")]
    evals = [(r["epoch"], r["test_top1"]) for r in records if r["kind"] == "eval"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), gridspec_kw={"width_ratios": [1, 1, 1.6]})
    if sparsity:
        axes[0].plot(*zip(*sorted(sparsity)), drawstyle="steps-post")
    axes[0].set(title="sparsity", xlabel="step", ylabel="fraction of zeros", ylim=(0, 1))
    if evals:
        axes[1].plot(*zip(*evals), marker="o")
    axes[1].set(title="test top-1", xlabel="epoch", ylabel="accuracy")
    names = list(layer_density)
    axes[2].bar(range(len(names)), [layer_density[n] for n in names])
    axes[2].set_xticks(range(len(names)), names, rotation=70, ha="right", fontsize=7)
    axes[2].set(title="density per layer", ylabel="fraction active", ylim=(0, 1.05))
    fig.tight_layout()
    path = run_dir / "training.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_table(summary: dict[str, Any]) -> str:
    """The final one-row table: method, sparsity, top-1, images/s, run directory."""
    headers = ("method", "target", "sparsity", "top-1", "FLOPs vs dense", "images/s", "run directory")
    row = (
        summary["method"],
        f"{summary['target_sparsity']:.3f}",
        f"{summary['sparsity']:.4f}",
        f"{summary['test_top1']:.4f}",
        f"{summary['train_flops_ratio']:.3f}",
        f"{summary['train_images_per_s']:.0f}",
        summary["run_dir"],
    )
    widths = [max(len(h), len(c)) for h, c in zip(headers, row)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), rule, line(row)])
