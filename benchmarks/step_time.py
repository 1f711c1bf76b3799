"""Step time of masked training against the same dense model, and the cost of a mask update.

One process builds a Trainer per method (dense, static, rigl, granet_st by default) from
configs/quickstart.yaml: small_resnet, batch 128, Fashion-MNIST (or synthetic data with
--synthetic). Every trainer runs `_train_step(x, y)` on the same prebuilt batches; the methods take
turns in blocks (5 rounds of 12 steps by default, the order rotated each round) so that drift in
the machine's speed falls on all of them alike. Reported: the median seconds per step, the ratio
sparse / dense of those medians (goal <= 1.03) and its spread over the rounds.

Then, for the methods that prune and regrow (rigl, granet_st), the Sparsifier's mask update is timed
after a forward and backward on the update steps step = k * update_interval (median of 10), and
amortized over the interval: update / (interval x that method's step) (goal <= 1 %).

    .venv/bin/python benchmarks/step_time.py [--steps 60 --rounds 5 --warmup 10] [--synthetic]

On a GPU (batches are moved to the device before timing; every timed call ends with a
synchronize), e.g. ResNet-50 at 224 px in bf16:

    python benchmarks/step_time.py --device cuda --model resnet50 --batch-size 256 --synthetic \
        data.synthetic.image_size=224 data.synthetic.channels=3 data.synthetic.num_classes=1000 \
        data.synthetic.train_size=3072 train.autocast=bf16 train.channels_last=true
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from record import REPO, append_results, load_average, markdown_table, run_info

SPARSITY = 0.9
STEP_GOAL = 1.03
UPDATE_GOAL_PERCENT = 1.0
TIMED_STEP = 1
"""The trainer's step counter is held here while timing: no method updates its mask at step 1."""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    parser.add_argument("--methods", default="static,rigl,granet_st",
                        help="sparse methods timed against dense (comma-separated)")
    parser.add_argument("--update-methods", default="rigl,granet_st",
                        help="methods whose prune-regrow update is timed")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per method")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved blocks per method")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per method first")
    parser.add_argument("--updates", type=int, default=10, help="mask updates timed per method")
    parser.add_argument("--update-interval", type=int, default=100, help="Delta T")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=12, help="distinct prebuilt batches")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--synthetic", action="store_true",
                        help="data.name=synthetic data.loader=synthetic instead of Fashion-MNIST")
    parser.add_argument("--profile", action="store_true",
                        help="also profile a block of dense and static steps, and one mask update "
                             "of each update method, with torch.profiler")
    parser.add_argument("--trace-dir", type=Path, default=None,
                        help="with --profile: write each profiled update's Chrome trace here")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--model", default="small_resnet", help="model.name of every trainer")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("extra", nargs="*", help="further key.sub=value overrides for every trainer")
    args = parser.parse_args(argv)
    if args.steps % args.rounds:
        parser.error(f"--steps {args.steps} must be a multiple of --rounds {args.rounds}")
    return args


def _overrides(args: argparse.Namespace, method: str, run_dir: Path) -> list[str]:
    overrides = [
        f"method.name={method}", f"method.sparsity={SPARSITY}",
        f"method.update_interval={args.update_interval}", f"train.batch_size={args.batch_size}",
        f"model.name={args.model}", f"train.device={args.device}", "run.progress=false",
        f"run.dir={run_dir}",
    ]
    if args.synthetic:
        # The synthetic set is 16 batches an epoch; give it the schedule length of 3 Fashion-MNIST
        # epochs (1404 steps) so the same update steps exist.
        overrides += ["data.name=synthetic", "data.loader=synthetic", "train.max_steps=1404"]
    return overrides + list(args.extra)


def _synchronize() -> None:
    """Wait for queued GPU work, so that a timer read after it covers that work."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _build(args: argparse.Namespace, method: str, workdir: Path):
    from distsparse.config import load_config
    from distsparse.engine.trainer import Trainer

    config = load_config(args.config, _overrides(args, method, workdir / method))
    return Trainer(config)


def _time_steps(trainer, batches, count: int, offset: int) -> list[float]:
    seconds = []
    for i in range(count):
        x, y = batches[(offset + i) % len(batches)]
        trainer.step = TIMED_STEP
        _synchronize()
        tick = time.perf_counter()
        trainer._train_step(x, y)
        _synchronize()
        seconds.append(time.perf_counter() - tick)
    return seconds


def _interleaved(args, trainers: dict, batches) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per-step seconds of every method, and the median of each of its blocks (one per round)."""
    names = list(trainers)
    for name in names:
        _time_steps(trainers[name], batches, args.warmup, 0)
    block = args.steps // args.rounds
    steps: dict[str, list[float]] = {name: [] for name in names}
    blocks: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            seconds = _time_steps(trainers[name], batches, block, r * block)
            steps[name] += seconds
            blocks[name].append(statistics.median(seconds))
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {blocks[n][-1] * 1e3:.1f} ms" for n in names), flush=True)
    return steps, blocks


def _time_updates(args, trainer, batches,
                  around=contextlib.nullcontext) -> tuple[list[float], list[int]]:
    """Seconds of the Sparsifier's mask update after a forward/backward, on update steps; each
    update runs inside the context manager `around()` makes (a profiler)."""
    import torch.nn.functional as F

    method = trainer.method
    candidates = [k * args.update_interval for k in range(1, 10_000)]
    update_steps = [s for s in candidates if s <= trainer.schedule.total_steps
                    and method.is_update_step(s)][: args.updates]
    if len(update_steps) < args.updates:
        raise SystemExit(f"{method.name}: only {len(update_steps)} update steps in a schedule of "
                         f"{trainer.schedule.total_steps} steps; lower --updates")
    model, optimizer = trainer.backend.model, trainer.backend.optimizer
    sparsifier = trainer.sparsifier
    seconds = []
    for i, step in enumerate(update_steps):
        x, y = batches[i % len(batches)]
        trainer.step = step  # asks for dense gradients in the backward where growth needs them
        model.train()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = sparsifier.access.grads() if method.needs_dense_grad(step) else None
        if not method.update_replaces_optimizer_step:
            # As `Sparsifier.step` does: the optimizer step and masking come first for these methods.
            optimizer.step()
            sparsifier.mask_all()
        _synchronize()
        tick = time.perf_counter()
        with around():
            sparsifier._update_masks(step, grads)
            _synchronize()
        seconds.append(time.perf_counter() - tick)
    return seconds, update_steps


def _time_masking(trainer, count: int = 50) -> float:
    """Median seconds of `Sparsifier.mask_all()` alone: the per-step work a mask adds to a dense step."""
    seconds = []
    for _ in range(count):
        _synchronize()
        tick = time.perf_counter()
        trainer.sparsifier.mask_all()
        _synchronize()
        seconds.append(time.perf_counter() - tick)
    return statistics.median(seconds)


def _profile(trainers: dict, batches, block: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    out = []
    for name in ("dense", "static"):
        if name not in trainers:
            continue
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            _time_steps(trainers[name], batches, block, 0)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        out.append(f"### torch.profiler, {block} steps of {name}\n\n```\n{table}\n```")
        print(out[-1])
    return "\n\n".join(out)


def _profile_update(args, name: str, trainer, batches) -> str:
    """torch.profiler's table of one mask update (its first update step again), by self CPU time:
    where an update is launch-bound, the host's time per call is what it costs."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    made = []

    def around():
        made.append(profile(activities=activities))
        return made[-1]

    _time_updates(argparse.Namespace(**{**vars(args), "updates": 1}), trainer, batches, around)
    if args.trace_dir is not None:
        args.trace_dir.mkdir(parents=True, exist_ok=True)
        made[0].export_chrome_trace(str(args.trace_dir / f"update-{name}.json"))
    events = made[0].key_averages()
    calls = sum(event.count for event in events if event.key.startswith("aten::"))
    phases = markdown_table(
        ["phase of the update", "host ms", "device ms"],
        [[e.key, f"{e.cpu_time_total / 1e3:.2f}", f"{e.device_time_total / 1e3:.2f}"]
         for e in events if e.key.startswith("distsparse.")])
    table = events.table(sort_by="self_cpu_time_total", row_limit=15)
    text = (f"### torch.profiler, one mask update of {name} ({calls} aten calls)\n\n{phases}"
            f"\n\n```\n{table}\n```")
    if args.device == "cuda":
        by_device = events.table(sort_by="self_device_time_total", row_limit=15)
        text += f"\n\nBy device time:\n\n```\n{by_device}\n```"
    print(text)
    return text


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    sparse = [m.strip() for m in args.methods.split(",") if m.strip()]
    updating = [m.strip() for m in args.update_methods.split(",") if m.strip()]
    names = ["dense"] + [m for m in dict.fromkeys(sparse + updating) if m != "dense"]
    load_before = load_average()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="distsparse-step-time-") as tmp:
        trainers = {name: _build(args, name, Path(tmp)) for name in names}
        loader = trainers["dense"].data.train
        batches = []
        for x, y in loader.batches(0):
            batches.append((trainers["dense"]._to_device(x.contiguous()), y.to(trainers["dense"].device)))
            if len(batches) == args.batches:
                break
        print(f"timing {args.steps} steps per method ({args.rounds} rounds of "
              f"{args.steps // args.rounds}, after {args.warmup} warm-up), "
              f"{len(batches)} batches of {args.batch_size}, threads {torch.get_num_threads()}",
              flush=True)
        steps, blocks = _interleaved(args, trainers, batches)
        masking = {name: _time_masking(t) for name, t in trainers.items()}
        profile_text = _profile(trainers, batches, args.steps // args.rounds) if args.profile else ""
        updates = {}
        for name in updating:
            print(f"  timing {args.updates} mask updates of {name}", flush=True)
            updates[name] = _time_updates(args, trainers[name], batches)
            if args.profile:
                profile_text += "\n\n" + _profile_update(args, name, trainers[name], batches)
        sparsity = {name: (1.0 - t.masks.density()) if t.method.uses_masks else 0.0
                    for name, t in trainers.items()}
        initial = {name: 1.0 - t.method.initial_density() for name, t in trainers.items()}
        total_steps = trainers["dense"].schedule.total_steps
        for trainer in trainers.values():
            if trainer.log is not None:
                trainer.log.close()
    elapsed = time.perf_counter() - started

    dense = statistics.median(steps["dense"])
    step_rows = []
    for name in names:
        median = statistics.median(steps[name])
        per_round = [b / d for b, d in zip(blocks[name], blocks["dense"])]
        ratio = median / dense
        met = "" if name == "dense" else ("yes" if ratio <= STEP_GOAL else "**no**")
        step_rows.append([
            name, f"{initial[name]:.2f}", f"{median * 1e3:.1f}",
            f"{min(steps[name]) * 1e3:.1f}", f"{ratio:.3f}", f"{statistics.median(per_round):.3f}",
            f"{min(per_round):.3f}-{max(per_round):.3f}", met,
            f"{masking[name] * 1e3:.2f} ({100 * masking[name] / dense:.2f} %)",
        ])
    step_table = markdown_table(
        ["method", "sparsity while timed", "median ms/step", "min ms/step", "ratio to dense",
         "median of per-round ratios", "per-round ratio range", f"<= {STEP_GOAL}", "masking alone, ms (% of dense step)"],
        step_rows,
    )
    spread = max(abs(b / d - 1.0) for name in names if name != "dense"
                 for b, d in zip(blocks[name], blocks["dense"]))
    if spread > STEP_GOAL - 1.0:
        step_table += (
            f"\n\nSingle rounds' ratios differ from 1 by up to {spread:.1%}, more than the "
            f"{STEP_GOAL - 1.0:.0%} margin of the goal: the ratios are no more precise than that "
            "noise allows. The masking column times `Sparsifier.mask_all()` alone (median of 50 "
            "calls), the only per-step work a masked step adds to the dense one."
        )
    update_rows = []
    for name, (seconds, at) in updates.items():
        step_s = statistics.median(steps[name])
        median = statistics.median(seconds)
        percent = 100.0 * median / (args.update_interval * step_s)
        update_rows.append([
            name, f"{at[0]}..{at[-1]}", len(seconds), f"{median * 1e3:.1f}",
            f"{max(seconds) * 1e3:.1f}", f"{step_s * 1e3:.1f}", f"{percent:.2f} %",
            "yes" if percent <= UPDATE_GOAL_PERCENT else "**no**",
        ])
    update_table = markdown_table(
        ["method", "update steps", "n", "median ms/update", "max ms/update", "ms/step",
         f"amortized over {args.update_interval} steps", f"<= {UPDATE_GOAL_PERCENT:g} %"],
        update_rows,
    )
    print()
    print(step_table)
    print()
    print(update_table)

    if not args.no_record:
        settings = (
            f"model {args.model} on {args.device}, data "
            f"{'synthetic' if args.synthetic else 'Fashion-MNIST'} {' '.join(args.extra)}, "
            f"batch {args.batch_size} ({len(batches)} fixed batches), method.sparsity "
            f"{SPARSITY} (granet_st starts at init_density 0.5), update_interval "
            f"{args.update_interval}, schedule {total_steps} steps, "
            f"torch.set_num_threads({args.threads}); {args.steps} timed steps per method in "
            f"{args.rounds} interleaved rounds after {args.warmup} warm-up; "
            f"`Trainer._train_step` with the step counter held at {TIMED_STEP}"
        )
        info = run_info(load_before, settings, {
            "mask density after the update timing": ", ".join(
                f"{n} {1 - s:.3f}" for n, s in sparsity.items() if n in updates),
            "wall time of the benchmark": f"{elapsed:.0f} s",
        })
        body = "### Training step\n\n" + step_table + "\n\n### Mask update (prune and regrow)\n\n" \
            + update_table + ("\n\n" + profile_text if profile_text else "")
        append_results("step_time.py: masked vs dense training step", info, body)
        print(f"\nappended to {Path('benchmarks/RESULTS.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
