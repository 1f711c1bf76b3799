"""Robustness beyond test accuracy on Fashion-MNIST: evaluate finished runs against their dense run.

Through the real command line, one subprocess at a time:

    distsparse evaluate RUN --dense DENSE [--suite default]        (for DENSE and every RUN)
    distsparse compare DENSE RUN... --metric prune_potential --delta 0.5 --out benchmarks/out/robustness

then prints the comparison (clean top-1, mean corruption top-1, shift top-1, agreement with the
dense net, prune potential per test distribution), appends it with machine, versions and settings
to RESULTS.md, and copies the two comparison plots to benchmarks/robustness_*.png. The runs are
the ones the other benchmarks leave in benchmarks/out/ (accuracy.py, post_training.py); an
evaluation.json already in a run directory is reused unless --fresh.

    .venv/bin/python benchmarks/robustness.py --dense benchmarks/out/acc/dense-s0 \\
        benchmarks/out/acc/rigl-s0 benchmarks/out/acc/snip-0.9-s0 ...
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from record import REPO, append_results, distsparse_command, load_average, run_info

OUT = REPO / "benchmarks" / "out" / "robustness"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense", type=Path, required=True, help="the finished dense run")
    parser.add_argument("runs", type=Path, nargs="+", help="finished sparse run directories")
    parser.add_argument("--suite", choices=("default", "full"), default="default")
    parser.add_argument("--delta", default="0.5", help="prune potential tolerance, percentage points")
    parser.add_argument("--fresh", action="store_true", help="re-evaluate runs already evaluated")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    return parser.parse_args(argv)


def _distsparse(*arguments: str) -> str:
    print(" ".join(arguments), flush=True)
    result = subprocess.run([*distsparse_command(), *arguments], cwd=REPO, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise SystemExit(f"failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}")
    return result.stdout


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    load_before = load_average()
    started = time.perf_counter()
    for run in [args.dense, *args.runs]:
        if args.fresh or not (run / "evaluation.json").is_file():
            tick = time.perf_counter()
            print(_distsparse("evaluate", str(run), "--dense", str(args.dense), "--suite",
                              args.suite, "--device", "cpu").strip().splitlines()[0],
                  f"({time.perf_counter() - tick:.0f} s)", flush=True)
    if OUT.exists():
        shutil.rmtree(OUT)
    _distsparse("compare", str(args.dense), *map(str, args.runs), "--metric", "prune_potential",
                "--delta", args.delta, "--out", str(OUT))
    elapsed = time.perf_counter() - started
    table = (OUT / "compare.md").read_text(encoding="utf-8").strip()
    print()
    print(table)
    for plot in OUT.glob("*.png"):
        shutil.copyfile(plot, REPO / "benchmarks" / f"robustness_{plot.name}")
    if not args.no_record:
        runs = ", ".join(str(r.relative_to(REPO) if r.is_absolute() else r) for r in args.runs)
        settings = (
            f"`distsparse evaluate RUN --dense {args.dense} --suite {args.suite}` then "
            f"`distsparse compare --metric prune_potential --delta {args.delta}`; runs: {runs}"
        )
        info = run_info(load_before, settings, {"wall time of the benchmark": f"{elapsed:.0f} s"})
        append_results("robustness.py: Fashion-MNIST, beyond test accuracy", info, table)
        print("\nappended to benchmarks/RESULTS.md; plots in benchmarks/robustness_*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
