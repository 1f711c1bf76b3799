"""Mask updates on ResNet-50's (or GPT-2 medium's) shapes as a ratio to one `torch.topk` over all scores.

The 54 weight layers of torchvision's ResNet-50 (25.5 M weights), or the 4 Conv1D weights of each
of GPT-2 medium's blocks (24 blocks, 302 M weights; `--blocks` fewer), hold random weights and
dense gradients (N(0, 1), float32). Each round times, in turn: one `torch.topk(k = 10 %)` over all
scores (the floor of one selection), then one `method.update` of RigL, SET, GMP, GraNet and
GraNet-ST at sparsity 0.9 (the methods' own scores, counts and selections; masks as training holds
them at that step), SET's counter-based random grow scores alone, then FORCE's selections:
`pai_iterations` global top-k over fixed scores at the exponential schedule's densities, as
`method.init=force` runs them between its gradients. Each method selects through its own layout,
as under a Sparsifier: a `FullLayout`, or with `--pieces` a one-rank `PieceLayout` on flattened
pieces (the sharded (ZeRO-3 / FSDP2) select's local work, its all-reduces the identity). Before
each timed update, untimed, the layout counts the masks: in training the previous update made
them, so their counts are known.
Reported per item: the median time and its ratio to the median topk, the range of the per-round
ratios (each to that round's topk), the host reads (`tolist`) of one update, its aten calls (every
level, views included, as torch.profiler counts them: what a GPU pays in launches), and the goals.
`--launch-bound` selects as a GPU does (`select.LAUNCH_BOUND_DEVICES`), on any device.
Run: python benchmarks/update_time.py [--device cuda] [--model gpt2-medium --blocks 4]
"""
from __future__ import annotations

import argparse
import statistics
import time

from fsdp_step import GPT2_MEDIUM
from record import append_results, load_average, markdown_table, run_info


GOALS = {"rigl": 2.5, "set": 2.5, "gmp": 1.5, "granet": 3.5, "granet_st": 3.5}
TOTAL_STEPS, STEPS_PER_EPOCH, SEED = 1000, 100, 0
UPDATE_STEP = {"rigl": 100, "set": 100, "gmp": 200, "granet": 200, "granet_st": 200}
"""A step inside each method's schedule: RigL/SET swap 30 % x cosine, GMP/GraNet prune toward
the cubic target that reaches 0.9 at step 300 (prune_end 0.3)."""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--force-iterations", type=int, default=60, help="0: no FORCE row")
    parser.add_argument("--model", choices=("resnet50", "gpt2-medium"), default="resnet50")
    parser.add_argument("--blocks", type=int, default=24, help="GPT-2 medium blocks (the scale)")
    parser.add_argument("--methods", default=",".join(GOALS),
                        help=f"comma-separated subset of {','.join(GOALS)}")
    parser.add_argument("--pieces", action="store_true",
                        help="select through the sharded select (a one-rank PieceLayout)")
    parser.add_argument("--launch-bound", action="store_true",
                        help="treat the device as launch-bound: segmented selections, one draw")
    parser.add_argument("--no-record", action="store_true", help="print only, no RESULTS.md entry")
    return parser.parse_args(argv)


def _resnet50_shapes() -> dict[str, tuple[int, ...]]:
    import torch
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.resnet50()
    return {name: tuple(p.shape) for name, p in model.named_parameters() if p.dim() > 1}


def _gpt2_medium_shapes(blocks: int) -> dict[str, tuple[int, ...]]:
    names = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    return {f"transformer.h.{block}.{name}.weight": shape for block in range(blocks)
            for name, shape in zip(names, GPT2_MEDIUM)}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    load_before = load_average()
    import torch

    from distsparse.config import MethodConfig
    from distsparse.methods import TrainingSchedule, build_method
    from distsparse.sparsity.allocation import active_count
    from distsparse.sparsity.layout import FullLayout, PieceLayout
    from distsparse.sparsity.schedules import iterative_densities
    from distsparse.sparsity import select
    from distsparse.sparsity.select import global_topk_masks
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.threads)
    if args.launch_bound:
        select.LAUNCH_BOUND_DEVICES = (*select.LAUNCH_BOUND_DEVICES, torch.device(args.device).type)
    started = time.perf_counter()
    shapes = _resnet50_shapes() if args.model == "resnet50" else _gpt2_medium_shapes(args.blocks)
    chosen = args.methods.split(",")
    unknown = sorted(set(chosen) - set(GOALS))
    if unknown:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)}; expected some of {', '.join(GOALS)}")
    gen = torch.Generator().manual_seed(SEED)
    weights = {n: torch.randn(s, generator=gen).to(args.device) for n, s in shapes.items()}
    grads = {n: torch.randn(s, generator=gen).to(args.device) for n, s in shapes.items()}
    force_scores = {n: torch.randn(s, generator=gen).abs().to(args.device) for n, s in shapes.items()}
    if args.pieces:  # one rank owns every layer whole, as a flattened piece
        weights, grads = ({n: t.reshape(-1) for n, t in d.items()} for d in (weights, grads))
    flat = torch.cat([w.reshape(-1) for w in weights.values()]).abs()
    total = flat.numel()
    schedule = TrainingSchedule(total_steps=TOTAL_STEPS, steps_per_epoch=STEPS_PER_EPOCH)
    methods, masks = {}, {}
    for name in chosen:
        method = build_method(MethodConfig(name=name, sparsity=0.9), schedule, SEED)
        method.layout = PieceLayout(shapes, 0, 1, lambda tensor: tensor, lambda tensor: [tensor]) \
            if args.pieces else FullLayout(shapes)
        initial = method.initial_masks(shapes)
        masks[name] = {n: (m.reshape(-1) if args.pieces else m).to(args.device)
                       for n, m in initial.items()}
        if name in ("gmp", "granet"):  # dense-to-sparse: the mask of the previous update
            masks[name] = {**masks[name], **method.update(
                UPDATE_STEP[name] - 100, masks[name], weights, grads)}
        methods[name] = method
    densities = iterative_densities(0.1, max(args.force_iterations, 1), "exp")

    def topk() -> None:
        torch.topk(flat, total // 10, sorted=False)

    def force() -> None:
        for density in densities:
            global_topk_masks(force_scores, active_count(total, density))

    items = {"topk": topk, **{name: (lambda n=name: methods[n].update(
        UPDATE_STEP[n], masks[n], weights, grads)) for name in chosen}}
    if "set" in chosen:
        items["set: random grow scores alone"] = lambda: methods["set"].random_grow_scores(
            UPDATE_STEP["set"], masks["set"])
    if args.force_iterations:
        items["force"] = force

    def known_counts(name: str) -> None:
        if name in methods:
            methods[name].layout.active_counts(masks[name])

    reads: dict[str, int] = {}
    aten_calls: dict[str, int] = {}
    tolist = torch.Tensor.tolist
    for name, item in items.items():  # warm-up, counting host reads and aten calls
        known_counts(name)
        calls = []
        torch.Tensor.tolist = lambda tensor, calls=calls: calls.append(1) or tolist(tensor)
        try:
            with profile(activities=[ProfilerActivity.CPU]) as traced:
                item()
        finally:
            torch.Tensor.tolist = tolist
        reads[name] = len(calls)
        aten_calls[name] = sum(event.count for event in traced.key_averages()
                               if event.key.startswith("aten::"))
    times: dict[str, list[float]] = {name: [] for name in items}
    for _ in range(args.rounds):
        for name, item in items.items():
            known_counts(name)
            _sync(args.device)
            begin = time.perf_counter()
            item()
            _sync(args.device)
            times[name].append(time.perf_counter() - begin)
    base = statistics.median(times["topk"])
    rows = []
    for name, values in times.items():
        per_round = [value / floor for value, floor in zip(values, times["topk"])]
        ratio = statistics.median(values) / base
        label = f"force ({args.force_iterations} global selections)" if name == "force" else name
        goal = GOALS.get(name)
        rows.append([label, f"{statistics.median(values) * 1e3:.1f}", f"{ratio:.2f}",
                     f"{min(per_round):.2f}-{max(per_round):.2f}", reads[name], aten_calls[name],
                     "" if goal is None else f"<= {goal}",
                     "" if goal is None else ("yes" if ratio <= goal else "**no**")])
    table = markdown_table(["item", "median ms", "ratio to one topk", "per-round ratio range",
                            "host reads", "aten calls", "goal", "met"], rows)
    print(table)
    if not args.no_record:
        model = "ResNet-50" if args.model == "resnet50" else f"GPT-2 medium ({args.blocks} blocks)"
        where = "the sharded select on one rank's pieces" if args.pieces else "full tensors"
        settings = (f"{model}'s {len(shapes)} weight layers ({total} weights), {where}, random N(0, 1) "
                    f"weights and gradients, float32 on {args.device}"
                    f"{' (selecting as a launch-bound device)' if args.launch_bound else ''}, "
                    f"sparsity 0.9, ERK init, "
                    f"update steps {UPDATE_STEP} of {TOTAL_STEPS}; topk k = 10 % of all scores; "
                    f"{args.rounds} interleaved rounds after one warm-up; "
                    f"torch.set_num_threads({args.threads})")
        info = run_info(load_before, settings,
                        {"wall time of the benchmark": f"{time.perf_counter() - started:.0f} s"})
        append_results("update_time.py: mask updates as a ratio to one topk", info, table)


if __name__ == "__main__":
    main()
