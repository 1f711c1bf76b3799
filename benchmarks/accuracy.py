"""Fashion-MNIST accuracy of sparsity methods at given sparsities, through the real command line.

For each method, sparsity and seed this runs, as a subprocess,

    distsparse train configs/quickstart.yaml method.name=M method.sparsity=P train.epochs=E
        seed=S run.dir=benchmarks/out/acc/M-P-sS run.progress=false

then reads the run's summary.json (test_top1, sparsity, train_flops_ratio, wall_s,
train_images_per_s) and prints and appends a table, the mean over seeds (and the spread of
test_top1) where there is more than one, and with several sparsities a method x sparsity table of
top-1. benchmarks/out/ is git-ignored; an existing run directory is replaced unless --reuse finds a
finished run with the same epochs there.

    .venv/bin/python benchmarks/accuracy.py [--epochs 3] [--seeds 0,1,2] [--methods rigl,set]
    .venv/bin/python benchmarks/accuracy.py --methods random,snip,grasp,synflow,iter_snip,force \
        --sparsities 0.9,0.95,0.98,0.995 --epochs 1
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

METHODS = ("dense", "static", "set", "rigl", "gmp", "granet", "granet_st")
OUT = REPO / "benchmarks" / "out" / "acc"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--sparsities", default="0.9", help="comma-separated, e.g. 0.9,0.95")
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--reuse", action="store_true",
                        help="keep finished runs already in benchmarks/out/acc with these epochs")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("extra", nargs="*", help="further key.sub=value overrides for every run")
    return parser.parse_args(argv)


def _finished(run_dir: Path, epochs: int) -> dict | None:
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text(encoding="utf-8"))
    return summary if summary.get("completed") and summary.get("epochs") == epochs else None


def _run(args: argparse.Namespace, method: str, sparsity: float, seed: int) -> dict:
    run_dir = OUT / f"{method}-{sparsity}-s{seed}"
    if args.reuse and (summary := _finished(run_dir, args.epochs)) is not None:
        print(f"{method} seed {seed}: reusing {run_dir.relative_to(REPO)}", flush=True)
        return summary
    if run_dir.exists():
        shutil.rmtree(run_dir)
    command = [
        *distsparse_command(), "train", args.config, f"method.name={method}",
        f"method.sparsity={sparsity}", f"train.epochs={args.epochs}", f"seed={seed}",
        f"run.dir={run_dir.relative_to(REPO)}", "run.progress=false", *args.extra,
    ]
    print(f"{method} seed {seed}: {' '.join(command[1:])}", flush=True)
    tick = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - tick
    if result.returncode != 0:
        raise SystemExit(f"{method} seed {seed} failed (exit {result.returncode}):\n"
                         f"{result.stderr.strip()[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    print(f"  top-1 {summary['test_top1']:.4f}, sparsity {summary['sparsity']:.3f}, "
          f"{seconds:.0f} s", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    load_before = load_average()
    started = time.perf_counter()
    sparsities = [float(p) for p in args.sparsities.split(",") if p.strip()]
    summaries = {(m, p): [_run(args, m, p, s) for s in seeds] for m in methods for p in sparsities}
    elapsed = time.perf_counter() - started

    rows = []
    for (method, sparsity), runs in summaries.items():
        get = lambda key: [float(r[key]) for r in runs]  # noqa: E731
        rows.append([
            method, sparsity, len(runs), mean_cell(get("test_top1"), 4, spread=True),
            mean_cell(get("sparsity"), 4),
            mean_cell(get("train_flops_ratio"), 3), mean_cell(get("wall_s"), 0),
            mean_cell(get("train_images_per_s"), 0),
        ])
    table = markdown_table(
        ["method", "target", "seeds", "test top-1" + (" (mean ± sd)" if len(seeds) > 1 else ""),
         "sparsity", "train FLOPs / dense", "wall s", "train img/s"],
        rows,
    )
    if len(sparsities) > 1:
        pivot = markdown_table(
            ["top-1", *(f"{p:.1%}" for p in sparsities)],
            [[m, *(mean_cell([float(r["test_top1"]) for r in summaries[m, p]], 4) for p in sparsities)]
             for m in methods],
        )
        table = f"{table}\n\n{pivot}"
    print()
    print(table)
    if not args.no_record:
        settings = (
            f"`distsparse train {args.config} method.sparsity={args.sparsities} "
            f"train.epochs={args.epochs}` {' '.join(args.extra)} (small_resnet, batch 128, "
            f"SGD lr 0.1 cosine, Fashion-MNIST), seeds {','.join(map(str, seeds))}, "
            "each run a subprocess, one at a time"
        )
        info = run_info(load_before, settings, {
            "wall time of the benchmark": f"{elapsed:.0f} s",
        })
        append_results(f"accuracy.py: Fashion-MNIST, {args.epochs} epoch(s)", info, table)
        print("\nappended to benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
