"""The sparse all-reduce DDP hook on 2 gloo processes: exact means, exact zeros, fewer bytes."""
from __future__ import annotations

import copy
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distsparse.distributed.comm_hook import register_sparse_allreduce
from distsparse.sparsity.masks import MaskSet, sparsifiable_parameters
from tests.conftest import free_port, leave_process_group

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)

WORLD = 2
DENSITY = 0.2
ITEM = torch.finfo(torch.float64).bits // 8  # bytes per gradient entry


def _random_masks(masks: MaskSet, seed: int) -> dict[str, torch.Tensor]:
    # Seeded the same on every rank: the hook relies on identical masks everywhere.
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.rand(p.shape, generator=gen) < DENSITY for name, p in masks.params.items()}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5)).double()
    masks = MaskSet(sparsifiable_parameters(model))
    masks.update(_random_masks(masks, seed=1))
    masks.apply()

    gen = torch.Generator().manual_seed(100 + rank)  # a different batch on each rank
    x = torch.randn(16, 20, generator=gen, dtype=torch.float64)
    y = torch.randn(16, 5, generator=gen, dtype=torch.float64)

    local = copy.deepcopy(model)
    nn.functional.mse_loss(local(x), y).backward()
    results: dict[str, object] = {
        "local": {name: p.grad.clone() for name, p in local.named_parameters()},
        "masks": masks.state_dict(),
    }

    # A tiny cap splits the model into buckets, some mixing masked and dense params. DDP honours a
    # sub-MiB cap only in its initial bucketing, which find_unused_parameters keeps for all steps.
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.002, find_unused_parameters=True)
    state = register_sparse_allreduce(ddp, masks)

    def step() -> dict[str, object]:
        ddp.zero_grad(set_to_none=True)
        state.reset_counters()
        nn.functional.mse_loss(ddp(x), y).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        return {"grads": grads, "bytes": state.bytes_sent, "calls": state.calls}

    results["sparse"] = step()
    state.dense = True
    results["dense"] = step()
    state.dense = False
    new_masks = _random_masks(masks, seed=2)
    new_masks["0.weight"] = torch.zeros_like(new_masks["0.weight"])  # an empty packed slice too
    masks.update(new_masks)
    results["updated"] = step()
    results["updated_masks"] = masks.state_dict()

    torch.save(results, Path(out) / f"rank{rank}.pt")
    ddp = state = None  # DDP's reducer holds the group
    leave_process_group()



@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """The results of both ranks from one 2-process run (spawned once for the whole file)."""
    out = tmp_path_factory.mktemp("comm_hook")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _dense_mean(ranks: list[dict]) -> dict[str, torch.Tensor]:
    local = [result["local"] for result in ranks]
    return {name: (local[0][name] + local[1][name]) / WORLD for name in local[0]}


def _assert_masked_mean(ranks: list[dict], mode: str, masks: dict[str, torch.Tensor]) -> None:
    mean = _dense_mean(ranks)
    for r, result in enumerate(ranks):
        assert result[mode]["grads"].keys() == mean.keys()
        for name, grad in result[mode]["grads"].items():
            # float64 and two terms: the DDP sum is order-independent, so equality is exact.
            expected = torch.where(masks[name], mean[name], 0.0) if name in masks else mean[name]
            assert torch.equal(grad, expected), f"rank {r}, {mode}, {name}"


def test_sparse_mode_sends_active_entries_and_leaves_exact_zeros(ranks):
    masks = ranks[0]["masks"]
    assert all(torch.equal(masks[n], ranks[1]["masks"][n]) for n in masks)
    assert set(masks) == {"0.weight", "2.weight"}
    _assert_masked_mean(ranks, "sparse", masks)
    for name, mask in masks.items():
        assert (ranks[0]["sparse"]["grads"][name][~mask] == 0).all()
        assert (ranks[0]["local"][name][~mask] != 0).any()  # the zeros come from the hook


def test_bytes_scale_with_density(ranks):
    masks = ranks[0]["masks"]
    numel = {name: g.numel() for name, g in ranks[0]["local"].items()}
    unmasked = sum(n for name, n in numel.items() if name not in masks)
    active = sum(int(m.sum()) for m in masks.values())
    for result in ranks:
        assert result["sparse"]["bytes"] == (active + unmasked) * ITEM
        assert result["dense"]["bytes"] == sum(numel.values()) * ITEM
        assert result["sparse"]["calls"] == result["dense"]["calls"] >= 2
    ratio = ranks[0]["sparse"]["bytes"] / ranks[0]["dense"]["bytes"]
    density = active / sum(numel[name] for name in masks)
    print(f"sparse/dense all-reduce bytes: {ratio:.3f} at weight density {density:.3f}")
    assert ratio < 0.3


def test_dense_mode_averages_every_entry(ranks):
    _assert_masked_mean(ranks, "dense", masks={})


def test_mask_update_applies_to_next_backward(ranks):
    masks = ranks[0]["updated_masks"]
    assert not torch.equal(masks["2.weight"], ranks[0]["masks"]["2.weight"])
    assert not masks["0.weight"].any()
    _assert_masked_mean(ranks, "updated", masks)
    active = sum(int(m.sum()) for m in masks.values())
    unmasked = sum(g.numel() for name, g in ranks[0]["local"].items() if name not in masks)
    assert ranks[0]["updated"]["bytes"] == (active + unmasked) * ITEM
