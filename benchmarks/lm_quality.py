"""Quality of sparse transformers: the fortunes byte LM (validation bits per byte) and the ViT on
Fashion-MNIST (test top-1), dense against static, SET, RigL and GraNet-ST, through the real CLI.

Every LM run sees the same tokens (train.max_steps x train.batch_size x data.text.block_size
bytes, the same split and validation set): RigL, SET, static and dense run configs/gpt/
fortunes_rigl.yaml with method.name/method.sparsity overrides, GraNet-ST configs/gpt/
fortunes_granet_st.yaml (its own schedule keys, the same model, data and optimizer). The ViT runs
configs/vit/fashion_mnist.yaml at 90 %. Each run is a subprocess,

    distsparse train CONFIG method.name=M method.sparsity=P seed=S run.dir=benchmarks/out/lm/...

then its summary.json is read. Prints the tables and appends them to RESULTS.md.

Every run uses the same number of threads (`--threads`, default cores / `--jobs`): the thread count
changes the order of floating-point sums, so runs with different counts differ in the last bits.
`--jobs 2` runs two at a time with one thread each (1.36x the throughput of one run with two
threads on 2 cores). `--reuse` keeps a completed run whose command, config file and thread count
are unchanged (written to benchmarks/out/lm/<run>.json when it starts, with the commit it
ran at), and resumes an unfinished one from its last checkpoint (`distsparse train --resume`,
which ends equal to an uninterrupted run), so an interrupted grid continues where it stopped; the
record lists every commit its runs came from.

    .venv/bin/python benchmarks/lm_quality.py            # the full grid (GPU or a quiet machine)
    .venv/bin/python benchmarks/lm_quality.py --jobs 2 --reuse   # the same, resumable, on 2 cores
    .venv/bin/python benchmarks/lm_quality.py --quick    # a smaller model, fewer steps, 1 seed
    .venv/bin/python benchmarks/lm_quality.py --sparsities 0.9 --seeds 0 --skip-vit  # a subset
    .venv/bin/python benchmarks/lm_quality.py --lm-steps 800 --skip-vit --jobs 2 --reuse  # longer
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from record import REPO, append_results, distsparse_command, environment, load_average, \
    markdown_table, mean_cell, run_info

OUT = REPO / "benchmarks" / "out" / "lm"
LM_CONFIG = "configs/gpt/fortunes_rigl.yaml"
LM_GRANET_CONFIG = "configs/gpt/fortunes_granet_st.yaml"
VIT_CONFIG = "configs/vit/fashion_mnist.yaml"
CHECKPOINT_EVERY = 100
"""Steps between the checkpoints an interrupted run resumes from."""
METHODS = ("dense", "static", "set", "rigl", "granet_st")
FULL = {"sparsities": (0.5, 0.8, 0.9), "seeds": (0, 1), "lm": [], "vit": [],
        "vit_methods": METHODS}
QUICK = {"sparsities": (0.9,), "seeds": (0,),
         "lm": ["train.max_steps=60", "train.batch_size=16", "model.kwargs.n_layer=2",
                "model.kwargs.n_embd=128", "train.log_every=20"],
         "vit": ["train.max_steps=60", "train.log_every=20"], "vit_methods": ("dense", "rigl")}
"""--quick: 60 steps of 16 x 64 bytes on a 2-layer, 128-wide GPT; 60 ViT steps; seed 0, 90 %."""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small setting (see QUICK)")
    parser.add_argument("--sparsities", help="comma-separated, instead of the setting's")
    parser.add_argument("--seeds", help="comma-separated, instead of the setting's")
    parser.add_argument("--skip-vit", action="store_true", help="only the language model")
    parser.add_argument("--lm-steps", type=int,
                        help="train.max_steps of every LM run (a longer recipe; runs named -<N>steps)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    parser.add_argument("--threads", type=int,
                        help="torch threads of every run (default: cores / --jobs)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep finished runs whose command, config and threads are unchanged")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args(argv)
    if args.jobs < 1 or (args.threads is not None and args.threads < 1) \
            or (args.lm_steps is not None and args.lm_steps < 1):
        parser.error("--jobs, --threads and --lm-steps must be at least 1")
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    return args


class Grid:
    """The runs of one benchmark: each a `distsparse train` subprocess, `jobs` at a time."""

    def __init__(self, jobs: int, threads: int, reuse: bool):
        self.pool = ThreadPoolExecutor(max_workers=jobs)
        self.threads, self.reuse = threads, reuse
        self.commit = environment()["distsparse"]
        self.commits: set[str] = set()
        self.lock = threading.Lock()

    def say(self, line: str) -> None:
        """One whole line on stdout (runs finish on several threads)."""
        with self.lock:
            print(line, flush=True)

    def submit(self, config: str, label: str, overrides: list[str]):
        """A future of the run's summary.json (a dict)."""
        return self.pool.submit(self._run, config, label, overrides)

    def _run(self, config: str, label: str, overrides: list[str]) -> dict:
        run_dir = OUT / label
        command = [*distsparse_command(), "train", config, *overrides,
                   f"run.dir={run_dir.relative_to(REPO)}", "run.progress=false",
                   f"run.checkpoint_every={CHECKPOINT_EVERY}"]
        identity = {"command": command[1:], "threads": self.threads,
                    "config_sha256": hashlib.sha256((REPO / config).read_bytes()).hexdigest()}
        record = OUT / f"{label}.json"
        kept = json.loads(record.read_text(encoding="utf-8")) \
            if self.reuse and record.is_file() else {}
        if kept and {key: kept.get(key) for key in identity} == identity:
            summary = run_dir / "summary.json"
            if summary.is_file() and json.loads(summary.read_text(encoding="utf-8"))["completed"]:
                return self._finished(label, run_dir, kept["commit"], "kept")
            if (run_dir / "checkpoints" / "last.pt").is_file():
                if self.commit not in kept["commit"].split("+"):
                    kept["commit"] += f"+{self.commit}"
                record.write_text(json.dumps(kept, indent=1), encoding="utf-8")
                self.say(f"{label}: resumed from its last checkpoint")
                self._train(label, [*command, "--resume", str(run_dir.relative_to(REPO))])
                return self._finished(label, run_dir, kept["commit"], "resumed")
        if run_dir.exists():
            shutil.rmtree(run_dir)
        OUT.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({**identity, "commit": self.commit}, indent=1),
                          encoding="utf-8")
        self.say(f"{label}: {' '.join(command[1:])}")
        self._train(label, command)
        return self._finished(label, run_dir, self.commit, "ran")

    def _train(self, label: str, command: list[str]) -> None:
        """Run one `distsparse train` command; its failure stops the benchmark."""
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": str(self.threads)})
        if result.returncode != 0:
            raise SystemExit(f"{label} failed (exit {result.returncode}):\n"
                             f"{result.stderr.strip()[-2000:]}")

    def _finished(self, label: str, run_dir: Path, commit: str, how: str) -> dict:
        self.commits.add(commit)
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        self.say(f"{label} ({how} at {commit}): sparsity {summary['sparsity']:.3f}, test loss "
                 f"{summary['test_loss']:.4f}, {summary['wall_s']:.0f} s")
        return summary


def _grid(methods, sparsities) -> list[tuple[str, float]]:
    """(method, sparsity) pairs; dense once, at 0."""
    return [(m, 0.0) for m in methods if m == "dense"] + [
        (m, p) for m in methods if m != "dense" for p in sparsities]


def _lm_runs(grid: Grid, setting: dict) -> dict[tuple[str, float], list]:
    """Futures of every LM run, seed by seed (a stopped grid has whole seeds first)."""
    runs: dict[tuple[str, float], list] = {}
    for seed in setting["seeds"]:
        for method, sparsity in _grid(METHODS, setting["sparsities"]):
            config = LM_GRANET_CONFIG if method == "granet_st" else LM_CONFIG
            runs.setdefault((method, sparsity), []).append(grid.submit(
                config, f"gpt-{method}-{sparsity}-s{seed}{setting.get('lm_suffix', '')}",
                [f"method.name={method}", f"method.sparsity={sparsity or 0.9}", f"seed={seed}",
                 *setting["lm"]]))
    return runs


def _vit_runs(grid: Grid, setting: dict) -> dict[tuple[str, float], list]:
    """Futures of every ViT run at 90 %, seed by seed."""
    runs: dict[tuple[str, float], list] = {}
    for seed in setting["seeds"]:
        for method, sparsity in _grid(setting["vit_methods"], (0.9,)):
            extra = ["method.drop_fraction=0.5", "method.update_end=1.0",
                     "method.init_density=0.5", "method.prune_end=0.5"] \
                if method == "granet_st" else []
            runs.setdefault((method, sparsity), []).append(grid.submit(
                VIT_CONFIG, f"vit-{method}-{sparsity}-s{seed}",
                [f"method.name={method}", "method.sparsity=0.9", f"seed={seed}", *extra,
                 *setting["vit"]]))
    return runs


def _table(futures: dict[tuple[str, float], list], metric: str, label: str) -> str:
    runs = {key: [future.result() for future in batch] for key, batch in futures.items()}
    spread = any(len(r) > 1 for r in runs.values())
    rows = [[method, f"{sparsity:.0%}", len(summaries),
             mean_cell([s[metric] for s in summaries], 4, spread=spread),
             mean_cell([s["sparsity"] for s in summaries], 4),
             mean_cell([s["steps"] for s in summaries], 0),
             mean_cell([s["wall_s"] for s in summaries], 0)]
            for (method, sparsity), summaries in runs.items()]
    return markdown_table(["method", "target", "seeds", label + (" (mean ± sd)" if spread else ""),
                           "sparsity", "steps", "wall s"], rows)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    setting = dict(QUICK if args.quick else FULL)
    if args.sparsities:
        setting["sparsities"] = tuple(float(p) for p in args.sparsities.split(","))
    if args.seeds:
        setting["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    if args.lm_steps:
        setting["lm"] = [*setting["lm"], f"train.max_steps={args.lm_steps}"]
        setting["lm_suffix"] = f"-{args.lm_steps}steps"
    load_before, started = load_average(), time.perf_counter()
    grid = Grid(args.jobs, args.threads, args.reuse)
    try:
        lm = _lm_runs(grid, setting)
        vit = {} if args.skip_vit else _vit_runs(grid, setting)
        body = "Fortunes byte LM, validation bits per byte (lower is better):\n\n" + _table(
            lm, "test_bits_per_byte", "val bits/byte")
        if vit:
            body += "\n\nViT on Fashion-MNIST, test top-1:\n\n" + _table(vit, "test_top1",
                                                                           "top-1")
    finally:
        grid.pool.shutdown(cancel_futures=True)
    print("\n" + body)
    if not args.no_record:
        lm_keys = " ".join(setting["lm"]) or "as the recipe"
        sparsities = f"sparsities {','.join(map(str, setting['sparsities']))}"
        settings = (f"{'--quick' if args.quick else 'recipe scale'}, {sparsities}; LM: {LM_CONFIG} (GraNet-ST: "
                    f"{LM_GRANET_CONFIG}) overrides `{lm_keys}`, same tokens for every method; ViT: "
                    f"{VIT_CONFIG} overrides `{' '.join(setting['vit']) or 'none'}`; seeds "
                    f"{','.join(map(str, setting['seeds']))}; each run a subprocess with "
                    f"{args.threads} torch thread(s), {args.jobs} at a time; runs from "
                    f"{', '.join(sorted(grid.commits))}")
        info = run_info(load_before, settings,
                        {"wall time of the benchmark": f"{time.perf_counter() - started:.0f} s"})
        append_results("lm_quality.py: sparse GPT on fortunes bytes, ViT on Fashion-MNIST"
                       + (" (--quick)" if args.quick else ""), info, body)
        print("\nappended to benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
