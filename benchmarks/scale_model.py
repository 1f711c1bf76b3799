"""Communication cost of sparse training from 8 to 1024 GPUs: measured terms, modelled scale.

Part 1 (measured): two processes, each a gloo device bound to its own loopback address
(127.0.0.1 and 127.0.0.2, the simulated nodes), time all-reduce and all-gather of float32
tensors from 4 B to 100 MB. Fitted to the ring forms at p = 2 (Thakur, Rabenseifner & Gropp,
"Optimization of collective communication operations in MPICH", 2005):
all-reduce 2(p-1)a + 2(p-1)/p n b = 2a + n b, all-gather (n bytes a rank) (p-1)a + (p-1) n b.

Part 2 (modelled): per step and per mask update, for ResNet-50 and GPT-2 XL (1.5 B) at 8-1024
GPUs on 100/200/400 Gb/s, with NCCL's own cost model: latencies and protocol factors of
NVIDIA/nccl src/graph/tuning.cc (commit b647562; network hop, ring LL/Simple 2.7/14 us, tree
LL/Simple 5/28 us; base 6.6/8.4 and 6.8/0 us), time = latency + bytes / algorithm bandwidth,
the fastest of ring and tree, LL and Simple, as NCCL's tuner picks. One GPU per network hop
(every step crosses a NIC of the stated bandwidth: no NVLink shortcut). The mask-update terms
come from distsparse's own code: `PieceLayout.drop_and_grow` (RigL's update on FSDP2/ZeRO-3
pieces) runs on the real layer shapes with a recording all-reduce, selecting as on a GPU (a
launch-bound device: hinted), giving its calls and bytes;
each grow selection starts from the ranks' estimates of its thresholds, carried by the drop's
first round (emulated: each layer split into as many pieces as the GPUs would hold, at most as
many as leave a piece its full-size size at 1024 GPUs), and the drop and the grow of the next
update also from the thresholds of the first (`sharded_topk`'s hints), its scores a new draw
with each layer's scale moved by up to `--drift-binades`;
the sparse-gradient hook's bytes are the active entries of ERK masks plus every unmasked
parameter (what `distributed/comm_hook.py` packs). Compared: the dense gradient all-reduce, the
hook, the sharded select, and all-reducing (rigl-torch, sparsimony) or all-gathering the drop
and grow scores of every masked weight.
Run: python benchmarks/scale_model.py
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from record import REPO, append_results, load_average, markdown_table, run_info

ADDRESSES = ("127.0.0.1", "127.0.0.2")
SIZES = [4, 64, 1 << 10, 16 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 100 << 20]
WORLDS = (8, 64, 256, 1024)
LINKS_GBPS = (100, 200, 400)
DENSITY = 0.1
DROP_FRACTION = 0.3
GPT2_XL = {"n_layer": 48, "n_embd": 1600, "n_head": 25}
FIGURE = REPO / "benchmarks" / "scale_model.png"

# NVIDIA/nccl src/graph/tuning.cc (b647562): base latency and network hop latency, in us,
# for (algorithm, protocol); bandwidth factor on the link's bus bandwidth.
NCCL = {("ring", "LL"): (6.6, 2.7, 1 / 4), ("ring", "Simple"): (8.4, 14.0, 1.0),
        ("tree", "LL"): (6.8, 5.0, 0.92 / 3.8), ("tree", "Simple"): (0.0, 28.0, 0.92)}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per size (median)")
    parser.add_argument("--gpt-scale", type=int, default=16,
                        help="GPT-2 XL's select runs on all 192 layers at 1/N of their size")
    parser.add_argument("--drift-binades", type=float, default=0.5,
                        help="the next update's scores: each layer's scaled by 2^u, |u| <= this")
    parser.add_argument("--no-record", action="store_true", help="print only, no RESULTS.md entry")
    return parser.parse_args(argv)


def _socket_addresses() -> set[str]:
    """Local IPv4 addresses of this process's TCP sockets (from /proc: fd inodes -> net/tcp)."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for line in Path("/proc/self/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[9] in inodes:
            address = int(fields[1].split(":")[0], 16)
            found.add(".".join(str(address >> shift & 255) for shift in (0, 8, 16, 24)))
    return found


def _timing_worker(rank: int, port: int, repeats: int, queue) -> None:
    """One simulated node: a gloo group whose device is bound to this node's address."""
    import torch.distributed as dist

    store = dist.TCPStore(ADDRESSES[0], port, 2, is_master=rank == 0)
    options = dist.ProcessGroupGloo._Options()
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=ADDRESSES[rank])]
    group = dist.ProcessGroupGloo(store, rank, 2, options)
    group.barrier().wait()  # connects the pairs
    times: dict[str, list[float]] = {"all_reduce": [], "all_gather": []}
    sockets = sorted(_socket_addresses())
    for size in SIZES:
        tensor = torch.ones(size // 4)
        gathered = [torch.empty_like(tensor) for _ in range(2)]
        calls = {"all_reduce": lambda: group.allreduce([tensor]).wait(),
                 "all_gather": lambda: group.allgather([gathered], [tensor]).wait()}
        for name, call in calls.items():
            call()  # warm-up
            samples = []
            for _ in range(repeats if size >= 1 << 20 else 8 * repeats):
                group.barrier().wait()
                start = time.perf_counter()
                call()
                samples.append(time.perf_counter() - start)
            times[name].append(statistics.median(samples))
    queue.put((rank, times, sockets))
    group.barrier().wait()


def fit(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least squares of t = a + b n, relative to each time (small messages weigh as much)."""
    import numpy as np

    n, t = np.asarray(sizes, dtype=float), np.asarray(seconds)
    design = np.stack([np.ones_like(n), n], 1) / t[:, None]
    (a, b), *_ = np.linalg.lstsq(design, np.ones_like(t), rcond=None)
    return float(a), float(b)


def nccl_time_us(kind: str, nbytes: float, world: int, gbps: float) -> float:
    """Fastest algorithm/protocol time of one collective in NCCL's model, one GPU per hop.

    all_reduce: nbytes per rank; all_gather: nbytes of the gathered result (ring only).
    """
    link = gbps * 125.0  # bytes per us
    best = math.inf
    for (algorithm, protocol), (base, hop, factor) in NCCL.items():
        if kind == "all_gather" and algorithm == "tree":
            continue
        if kind == "all_gather":
            latency, moved = base + (world - 1) * hop, nbytes * (world - 1) / world
        elif algorithm == "ring":
            latency, moved = base + 2 * (world - 1) * hop, nbytes * 2 * (world - 1) / world
        else:
            latency, moved = base + 2 * math.log2(world) * hop, 2 * nbytes
        best = min(best, latency + moved / (link * factor))
    return best


def _gpt2_xl() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        return GPT2LMHeadModel(GPT2Config(**GPT2_XL))


def _resnet50() -> torch.nn.Module:
    from distsparse.models import build_model

    with torch.device("meta"):
        return build_model("resnet50", 1000, 3)


def model_terms(model: torch.nn.Module) -> dict:
    """Parameter counts and ERK densities at DENSITY over distsparse's default masked weights."""
    from distsparse.sparsity.allocation import active_count, layer_densities
    from distsparse.sparsity.masks import sparsifiable_parameters

    masked = sparsifiable_parameters(model)
    shapes = {name: tuple(p.shape) for name, p in masked.items()}
    densities = layer_densities("erk", shapes, DENSITY)
    total = sum(p.numel() for p in model.parameters())
    masked_numel = sum(p.numel() for p in masked.values())
    active = {name: active_count(math.prod(shape), densities[name]) for name, shape in shapes.items()}
    return {"shapes": shapes, "active": active, "total": total, "masked": masked_numel,
            "hook_entries": sum(active.values()) + total - masked_numel}


UPDATES = ("first", "next")
"""A run's first mask update (no thresholds to start from: its drop expected at its first step,
`PieceLayout.expect_drop`) and the next one."""


def measure_select(shapes: dict[str, tuple[int, ...]], active: dict[str, int],
                   drift_binades: float, estimate_ranks: int, scale: int = 1) -> dict:
    """RigL's drop-and-grow on pieces (world size 1: the histograms and rounds are global),
    |N(0, 1)| scores, with the active counts known as in training (the previous update made the
    masks), twice on one layout: the first update of a run, its drop expected at its first step from
    scores drifted as between updates ("setup": that call), and the next one, its scores a new
    draw scaled per layer by 2^u, u uniform in [-drift_binades, drift_binades] (each drop starts
    from the thresholds the first found); and the first update without the setup ("cold", on a
    layout of its own). The grow's threshold estimates are those
    `estimate_ranks` ranks would agree on (`emulated_estimates`). Layers at 1/`scale` of their
    size: a later round's counts take the bytes the full size's candidates (`scale` times these)
    would (`sharded_select._cell_bytes`). The bytes of each all-reduce call of each: one rank's
    at any number of ranks (nothing in a call grows with them)."""
    import distsparse.sparsity.layout as layout_module
    import distsparse.sparsity.sharded_select as select_rounds
    from distsparse.sparsity import select as select_module
    from distsparse.sparsity.layout import PieceLayout

    calls: list[int] = []

    def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
        calls.append(tensor.numel() * tensor.element_size())
        return tensor

    layout = PieceLayout(shapes, 0, 1, all_reduce_sum, lambda tensor: [tensor])
    generator = torch.Generator().manual_seed(0)

    def scores(scale: dict[str, float]) -> dict[str, torch.Tensor]:
        return {name: torch.randn(math.prod(shape), generator=generator).abs_().mul_(scale[name])
                for name, shape in shapes.items()}

    masks = {}
    for name, shape in shapes.items():
        order = torch.randperm(math.prod(shape), generator=generator)
        masks[name] = torch.zeros(math.prod(shape), dtype=torch.bool)
        masks[name][order[: active[name]]] = True
    counts = {name: int(DROP_FRACTION * active[name]) for name in shapes}
    known = layout.active_counts(masks)
    result, seconds = {}, 0.0
    estimates = layout_module.threshold_estimates
    layout_module.threshold_estimates = emulated_estimates(estimate_ranks)
    devices = select_module.LAUNCH_BOUND_DEVICES
    select_module.LAUNCH_BOUND_DEVICES = (*devices, "cpu")  # selections as on a GPU: hinted
    cell_bytes = select_rounds._cell_bytes
    select_rounds._cell_bytes = lambda most: cell_bytes(most * scale)

    def drift() -> dict[str, float]:
        return {name: 2 ** (drift_binades * (2 * torch.rand((), generator=generator).item() - 1))
                for name in shapes}

    def update(on: PieceLayout, drop: dict[str, torch.Tensor],
               grow: dict[str, torch.Tensor]) -> tuple[list[int], dict[str, torch.Tensor]]:
        nonlocal seconds
        calls.clear()
        start = time.perf_counter()
        new = on.drop_and_grow(masks, drop, grow, counts, known)
        seconds += time.perf_counter() - start
        return list(calls), new

    try:
        drop, grow = scores(dict.fromkeys(shapes, 1.0)), scores(dict.fromkeys(shapes, 1.0))
        cold = PieceLayout(shapes, 0, 1, all_reduce_sum, lambda tensor: [tensor])
        result["cold"], _ = update(cold, drop, grow)
        calls.clear()
        layout.expect_drop(scores(drift()), masks, 1 - DROP_FRACTION)
        result["setup"] = list(calls)
        result["first"], new = update(layout, drop, grow)
        masks.update(new)
        moved = drift()
        result["next"], _ = update(layout, scores(moved), scores(moved))
    finally:
        layout_module.threshold_estimates = estimates
        select_module.LAUNCH_BOUND_DEVICES = devices
        select_rounds._cell_bytes = cell_bytes
    result["seconds"] = seconds / 3
    return result


def emulated_estimates(ranks: int):
    """`threshold_estimates` for a layout of whole layers, as `ranks` ranks would sum them: each
    layer split into `ranks` ZeRO-3 pieces, each piece's estimates taken as its rank would."""
    from distsparse.sparsity.sharded_select import threshold_estimates, zero3_partition

    def estimates(scores, eligible, fractions, key_bits, world_size=1):
        total = 0
        for rank in range(ranks):
            pieces = [slice(*zero3_partition(layer.numel(), rank, ranks)) for layer in scores]
            total = total + threshold_estimates(
                [layer[piece] for layer, piece in zip(scores, pieces)],
                [allowed[piece] for allowed, piece in zip(eligible, pieces)], fractions, key_bits,
                ranks)
        return total

    return estimates


def full_size_ties(terms: dict) -> tuple[int, int, int]:
    """Layers whose RigL drop, and whose grow, tie at their threshold when drawn at full size
    (|N(0, 1)| scores, one layer at a time; the scores are i.i.d., so the drop's candidates are
    `active` draws and the grow's the rest plus the dropped), and the most tied entries in one."""
    generator = torch.Generator().manual_seed(1)
    tied, most = [0, 0], 0
    for name, shape in terms["shapes"].items():
        numel, active = math.prod(shape), terms["active"][name]
        count = int(DROP_FRACTION * active)
        for which, (candidates, k) in enumerate(((active, active - count),
                                                 (numel - active + count, count))):
            if not 0 < k < candidates:
                continue
            scores = torch.randn(candidates, generator=generator).abs_()
            threshold = scores.kthvalue(candidates - k + 1).values
            above, at = int((scores > threshold).sum()), int((scores == threshold).sum())
            if above + at > k:
                tied[which] += 1
                most = max(most, at)
    return tied[0], tied[1], most


def tie_round_bytes(tied_layers: int, most_tied: int, largest: int) -> int:
    """Bytes of the round that breaks `tied_layers` layers' ties by index (`sharded_topk`): a
    row of 2^width counts a layer, each in the bytes `most_tied` candidates need, in whole int32
    words; the width as the select picks it."""
    from distsparse.sparsity.sharded_select import TIE_SPARE_BITS, _cell_bytes, round_bits

    if not tied_layers:
        return 0
    width = round_bits(tied_layers, (largest - 1).bit_length(), most_tied << TIE_SPARE_BITS)
    return -(-tied_layers * 2**width * _cell_bytes(most_tied) // 4) * 4


def _timings(repeats: int) -> tuple[dict[str, list[float]], dict[int, list[str]]]:
    """Rank 0's medians, and each rank's local socket addresses once its gloo pairs connected."""
    import multiprocessing
    import socket

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    with socket.socket() as probe:
        probe.bind((ADDRESSES[0], 0))
        port = probe.getsockname()[1]
    workers = [context.Process(target=_timing_worker, args=(rank, port, repeats, queue))
               for rank in range(2)]
    for worker in workers:
        worker.start()
    results = {rank: (times, sockets) for rank, times, sockets in
               (queue.get(timeout=1800) for _ in workers)}
    for worker in workers:
        worker.join()
    return results[0][0], {rank: sockets for rank, (_, sockets) in results.items()}


def select_ms(calls: list[int], world: int, gbps: int) -> float:
    """Modelled milliseconds of an update's select calls (bytes per rank each)."""
    return sum(nccl_time_us("all_reduce", size, world, gbps) for size in calls) / 1e3


def _table_rows(name: str, terms: dict, select: dict) -> list[list[str]]:
    dense = terms["total"] * 4
    hook = terms["hook_entries"] * 4
    scores = 2 * terms["masked"] * 4  # drop and grow scores, float32
    rows = []
    for world in WORLDS:
        for gbps in LINKS_GBPS:
            calls = select[world]
            selects = [cell for update in UPDATES for cell in (
                f"{len(calls[update])} / {sum(calls[update]) / 1e3:.1f}",
                f"{select_ms(calls[update], world, gbps):.3f}")]
            rows.append([
                name, world, gbps,
                f"{nccl_time_us('all_reduce', dense, world, gbps) / 1e3:.2f}",
                f"{nccl_time_us('all_reduce', hook, world, gbps) / 1e3:.2f}",
                f"{hook / dense:.4f}", *selects,
                f"{nccl_time_us('all_reduce', scores, world, gbps) / 1e3:.1f}",
                f"{nccl_time_us('all_gather', scores, world, gbps) / 1e3:.1f}",
            ])
    return rows


def _plot(times: dict, fits: dict, models: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind, marker in (("all_reduce", "o"), ("all_gather", "s")):
        a, b = fits[kind]
        left.loglog(SIZES, [t * 1e6 for t in times[kind]], marker, label=f"{kind} measured")
        left.loglog(SIZES, [(a + b * n) * 1e6 for n in SIZES], "-", label=f"{kind} a + b n")
    left.set(xlabel="bytes per rank", ylabel="us", title="gloo, 127.0.0.1 <-> 127.0.0.2")
    left.legend()
    for name, (terms, select) in models.items():
        for update, style in zip(UPDATES, ("o-", "o:")):
            right.semilogy(WORLDS, [select_ms(select[w][update], w, 100) for w in WORLDS], style,
                           label=f"{name}: sharded select, {update} update")
        right.semilogy(WORLDS, [nccl_time_us("all_reduce", 8 * terms["masked"], w, 100) / 1e3
                                for w in WORLDS], "s--", label=f"{name}: all-reduce scores")
    right.axhline(1.0, color="grey", linewidth=0.8)
    right.set_xscale("log", base=2)
    right.set(xlabel="GPUs", ylabel="ms per mask update", title="NCCL model, 100 Gb/s")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(FIGURE, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    load_before, started = load_average(), time.perf_counter()
    times, sockets = _timings(args.repeats)
    fits = {kind: fit(SIZES, times[kind]) for kind in times}
    residual = {kind: max(zip((abs(t / (fits[kind][0] + fits[kind][1] * n) - 1)
                               for n, t in zip(SIZES, times[kind])), SIZES)) for kind in times}
    alpha = {"all_reduce": fits["all_reduce"][0] / 2, "all_gather": fits["all_gather"][0]}
    beta = {kind: fits[kind][1] for kind in fits}
    measured_rows = [[f"{n:,}", f"{times['all_reduce'][i] * 1e6:.0f}",
                      f"{(fits['all_reduce'][0] + fits['all_reduce'][1] * n) * 1e6:.0f}",
                      f"{times['all_gather'][i] * 1e6:.0f}",
                      f"{(fits['all_gather'][0] + fits['all_gather'][1] * n) * 1e6:.0f}"]
                     for i, n in enumerate(SIZES)]
    measured = markdown_table(["bytes per rank", "all-reduce us", "fit", "all-gather us", "fit"],
                              measured_rows)
    stated = "; ".join(f"{kind}: alpha {alpha[kind] * 1e6:.1f} us, 1/beta "
                       f"{1 / beta[kind] / 1e9:.2f} GB/s (fit off by at most "
                       f"{residual[kind][0]:.0%}, at {residual[kind][1]:,} B)" for kind in fits)
    bound = ", ".join(f"rank {rank}: {' '.join(found)}" for rank, found in sockets.items())

    models, estimate_ranks = {}, {}
    for name, build, scale in (("ResNet-50", _resnet50, 1), ("GPT-2 XL", _gpt2_xl, args.gpt_scale)):
        terms = model_terms(build())
        shapes = {layer: (max(1, math.prod(shape) // scale),) for layer, shape in terms["shapes"].items()}
        active = {layer: max(1, terms["active"][layer] // scale) for layer in shapes}
        # At 1/scale of the size, ranks' pieces as large as at full size on 1024 GPUs: at most
        # 1024 / scale ranks (fewer estimates in the mean: a wider bracket than 1024 GPUs').
        estimate_ranks[name] = {world: min(world, max(1, WORLDS[-1] // scale)) for world in WORLDS}
        measured_at = {ranks: measure_select(shapes, active, args.drift_binades, ranks, scale)
                       for ranks in sorted(set(estimate_ranks[name].values()))}
        models[name] = (terms, {world: measured_at[ranks]
                                for world, ranks in estimate_ranks[name].items()})
    gpt = models["GPT-2 XL"][0]
    drop_tied, grow_tied, most_tied = full_size_ties(gpt)

    rows = [row for name, (terms, select) in models.items() for row in _table_rows(name, terms, select)]
    headers = ["model", "GPUs", "Gb/s", "dense grad all-reduce ms/step", "sparse hook ms/step",
               "hook / dense bytes", "select calls / kB, first update", "select ms, first update",
               "select calls / kB, next update", "select ms, next update",
               "all-reduce scores ms/update", "all-gather scores ms/update"]
    table = markdown_table(headers, rows)
    _plot(times, fits, models)

    goals = []
    for name, (terms, select) in models.items():
        updates = []
        for update in UPDATES:
            fewest, most = select[WORLDS[0]][update], select[WORLDS[-1]][update]
            smallest, largest = sum(fewest), sum(most)
            worst = select_ms(most, 1024, 100)
            differs = ("; they differ only as the ranks' estimates do, around which the grow's "
                       "first round counts (in a finer window too where they agree closely: a "
                       "round fewer)" if fewest != most else "")
            updates.append(
                f"{update} update: {len(fewest)} all-reduces of {smallest / 1e3:.1f} kB a rank at "
                f"{WORLDS[0]} GPUs and {len(most)} of {largest / 1e3:.1f} kB at 1024{differs}; "
                f"< 1 ms at 1024 GPUs on 100 Gb/s {'yes' if worst < 1 else 'no'} "
                f"({worst:.2f} ms)")
        ranks = estimate_ranks[name]
        at_scale = select[WORLDS[-1]]
        updates[0] += (
            f" (each grow starts from the estimates of its thresholds that its drop's first round "
            f"carries, here as " + ", ".join(f"{ranks[world]} ranks" for world in WORLDS)
            + f" would agree on them at {', '.join(map(str, WORLDS))} GPUs; the drop from the "
            f"ranks' estimates of its thresholds taken at the run's first step from weights that moved since as "
            f"between updates: one all-reduce of {sum(at_scale['setup']) / 1e3:.1f} kB then, "
            f"once a run; cold, without it: {len(at_scale['cold'])} all-reduces of "
            f"{sum(at_scale['cold']) / 1e3:.1f} kB, {select_ms(at_scale['cold'], 1024, 100):.2f} "
            f"ms at 1024 GPUs on 100 Gb/s)")
        if name == "GPT-2 XL":
            drop_round, grow_round = (
                tie_round_bytes(tied, most_tied, max(map(math.prod, terms["shapes"].values())))
                for tied in (drop_tied, grow_tied))
            added = nccl_time_us("all_reduce", 50_000 + drop_round, 1024, 100) - \
                nccl_time_us("all_reduce", 50_000, 1024, 100)
            updates[-1] += (
                f". Ties at full size (each layer's drop and grow scores drawn whole, "
                f"|N(0, 1)|, one draw): the drop ties in {drop_tied} and the grow in {grow_tied} "
                f"of the {len(terms['shapes'])} layers, at most {most_tied} tied entries in one. "
                f"Ties break in rounds over the tied entries' indices: the drop's round "
                f"({drop_round / 1e3:.1f} kB) goes with the grow's first round, adding "
                f"{added:.0f} us to a 50 kB call at 1024 GPUs; the grow's is a call of "
                f"{grow_round / 1e3:.1f} kB, {nccl_time_us('all_reduce', grow_round, 1024, 100):.0f}"
                f" us there, at any number of GPUs the same bytes")
        ratio = terms["hook_entries"] / terms["total"]
        unmasked = terms["total"] - terms["masked"]
        goals.append(
            f"- {name}: {terms['total']:,} parameters, {terms['masked']:,} masked "
            f"({len(terms['shapes'])} layers), ERK density {DENSITY}. Mask-update traffic, "
            + "; ".join(updates) + f"; flat in the GPUs: no call holds a term that grows with "
            f"them (ties break in rounds over the tied entries' indices, not in a table of ranks; "
            f"tests/test_sharded_select.py pins a selection's bytes equal on 1 to 8 ranks) "
            f"(latency-bound: a round costs "
            f"{nccl_time_us('all_reduce', 8, 1024, 100):.0f} us at 1024 GPUs). Hook bytes / dense = "
            f"{ratio:.4f}, the model's density by construction (the hook sends the active "
            f"weights' entries and the {unmasked:,} unmasked parameters whole, no indices; "
            f"tests/test_comm_hook.py pins those bytes at the all_reduce call); against the "
            f"masked weights' density {DENSITY} +- 0.02: "
            f"{'yes' if abs(ratio - DENSITY) <= 0.02 else 'no'}; the same ratio at every size "
            f"(both payloads are per rank). A growth step (RigL: one in update_interval) "
            f"sends the dense gradient. An update's select ran "
            f"{select[WORLDS[-1]]['seconds']:.1f} s on this CPU.")
    wall = time.perf_counter() - started
    notes = (
        f"Measured (gloo, 2 processes bound to 127.0.0.1 / 127.0.0.2; local addresses of each "
        f"process's TCP sockets: {bound}): {stated}.\n\n"
        f"{measured}\n\n{table}\n\n" + "\n".join(goals) + "\n\n"
        "Where the model departs from what was measured: the loopback 'network' is a memory copy "
        "in one kernel on 2 shared cores, so the measured alpha and 1/beta describe this CPU, not "
        "a NIC, and the largest residual of the linear form is stated above; the table uses "
        "NCCL's published latencies and the stated link rates instead and keeps only the "
        "measured form (a latency per call plus bytes over a rate). "
        "The model ignores NVLink inside a node (every hop crosses the network), LL128, "
        "congestion and the overlap of the gradient all-reduce with the backward pass; "
        f"GPT-2 XL's select ran on all its layers at 1/{args.gpt_scale} of their size (the same "
        "histogram rows, their later rounds' counts in the bytes the full size's candidates "
        f"({args.gpt_scale} times as many) would take; a round fewer may be needed than at full "
        "size, and fewer layers tie: their full-size ties are counted apart), its threshold "
        "estimates from as many ranks as "
        f"leave each a piece of the size it has at 1024 GPUs, at most {WORLDS[-1] // args.gpt_scale} "
        "(fewer estimates: a wider bracket, so a narrow window no more often than at full "
        "size).\n\n"
        f"![scale model]({FIGURE.name})\n")
    print(notes)
    if not args.no_record:
        settings = (f"sizes {SIZES[0]} B-{SIZES[-1] >> 20} MB, median of {args.repeats}; "
                    f"ERK density {DENSITY}, RigL drop fraction {DROP_FRACTION}, |N(0,1)| scores; "
                    f"NCCL tuning.cc b647562 latencies, one GPU per hop; GPT-2 XL select on "
                    f"all layers at 1/{args.gpt_scale} of their size; the next update's scores "
                    f"a new draw, each layer's scaled by 2^u, |u| <= {args.drift_binades}")
        info = run_info(load_before, settings, {"wall time of the benchmark": f"{wall:.0f} s"})
        append_results("scale_model.py: measured gloo alpha/beta, modelled cost to 1024 GPUs",
                       info, notes)
        print(f"appended to benchmarks/RESULTS.md; figure {FIGURE.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
