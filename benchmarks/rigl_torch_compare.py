"""The same hand-written loop three ways: dense, distsparse.Sparsifier, rigl-torch's RigLScheduler.

Same model (the MLP by default, --model), seeds (--seeds), data (Fashion-MNIST, or --synthetic), optimizer (SGD 0.1, momentum 0.9,
weight decay 5e-4), cosine LR and RigL recipe (90 % sparsity, uniform with the first layer dense as
rigl-torch's `uniform` does, linear layers masked, delta 100, alpha 0.3, T_end 75 % of training),
one process, the three loops interleaved step by step. Prints the median step time of each (all steps, update steps included) as ratios to
dense and to rigl-torch, and the test top-1 after training. Needs `pip install rigl-torch==0.5.2`
(a peer library, not a distsparse dependency). Run: python benchmarks/rigl_torch_compare.py
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from record import REPO, append_results, load_average, markdown_table, mean_cell, run_info

SPARSITY, DELTA, ALPHA = 0.9, 100, 0.3
VARIANTS = ("dense", "distsparse", "rigl-torch")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="training steps per variant")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated subset of dense,distsparse,rigl-torch")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated; each seed trains all "
                        "three loops (model init, data order, masks)")
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--model", default="mlp", help="a distsparse model name (rigl-torch 0.5.2 "
                        "crashes on small_resnet's first RigL step: `view` of a non-contiguous "
                        "gradient in _rigl_step)")
    parser.add_argument("--no-record", action="store_true", help="print only, no RESULTS.md entry")
    return parser.parse_args(argv)


def _loop(variant: str, args: argparse.Namespace, seed: int):
    """The variant's model, optimizer and data; yields after each step, then its results."""
    import torch
    import torch.nn.functional as F

    import distsparse
    from distsparse.config import load_config
    from distsparse.data.loader import build_data
    from distsparse.engine.optim import build_lr_scheduler, build_optimizer
    from distsparse.models import build_model

    overrides = [f"train.batch_size={args.batch_size}", f"train.max_steps={args.steps}",
                 "train.lr=0.1", "train.warmup_epochs=0", "train.label_smoothing=0", f"seed={seed}"]
    if args.synthetic:
        overrides += ["data.name=synthetic", "data.loader=synthetic"]
    config = load_config(REPO / "configs" / "quickstart.yaml", overrides)
    data = build_data(config)
    torch.manual_seed(seed)
    model = build_model(args.model, data.num_classes, data.in_channels)
    optimizer = build_optimizer(model, config.train)
    # Before rigl-torch wraps optimizer.step (torch's scheduler cannot wrap its plain function).
    scheduler = build_lr_scheduler(optimizer, args.steps, len(data.train), config.train)
    end = int(0.75 * args.steps)
    if variant == "distsparse":
        sparsifier = distsparse.Sparsifier(
            model, optimizer, method="rigl", sparsity=SPARSITY, total_steps=args.steps, seed=seed,
            distribution="uniform", dense_first_layer=True, update_interval=DELTA,
            drop_fraction=ALPHA, update_end=0.75)
    elif variant == "rigl-torch":
        from rigl_torch.RigL import RigLScheduler

        pruner = RigLScheduler(model, optimizer, dense_allocation=1 - SPARSITY, T_end=end,
                               sparsity_distribution="uniform", ignore_linear_layers=False,
                               delta=DELTA, alpha=ALPHA)
    seconds, step, epoch = [], 0, 0
    while step < args.steps:
        for x, y in data.train.batches(epoch):
            tick = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            if variant == "distsparse":
                sparsifier.step()
            elif variant == "rigl-torch":
                if pruner():
                    optimizer.step()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            seconds.append(time.perf_counter() - tick)
            step += 1
            yield
            if step == args.steps:
                break
        epoch += 1
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in data.test.batches(0):
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    zeros = sum(int((w == 0).sum()) for w in weights[1:])
    masked = sum(w.numel() for w in weights[1:])
    yield {"seconds": seconds, "top1": correct / total, "sparsity": zeros / masked,
           "threads": torch.get_num_threads()}


def _interleaved(args: argparse.Namespace, seed: int) -> dict[str, dict]:
    """Step i of every variant back to back (the order rotating), so that the machine's load
    falls on all of them alike; then each variant's results."""
    variants = args.variants.split(",")
    loops = {variant: _loop(variant, args, seed) for variant in variants}
    for step in range(args.steps):
        shift = step % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            next(loops[variant])
    return {variant: next(loop) for variant, loop in loops.items()}


def _over_seeds(args: argparse.Namespace, seeds: list[int]) -> dict[str, dict]:
    """Every seed's interleaved run; step times pooled, top-1 and sparsity per seed."""
    runs = [_interleaved(args, seed) for seed in seeds]
    pooled = {}
    for variant in runs[0]:
        seconds = [s for run in runs for s in run[variant]["seconds"]]
        pooled[variant] = {"step_ms": statistics.median(seconds) * 1e3,
                           "mean_ms": statistics.fmean(seconds) * 1e3,
                           "top1": [run[variant]["top1"] for run in runs],
                           "sparsity": statistics.fmean(run[variant]["sparsity"] for run in runs),
                           "threads": runs[0][variant]["threads"]}
    return pooled


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    sys.path.insert(0, str(REPO))
    before = load_average()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    results = _over_seeds(args, seeds)
    references = [name for name in ("dense", "rigl-torch") if name in results]

    def ratios(r: dict, key: str) -> list[str]:
        return [f"{r[key] / results[name][key]:.3f}" for name in references]

    rows = [[name, f"{r['step_ms']:.3f}", *ratios(r, "step_ms"), f"{r['mean_ms']:.3f}",
             *ratios(r, "mean_ms"), f"{r['sparsity']:.4f}", mean_cell(r["top1"], 4, spread=True)]
            for name, r in results.items()]
    body = markdown_table(["loop", "median ms/step", *(f"median / {n}" for n in references),
                           "mean ms/step (updates included)", *(f"mean / {n}" for n in references),
                           "sparsity after (not first layer)",
                           f"test top-1 (mean ± std over {len(seeds)} seeds)"], rows) + "\n"
    print(body)
    if args.no_record:
        return 0
    settings = (f"one process, torch threads {results['distsparse']['threads']}, {args.model}, "
                f"{'synthetic' if args.synthetic else 'Fashion-MNIST'}, batch {args.batch_size}, "
                f"{args.steps} steps each (interleaved step by step, order rotating), loops {args.variants}, "
                f"seeds {args.seeds}, RigL {SPARSITY:.0%} uniform "
                f"(first layer dense), delta {DELTA}, alpha {ALPHA}, rigl-torch 0.5.2")
    append_results("rigl_torch_compare.py: Sparsifier vs rigl-torch's RigLScheduler, same loop",
                   run_info(before, settings, {}), body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
