"""Evaluate a trained run beyond test accuracy: corruptions, a held-out shift, agreement with dense.

Following "Lost in Pruning" (Liebenwein et al., MLSys 2021, arXiv 2103.03014; lucaslie/torchprune
`paper/lost/script/generalization.py`): top-1 on the clean test set, on every corruption and
severity of a suite and on a held-out shift; with a dense run, top-1 agreement with it and excess
error (error of the run minus error of the dense run) on every one of those test distributions.
"""
from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from distsparse.data.loader import BatchLoader  # noqa: E402
from distsparse.engine.runs import TrainedRun, load_run  # noqa: E402
from distsparse.errors import CheckpointError, ConfigError  # noqa: E402
from distsparse.evaluate.corruptions import CORRUPTIONS, SHIFTS, SUITES  # noqa: E402
from distsparse.evaluate.metrics import excess_error, predict  # noqa: E402

__all__ = ["EVALUATION_NAME", "Distribution", "evaluate_run", "format_evaluation", "resolve_device",
           "suite_distributions"]

EVALUATION_NAME = "evaluation.json"
CHUNK = 256
"""Corruptions see the test set in chunks of this many images, so their random draws (seeded by
chunk index) do not depend on a run's batch size and a run and its dense reference see the same
corrupted pixels."""


@dataclass(frozen=True)
class Distribution:
    """One test distribution: the clean test set, a corruption at a severity, or a shift."""

    kind: str
    name: str
    severity: int | None = None

    @property
    def label(self) -> str:
        """A short name: clean, gaussian_noise/3, rotate_translate."""
        return self.name if self.severity is None else f"{self.name}/{self.severity}"

    def apply(self, pixels: torch.Tensor, seed: int) -> torch.Tensor:
        """These images (values in [0, 1]) as this distribution shows them."""
        if self.kind == "corruption":
            return CORRUPTIONS[self.name](pixels, self.severity, seed)
        if self.kind == "shift":
            return SHIFTS[self.name](pixels, seed)
        return pixels


def suite_distributions(suite: str) -> list[Distribution]:
    """Clean, then every corruption x severity, then the shifts of a suite (`default` or `full`)."""
    if suite not in SUITES:
        raise ConfigError(f"--suite {suite!r}: expected one of {', '.join(SUITES)}")
    chosen = SUITES[suite]
    return [
        Distribution("clean", "clean"),
        *(Distribution("corruption", name, severity)
          for name, severities in chosen.corruptions.items() for severity in severities),
        *(Distribution("shift", name) for name in chosen.shifts),
    ]


def resolve_device(name: str) -> torch.device:
    """cpu, cuda or auto (cuda when available); cuda without a GPU raises ConfigError."""
    if name not in ("cpu", "cuda", "auto"):
        raise ConfigError(f"--device {name!r}: expected cpu, cuda or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device 'cuda': no CUDA device is available")
    return torch.device(name)


def _check_comparable(run: TrainedRun, dense: TrainedRun) -> None:
    """The dense reference must share architecture and test set with the run; name both if not."""
    names = f"dense run {dense.run_dir} and run {run.run_dir}"
    if run.config.model.name != dense.config.model.name:
        raise CheckpointError(
            f"{names} have different architectures: model.name={dense.config.model.name!r} "
            f"vs {run.config.model.name!r}"
        )
    shapes = {name: tuple(p.shape) for name, p in run.model.named_parameters()}
    dense_shapes = {name: tuple(p.shape) for name, p in dense.model.named_parameters()}
    if shapes != dense_shapes:
        name = next(n for n in (*shapes, *dense_shapes) if shapes.get(n) != dense_shapes.get(n))
        raise CheckpointError(
            f"{names} have different architectures: parameter {name} has shape "
            f"{dense_shapes.get(name)} vs {shapes.get(name)}"
        )
    if run.config.data.name != dense.config.data.name:
        raise CheckpointError(
            f"{names} were trained on different data: data.name={dense.config.data.name!r} "
            f"vs {run.config.data.name!r}"
        )
    labels = getattr(run.data.test, "labels", None)
    dense_labels = getattr(dense.data.test, "labels", None)
    if labels is not None and dense_labels is not None and not torch.equal(labels, dense_labels):
        raise CheckpointError(f"{names} have different test sets (data.* settings or seed differ)")


def _chunks(loader: BatchLoader, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The test set's normalized batches regrouped into chunks of `size` (the last may be short)."""
    inputs, labels, held = [], [], 0
    for x, y in loader.batches(0):
        inputs.append(x)
        labels.append(y)
        held += len(y)
        while held >= size:
            x_all, y_all = torch.cat(inputs), torch.cat(labels)
            yield x_all[:size], y_all[:size]
            inputs, labels, held = [x_all[size:]], [y_all[size:]], held - size
    if held:
        yield torch.cat(inputs), torch.cat(labels)


class _Normalization:
    """A loader's per-channel mean and std on a device."""

    def __init__(self, loader: BatchLoader, device: torch.device) -> None:
        self.mean, self.std = loader.mean.to(device), loader.std.to(device)

    def same_as(self, other: _Normalization) -> bool:
        return torch.equal(self.mean, other.mean) and torch.equal(self.std, other.std)


def _inputs(run: TrainedRun, dense: TrainedRun | None, distribution: Distribution, seed: int,
            device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
    """(run's inputs, dense run's inputs, labels) per batch of the test distribution.

    Clean batches go to the run exactly as training evaluated them; otherwise the normalization is
    undone, the images transformed in [0, 1] and normalized again, for each model with its own
    statistics.
    """
    norm = _Normalization(run.data.test, device)
    dense_norm = None if dense is None else _Normalization(dense.data.test, device)
    if distribution.kind == "clean":
        for x, y in run.data.test.batches(0):
            x = x.to(device)
            if dense_norm is None:
                yield x, None, y
            elif dense_norm.same_as(norm):
                yield x, x, y
            else:
                yield x, (x * norm.std + norm.mean - dense_norm.mean) / dense_norm.std, y
        return
    for index, (x, y) in enumerate(_chunks(run.data.test, CHUNK)):
        pixels = (x.to(device) * norm.std + norm.mean).clamp(0, 1)
        shown = distribution.apply(pixels, seed * 1_000_003 + index)
        dense_x = None if dense_norm is None else (shown - dense_norm.mean) / dense_norm.std
        yield (shown - norm.mean) / norm.std, dense_x, y


def _predict_as_trained(run: TrainedRun, x: torch.Tensor) -> torch.Tensor:
    """Top-1 under the run's own train.autocast and train.channels_last, as training evaluated."""
    train = run.config.train
    if train.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=train.autocast == "bf16"):
        return predict(run.model, x).cpu()


def _evaluate_one(run: TrainedRun, dense: TrainedRun | None, distribution: Distribution,
                  seed: int, device: torch.device) -> dict[str, Any]:
    correct = dense_correct = same = count = 0
    for x, dense_x, y in _inputs(run, dense, distribution, seed, device):
        prediction = _predict_as_trained(run, x)
        correct += int((prediction == y).sum())
        count += y.numel()  # a language model predicts every position
        if dense_x is not None:
            dense_prediction = _predict_as_trained(dense, dense_x)
            dense_correct += int((dense_prediction == y).sum())
            same += int((dense_prediction == prediction).sum())
    record: dict[str, Any] = {
        "kind": distribution.kind, "name": distribution.name, "severity": distribution.severity,
        "count": count, "top1": correct / count,
    }
    if dense is not None:
        record["dense_top1"] = dense_correct / count
        record["agreement"] = same / count
        record["excess_error"] = excess_error(record["top1"], record["dense_top1"])
    return record


def _mean(records: list[dict[str, Any]], kind: str, key: str) -> float | None:
    values = [r[key] for r in records if r["kind"] == kind]
    return sum(values) / len(values) if values else None


def _sparsity(run: TrainedRun) -> float:
    total = sum(mask.numel() for mask in run.masks.values())
    active = sum(int(mask.sum()) for mask in run.masks.values())
    return 1.0 - active / total if total else 0.0


def _pruned_parameters(run: TrainedRun) -> tuple[int, int]:
    """(masked-off weights, all parameters of the model: biases, normalization, dense layers)."""
    pruned = sum(mask.numel() - int(mask.sum()) for mask in run.masks.values())
    return pruned, sum(p.numel() for p in run.model.parameters())


def evaluate_run(run_dir: Path, dense_dir: Path | None = None, suite: str = "default",
                 device: str = "auto", seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Evaluate RUN_DIR on the suite's test distributions (with DENSE_DIR: agreement and excess
    error too) and write evaluation.json, evaluation.md and evaluation.png into RUN_DIR.

    Besides `sparsity` (over the masked weights) the result holds torchprune's prune ratio, over
    all parameters of the model (`prune_ratio_all_parameters`, with both counts).

    A language model (byte-level text) is evaluated on its clean test set only, top-1 over every
    predicted byte. Bad input (no checkpoint, a dense run of another architecture or data) raises a
    DistsparseError before anything is written; evaluation.json is replaced atomically.
    """
    distributions = suite_distributions(suite)
    torch_device = resolve_device(device)
    run = load_run(Path(run_dir), torch_device)
    dense = None if dense_dir is None else load_run(Path(dense_dir), torch_device)
    if dense is not None:
        _check_comparable(run, dense)
    if run.data.byte_level:  # corruptions and shifts are of images: text has its clean test set
        distributions = distributions[:1]
    records = [
        _evaluate_one(run, dense, distribution, seed, torch_device)
        for distribution in tqdm(distributions, desc="evaluate", unit="test set",
                                 disable=None if progress else True)
    ]
    pruned, parameters = _pruned_parameters(run)
    result: dict[str, Any] = {
        "run_dir": str(run.run_dir),
        "dense_dir": None if dense is None else str(dense.run_dir),
        "method": run.summary.get("method", run.config.method.name),
        "sparsity": run.summary.get("sparsity", _sparsity(run)),
        "parameters": parameters,
        "pruned_parameters": pruned,
        "prune_ratio_all_parameters": pruned / parameters,
        "model": run.config.model.name,
        "data": run.config.data.name,
        "step": run.step,
        "suite": suite,
        "seed": seed,
        "device": torch_device.type,
        "clean_top1": records[0]["top1"],
        "mean_corruption_top1": _mean(records, "corruption", "top1"),
        "shift_top1": _mean(records, "shift", "top1"),
    }
    if dense is not None:
        for prefix, key in (("dense_", "dense_top1"), ("", "agreement"), ("", "excess_error")):
            suffix = "top1" if key == "dense_top1" else key
            result[f"{prefix}clean_{suffix}"] = records[0][key]
            result[f"{prefix}mean_corruption_{suffix}"] = _mean(records, "corruption", key)
            result[f"{prefix}shift_{suffix}"] = _mean(records, "shift", key)
    result["distributions"] = records
    _write_atomic(run.run_dir / "evaluation.png", _plot(result))
    _write_atomic(run.run_dir / "evaluation.md", format_evaluation(result).encode("utf-8"))
    _write_atomic(run.run_dir / EVALUATION_NAME, (json.dumps(result, indent=2) + "\n").encode("utf-8"))
    return result


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name beside PATH, then rename over it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def format_evaluation(result: dict[str, Any]) -> str:
    """evaluation.md: the headline numbers, then one row per test distribution."""
    dense = result["dense_dir"] is not None
    lines = [
        f"# Evaluation of `{result['run_dir']}`",
        "",
        f"method `{result['method']}`, sparsity {result['sparsity']:.4f} (over all parameters "
        f"{result['prune_ratio_all_parameters']:.4f}), model `{result['model']}`, "
        f"data `{result['data']}`, suite `{result['suite']}` (seed {result['seed']})"
        + (f"; dense reference `{result['dense_dir']}`" if dense else ""),
        "",
    ]
    columns = ["top-1", *(["dense top-1", "agreement", "excess error"] if dense else [])]
    keys = ["top1", *(["dense_top1", "agreement", "excess_error"] if dense else [])]
    lines += [f"| test distribution | {' | '.join(columns)} |", "|---" * (len(columns) + 1) + "|"]
    headline = (("clean", "clean"), ("corruptions (mean)", "mean_corruption"),
                ("shift (mean)", "shift"))
    for title, part in headline:
        values = [result.get(f"{part}_top1")]
        if values[0] is None:  # no such test distribution (a language model has only clean)
            continue
        if dense:
            values += [result.get(f"dense_{part}_top1"), result.get(f"{part}_agreement"),
                       result.get(f"{part}_excess_error")]
        lines.append(f"| {title} | {' | '.join(_number(v) for v in values)} |")
    lines += ["", f"| distribution | severity | {' | '.join(columns)} |",
              "|---" * (len(columns) + 2) + "|"]
    for record in result["distributions"]:
        severity = "" if record["severity"] is None else str(record["severity"])
        values = " | ".join(_number(record[k]) for k in keys)
        lines.append(f"| {record['name']} | {severity} | {values} |")
    return "\n".join(lines) + "\n"


def _plot(result: dict[str, Any]) -> bytes:
    """evaluation.png: top-1 against severity per corruption (dense dashed), then clean and shift."""
    records = result["distributions"]
    dense = result["dense_dir"] is not None
    corruptions = list(dict.fromkeys(r["name"] for r in records if r["kind"] == "corruption"))
    panels = len(corruptions) + 1
    columns = min(4, panels)
    rows = math.ceil(panels / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.0 * rows), squeeze=False)
    flat = axes.ravel()
    clean = records[0]
    for axis, name in zip(flat, corruptions):
        points = [r for r in records if r["name"] == name]
        severities = [r["severity"] for r in points]
        axis.plot(severities, [r["top1"] for r in points], marker="o", color="C0", label="run")
        axis.axhline(clean["top1"], color="C0", linestyle=":", linewidth=1)
        if dense:
            axis.plot(severities, [r["dense_top1"] for r in points], marker="o", color="C1",
                      linestyle="--", label="dense")
            axis.axhline(clean["dense_top1"], color="C1", linestyle=":", linewidth=1)
        axis.set(title=name, xlabel="severity", ylabel="top-1", ylim=(0, 1.02), xticks=severities)
    summary_axis = flat[len(corruptions)]
    others = [r for r in records if r["kind"] != "corruption"]
    positions = range(len(others))
    width = 0.4 if dense else 0.8
    summary_axis.bar([p - (width / 2 if dense else 0) for p in positions], [r["top1"] for r in others],
                     width=width, color="C0", label="run")
    if dense:
        summary_axis.bar([p + width / 2 for p in positions], [r["dense_top1"] for r in others],
                         width=width, color="C1", hatch="//", label="dense")
    summary_axis.set_xticks(list(positions), [r["name"] for r in others], rotation=20)
    summary_axis.set(title="clean and shift", ylabel="top-1", ylim=(0, 1.02))
    summary_axis.legend(fontsize=8)
    for axis in flat[panels:]:
        axis.axis("off")
    fig.suptitle(f"{result['method']} at sparsity {result['sparsity']:.3f}: {result['run_dir']}",
                 fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
