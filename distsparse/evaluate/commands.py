"""The `evaluate` and `compare` verbs of the `distsparse` command line."""
from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["VERBS", "add_parsers", "run"]

VERBS = ("evaluate", "compare")


def add_parsers(verbs: argparse._SubParsersAction) -> None:
    """Add the evaluate and compare sub-commands to the CLI's sub-parsers."""
    evaluate = verbs.add_parser(
        "evaluate", help="evaluate a run on corruptions, a held-out shift and against a dense run",
        description="Evaluate RUN_DIR's trained model on the clean test set, ImageNet-C-style "
        "corruptions computed on the fly (severities 1-5) and a held-out rotation/translation "
        "shift; with --dense, also top-1 agreement with the dense run and excess error. Writes "
        "evaluation.json, evaluation.md and evaluation.png into RUN_DIR.",
    )
    evaluate.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="a trained run directory")
    evaluate.add_argument("--dense", metavar="RUN_DIR", type=Path,
                          help="dense run of the same architecture and data to compare with")
    evaluate.add_argument("--suite", choices=("default", "full"), default="default",
                          help="default: 6 corruptions at severities 1, 3, 5; full: 11 corruptions "
                          "at severities 1-5 (both with the shift)")
    evaluate.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                          help="where to evaluate (auto: cuda when available)")
    evaluate.add_argument("--seed", type=int, default=0,
                          help="seed of the corruptions' random draws (same seed, same pixels)")
    compare = verbs.add_parser(
        "compare", help="tabulate and plot several runs; prune potential against a dense run",
        description="One table across runs (method, sparsity, top-1, training FLOPs and, where "
        "`distsparse evaluate` ran, mean corruption top-1, shift top-1 and agreement) as Markdown "
        "and CSV, and plots of accuracy and robustness against sparsity per method. With "
        "--metric prune_potential: per method and test distribution (every corruption at every "
        "severity, each shift, and the suite mean as a summary), the largest prune ratio whose "
        "error is within --delta of the dense run's, over the masked weights and over all "
        "parameters (Liebenwein et al., arXiv 2103.03014; lucaslie/torchprune).",
    )
    compare.add_argument("run_dirs", metavar="RUN_DIR", type=Path, nargs="+", help="run directories")
    compare.add_argument("--metric", choices=("top1", "prune_potential"), default="top1",
                         help="top1: the table and plots; prune_potential: also the prune "
                         "potential table (needs a run with method dense or sparsity 0)")
    compare.add_argument("--delta", type=float, default=0.5,
                         help="prune potential tolerance in percentage points of error "
                         "(0.5 means 0.005 as a fraction; default 0.5, the paper's)")
    compare.add_argument("--out", metavar="DIR", type=Path, default=Path("runs/compare"),
                         help="output directory (default runs/compare)")


def run(args: argparse.Namespace) -> None:
    """Carry out an evaluate or compare command; bad input raises a DistsparseError."""
    if args.verb == "evaluate":
        from distsparse.evaluate.evaluation import evaluate_run

        result = evaluate_run(args.run_dir, args.dense, suite=args.suite, device=args.device,
                              seed=args.seed)
        shown = (("clean top-1", "clean_top1"), ("mean corruption top-1", "mean_corruption_top1"),
                 ("shift top-1", "shift_top1"), ("agreement with dense", "clean_agreement"))
        print(", ".join(f"{label} {result[key]:.4f}" for label, key in shown
                        if result.get(key) is not None))
        print(f"wrote {args.run_dir / 'evaluation.json'}, evaluation.md and evaluation.png")
    else:
        from distsparse.evaluate.compare import compare_runs

        result = compare_runs(args.run_dirs, args.out, metric=args.metric, delta=args.delta / 100.0)
        print((args.out / "compare.md").read_text(encoding="utf-8"), end="")
        print(f"wrote {', '.join(result['files'])}")
