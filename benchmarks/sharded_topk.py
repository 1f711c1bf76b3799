"""Global top-k over ZeRO-3 shards of ResNet-50's weights: histogram select vs moving the scores.

Two gloo ranks each own their ZeRO-3 piece (`zero3_partition`) of the scores of ResNet-50's 54
weight layers (25.5 M scores, float32) and select the globally largest 10 % three ways:

  histogram     `sharded_global_topk`: radix select, one small histogram all-reduce per round
  all-gather    every rank gathers every piece, then `global_topk_masks` on the full scores
  all-reduce    the full score tensor all-reduced (each rank contributes its piece, zeros elsewhere),
                as libraries that score globally over replicas do, then `global_topk_masks`

on magnitude-like scores (|N(0, 1)|) and on heavy ties (16 distinct values). Bytes are the payload
each rank hands to the collectives; times are the median wall time per selection on rank 0.
Every selection is checked against the single-process `global_topk_masks` on the full scores.
Run: python benchmarks/sharded_topk.py
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from record import REPO, append_results, load_average, markdown_table, run_info, run_ranks

WORLD = 2
KINDS = ("magnitude", "ties")
WAYS = ("histogram", "all-gather", "all-reduce")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed selections per way")
    parser.add_argument("--density", type=float, default=0.1, help="fraction kept")
    parser.add_argument("--no-record", action="store_true", help="print only, no RESULTS.md entry")
    return parser.parse_args(argv)


def _resnet50_numels() -> list[int]:
    import torch
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.resnet50()
    return [p.numel() for p in model.parameters() if p.dim() > 1]


def _full_scores(numels: list[int], kind: str):
    import torch

    gen = torch.Generator().manual_seed(7)
    if kind == "magnitude":
        return [torch.randn(n, generator=gen).abs() for n in numels]
    return [torch.randint(-8, 8, (n,), generator=gen).float() / 8 for n in numels]


def _worker(rank: int, port: int, args: argparse.Namespace, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    from distsparse.sparsity.allocation import active_count
    from distsparse.sparsity.select import global_topk_masks
    from distsparse.sparsity.sharded_select import ShardPiece, sharded_global_topk, zero3_partition

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // WORLD))
    numels = _resnet50_numels()
    k = active_count(sum(numels), args.density)
    bounds = [zero3_partition(n, rank, WORLD) for n in numels]
    result: dict = {"numel": sum(numels), "layers": len(numels), "k": k}
    for kind in KINDS:
        full = _full_scores(numels, kind)
        expected = global_topk_masks({str(i): s for i, s in enumerate(full)}, k)
        pieces = [ShardPiece(s[a:b].clone(), a, n) for s, (a, b), n in zip(full, bounds, numels)]
        del full

        def histogram():
            selection = sharded_global_topk(pieces, k, dist.all_reduce, rank=rank, world_size=WORLD)
            return selection.masks, selection.bytes_sent, selection.all_reduces

        def all_gather():
            gathered, sent = {}, 0
            for i, (piece, n) in enumerate(zip(pieces, numels)):
                chunk = -(-n // WORLD)
                padded = torch.zeros(chunk)
                padded[: piece.scores.numel()] = piece.scores
                out = torch.empty(chunk * WORLD)
                dist.all_gather_single(out, padded)
                gathered[str(i)] = out[:n]
                sent += padded.numel() * padded.element_size()
            masks = global_topk_masks(gathered, k)
            return [masks[str(i)][a:b] for i, (a, b) in enumerate(bounds)], sent, len(numels)

        def all_reduce():
            flat = torch.zeros(sum(numels))
            start = 0
            for piece, n in zip(pieces, numels):
                flat[start + piece.offset: start + piece.offset + piece.scores.numel()] = piece.scores
                start += n
            dist.all_reduce(flat)
            masks = global_topk_masks(dict(zip(map(str, range(len(numels))), flat.split(numels))), k)
            return ([masks[str(i)][a:b] for i, (a, b) in enumerate(bounds)],
                    flat.numel() * flat.element_size(), 1)

        for way, select in zip(WAYS, (histogram, all_gather, all_reduce)):
            seconds = []
            for _ in range(args.repeats):
                dist.barrier()
                tick = time.perf_counter()
                masks, sent, calls = select()
                seconds.append(time.perf_counter() - tick)
            exact = all(torch.equal(m, expected[str(i)][a:b])
                        for i, (m, (a, b)) in enumerate(zip(masks, bounds)))
            flags = torch.tensor([int(exact)])
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
            result[(kind, way)] = {"seconds": statistics.median(seconds), "bytes": sent,
                                   "calls": calls, "exact": bool(flags.item())}
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
    rows = []
    for kind in KINDS:
        base = result[(kind, "histogram")]
        for way in WAYS:
            r = result[(kind, way)]
            rows.append([kind, way, f"{r['bytes']:,}", f"{r['bytes'] / base['bytes']:,.0f}",
                         r["calls"], f"{r['seconds'] * 1e3:,.0f}",
                         f"{r['seconds'] / base['seconds']:.2f}", "yes" if r["exact"] else "NO"])
    table = markdown_table(
        ["scores", "selection", "bytes handed to collectives per rank", "bytes vs histogram",
         "collective calls", "median ms per selection (rank 0)", "time vs histogram",
         "equals single-process global_topk"], rows)
    body = (f"{table}\n\nResNet-50: {result['layers']} weight layers, {result['numel']:,} scores, "
            f"k = {result['k']:,} kept.\n")
    print(body)
    settings = (f"{WORLD} ranks, gloo on one machine, float32 scores, density {args.density}, "
                f"{args.repeats} timed selections per way")
    if args.no_record:
        return 0
    info = run_info(before, settings, {"wall time of the benchmark": f"{wall:.0f} s"})
    append_results("sharded_topk.py: global top-k over ZeRO-3 shards, ResNet-50 shapes", info, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
