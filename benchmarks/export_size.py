"""File size and load time of ResNet-50 exported sparse vs dense, float32 and bfloat16.

distsparse's `resnet50` (1000 classes, 3 channels) is freshly initialised and masked at 80 / 90 /
95 % sparsity with the `static` method's ERK masks (rigl's allocation, distsparse's counter RNG),
then written by `distsparse.export_model` as the sparse safetensors layout and as the dense state
dict, in float32 and bfloat16. Per file: its size in MB (10^6 bytes, as rigl's README counts),
the layout's arithmetic (values x bytes + masks / 8 + dense tensors; the rest is the safetensors
header) and the median time to read it back into a dense state dict (`distsparse.load_sparse`
against `safetensors.torch.load_file`), as a ratio to the dense file's, measured in the same run.
Goal of the issue: 90 % float32 sparse <= 14 MB (rigl's README: 13.5 MB against 102.1 dense).
Run: python benchmarks/export_size.py [--rounds 5] [--no-record]
"""
from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

from record import append_results, load_average, markdown_table, run_info

SPARSITIES = (0.8, 0.9, 0.95)
DTYPES = ("float32", "bfloat16")
GOAL_MB = 14.0
"""90 % ERK, float32, sparse."""
SEED = 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed loads per file")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--no-record", action="store_true", help="print only, no RESULTS.md entry")
    return parser.parse_args(argv)


def _median_seconds(load, rounds: int) -> float:
    load()  # warm the page cache: every file is read from memory alike
    times = []
    for _ in range(rounds):
        begin = time.perf_counter()
        load()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def _layout_bytes(state, masks, width: int) -> int:
    """The sparse layout's data bytes: active values, packed masks, every other tensor dense."""
    values = sum(int(mask.sum()) for mask in masks.values()) * width
    packed = sum(math.ceil(mask.numel() / 8) for mask in masks.values())
    dense = sum(t.numel() * (width if t.is_floating_point() else t.element_size())
                for key, t in state.items() if key not in masks)
    return values + packed + dense


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    load_before = load_average()
    import torch
    from safetensors.torch import load_file

    import distsparse
    from distsparse.config import MethodConfig
    from distsparse.methods import TrainingSchedule, build_method
    from distsparse.models import build_model
    from distsparse.sparsity.masks import sparsifiable_parameters

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    torch.manual_seed(SEED)
    model = build_model("resnet50", 1000, 3).eval()
    shapes = {name: tuple(p.shape) for name, p in sparsifiable_parameters(model).items()}
    schedule = TrainingSchedule(total_steps=1, steps_per_epoch=1)
    rows, goal_met = [], None
    with tempfile.TemporaryDirectory() as folder:
        for sparsity in SPARSITIES:
            method = build_method(MethodConfig(name="static", sparsity=sparsity, distribution="erk"),
                                  schedule, SEED)
            masks = method.initial_masks(shapes)
            measured = 1 - sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
            for dtype in DTYPES:
                width = torch.finfo(getattr(torch, dtype)).bits // 8
                files = {}
                for fmt in ("sparse", "dense"):
                    files[fmt] = Path(folder) / f"{sparsity}-{dtype}-{fmt}.safetensors"
                    distsparse.export_model(model, masks, files[fmt], format=fmt, dtype=dtype)
                dense_s = _median_seconds(lambda: load_file(files["dense"]), args.rounds)
                sparse_s = _median_seconds(lambda: distsparse.load_sparse(files["sparse"]), args.rounds)
                sparse_mb, dense_mb = (files[f].stat().st_size / 1e6 for f in ("sparse", "dense"))
                arithmetic_mb = _layout_bytes(model.state_dict(), masks, width) / 1e6
                is_goal = sparsity == 0.9 and dtype == "float32"
                if is_goal:
                    goal_met = sparse_mb <= GOAL_MB
                rows.append([f"{sparsity:.2f} ({measured:.4f})", dtype, f"{sparse_mb:.2f}",
                             f"{arithmetic_mb:.2f}", f"{dense_mb:.2f}", f"{sparse_mb / dense_mb:.3f}",
                             f"{sparse_s * 1e3:.0f}", f"{dense_s * 1e3:.0f}",
                             f"{sparse_s / dense_s:.2f}",
                             f"<= {GOAL_MB} MB: {'yes' if goal_met else '**no**'}" if is_goal else ""])
                for path in files.values():
                    path.unlink()
    table = markdown_table(["sparsity (measured)", "dtype", "sparse MB", "layout arithmetic MB",
                            "dense MB", "sparse / dense size", "load sparse ms", "load dense ms",
                            "load ratio", "goal"], rows)
    print(table)
    if not args.no_record:
        settings = (f"distsparse resnet50 (1000 classes, 3 channels), fresh init seed {SEED}, static "
                    f"ERK masks at {', '.join(map(str, SPARSITIES))}; export_model sparse and dense "
                    f"safetensors in {', '.join(DTYPES)}; load = median of {args.rounds} reads "
                    f"(after one warm-up read) into a dense state dict; torch threads {args.threads}")
        info = run_info(load_before, settings,
                        {"wall time of the benchmark": f"{time.perf_counter() - started:.0f} s"})
        append_results("export_size.py: ResNet-50 sparse vs dense export, size and load time",
                       info, table)


if __name__ == "__main__":
    main()
