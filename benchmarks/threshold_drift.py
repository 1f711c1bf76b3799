"""How far RigL's selection thresholds move between mask updates in a real run.

The sharded select starts each selection from the threshold it found the update before, and saves
a round when every layer's new threshold lies within a factor of 2 of its old one (the window of
`sharded_select._window_shift`; the rounds are shared, so one layer outside costs the saving).
This runs `distsparse train CONFIG [overrides]` in this process with the full-tensor layout's
`drop_and_grow` recorded: at every update, per layer, the drop threshold (the k-th largest drop
score among active entries, k = active - n) and the grow threshold (the n-th largest grow score
among entries not kept). It prints, per selection, the moves |log2(new / old)| of every layer
between consecutive updates and the share of update pairs in which every layer stayed within one
binade, and appends them to RESULTS.md.

    .venv/bin/python benchmarks/threshold_drift.py configs/gpt/fortunes_rigl.yaml \\
        model.kwargs.n_layer=2 model.kwargs.n_embd=128 train.batch_size=16
    .venv/bin/python benchmarks/threshold_drift.py configs/quickstart.yaml method.name=rigl
"""
from __future__ import annotations

import math
import statistics
import sys
import tempfile
import time

import torch

from record import append_results, load_average, markdown_table, run_info


def _kth(scores: torch.Tensor, k: int) -> float:
    return scores.topk(k).values[-1].item() if k > 0 else math.nan


def record_thresholds(records: list[dict[str, tuple[float, float]]]):
    """Wrap FullLayout.drop_and_grow to append each update's per-layer (drop, grow) thresholds;
    returns the undo."""
    from distsparse.sparsity.layout import FullLayout

    original = FullLayout.drop_and_grow

    def recording(self, masks, drop_scores, grow_scores, counts, active=None):
        row = {}
        for name, count in counts.items():
            if count <= 0:
                continue
            mask = masks[name].reshape(-1).bool()
            drop = drop_scores[name].reshape(-1).double().masked_fill(~mask, -math.inf)
            keep = int(mask.sum()) - count
            kept = torch.zeros_like(mask)
            kept[drop.topk(keep).indices] = True
            grow = grow_scores[name].reshape(-1).double().masked_fill(kept, -math.inf)
            row[name] = (_kth(drop, keep), _kth(grow, count))
        records.append(row)
        return original(self, masks, drop_scores, grow_scores, counts, active)

    FullLayout.drop_and_grow = recording
    return lambda: setattr(FullLayout, "drop_and_grow", original)


def moves(records: list[dict[str, tuple[float, float]]], which: int) -> list[list[float]]:
    """Per consecutive update pair, |log2(new / old)| of every layer updated in both."""
    return [[abs(math.log2(after[name][which] / before[name][which])) for name in before
             if name in after and before[name][which] > 0 and after[name][which] > 0]
            for before, after in zip(records, records[1:])]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        print(__doc__)
        return 2
    from distsparse.cli import main as distsparse

    load_before, started = load_average(), time.perf_counter()
    records: list[dict[str, tuple[float, float]]] = []
    undo = record_thresholds(records)
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            status = distsparse(["train", *argv, f"run.dir={run_dir}/run", "run.progress=false"])
    finally:
        undo()
    if status:
        return status
    rows = []
    for which, label in ((0, "drop (magnitude among active)"), (1, "grow (among not kept)")):
        pairs = [pair for pair in moves(records, which) if pair]
        every = [move for pair in pairs for move in pair]
        rows.append([label, len(records), len(pairs), len(every), f"{statistics.median(every):.2f}",
                     f"{max(every):.2f}", f"{sum(m < 1 for m in every) / len(every):.0%}",
                     f"{sum(max(pair) < 1 for pair in pairs)} of {len(pairs)}"])
    body = markdown_table(["selection", "updates", "update pairs", "layer moves",
                           "median binades", "largest", "moves < 1 binade",
                           "pairs with every layer < 1 binade"], rows)
    print(body)
    info = run_info(load_before, f"distsparse train {' '.join(argv)}",
                    {"wall time of the benchmark": f"{time.perf_counter() - started:.0f} s"})
    append_results("threshold_drift.py: RigL thresholds between consecutive mask updates", info,
                   body)
    print("\nappended to benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
