"""The pieces layout (ZeRO-3) against the full layout on 2 gloo ranks: every selection, count,
method update and MaskSet report, concatenated over the ranks in rank order, equals the full result;
mask updates count nothing they made (no count all-reduce).

Layer sizes are odd (not divisible by the world size) and one layer has a single element (rank 1's
piece is empty); scores are heavily tied. Each rank records mismatches instead of raising, so a
failed check never leaves the other rank waiting in a collective.
"""
from __future__ import annotations

import os
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distsparse.config import load_config
from distsparse.methods import METHODS as REGISTRY
from distsparse.methods import TrainingSchedule, build_method
from distsparse.sparsity.layout import FullLayout, PieceLayout
from distsparse.sparsity.masks import MaskSet
from distsparse.sparsity.select import drop_and_grow, global_topk_masks, topk_mask
from tests.conftest import HiddenSyncs, free_port

WORLD = 2
SHAPES = {"conv": (3, 5, 3, 3), "one": (1, 1), "fc": (7, 13), "odd": (3,)}
VARIANTS = {"gmp": [["method.prune_scope=global"], ["method.prune_scope=layer"]],
            "granet_st": [["method.growth=gradient"], ["method.growth=random"]]}
"""Methods whose updates take other paths by option: each path runs on pieces."""
METHOD_OPTIONS = ["method.sparsity=0.8", "method.update_interval=4", "method.prune_end=0.5"]
SCHEDULE = TrainingSchedule(total_steps=100, steps_per_epoch=10)


def _updates_masks(name: str) -> bool:
    config = load_config(None, [f"method.name={name}", *METHOD_OPTIONS])
    method = build_method(config.method, SCHEDULE, seed=3)
    return method.uses_masks and method.is_update_step(20)


METHODS = {f"{name}{''.join('-' + o.split('=')[1] for o in options)}": [f"method.name={name}", *options]
           for name in sorted(REGISTRY) if _updates_masks(name)
           for options in VARIANTS.get(name, [[]])}
"""Every registered method that changes masks during training (taken from the registry, so a new
method runs here too): its update on pieces must equal the full-tensor update."""


def _tied(seed: int, levels: int = 4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randint(-levels, levels + 1, shape, generator=gen).float() / levels
            for name, shape in SHAPES.items()}


def _masks(seed: int, density: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    masks = {name: torch.rand(shape, generator=gen) < density for name, shape in SHAPES.items()}
    masks["one"][:] = True
    return masks


def _gather(layout: PieceLayout, pieces: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return layout.full_masks(pieces)


def _check(label: str, got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
           errors: list[str]) -> None:
    if set(got) != set(expected):
        errors.append(f"{label}: layers {sorted(got)} instead of {sorted(expected)}")
        return
    for name in expected:
        if not torch.equal(got[name], expected[name]):
            errors.append(f"{label}: {name} differs")


def _selections(full: FullLayout, pieces: PieceLayout, errors: list[str]) -> None:
    scores, masks = _tied(1), _masks(2, 0.6)
    sliced = {name: pieces.piece(name, value) for name, value in scores.items()}
    sliced_masks = {name: pieces.piece(name, mask) for name, mask in masks.items()}
    if pieces.active_counts(sliced_masks) != full.active_counts(masks):
        errors.append("active counts differ")
    numels = {name: full.numel(name) for name in SHAPES}
    eligible_counts = full.active_counts(masks)
    for label, ks in {"k=0": dict.fromkeys(SHAPES, 0), "k=all": numels,
                      "half": {n: c // 2 for n, c in numels.items()}}.items():
        _check(f"per-layer {label}", _gather(pieces, pieces.topk_per_layer(sliced, ks)),
               full.topk_per_layer(scores, ks), errors)
    eligible_ks = {name: (count + 1) // 2 for name, count in eligible_counts.items()}
    _check("per-layer eligible",
           _gather(pieces, pieces.topk_per_layer(sliced, eligible_ks, sliced_masks)),
           full.topk_per_layer(scores, eligible_ks, masks), errors)
    total = sum(numels.values())
    for k in (0, 1, total // 3, total):
        _check(f"global k={k}", _gather(pieces, pieces.global_topk(sliced, k)),
               full.global_topk(scores, k), errors)
    counts = {name: count // 3 for name, count in eligible_counts.items()}
    grow = _tied(3, levels=1)
    _check("drop and grow",
           _gather(pieces, pieces.drop_and_grow(sliced_masks, sliced,
                                                {n: pieces.piece(n, g) for n, g in grow.items()},
                                                counts)),
           full.drop_and_grow(masks, scores, grow, counts), errors)
    randoms = pieces.random_scores(5, 7, "grow", list(SHAPES))
    for name, expected in full.random_scores(5, 7, "grow", list(SHAPES)).items():
        parts = [torch.empty(0, dtype=torch.int64)] * WORLD
        dist.all_gather_object(parts, randoms[name])
        if not torch.equal(torch.cat(parts), expected.reshape(-1)):
            errors.append(f"random scores of {name} differ")


def _methods(full: FullLayout, pieces: PieceLayout, errors: list[str]) -> None:
    weights, grads, masks = _tied(11), _tied(12, levels=2), _masks(13, 0.7)
    for label, overrides in METHODS.items():
        config = load_config(None, [*overrides, *METHOD_OPTIONS])
        reference = build_method(config.method, SCHEDULE, seed=3)
        reference.layout = full
        sharded = build_method(config.method, SCHEDULE, seed=3)
        sharded.layout = pieces
        expected = reference.update(20, masks, weights, grads)
        got = sharded.update(20, {n: pieces.piece(n, m) for n, m in masks.items()},
                             {n: pieces.piece(n, w) for n, w in weights.items()},
                             {n: pieces.piece(n, g) for n, g in grads.items()})
        if not expected:
            errors.append(f"{label}: the update changed nothing (nothing was shown)")
        _check(label, _gather(pieces, got), expected, errors)


def _mask_set(full: FullLayout, pieces: PieceLayout, errors: list[str]) -> None:
    masks = _masks(31, 0.4)
    whole = MaskSet({name: torch.zeros(shape) for name, shape in SHAPES.items()})
    whole.update(masks)
    sharded = MaskSet({name: torch.zeros(shape) for name, shape in SHAPES.items()})
    sharded.update(masks)
    sharded.use_layout(pieces)
    if not sharded.sharded or sharded.masks["fc"].numel() == full.numel("fc"):
        errors.append("the MaskSet does not hold pieces")
    for what in ("fingerprint", "layer_density", "density", "active_counts", "shapes"):
        if getattr(sharded, what)() != getattr(whole, what)():
            errors.append(f"MaskSet.{what} differs between pieces and full masks")
    _check("MaskSet.state_dict", sharded.state_dict(), whole.state_dict(), errors)
    sharded.load_state_dict(_masks(32, 0.5))
    _check("MaskSet.load_state_dict", sharded.full_masks(), _masks(32, 0.5), errors)


def _counts_remembered(full: FullLayout, pieces: PieceLayout, errors: list[str]) -> None:
    """Updates through a MaskSet count nothing again: the counts of masks the layout made are known
    (no count all-reduce after the first), and every report still equals the full masks'."""
    weights, grads = _tied(41), _tied(42, levels=2)
    piece_weights = {n: pieces.piece(n, w) for n, w in weights.items()}
    piece_grads = {n: pieces.piece(n, g) for n, g in grads.items()}
    for name in ("rigl", "set"):
        config = load_config(None, [f"method.name={name}", *METHOD_OPTIONS])
        whole = MaskSet({n: torch.zeros(shape) for n, shape in SHAPES.items()})
        whole.update(_masks(43, 0.5))
        sharded = MaskSet({n: torch.zeros(shape) for n, shape in SHAPES.items()})
        sharded.update(_masks(43, 0.5))
        sharded.use_layout(pieces)
        counted = []
        pieces._count = lambda masks, count=PieceLayout._count: counted.append(sorted(masks)) \
            or count(pieces, masks)
        for mask_set, layout, w, g in ((whole, full, weights, grads),
                                       (sharded, pieces, piece_weights, piece_grads)):
            method = build_method(config.method, SCHEDULE, seed=3)
            method.layout = layout
            for step in (4, 8, 12):
                mask_set.update(method.update(step, mask_set.masks, w, g))
        del pieces._count
        if counted:
            errors.append(f"{name}: counts all-reduced again after use_layout: {counted}")
        if sharded.active_counts() != whole.active_counts() or sharded.density() != whole.density():
            errors.append(f"{name}: remembered counts differ from the full masks' counts")
        _check(f"{name} after three updates", sharded.full_masks(), whole.masks, errors)


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    torch.set_num_threads(1)

    def all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(tensor) for _ in range(WORLD)]
        dist.all_gather(parts, tensor)
        return parts

    errors: list[str] = []
    try:
        full = FullLayout(SHAPES)
        pieces = PieceLayout(SHAPES, rank, WORLD, dist.all_reduce, all_gather)
        if pieces.piece("one", torch.ones(1, 1)).numel() != (1 - rank):
            errors.append("the one-element layer is not empty on rank 1")
        _selections(full, pieces, errors)
        _methods(full, pieces, errors)
        _mask_set(full, pieces, errors)
        _counts_remembered(full, pieces, errors)
    except Exception:  # noqa: BLE001 - recorded for the test to report
        errors.append(traceback.format_exc())
    torch.save(errors, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()



@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)
def test_pieces_equal_full_tensors_on_two_gloo_ranks(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    errors = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]
    assert errors == [[], []], "\n".join(errors[0][:20] + errors[1][:5])


def test_the_method_table_is_every_method_that_updates_masks():
    assert {label.split("-")[0] for label in METHODS} == {"gmp", "granet", "granet_st", "rigl", "set"}


def test_full_layout_is_select_py():
    layout = FullLayout(SHAPES)
    scores, grow, masks = _tied(21), _tied(23), _masks(22, 0.5)
    ks = {name: int(mask.sum()) // 2 for name, mask in masks.items()}
    per_layer = layout.topk_per_layer(scores, ks, masks)
    for name, k in ks.items():
        assert torch.equal(per_layer[name], topk_mask(scores[name], k, masks[name]))
    expected = global_topk_masks(scores, 20, masks)
    _check("global", layout.global_topk(scores, 20, masks), expected, errors := [])
    counts = {"conv": 3, "one": 0, "fc": 5, "odd": 1}
    swapped = layout.drop_and_grow(masks, scores, grow, counts)
    _check("drop and grow", swapped,
           {name: drop_and_grow(masks[name], scores[name], grow[name], counts[name])[0]
            for name in ("conv", "fc", "odd")}, errors)
    assert errors == []


@pytest.mark.parametrize("layers", [6, 24])
def test_a_drop_and_grow_on_pieces_waits_for_the_device_at_most_once_per_call(layers):
    """RigL's update on one rank's pieces (drop by |w| with the grow's estimates, grow with the
    drop's last round and ties): no layer-by-layer wait for the device (nonzero, boolean-mask
    indexing, item), so at most one per all-reduce whatever the number of layers; the masks are
    the full tensors'."""
    g = torch.Generator().manual_seed(layers)
    shapes = {f"l{i}": (40 + i, 30) for i in range(layers)}
    calls = []
    pieces = PieceLayout(shapes, 0, 1, lambda tensor: calls.append(tensor.numel()) or tensor,
                         lambda tensor: [tensor])
    masks = {n: (torch.rand(s, generator=g) < 0.2).reshape(-1) for n, s in shapes.items()}
    drop = {n: torch.randn(s, generator=g).abs().reshape(-1) for n, s in shapes.items()}
    grow = {n: (torch.randint(0, 4, s, generator=g) / 4).reshape(-1) for n, s in shapes.items()}
    counts = {n: int(m.sum()) // 3 for n, m in masks.items()}
    pieces.active_counts(masks)
    calls.clear()
    with HiddenSyncs() as hidden:
        new = pieces.drop_and_grow(masks, drop, grow, counts)
    assert len(hidden.ops) <= len(calls) <= 8
    full = FullLayout({n: (m.numel(),) for n, m in masks.items()}).drop_and_grow(
        masks, drop, grow, counts)
    assert all(torch.equal(new[n], full[n]) for n in shapes)
