"""The stop-signal check's cost per training step, 2 ranks: none, blocking, asynchronous CPU.

Each rank builds one trainer (small ResNet, RigL, synthetic data unless --fmnist) and times
`_train_step` followed by one of:
  none           no check (what a run without signal handling would cost)
  blocking       an all-reduce of a flag on the training device's group, read on the host every
                 step (what the trainer did before: a host sync per step on CUDA)
  async-every-1  StopSignal.agreed: an asynchronous MAX all-reduce on a CPU (gloo) side group
                 every step, the previous one's result read
  async-every-10 the same every 10 steps (run.signal_check_every=10)
in interleaved rounds with the step held at a non-update step. Timing stops after the check, on
CUDA after a synchronize, so a device stall shows in the step time.
Run: python benchmarks/stop_check.py [--device cuda]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from record import REPO, append_results, load_average, markdown_table, run_info, run_ranks

VARIANTS = ("none", "blocking", "async-every-1", "async-every-10")
TIMED_STEP = 1


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="timed steps per variant")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--fmnist", action="store_true", help="Fashion-MNIST instead of synthetic")
    parser.add_argument("--no-record", action="store_true", help="print only, no RESULTS.md entry")
    return parser.parse_args(argv)


def _worker(rank: int, port: int, args: argparse.Namespace, workdir: str, queue) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // 2)))
    import torch
    import torch.distributed as dist

    from distsparse.config import load_config
    from distsparse.engine.stop_signal import StopSignal
    from distsparse.engine.trainer import Trainer

    overrides = ["method.name=rigl", f"train.batch_size={args.batch_size}", "backend.name=ddp",
                 "launcher.num_workers=2", "model.name=small_resnet", "run.progress=false",
                 f"train.device={args.device}", f"run.dir={workdir}/run"]
    if not args.fmnist:
        overrides += ["data.name=synthetic", "data.loader=synthetic"]
    trainer = Trainer(load_config(REPO / "configs" / "quickstart.yaml", overrides))
    device = trainer.device
    batches = [(trainer._to_device(x), y.to(device))
               for _, (x, y) in zip(range(8), trainer.data.train.batches(0))]

    def blocking(step: int) -> bool:
        flag = torch.zeros(1, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    with StopSignal(1) as every_1, StopSignal(10) as every_10:
        checks = {"none": lambda step: False, "blocking": blocking,
                  "async-every-1": every_1.agreed, "async-every-10": every_10.agreed}
        step_counter = {name: 0 for name in VARIANTS}

        def run(name: str, count: int) -> list[float]:
            seconds = []
            for i in range(count):
                x, y = batches[i % len(batches)]
                trainer.step = TIMED_STEP
                step_counter[name] += 1
                tick = time.perf_counter()
                trainer._train_step(x, y)
                checks[name](step_counter[name])
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds.append(time.perf_counter() - tick)
            return seconds

        for name in VARIANTS:
            run(name, args.warmup)
        block = args.steps // args.rounds
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for r in range(args.rounds):
            order = VARIANTS[r % 4:] + VARIANTS[: r % 4]
            for name in order:
                times[name] += run(name, block)
    if rank == 0:
        queue.put({"times": times, "threads": torch.get_num_threads(),
                   "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"})
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    sys.path.insert(0, str(REPO))
    before = load_average()
    with tempfile.TemporaryDirectory() as workdir:
        tick = time.perf_counter()
        result = run_ranks(_worker, 2, args, workdir, timeout=1200)
        wall = time.perf_counter() - tick
    medians = {name: statistics.median(t) for name, t in result["times"].items()}
    rows = [[name, f"{medians[name] * 1e3:.2f}", f"{medians[name] / medians['none']:.4f}"]
            for name in VARIANTS]
    body = markdown_table(["check", "median ms/step (rank 0)", "ratio to no check"], rows) + "\n"
    print(body)
    if args.no_record:
        return 0
    settings = (f"2 ranks on {result['device']}, gloo side group for the async checks, torch "
                f"threads per rank {result['threads']}, small_resnet RigL, "
                f"{'Fashion-MNIST' if args.fmnist else 'synthetic'}, global batch {args.batch_size}, "
                f"{args.steps} timed steps per variant in {args.rounds} interleaved rounds after "
                f"{args.warmup} warm-up")
    info = run_info(before, settings, {"wall time of the benchmark": f"{wall:.0f} s"})
    append_results("stop_check.py: the stop-signal check per step, 2 ranks", info, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
