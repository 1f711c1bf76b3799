"""How far RigL's selection thresholds move between mask updates in a real run.

The sharded select starts each selection from the threshold it found the update before, and saves
a round when every layer's new threshold lies within a factor of 2 of its old one (the window of
`sharded_select._window_shift`; the rounds are shared, so one layer outside costs the saving).
This runs `distsparse train CONFIG [overrides]` in this process with the full-tensor layout's
`drop_and_grow` recorded: at every update, per layer, the drop threshold (the k-th largest drop
score among active entries, k = active - n) and the grow threshold (the n-th largest grow score
among entries not kept). It prints, per selection, the moves |log2(new / old)| of every layer
between consecutive updates and the share of update pairs in which every layer stayed within one
binade. It also places each threshold in the first round of a selection started from hints (the
threshold of the update before, and the ranks' estimates, `threshold_estimates` of each layer
split into 8 and 64 ZeRO-3 pieces, as `PieceLayout.drop_and_grow` starts them): in a finer
window (a round saved beyond the plain one), a plain one (a factor 2 either way), or outside
(no round saved); pieces of a real layer differ, unlike the i.i.d. scores of `scale_model.py`.
And it replays every update on pieces, counting its all-reduce calls with the drop's last round
carried by the grow's first round and without. It appends the tables to RESULTS.md.

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


PLACES = ("finer window", "plain window", "outside")
HINTED = (((0, True), (8, False), (64, False)), ((8, False), (64, False), (8, True), (64, True)))
"""Per selection (drop, grow), the first rounds placed: (ranks whose estimates, 0 for none;
whether the threshold of the update before is a hint too). `PieceLayout.drop_and_grow` starts
the drop from the threshold before, the grow from both; the drop from estimates is for
comparison."""


def place(scores: torch.Tensor, eligible: torch.Tensor, fraction: float, threshold: float,
          world: int, width: int, previous: float | None) -> str | None:
    """Where `threshold` falls among the first-round cells of a selection started from `world`
    ranks' estimates over ZeRO-3 pieces of the layer (world 0: none) and from the `previous`
    threshold if given (None: no hint at all)."""
    from distsparse.sparsity.sharded_select import (
        Threshold,
        _candidate_keys,
        _window_cells,
        _window_shift,
        estimated_hints,
    )
    from scale_model import emulated_estimates

    def key_of(value: float) -> int:
        return int(_candidate_keys(torch.tensor([value], dtype=torch.float32), 32)) & (2**32 - 1)

    hints = [] if previous is None or not math.isfinite(previous) else [Threshold(32, key_of(previous))]
    if world:
        total = emulated_estimates(world)([scores], [eligible], [fraction], 32)
        hints += [hint for hint in estimated_hints(total.tolist(), 32) if hint is not None]
    if not hints or not math.isfinite(threshold):
        return None
    key = key_of(threshold)
    shift = [cell_shift for low, cell_shift in _window_cells(hints, width, 32) if low <= key][-1]
    plain = _window_shift(width, 32)
    return PLACES[0] if shift < plain else PLACES[1] if shift == plain else PLACES[2]


REPLAYS = tuple((ranks, deferred) for ranks in (8, 64) for deferred in (True, False))
"""The update replayed on pieces: (ranks whose estimates start the grow, whether the drop's last
round rides in the grow's first round; else only its tie round does)."""


class Replay:
    """`PieceLayout.drop_and_grow` of every recorded update on one rank's pieces (the whole
    layers: the rounds are those of any number of ranks), the grow started from the estimates
    `ranks` ranks would agree on (`scale_model.emulated_estimates`): the calls of each update,
    its masks checked against the full tensors'."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], ranks: int, deferred: bool) -> None:
        from distsparse.sparsity.layout import PieceLayout

        self.calls: list[int] = []
        self.count = 0

        def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
            self.count += 1
            return tensor

        self.layout = PieceLayout(shapes, 0, 1, all_reduce_sum, lambda tensor: [tensor])
        self.ranks, self.deferred = ranks, deferred

    def update(self, masks, drop_scores, grow_scores, counts, active, expected) -> None:
        import distsparse.sparsity.layout as layout_module
        from scale_model import emulated_estimates

        from distsparse.sparsity import select as select_module

        select, estimates = layout_module.sharded_topk, layout_module.threshold_estimates
        devices = select_module.LAUNCH_BOUND_DEVICES
        select_module.LAUNCH_BOUND_DEVICES = (*devices, "cpu")  # hinted, as on a GPU

        def ties_only(*args, defer_last_round=False, **kwargs):
            return select(*args, defer_ties=kwargs.pop("defer_ties", False) or defer_last_round,
                          **kwargs)

        layout_module.threshold_estimates = emulated_estimates(self.ranks)
        if not self.deferred:
            layout_module.sharded_topk = ties_only
        self.count = 0
        try:
            flat = [{name: tensor.reshape(-1) for name, tensor in tensors.items()}
                    for tensors in (masks, drop_scores, grow_scores)]
            new = self.layout.drop_and_grow(*flat, counts, active)
        finally:
            layout_module.sharded_topk, layout_module.threshold_estimates = select, estimates
            select_module.LAUNCH_BOUND_DEVICES = devices
        for name, mask in new.items():
            if not torch.equal(mask, expected[name].reshape(-1)):
                raise AssertionError(f"{name}: the replay on pieces differs from the full tensors")
        self.calls.append(self.count)


def record_thresholds(records: list[dict[str, tuple[float, float]]],
                      places: list[tuple[int, int, str]], replays: dict[tuple[int, bool], Replay]):
    """Wrap FullLayout.drop_and_grow to append each update's per-layer (drop, grow) thresholds,
    and (selection, world, place) per layer to `places`, and to replay it on pieces (`replays`,
    filled per (ranks, deferred) of `REPLAYS` at the first update); returns the undo."""
    from distsparse.sparsity.layout import FullLayout
    from distsparse.sparsity.sharded_select import round_bits

    original = FullLayout.drop_and_grow

    def recording(self, masks, drop_scores, grow_scores, counts, active=None):
        row = {}
        swapped = [name for name, count in counts.items() if count > 0]
        width = round_bits(len(swapped), 32, max((masks[name].numel() for name in swapped), default=1))
        for name in swapped:
            count = counts[name]
            mask = masks[name].reshape(-1).bool()
            drop = drop_scores[name].reshape(-1).double().masked_fill(~mask, -math.inf)
            keep = int(mask.sum()) - count
            kept = torch.zeros_like(mask)
            kept[drop.topk(keep).indices] = True
            grow = grow_scores[name].reshape(-1).double().masked_fill(kept, -math.inf)
            row[name] = (_kth(drop, keep), _kth(grow, count))
            active_count = int(mask.sum())
            previous = records[-1].get(name) if records else None
            for which, (scores, eligible, fraction) in enumerate((
                    (drop_scores[name], mask, keep / active_count),
                    (grow_scores[name], ~mask, count / (mask.numel() - active_count + count)))):
                for hinted in HINTED[which]:
                    world, from_previous = hinted
                    if from_previous and previous is None:
                        continue
                    where = place(scores.reshape(-1).float(), eligible, fraction,
                                  row[name][which], world, width,
                                  previous[which] if from_previous else None)
                    if where is not None:
                        places.append((which, hinted, where))
        records.append(row)
        new = original(self, masks, drop_scores, grow_scores, counts, active)
        if active is None:
            active = self.active_counts({name: masks[name] for name in counts})
        for replay_of in REPLAYS:
            if replay_of not in replays:
                replays[replay_of] = Replay({name: (mask.numel(),) for name, mask in masks.items()},
                                            *replay_of)
            replays[replay_of].update(masks, drop_scores, grow_scores, counts, active, new)
        return new

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
    places: list[tuple[int, int, str]] = []
    replays: dict[tuple[int, bool], Replay] = {}
    undo = record_thresholds(records, places, replays)
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
    placed = []
    for which, label in ((0, "drop (magnitude among active)"), (1, "grow (among not kept)")):
        for hinted in HINTED[which]:
            found = [where for selection, hints, where in places if (selection, hints) == (which, hinted)]
            world, from_previous = hinted
            hints = " and ".join(([f"{world} ranks' estimates"] if world else [])
                                 + (["the threshold before"] if from_previous else []))
            placed.append([label, hints, len(found),
                           *(f"{found.count(where) / max(1, len(found)):.0%}" for where in PLACES)])
    zeros = [sum(1 for row in records for pair in row.values() if pair[which] == 0) for which in (0, 1)]
    layer_updates = sum(len(row) for row in records)
    body += ("\n\nWhere each threshold falls in a first round started from hints (thresholds at "
             f"0 of the {layer_updates} layer updates: drop {zeros[0]}, grow {zeros[1]}):\n\n"
             + markdown_table(["selection", "hints", "layer updates", *PLACES], placed))
    replayed = []
    for (ranks, deferred), replay in replays.items():
        first, *later = replay.calls
        replayed.append([f"{ranks} ranks' estimates",
                         "drop's last round and ties" if deferred else "drop's ties only",
                         len(replay.calls), first, f"{statistics.mean(later):.2f}" if later else "-",
                         max(later, default="-"), sum(replay.calls)])
    body += ("\n\nAll-reduce calls of each update replayed on pieces (`PieceLayout.drop_and_grow`, "
             "masks checked against the full tensors'), by what the grow's first round carries "
             "(of the calls: the rounds of any number of ranks, the estimates as these ranks "
             "would agree on them):\n\n"
             + markdown_table(["grow started from", "grow's first round carries", "updates",
                               "first update", "later, mean", "later, most", "calls in all"],
                              replayed))
    print(body)
    info = run_info(load_before, f"distsparse train {' '.join(argv)}",
                    {"wall time of the benchmark": f"{time.perf_counter() - started:.0f} s"})
    append_results("threshold_drift.py: RigL thresholds between consecutive mask updates", info,
                   body)
    print("\nappended to benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
