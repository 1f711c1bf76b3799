"""Post-training sparsity on Fashion-MNIST: one-shot magnitude (with and without fine-tuning) vs UniPTS.

The issue's claim: from a dense Fashion-MNIST checkpoint at 90 % sparsity, UniPTS beats one-shot
magnitude pruning followed by the same fine-tuning budget (same calibration set, same epochs,
same optimizer) in top-1. Through the real command line, one subprocess at a time:

    distsparse train configs/quickstart.yaml method.name=dense train.epochs=D
        run.dir=benchmarks/out/pts/dense run.progress=false          (skipped with --dense RUN)
    distsparse prune DENSE --method oneshot --sparsity S --epochs 0
    distsparse prune DENSE --method oneshot --sparsity S --epochs E
    distsparse prune DENSE --method unipts  --sparsity S --epochs E

for each sparsity S and prune seed, then prints a table (mean over seeds, and the spread of top-1
where there are several) and appends it, with machine, versions and settings, to RESULTS.md.
benchmarks/out/ is git-ignored; existing output directories there are replaced, except that --reuse
keeps those holding a finished run of the same settings.

    .venv/bin/python benchmarks/post_training.py [--dense-epochs 3] [--epochs 5] [--seeds 0,1]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from record import (
    REPO,
    append_results,
    distsparse_command,
    load_average,
    markdown_table,
    mean_cell,
    run_info,
)

OUT = REPO / "benchmarks" / "out" / "pts"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense", type=Path, help="use this finished dense run instead of training one")
    parser.add_argument("--dense-epochs", type=int, default=3, help="epochs of the dense run (default 3)")
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--sparsities", default="0.7,0.9", help="comma-separated, e.g. 0.7,0.9")
    parser.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs of both methods")
    parser.add_argument("--calib-samples", type=int, default=2048)
    parser.add_argument("--preset", choices=("cpu", "paper"), default="cpu",
                        help="`distsparse prune --preset` for the search and warm-up; --epochs and "
                             "--calib-samples here override it (default cpu)")
    parser.add_argument("--seeds", default="0", help="comma-separated prune seeds, e.g. 0,1,2")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--reuse", action="store_true",
                        help="keep finished runs in benchmarks/out/pts made with these settings")
    parser.add_argument("prune_args", nargs="*",
                        help="further `distsparse prune` options for every run (after --), "
                             "e.g. -- --population 25 --generations 25 --parents 10")
    return parser.parse_args(argv)


def _run(command: list[str], label: str) -> float:
    print(f"{label}: {' '.join(command[1:])}", flush=True)
    tick = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{label} failed (exit {result.returncode}):\n{result.stderr.strip()[-2000:]}")
    return time.perf_counter() - tick


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))


def _dense(args: argparse.Namespace) -> Path:
    if args.dense is not None:
        return args.dense.resolve()
    run_dir = OUT / "dense"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    _run([*distsparse_command(), "train", args.config, "method.name=dense",
          f"train.epochs={args.dense_epochs}", f"run.dir={run_dir.relative_to(REPO)}",
          "run.progress=false"], "dense")
    return run_dir


def _prune(dense: Path, label: str, method: str, sparsity: float, epochs: int, seed: int,
           args: argparse.Namespace) -> dict:
    out = OUT / f"{label}-{sparsity:g}-s{seed}"
    if args.reuse and _same_settings(out, dense, method, sparsity, epochs, seed, args):
        print(f"{label} {sparsity:g} seed {seed}: reusing {out.relative_to(REPO)}", flush=True)
        return _summary(out)
    if out.exists():
        shutil.rmtree(out)
    seconds = _run([*distsparse_command(), "prune", str(dense), "--method", method, "--sparsity", f"{sparsity}",
                    "--preset", args.preset, "--epochs", str(epochs),
                    "--calib-samples", str(args.calib_samples),
                    "--seed", str(seed), "--out", str(out.relative_to(REPO)), "--no-progress",
                    *args.prune_args], f"{label} {sparsity:g} seed {seed}")
    summary = _summary(out)
    print(f"  top-1 {summary['test_top1']:.4f}, sparsity {summary['sparsity']:.4f}, {seconds:.0f} s",
          flush=True)
    return summary


def _same_settings(out: Path, dense: Path, method: str, sparsity: float, epochs: int, seed: int,
                   args: argparse.Namespace) -> bool:
    """Whether `out` holds a finished prune run of exactly these settings."""
    if args.prune_args or not (out / "summary.json").is_file():
        return False
    summary = _summary(out)
    wanted = {"completed": True, "method": method, "target_sparsity": sparsity,
              "finetune_epochs": epochs, "calib_samples": args.calib_samples, "seed": seed,
              "preset": args.preset,
              "source_run": str(dense)}
    return all(summary.get(key) == value for key, value in wanted.items())


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    sparsities = [float(s) for s in args.sparsities.split(",") if s.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    load_before = load_average()
    started = time.perf_counter()
    dense = _dense(args)
    dense_top1 = _summary(dense)["test_top1"]
    variants = [("oneshot", "oneshot", 0), (f"oneshot+ft{args.epochs}", "oneshot", args.epochs),
                (f"unipts{args.epochs}", "unipts", args.epochs)]
    rows = []
    for sparsity in sparsities:
        for label, method, epochs in variants:
            runs = [_prune(dense, label, method, sparsity, epochs, seed, args) for seed in seeds]
            get = lambda key: [float(r[key]) for r in runs]  # noqa: E731
            rows.append([f"{sparsity:g}", label, epochs, mean_cell(get("test_top1"), 4, spread=True),
                         f"{dense_top1:.4f}", mean_cell(get("sparsity"), 4), mean_cell(get("wall_s"), 0),
                         mean_cell(get("train_flops_ratio"), 3)])
    elapsed = time.perf_counter() - started
    table = markdown_table(
        ["sparsity", "method", "fine-tune epochs", "test top-1" + (" (mean ± sd)" if len(seeds) > 1 else ""),
         "dense top-1", "measured sparsity", "wall s", "fine-tune FLOPs / dense"],
        rows,
    )
    print()
    print(table)
    if not args.no_record:
        settings = (
            f"dense {dense.relative_to(REPO) if dense.is_relative_to(REPO) else dense} "
            f"(small_resnet, Fashion-MNIST{'' if args.dense else f', {args.dense_epochs} epochs'}); "
            f"`distsparse prune --preset {args.preset} --calib-samples {args.calib_samples} "
            f"--epochs E` "
            f"{' '.join(args.prune_args)} (batch 64, SGD lr 0.01 cosine; oneshot: global top-|w|, "
            f"cross-entropy; unipts: search then KD), sparsities {args.sparsities}, prune seeds "
            f"{','.join(map(str, seeds))}, each run a subprocess, one at a time"
        )
        info = run_info(load_before, settings, {"wall time of the benchmark": f"{elapsed:.0f} s"})
        append_results(f"post_training.py: Fashion-MNIST, oneshot vs UniPTS, {args.epochs} epoch(s)",
                       info, table)
        print("\nappended to benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
