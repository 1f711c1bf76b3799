"""File size and load time of ResNet-50 exported sparse vs dense, float32 and bfloat16.

distsparse's `resnet50` (1000 classes, 3 channels) is freshly initialised and masked at 80 / 90 /
95 % sparsity with the `static` method's ERK masks (rigl's allocation, distsparse's counter RNG),
then written by `distsparse.export_model` as the sparse safetensors layout and as the dense state
dict, in float32 and bfloat16. Per file: its size in MB (10^6 bytes, as rigl's README counts),
the layout's arithmetic (values x bytes + masks / 8 + dense tensors; the rest is the safetensors
header) and the median time to read it back into a dense state dict (`distsparse.load_sparse`
against `safetensors.torch.load_file`), as a ratio to the dense file's, measured in the same run.
Goal of the issue: 90 % float32 sparse <= 14 MB (rigl's README: 13.5 MB against 102.1 dense).

`--parts gpt` (no goal): CPU inference of the MLP blocks of a sparse-exported GPT (distsparse's
`gpt`, GPT-2 small's shapes by default: 12 layers, 768 wide, MLP 3072; static ERK masks at 90 %)
read back with `load_sparse`: each block's two projections as `torch.sparse` CSR matrices against
the same dense weights, batch 1 and 64 tokens, median time over all blocks as a ratio to dense.
Run: python benchmarks/export_size.py [--parts size,gpt] [--rounds 5] [--no-record]
"""
from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from record import append_results, load_average, markdown_table, run_info

SPARSITIES = (0.8, 0.9, 0.95)
DTYPES = ("float32", "bfloat16")
GOAL_MB = 14.0
"""90 % ERK, float32, sparse."""
SEED = 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="size,gpt", help="size, gpt or both (comma-separated)")
    parser.add_argument("--rounds", type=int, default=5, help="timed loads per file / forwards")
    parser.add_argument("--gpt-layers", type=int, default=12)
    parser.add_argument("--gpt-width", type=int, default=768, help="n_embd (the MLP is 4x)")
    parser.add_argument("--gpt-sparsity", type=float, default=0.9)
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
    import torch

    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    if "size" in parts:
        _size(args)
    if "gpt" in parts:
        _gpt_mlp(args)


def _size(args: argparse.Namespace) -> None:
    """ResNet-50's sparse and dense files: size and load time."""
    load_before = load_average()
    import torch
    from safetensors.torch import load_file

    import distsparse
    from distsparse.config import MethodConfig
    from distsparse.methods import TrainingSchedule, build_method
    from distsparse.models import build_model
    from distsparse.sparsity.masks import sparsifiable_parameters

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


def _gpt_mlp(args: argparse.Namespace) -> None:
    """The MLP blocks of a sparse-exported GPT: torch.sparse CSR against dense, batch 1 and 64."""
    load_before = load_average()
    import torch
    import torch.nn.functional as F

    import distsparse
    from distsparse.config import MethodConfig
    from distsparse.methods import TrainingSchedule, build_method
    from distsparse.models import build_model
    from distsparse.sparsity.masks import sparsifiable_parameters

    started = time.perf_counter()
    torch.manual_seed(SEED)
    kwargs = {"n_layer": args.gpt_layers, "n_head": 12, "n_embd": args.gpt_width, "n_positions": 128}
    model = build_model("gpt", 256, 1, kwargs).eval()
    shapes = {name: tuple(p.shape) for name, p in sparsifiable_parameters(model).items()}
    method = build_method(MethodConfig(name="static", sparsity=args.gpt_sparsity, distribution="erk"),
                          TrainingSchedule(total_steps=1, steps_per_epoch=1), SEED)
    masks = method.initial_masks(shapes)
    with tempfile.TemporaryDirectory() as folder:
        path = distsparse.export_model(model, masks, Path(folder) / "gpt.safetensors")
        size_mb = path.stat().st_size / 1e6
        state = distsparse.load_sparse(path)
    blocks = []
    for layer in range(args.gpt_layers):
        prefix = f"gpt2.transformer.h.{layer}.mlp."
        # Hugging Face Conv1D: y = x @ W + b with W stored (in, out); CSR holds W^T (out, in).
        weights = [state[f"{prefix}{name}.weight"] for name in ("c_fc", "c_proj")]
        biases = [state[f"{prefix}{name}.bias"] for name in ("c_fc", "c_proj")]
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            csr = [w.t().contiguous().to_sparse_csr() for w in weights]
        blocks.append((weights, biases, csr))
    fc, proj = (f"gpt2.transformer.h.0.mlp.{name}.weight" for name in ("c_fc", "c_proj"))
    densities = {name: float(masks[name].float().mean()) for name in (fc, proj)}

    def dense_block(x, weights, biases, csr):
        return F.gelu(x @ weights[0] + biases[0], approximate="tanh") @ weights[1] + biases[1]

    def sparse_block(x, weights, biases, csr):
        hidden = F.gelu((csr[0] @ x.t()).t() + biases[0], approximate="tanh")
        return (csr[1] @ hidden.t()).t() + biases[1]

    rows = []
    with torch.no_grad():
        for batch in (1, 64):
            x = torch.randn(batch, args.gpt_width)
            for block in blocks:
                torch.testing.assert_close(sparse_block(x, *block), dense_block(x, *block),
                                           rtol=1e-4, atol=1e-4)
            times = {}
            for name, forward in (("dense", dense_block), ("csr", sparse_block)):
                times[name] = _median_seconds(lambda: [forward(x, *block) for block in blocks],
                                              args.rounds)
            rows.append([batch, f"{times['dense'] * 1e3 / len(blocks):.3f}",
                         f"{times['csr'] * 1e3 / len(blocks):.3f}",
                         f"{times['csr'] / times['dense']:.2f}"])
    table = markdown_table(["batch (tokens)", "dense ms per MLP block", "CSR ms per MLP block",
                            "CSR / dense"], rows)
    print(table)
    if not args.no_record:
        settings = (f"distsparse gpt (GPT2LMHeadModel) {args.gpt_layers} layers, n_embd "
                    f"{args.gpt_width}, MLP {4 * args.gpt_width}, fresh init seed {SEED}, static ERK "
                    f"masks at {args.gpt_sparsity} (c_fc density {densities[fc]:.4f}, c_proj "
                    f"{densities[proj]:.4f}); exported sparse ({size_mb:.2f} MB) and read back with "
                    f"load_sparse; per block gelu(x W_fc + b) W_proj + b, float32, CSR = "
                    f"torch.sparse_csr of W^T times x^T; median of {args.rounds} passes over all "
                    f"blocks after one warm-up; torch threads {args.threads}")
        info = run_info(load_before, settings,
                        {"wall time of the benchmark": f"{time.perf_counter() - started:.0f} s"})
        append_results("export_size.py --parts gpt: sparse-exported GPT MLP blocks, torch.sparse "
                       "CSR vs dense on the CPU", info, table)


if __name__ == "__main__":
    main()
