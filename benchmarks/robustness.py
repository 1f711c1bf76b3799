"""Robustness beyond test accuracy on Fashion-MNIST: evaluate finished runs against their dense run.

Through the real command line, `--jobs` subprocesses at a time:

    distsparse evaluate RUN --dense DENSE [--suite default] --device D     (for DENSE and every RUN)
    distsparse compare DENSE RUN... --metric prune_potential --delta 0.5 --out benchmarks/out/robustness

then prints the comparison (clean top-1, mean corruption top-1, shift top-1, agreement with the
dense net, prune potential per test distribution), appends it with machine, versions and settings
to RESULTS.md, and copies the two comparison plots to benchmarks/robustness_*.png. An
evaluation.json already in a run directory is reused unless --fresh.

The runs are either given (the ones accuracy.py and post_training.py leave in benchmarks/out/):

    .venv/bin/python benchmarks/robustness.py --dense benchmarks/out/acc/dense-s0 \\
        benchmarks/out/acc/rigl-s0 benchmarks/out/acc/snip-0.9-s0 ...

or trained first with --train, the whole sweep into benchmarks/out/rob-runs/ (dense, every
training method at every sparsity with the same epochs, and `unipts` as `distsparse prune DENSE
--method unipts` with --prune-epochs of fine-tuning):

    .venv/bin/python benchmarks/robustness.py --train --methods gmp,rigl,granet_st,snip,force,unipts \\
        --sparsities 0.8,0.9,0.95 --epochs 3 --device cuda --jobs 6
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from record import REPO, append_results, distsparse_command, load_average, run_info

OUT = REPO / "benchmarks" / "out" / "robustness"
RUNS = REPO / "benchmarks" / "out" / "rob-runs"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense", type=Path, help="the finished dense run (not with --train)")
    parser.add_argument("items", nargs="*", metavar="RUN | key=value",
                        help="finished sparse run directories; with --train, key.sub=value "
                             "overrides for every training run")
    parser.add_argument("--train", action="store_true", help="train the sweep first (see below)")
    parser.add_argument("--methods", default="gmp,rigl,granet_st,snip,force,unipts",
                        help="--train: training methods, and unipts for post-training")
    parser.add_argument("--sparsities", default="0.8,0.9,0.95", help="--train: comma-separated")
    parser.add_argument("--epochs", type=int, default=3, help="--train: epochs of every training run")
    parser.add_argument("--prune-epochs", type=int, default=5, help="--train: unipts fine-tuning epochs")
    parser.add_argument("--config", default="configs/quickstart.yaml", help="--train: base config")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--jobs", type=int, default=1, help="subprocesses at a time")
    parser.add_argument("--suite", choices=("default", "full"), default="default")
    parser.add_argument("--delta", default="0.5", help="prune potential tolerance, percentage points")
    parser.add_argument("--fresh", action="store_true", help="re-evaluate runs already evaluated")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args(argv)
    if args.train == (args.dense is not None) or (not args.train and not args.items):
        parser.error("give either --train [key=value...] or --dense DENSE RUN...")
    args.extra, args.runs = (args.items, []) if args.train else ([], [Path(r) for r in args.items])
    return args


def _distsparse(*arguments: str) -> str:
    """Run one distsparse command; its result line and duration are printed when it ends."""
    tick = time.perf_counter()
    result = subprocess.run([*distsparse_command(), *arguments], cwd=REPO, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(arguments)}\nfailed (exit {result.returncode}): "
                         f"{result.stderr.strip()[-2000:]}")
    lines = result.stdout.strip().splitlines() or [""]
    shown = lines[-1] if arguments[0] in ("train", "prune") else lines[0]  # table row / headline
    print(f"{arguments[0]}: {shown} ({time.perf_counter() - tick:.0f} s)", flush=True)
    return result.stdout


def _in_parallel(commands: list[list[str]], jobs: int) -> None:
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for _ in pool.map(lambda command: _distsparse(*command), commands):
            pass


def _train_sweep(args: argparse.Namespace) -> tuple[Path, list[Path]]:
    """Train dense, then every method at every sparsity; return (dense, sparse runs)."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    sparsities = [p.strip() for p in args.sparsities.split(",") if p.strip()]
    if RUNS.exists():
        shutil.rmtree(RUNS)

    def train(name: str, *overrides: str) -> list[str]:
        return ["train", args.config, *overrides, f"train.epochs={args.epochs}",
                f"train.device={args.device}", f"run.dir={RUNS / name}", "run.progress=false",
                *args.extra]

    dense = RUNS / "dense"
    _distsparse(*train("dense", "method.name=dense"))
    trained, pruned = [], []
    for method in methods:
        for sparsity in sparsities:
            run = RUNS / f"{method}-{sparsity}"
            if method == "unipts":
                pruned.append(["prune", str(dense), "--method", "unipts", "--sparsity", sparsity,
                               "--epochs", str(args.prune_epochs), "--device", args.device,
                               "--out", str(run), "--no-progress"])
            else:
                trained.append(train(run.name, f"method.name={method}", f"method.sparsity={sparsity}"))
    _in_parallel(pruned + trained, args.jobs)  # the slowest (unipts) first
    runs = [RUNS / f"{m}-{p}" for m in methods for p in sparsities]
    return dense, runs


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    load_before = load_average()
    started = time.perf_counter()
    dense, runs = _train_sweep(args) if args.train else (args.dense, args.runs)
    _in_parallel([["evaluate", str(run), "--dense", str(dense), "--suite", args.suite,
                   "--device", args.device]
                  for run in [dense, *runs] if args.fresh or not (run / "evaluation.json").is_file()],
                 args.jobs)
    if OUT.exists():
        shutil.rmtree(OUT)
    _distsparse("compare", str(dense), *map(str, runs), "--metric", "prune_potential",
                "--delta", args.delta, "--out", str(OUT))
    elapsed = time.perf_counter() - started
    table = (OUT / "compare.md").read_text(encoding="utf-8").strip()
    print()
    print(table)
    for plot in OUT.glob("*.png"):
        shutil.copyfile(plot, REPO / "benchmarks" / f"robustness_{plot.name}")
    if not args.no_record:
        shown = lambda run: str(run.relative_to(REPO) if run.is_relative_to(REPO) else run)  # noqa: E731
        trained = (f"trained by --train: {args.config} {' '.join(args.extra)}, {args.epochs} epochs; "
                   f"unipts: `distsparse prune DENSE --method unipts --epochs {args.prune_epochs}`; "
                   if args.train else "")
        settings = (
            f"{trained}`distsparse evaluate RUN --dense {shown(dense)} --suite {args.suite} "
            f"--device {args.device}` then `distsparse compare --metric prune_potential "
            f"--delta {args.delta}`; {args.jobs} subprocess(es) at a time; runs: "
            f"{', '.join(map(shown, runs))}"
        )
        info = run_info(load_before, settings, {"wall time of the benchmark": f"{elapsed:.0f} s"})
        append_results("robustness.py: Fashion-MNIST, beyond test accuracy", info, table)
        print("\nappended to benchmarks/RESULTS.md; plots in benchmarks/robustness_*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
