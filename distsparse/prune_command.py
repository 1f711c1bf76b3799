"""`distsparse prune`: post-training sparsity of a trained run (one-shot magnitude or UniPTS).

Imports nothing heavy at module level: the `distsparse` command line builds this parser before
it knows which verb runs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from distsparse.errors import DistsparseError

if TYPE_CHECKING:
    from distsparse.engine.post_training import PruneSettings

__all__ = ["add_prune_parser", "prune_settings", "run_prune"]

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

The calibration set is --calib-samples distinct training images drawn with --seed, through the
run's own training pipeline (in-memory, FFCV or torchvision). The overall active count is exactly
N - floor(S * N) (rigl's count) for global and unipts; uniform and ERK keep rigl's per-layer
integer counts.

--preset cpu (default) is sized for a small network on CPU: 2048 calibration images, unipts 5
epochs, search population 8, 4 generations, 4 parents, no warm-up. --preset paper is UniPTS's
ImageNet setting (xjjxmu/UniPTS): 10240 images, 100 epochs, 1 warm-up epoch, population 25,
25 generations, 10 parents. Both: batch 64, SGD lr 0.01 (momentum 0.9, weight decay 1e-4)
cosine; oneshot 0 epochs. Options given explicitly override the preset; summary.json records it.

The output is step 0 of a static-mask run (config.yaml: method.name=static): fine-tune it with
the mask fixed by `distsparse train --resume OUT train.epochs=N [train.lr=...]`.
"""

_EXAMPLES = """\
examples:
  distsparse prune runs/dense --method oneshot --sparsity 0.9
  distsparse prune runs/dense --method oneshot --sparsity 0.9 --distribution erk --epochs 5
  distsparse prune runs/dense/checkpoints/last.pt --method unipts --sparsity 0.9 --out runs/u90
  distsparse prune runs/rn50 --method unipts --sparsity 0.9 --preset paper --device cuda
  distsparse train --resume runs/u90 train.epochs=10 train.lr=0.01
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
    prune.add_argument("--preset", choices=("cpu", "paper"), default="cpu",
                       help="default values of the options below: cpu (default, small and fast) "
                            "or paper (UniPTS's ImageNet settings)")
    prune.add_argument("--calib-samples", type=int, metavar="N",
                       help="calibration images drawn from the training set (cpu 2048, paper 10240)")
    prune.add_argument("--epochs", type=int, metavar="E",
                       help="epochs over the calibration set (oneshot 0; unipts: cpu 5, paper 100)")
    prune.add_argument("--batch-size", type=int, help="cpu and paper 64")
    prune.add_argument("--lr", type=float,
                       help="SGD (momentum 0.9, weight decay 1e-4), cosine schedule; cpu and paper 0.01")
    prune.add_argument("--warmup-epochs", type=float, metavar="W",
                       help="linear LR warm-up before the cosine (cpu 0, paper 1)")
    prune.add_argument("--population", type=int,
                       help="unipts search: candidates per generation (cpu 8, paper 25)")
    prune.add_argument("--generations", type=int,
                       help="unipts search: generations (cpu 4, paper 25)")
    prune.add_argument("--parents", type=int,
                       help="unipts search: fittest candidates kept to breed (cpu 4, paper 10)")
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


def prune_settings(args: argparse.Namespace) -> PruneSettings:
    """The PruneSettings a parsed `prune` command stands for: its preset, overridden by what is given."""
    from distsparse.engine.post_training import PruneSettings

    return PruneSettings.from_preset(
        args.preset, args.method, args.sparsity, distribution=args.distribution,
        calib_samples=args.calib_samples, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, warmup_epochs=args.warmup_epochs, population=args.population,
        generations=args.generations, parents=args.parents, mutation_rate=args.mutation_rate,
        crossover_rate=args.crossover_rate, seed=args.seed, out=args.out, device=args.device,
        progress=not args.no_progress,
    )


def run_prune(args: argparse.Namespace) -> int:
    """Run a parsed `prune` command; bad input ends with one line and exit status 2."""
    try:
        from distsparse.engine.post_training import prune

        prune(args.run, prune_settings(args))
    except DistsparseError as exc:
        print(f"distsparse: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distsparse: interrupted", file=sys.stderr)
        return 130
    return 0
