"""Quality of sparse transformers: the fortunes byte LM (validation bits per byte) and the ViT on
Fashion-MNIST (test top-1), dense against static, SET, RigL and GraNet-ST, through the real CLI.

Every LM run sees the same tokens (train.max_steps x train.batch_size x data.text.block_size
bytes, the same split and validation set): RigL, SET, static and dense run configs/gpt/
fortunes_rigl.yaml with method.name/method.sparsity overrides, GraNet-ST configs/gpt/
fortunes_granet_st.yaml (its own schedule keys, the same model, data and optimizer). The ViT runs
configs/vit/fashion_mnist.yaml at 90 %. Each run is a subprocess,

    distsparse train CONFIG method.name=M method.sparsity=P seed=S run.dir=benchmarks/out/lm/...

then its summary.json is read. Prints the tables and appends them to RESULTS.md.

    .venv/bin/python benchmarks/lm_quality.py            # the full grid (GPU or a quiet machine)
    .venv/bin/python benchmarks/lm_quality.py --quick    # a smaller model, fewer steps, 1 seed
    .venv/bin/python benchmarks/lm_quality.py --sparsities 0.9 --seeds 0 --skip-vit  # a subset
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from record import REPO, append_results, distsparse_command, load_average, markdown_table, \
    mean_cell, run_info

OUT = REPO / "benchmarks" / "out" / "lm"
LM_CONFIG = "configs/gpt/fortunes_rigl.yaml"
LM_GRANET_CONFIG = "configs/gpt/fortunes_granet_st.yaml"
VIT_CONFIG = "configs/vit/fashion_mnist.yaml"
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
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    return parser.parse_args(argv)


def _run(config: str, label: str, overrides: list[str]) -> dict:
    run_dir = OUT / label
    if run_dir.exists():
        shutil.rmtree(run_dir)
    command = [*distsparse_command(), "train", config, *overrides,
               f"run.dir={run_dir.relative_to(REPO)}", "run.progress=false"]
    print(f"{label}: {' '.join(command[1:])}", flush=True)
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{label} failed (exit {result.returncode}):\n{result.stderr.strip()[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    print(f"  sparsity {summary['sparsity']:.3f}, test loss {summary['test_loss']:.4f}, "
          f"{summary['wall_s']:.0f} s", flush=True)
    return summary


def _grid(methods, sparsities) -> list[tuple[str, float]]:
    """(method, sparsity) pairs; dense once, at 0."""
    return [(m, 0.0) for m in methods if m == "dense"] + [
        (m, p) for m in methods if m != "dense" for p in sparsities]


def _lm_runs(setting: dict) -> dict[tuple[str, float], list[dict]]:
    runs = {}
    for method, sparsity in _grid(METHODS, setting["sparsities"]):
        config = LM_GRANET_CONFIG if method == "granet_st" else LM_CONFIG
        runs[method, sparsity] = [
            _run(config, f"gpt-{method}-{sparsity}-s{seed}",
                 [f"method.name={method}", f"method.sparsity={sparsity or 0.9}", f"seed={seed}",
                  *setting["lm"]])
            for seed in setting["seeds"]]
    return runs


def _vit_runs(setting: dict) -> dict[tuple[str, float], list[dict]]:
    runs = {}
    for method, sparsity in _grid(setting["vit_methods"], (0.9,)):
        extra = ["method.drop_fraction=0.5", "method.update_end=1.0", "method.init_density=0.5",
                 "method.prune_end=0.5"] if method == "granet_st" else []
        runs[method, sparsity] = [
            _run(VIT_CONFIG, f"vit-{method}-{sparsity}-s{seed}",
                 [f"method.name={method}", "method.sparsity=0.9", f"seed={seed}", *extra,
                  *setting["vit"]])
            for seed in setting["seeds"]]
    return runs


def _table(runs: dict[tuple[str, float], list[dict]], metric: str, label: str) -> str:
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
    load_before, started = load_average(), time.perf_counter()
    lm = _lm_runs(setting)
    body = "Fortunes byte LM, validation bits per byte (lower is better):\n\n" + _table(
        lm, "test_bits_per_byte", "val bits/byte")
    if not args.skip_vit:
        vit = _vit_runs(setting)
        body += "\n\nViT on Fashion-MNIST, test top-1:\n\n" + _table(vit, "test_top1", "top-1")
    print("\n" + body)
    if not args.no_record:
        lm_keys = " ".join(setting["lm"]) or "as the recipe"
        grid = f"sparsities {','.join(map(str, setting['sparsities']))}"
        settings = (f"{'--quick' if args.quick else 'recipe scale'}, {grid}; LM: {LM_CONFIG} (GraNet-ST: "
                    f"{LM_GRANET_CONFIG}) overrides `{lm_keys}`, same tokens for every method; ViT: "
                    f"{VIT_CONFIG} overrides `{' '.join(setting['vit']) or 'none'}`; seeds "
                    f"{','.join(map(str, setting['seeds']))}; each run a subprocess, one at a time")
        info = run_info(load_before, settings,
                        {"wall time of the benchmark": f"{time.perf_counter() - started:.0f} s"})
        append_results("lm_quality.py: sparse GPT on fortunes bytes, ViT on Fashion-MNIST"
                       + (" (--quick)" if args.quick else ""), info, body)
        print("\nappended to benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
