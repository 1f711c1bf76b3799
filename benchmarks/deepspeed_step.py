"""DeepSpeed ZeRO stages 0-3 on 2 CPU ranks: sparse (RigL) vs dense training throughput per stage.

For every stage and for DDP as the reference this runs, through the real command line,

    distsparse train configs/quickstart.yaml --nproc 2 backend.name=B backend.zero_stage=S
        method.name=dense|rigl train.max_steps=N method.update_interval=U ...

then reads summary.json (train_images_per_s: images over the time spent in training steps, mask
updates included) and metrics.jsonl (the seconds of every RigL mask update) and prints the
sparse/dense throughput ratio per backend and the median time of a mask update. Sparse and dense
of one backend run back to back; other work on the machine shows in the recorded load average.
Run: python benchmarks/deepspeed_step.py [--steps 60]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from record import (
    REPO,
    append_results,
    distsparse_command,
    load_average,
    markdown_table,
    run_info,
)

BACKENDS = {
    "ddp": ["backend.name=ddp"],
    **{f"zero-{s}": ["backend.name=deepspeed", f"backend.zero_stage={s}"] for s in range(4)},
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps per run")
    parser.add_argument("--update-interval", type=int, default=10, help="RigL ΔT in steps")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch")
    parser.add_argument("--no-record", action="store_true", help="print only, no RESULTS.md entry")
    return parser.parse_args(argv)


def _run(run_dir: Path, overrides: list[str]) -> tuple[dict, list[float]]:
    command = [*distsparse_command(), "train", "--nproc", "2", str(REPO / "configs" / "quickstart.yaml"),
               *overrides, f"run.dir={run_dir}", "run.progress=false"]
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    updates = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, [u["seconds"] for u in updates if u.get("kind") == "mask_update"]


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    before = load_average()
    common = [f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}",
              f"method.sparsity={args.sparsity}", f"method.update_interval={args.update_interval}",
              "train.log_every=1000"]
    rows, tick = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        for backend, keys in BACKENDS.items():
            dense, _ = _run(Path(workdir) / f"{backend}-dense", [*common, *keys, "method.name=dense"])
            sparse, updates = _run(Path(workdir) / f"{backend}-rigl", [*common, *keys, "method.name=rigl"])
            ratio = dense["train_images_per_s"] / sparse["train_images_per_s"]
            rows.append([backend, f"{dense['train_images_per_s']:.0f}",
                         f"{sparse['train_images_per_s']:.0f}", f"{ratio:.3f}", len(updates),
                         f"{statistics.median(updates) * 1e3:.0f}" if updates else "-",
                         f"{sparse['sparsity']:.4f}"])
            print(" | ".join(map(str, rows[-1])), flush=True)
    wall = time.perf_counter() - tick
    table = markdown_table(
        ["backend", "dense images/s", "RigL images/s", "step time RigL / dense",
         "mask updates", "median ms per mask update", "final sparsity"], rows)
    print(table)
    if args.no_record:
        return 0
    settings = (f"2 ranks (--nproc 2), gloo, small_resnet on Fashion-MNIST, global batch "
                f"{args.batch_size}, {args.steps} steps per run, RigL at {args.sparsity} with "
                f"ΔT = {args.update_interval} steps, float32")
    info = run_info(before, settings, {"wall time of the benchmark": f"{wall:.0f} s"})
    append_results("deepspeed_step.py: ZeRO stages on 2 CPU ranks, sparse vs dense", info,
                   f"{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
