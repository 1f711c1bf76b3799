"""`distsparse prune`: post-training sparsity of a trained run (one-shot magnitude or UniPTS).

Imports nothing heavy at module level: the `distsparse` command line builds this parser before
it knows which verb runs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distsparse.errors import DistsparseError

__all__ = ["add_prune_parser", "run_prune"]

_DESCRIPTION = """\
Make a trained run sparse after training and write the result as a normal run directory
(config.yaml, checkpoints/last.pt, summary.json, metrics.jsonl, training.png), evaluated like any
other run. RUN is a run directory or its checkpoints/last.pt.

oneshot: magnitude pruning, a global top-|w| over all sparsifiable weights, or per layer with
  uniform or ERK densities; then, with --epochs E > 0, fine-tuning on the calibration set with
  cross-entropy, the mask fixed and pruned weights exactly zero after every step.
unipts: UniPTS (arXiv 2405.18810, github xjjxmu/UniPTS): an evolutionary search of layer-wise
  sparsity (reduce every layer to S + 5 %, regrow 5 % of the weights by a softmax allocation;
  fitness = calibration top-1 after BN recalibration), then dynamic sparse training on the
  calibration set by base-decayed distillation from the dense network (the mask is the per-layer
  top-|w| at every forward, straight-through gradients), and a final exact top-|w| mask.

The calibration set is --calib-samples distinct training images drawn with --seed. The overall
active count is exactly N - floor(S * N) (rigl's count) for global and unipts; uniform and ERK keep rigl's
per-layer integer counts.
"""

_EXAMPLES = """\
examples:
  distsparse prune runs/dense --method oneshot --sparsity 0.9
  distsparse prune runs/dense --method oneshot --sparsity 0.9 --distribution erk --epochs 5
  distsparse prune runs/dense/checkpoints/last.pt --method unipts --sparsity 0.9 --out runs/u90
"""


def add_prune_parser(verbs: argparse._SubParsersAction) -> None:
    """Add the `prune` verb and its options to the command line's subparsers."""
    prune = verbs.add_parser(
        "prune", help="post-training sparsity of a trained run (oneshot, unipts)",
        description=_DESCRIPTION, epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prune.add_argument("run", metavar="RUN", type=Path,
                       help="trained run directory, or its checkpoints/last.pt")
    prune.add_argument("--method", required=True, choices=("oneshot", "unipts"),
                       help="one-shot magnitude pruning or UniPTS")
    prune.add_argument("--sparsity", required=True, type=float, metavar="S",
                       help="fraction of zeros over the sparsifiable weights, in [0, 1)")
    prune.add_argument("--distribution", choices=("global", "uniform", "erk"),
                       help="oneshot only: one global top-|w| (default) or per-layer densities")
    prune.add_argument("--calib-samples", type=int, default=2048, metavar="N",
                       help="calibration images drawn from the training set (default 2048; "
                            "UniPTS's ImageNet setting is 10240)")
    prune.add_argument("--epochs", type=int, metavar="E",
                       help="epochs over the calibration set (default: oneshot 0, unipts 5)")
    prune.add_argument("--batch-size", type=int, default=64, help="default 64 (as UniPTS)")
    prune.add_argument("--lr", type=float, default=0.01,
                       help="SGD (momentum 0.9, weight decay 1e-4), cosine schedule; default 0.01")
    prune.add_argument("--population", type=int, default=8,
                       help="unipts search: candidates per generation (default 8; reference 25)")
    prune.add_argument("--generations", type=int, default=4,
                       help="unipts search: generations (default 4; reference 25)")
    prune.add_argument("--parents", type=int, default=4,
                       help="unipts search: fittest candidates kept to breed (default 4; reference 10)")
    prune.add_argument("--mutation-rate", type=float, default=0.1,
                       help="unipts search: chance a gene mutates (default 0.1)")
    prune.add_argument("--crossover-rate", type=float, default=1.0,
                       help="unipts search: chance a child is a crossover (default 1.0)")
    prune.add_argument("--seed", type=int, default=0,
                       help="seed of the calibration set, its batch order and the search")
    prune.add_argument("--out", type=Path, metavar="RUN_DIR_OUT",
                       help="output run directory (default runs/<input-name>-<method>-<sparsity>); "
                            "must not exist or be empty")
    prune.add_argument("--device", choices=("cpu", "cuda", "auto"),
                       help="default: the run's train.device")
    prune.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_prune(args: argparse.Namespace) -> int:
    """Run a parsed `prune` command; bad input ends with one line and exit status 2."""
    try:
        from distsparse.engine.post_training import PruneSettings, prune
        from distsparse.methods.post_training import SearchSettings

        search = SearchSettings(population=args.population, generations=args.generations,
                                parents=args.parents, mutation_rate=args.mutation_rate,
                                crossover_rate=args.crossover_rate)
        settings = PruneSettings(
            method=args.method, sparsity=args.sparsity, distribution=args.distribution,
            calib_samples=args.calib_samples, epochs=args.epochs, batch_size=args.batch_size,
            lr=args.lr, search=search, seed=args.seed, out=args.out, device=args.device,
            progress=not args.no_progress,
        )
        prune(args.run, settings)
    except DistsparseError as exc:
        print(f"distsparse: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distsparse: interrupted", file=sys.stderr)
        return 130
    return 0
