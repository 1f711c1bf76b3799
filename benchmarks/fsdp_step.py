"""FSDP2 on 2 CPU ranks: sparse (RigL) vs dense step time, bytes per mask update; and the sharded
per-layer select on GPT-2 medium's weight shapes against gathering the scores.

Part 1: distsparse's GPT (`--layers`/`--width`, byte vocabulary, `--context` tokens, `--batch`
sequences per rank) sharded with `FSDPBackend` on 2 gloo ranks trains `--steps` AdamW steps
dense (optimizer.step) and sparse (`Sparsifier.step`, RigL at 90 %, a mask update every
`--interval` steps), in alternating rounds; the ratio is of the mean step time over all steps,
mask updates included. Bytes per update are counted in every torch.distributed collective the
update calls (wrapped while it runs), per rank.

Part 2: each rank holds its FSDP2 row shard of scores (|N(0, 1)|, float32) of GPT-2 medium's
masked weights (24 blocks of Conv1D 1024x3072, 1024x1024, 1024x4096, 4096x1024, stored in x out,
302 M entries) and keeps the top 10 % of every layer two ways: `PieceLayout.topk_per_layer` (the
radix select RigL/SET use under FSDP2: histograms all-reduced) and all-gathering each layer's
score pieces then `topk_masks` locally. Both must give the same masks.
Run: python benchmarks/fsdp_step.py
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from record import REPO, append_results, load_average, markdown_table, run_info, run_ranks

WORLD = 2
GPT2_MEDIUM = [(1024, 3072), (1024, 1024), (1024, 4096), (4096, 1024)]
"""Shapes of one GPT-2 medium block's Conv1D weights (n_embd 1024, stored in x out)."""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="GPT blocks (part 1)")
    parser.add_argument("--width", type=int, default=128, help="GPT n_embd (part 1)")
    parser.add_argument("--context", type=int, default=64, help="tokens per sequence (part 1)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank (part 1)")
    parser.add_argument("--steps", type=int, default=20, help="steps per round (part 1)")
    parser.add_argument("--rounds", type=int, default=2, help="dense/sparse rounds (part 1)")
    parser.add_argument("--interval", type=int, default=5, help="RigL update interval (part 1)")
    parser.add_argument("--blocks", type=int, default=24, help="GPT-2 medium blocks (part 2)")
    parser.add_argument("--no-record", action="store_true", help="print only, no RESULTS.md entry")
    return parser.parse_args(argv)


def _count_collectives(sent: dict[str, int]):
    """Wrap torch.distributed's collectives to add their payload bytes to `sent`; returns undo."""
    import torch.distributed as dist

    saved = {name: getattr(dist, name) for name in ("all_reduce", "all_gather", "broadcast",
                                                     "all_gather_into_tensor", "reduce_scatter")}

    def counted(name):
        def call(tensor_or_list, *args, **kwargs):
            first = args[0] if name == "all_gather" else tensor_or_list
            sent["bytes"] += first.numel() * first.element_size()
            sent["calls"] += 1
            return saved[name](tensor_or_list, *args, **kwargs)
        return call

    for name in saved:
        setattr(dist, name, counted(name))
    return lambda: [setattr(dist, name, fn) for name, fn in saved.items()]


def _steps(args: argparse.Namespace, rank: int) -> dict:
    import torch
    import torch.nn.functional as F

    import distsparse
    from distsparse.distributed.process_group import DistEnv
    from distsparse.engine.backends.fsdp import FSDPBackend
    from distsparse.models.gpt import build_gpt

    generator = torch.Generator().manual_seed(rank)
    total = args.steps * args.rounds
    tokens = [torch.randint(0, 256, (args.batch, args.context + 1), generator=generator)
              for _ in range(args.steps)]

    def backend():
        torch.manual_seed(0)
        model = build_gpt(256, {"n_layer": args.layers, "n_head": 4, "n_embd": args.width,
                                "n_positions": args.context})
        return FSDPBackend(model, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
                           DistEnv(rank, WORLD, rank), torch.device("cpu"))

    dense, sparse = backend(), backend()
    sparsifier = distsparse.Sparsifier(sparse.model, sparse.optimizer, method="rigl", sparsity=0.9,
                                       total_steps=total, update_interval=args.interval)
    updates: list[tuple[int, int]] = []
    update_masks = sparsifier._update_masks

    def counted_update(step, grads):
        sent = {"bytes": 0, "calls": 0}
        undo = _count_collectives(sent)
        try:
            update_masks(step, grads)
        finally:
            undo()
        updates.append((sent["bytes"], sent["calls"]))

    sparsifier._update_masks = counted_update
    seconds = {"dense": [], "sparse": []}
    for _ in range(args.rounds):
        for kind, run in (("dense", dense), ("sparse", sparse)):
            for batch in tokens:
                torch.distributed.barrier()
                tick = time.perf_counter()
                run.backward(F.cross_entropy(run.model(batch[:, :-1]).reshape(-1, 256),
                                             batch[:, 1:].reshape(-1)))
                if kind == "dense":
                    run.optimizer.step()
                else:
                    sparsifier.step()
                seconds[kind].append(time.perf_counter() - tick)
    params = sum(p.numel() for p in dense.model.parameters())
    return {"seconds": seconds, "updates": updates, "params": params,
            "masked": sum(sparsifier.mask_set.layout.numel(n) for n in sparsifier.masks),
            "density": sparsifier.density()}


def _select(args: argparse.Namespace, rank: int) -> dict:
    import torch
    import torch.distributed as dist

    from distsparse.sparsity.allocation import active_count
    from distsparse.sparsity.layout import PieceLayout
    from distsparse.sparsity.select import topk_masks

    shapes = {f"h.{b}.{i}": shape for b in range(args.blocks) for i, shape in enumerate(GPT2_MEDIUM)}
    units = {name: shape[1] for name, shape in shapes.items()}

    def all_gather(tensor):
        parts = [torch.empty_like(tensor) for _ in range(WORLD)]
        dist.all_gather(parts, tensor)
        return parts

    # Through a lambda, so that the counting wrapper sees the selection's all-reduces.
    layout = PieceLayout(shapes, rank, WORLD, lambda tensor: dist.all_reduce(tensor), all_gather,
                         units)
    generator = torch.Generator().manual_seed(11 + rank)
    scores = {name: torch.randn(stop - start, generator=generator).abs()
              for name, (start, stop) in layout.bounds.items()}
    ks = {name: active_count(layout.numel(name), 0.1) for name in shapes}

    def histogram():
        sent = {"bytes": 0, "calls": 0}
        undo = _count_collectives(sent)
        try:
            return layout.topk_per_layer(scores, ks), sent
        finally:
            undo()

    def gathered():
        sent = {"bytes": 0, "calls": 0}
        undo = _count_collectives(sent)
        try:
            masks = {}
            for name, piece in scores.items():
                size = layout.bounds_of(name, 0)[1]  # rank 0's piece is the largest
                padded = torch.zeros(size)
                padded[: piece.numel()] = piece
                parts = all_gather(padded)
                full = torch.cat([part[: b - a] for part, (a, b) in
                                  zip(parts, (layout.bounds_of(name, r) for r in range(WORLD)))])
                start, stop = layout.bounds[name]
                masks[name] = topk_masks([full], [ks[name]])[0][start:stop]
            return masks, sent
        finally:
            undo()

    result = {"numel": sum(layout.numel(n) for n in shapes), "layers": len(shapes)}
    for way, select in (("histogram", histogram), ("all-gather", gathered)):
        dist.barrier()
        tick = time.perf_counter()
        masks, sent = select()
        result[way] = {"seconds": time.perf_counter() - tick, **sent}
        result[f"{way} masks"] = masks
    same = torch.tensor([int(all(torch.equal(result["histogram masks"][n], result["all-gather masks"][n])
                                 for n in shapes))])
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    result["same"] = bool(same.item())
    del result["histogram masks"], result["all-gather masks"]
    return result


def _worker(rank: int, port: int, args: argparse.Namespace, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // WORLD))
    result = {"steps": _steps(args, rank), "select": _select(args, rank)}
    if rank == 0:
        queue.put(result)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    sys.path.insert(0, str(REPO))
    before = load_average()
    tick = time.perf_counter()
    result = run_ranks(_worker, WORLD, args)
    wall = time.perf_counter() - tick
    steps, select = result["steps"], result["select"]
    dense, sparse = (statistics.fmean(steps["seconds"][k]) for k in ("dense", "sparse"))
    update_bytes = [sent for sent, _ in steps["updates"]]
    part1 = markdown_table(
        ["model", "dense ms/step", "sparse ms/step", "sparse / dense", "mask updates",
         "bytes per update per rank (min-max)", "collective calls of each update, in order"],
        [[f"GPT {args.layers}x{args.width}, {steps['params']:,} params, {steps['masked']:,} masked",
          f"{dense * 1e3:.1f}", f"{sparse * 1e3:.1f}", f"{sparse / dense:.3f}",
          len(update_bytes), f"{min(update_bytes):,}-{max(update_bytes):,}",
          " ".join(str(calls) for _, calls in steps["updates"])]])
    h, g = select["histogram"], select["all-gather"]
    part2 = markdown_table(
        ["selection", "bytes per rank", "collective calls", "seconds (rank 0)", "same masks"],
        [["histogram (PieceLayout.topk_per_layer)", f"{h['bytes']:,}", h["calls"],
          f"{h['seconds']:.1f}", "yes" if select["same"] else "NO"],
         ["all-gather scores, topk per layer", f"{g['bytes']:,}", g["calls"], f"{g['seconds']:.1f}",
          "yes" if select["same"] else "NO"]])
    body = (f"{part1}\n\nFinal density {steps['density']:.4f}; mean over {args.rounds} alternating "
            f"rounds of {args.steps} steps each, mask updates included.\n\n{part2}\n\n"
            f"GPT-2 medium: {select['layers']} masked weights, {select['numel']:,} scores, top 10 % "
            f"of each layer, FSDP2 row shards on {WORLD} ranks.\n")
    print(body)
    if args.no_record:
        return 0
    settings = (f"{WORLD} gloo ranks on one machine; part 1: AdamW, batch {args.batch}x"
                f"{args.context} tokens per rank, RigL 90 % every {args.interval} steps; part 2: "
                f"{args.blocks} blocks, float32 scores, one selection per way")
    info = run_info(before, settings, {"wall time of the benchmark": f"{wall:.0f} s"})
    append_results("fsdp_step.py: FSDP2 sparse vs dense step, sharded select on GPT-2 medium",
                   info, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
