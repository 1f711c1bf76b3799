"""DDP on 2 CPU ranks: sparse vs dense step time, gradient all-reduce bytes, effect of the hook,
and the cost of DDP's bucket layouts.

Each rank builds six trainers on the same data (small ResNet, Fashion-MNIST unless --synthetic):
  dense            DDP's own all-reduce
  rigl             masked, sparse-gradient hook (the default)
  rigl-no-hook     masked, DDP's own all-reduce (backend.sparse_gradients=false)
  rigl-hook-dense  masked, the hook forced to send whole buckets (measures dense bytes through it)
  rigl-rebuilt     rigl with torch's own bucket rebuild after the first step (no fix_bucket_layout:
                   overlaps reduction with backward, not bit-exact across a restart at >= 3 ranks)
  rigl-find-unused rigl with find_unused_parameters=True (no rebuild either; an autograd traversal
                   and an all-reduce of the used-parameter map every step)
and times `_train_step` in interleaved blocks with the step held at a non-update step. Bytes are
counted by the hook where it calls all_reduce. Run: python benchmarks/ddp_step.py
(--model torchvision:resnet18 for a model of several buckets).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import tempfile
import time

from record import REPO, append_results, load_average, markdown_table, run_info, run_ranks

VARIANTS = {
    "dense": ["method.name=dense"],
    "rigl": ["method.name=rigl"],
    "rigl-no-hook": ["method.name=rigl", "backend.sparse_gradients=false"],
    "rigl-hook-dense": ["method.name=rigl"],
    "rigl-rebuilt": ["method.name=rigl"],
    "rigl-find-unused": ["method.name=rigl"],
}
TIMED_STEP = 1


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per variant")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--model", default="small_resnet", help="model.name of every trainer")
    parser.add_argument("--no-record", action="store_true", help="print only, no RESULTS.md entry")
    return parser.parse_args(argv)


@contextlib.contextmanager
def _bucket_layout(variant: str):
    """Build the variant's DDP as torch would without distsparse's fixed layout (rigl-rebuilt), or
    with find_unused_parameters=True (rigl-find-unused); every other variant as distsparse does."""
    from distsparse.engine.backends import ddp

    if variant not in ("rigl-rebuilt", "rigl-find-unused"):
        yield
        return
    wrapper, fix = ddp.DistributedDataParallel, ddp.fix_bucket_layout
    ddp.fix_bucket_layout = lambda model: None
    if variant == "rigl-find-unused":
        ddp.DistributedDataParallel = functools.partial(wrapper, find_unused_parameters=True)
    try:
        yield
    finally:
        ddp.DistributedDataParallel, ddp.fix_bucket_layout = wrapper, fix


def _bucket_sizes(model) -> str:
    """The DDP buckets' sizes in MB, in the order DDP reduces them (after any rebuild)."""
    data = model._get_ddp_logging_data()
    sizes = data.get("rebuilt_bucket_sizes") or data["bucket_sizes"]
    return " + ".join(f"{int(size) / 1e6:.2f}" for size in str(sizes).split(", "))


def _worker(rank: int, port: int, args: argparse.Namespace, workdir: str, queue) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // 2)))
    import torch

    from distsparse.config import load_config
    from distsparse.engine.trainer import Trainer

    common = [f"method.sparsity={args.sparsity}", f"train.batch_size={args.batch_size}",
              "backend.name=ddp", "launcher.num_workers=2", f"model.name={args.model}",
              "run.progress=false"]
    if args.synthetic:
        common += ["data.name=synthetic", "data.loader=synthetic", "train.max_steps=1404"]
    trainers = {}
    for name, extra in VARIANTS.items():
        config = load_config(REPO / "configs" / "quickstart.yaml",
                             [*common, *extra, f"run.dir={workdir}/{name}"])
        with _bucket_layout(name):
            trainers[name] = Trainer(config)
    forced = trainers["rigl-hook-dense"].backend.access
    forced.set_dense_gradients = lambda needed: setattr(forced.gradient_state, "dense", True)
    batches = [(x, y) for _, (x, y) in zip(range(8), trainers["dense"].data.train.batches(0))]

    def run(name: str, count: int) -> list[float]:
        trainer, seconds = trainers[name], []
        for i in range(count):
            x, y = batches[i % len(batches)]
            trainer.step = TIMED_STEP
            tick = time.perf_counter()
            trainer._train_step(x, y)
            seconds.append(time.perf_counter() - tick)
        return seconds

    for name in trainers:
        run(name, args.warmup)
    for name in ("rigl", "rigl-hook-dense"):
        trainers[name].backend.access.gradient_state.reset_counters()
    block = args.steps // args.rounds
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for r in range(args.rounds):
        names = list(trainers)
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name] += run(name, block)
    masks = trainers["rigl"].masks
    weights_active = sum(masks.active_counts().values())
    weights_total = sum(m.numel() for m in masks.masks.values())
    params_total = sum(p.numel() for p in trainers["rigl"].backend.model.parameters())
    result = {
        "times": times,
        "bytes": {name: trainers[name].backend.access.gradient_state.bytes_sent / args.steps
                  for name in ("rigl", "rigl-hook-dense")},
        "unmasked": params_total - weights_total,
        "active": weights_active,
        "masked_total": weights_total,
        "threads": torch.get_num_threads(),
        "buckets": {name: _bucket_sizes(trainer.backend.model) for name, trainer in trainers.items()},
    }
    if rank == 0:
        queue.put(result)
    torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    sys.path.insert(0, str(REPO))
    before = load_average()
    with tempfile.TemporaryDirectory() as workdir:
        tick = time.perf_counter()
        result = run_ranks(_worker, 2, args, workdir, timeout=1200)
        wall = time.perf_counter() - tick
    medians = {name: statistics.median(t) for name, t in result["times"].items()}
    rows = [[name, f"{medians[name] * 1e3:.1f}", f"{medians[name] / medians['dense']:.3f}",
             result["buckets"][name]] for name in VARIANTS]
    step_table = markdown_table(["variant", "median ms/step (rank 0)", "ratio to dense",
                                 "DDP buckets, MB in reduction order"], rows)
    sparse_bytes, dense_bytes = result["bytes"]["rigl"], result["bytes"]["rigl-hook-dense"]
    density = result["active"] / result["masked_total"]
    expected = (result["active"] + result["unmasked"]) / (result["masked_total"] + result["unmasked"])
    bytes_table = markdown_table(
        ["all-reduce bytes/step, sparse hook", "dense (hook forced dense)", "ratio",
         "weight density", "expected ratio (active + unmasked) / all"],
        [[f"{sparse_bytes:,.0f}", f"{dense_bytes:,.0f}", f"{sparse_bytes / dense_bytes:.4f}",
          f"{density:.4f}", f"{expected:.4f}"]],
    )
    hook_effect = medians["rigl"] / medians["rigl-no-hook"]
    rebuilt = medians["rigl-rebuilt"]
    body = (f"### Step time\n\n{step_table}\n\nEffect of the sparse hook on the step: "
            f"{hook_effect:.3f} (rigl with hook / rigl with DDP's own all-reduce).\n\n"
            f"Layouts exact across a restart, against torch's rebuild: fixed at construction "
            f"(rigl) {medians['rigl'] / rebuilt:.3f}, find_unused_parameters "
            f"{medians['rigl-find-unused'] / rebuilt:.3f} (median step / rigl-rebuilt's).\n\n"
            f"### Gradient all-reduce bytes per step (measured at the all_reduce call)\n\n{bytes_table}\n")
    print(body)
    if args.no_record:
        return 0
    settings = (
        f"2 ranks, gloo, torch threads per rank {result['threads']}, model {args.model}, "
        f"{'synthetic' if args.synthetic else 'Fashion-MNIST'}, global batch "
        f"{args.batch_size}, sparsity {args.sparsity}, {args.steps} timed steps per "
        f"variant in {args.rounds} interleaved rounds after {args.warmup} warm-up"
    )
    info = run_info(before, settings, {
        "wall time of the benchmark": f"{wall:.0f} s",
    })
    append_results("ddp_step.py: DDP on 2 CPU ranks, sparse vs dense", info, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
