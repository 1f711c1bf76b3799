"""`distsparse.Sparsifier` handed a DeepSpeed engine the user built (ZeRO 1 and 3, 2 gloo ranks):
the user's loop is the plain one with engine.backward; masks equal one process's and every copy
(weight, fp32 master, optimizer state) holds exact zeros at masked-off positions."""
from __future__ import annotations

import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import distsparse
from tests.conftest import free_port

deepspeed = pytest.importorskip("deepspeed")

WORLD, STEPS, BATCH = 2, 16, 16
OPTIONS = {"method": "rigl", "sparsity": 0.8, "total_steps": STEPS, "update_interval": 4}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(),
                         nn.Linear(48, 10))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 32, generator=generator),
             torch.randint(0, 10, (BATCH,), generator=generator)) for _ in range(STEPS)]


def _one_process() -> tuple[str, dict[str, torch.Tensor]]:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = distsparse.Sparsifier(model, optimizer, **OPTIONS)
    for x, y in _batches():
        F.cross_entropy(model(x), y).backward()
        sparsifier.step()
        optimizer.zero_grad()
    return sparsifier.fingerprint(), model.state_dict()


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    results = {}
    try:
        deepspeed.init_distributed("gloo")
        for stage in (1, 3):
            model = _model()
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            config = {"train_batch_size": BATCH, "train_micro_batch_size_per_gpu": BATCH // WORLD,
                      "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                      "steps_per_print": 2**31 - 1}
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
            sparsifier = distsparse.Sparsifier(engine, **OPTIONS)
            zeros_everywhere = True
            for x, y in _batches():
                part = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
                engine.backward(F.cross_entropy(engine(x[part]), y[part]))
                sparsifier.step()  # engine.step (or its skip on RigL's update steps)
                zeros_everywhere &= _masked_off_copies_are_zero(engine, sparsifier, stage)
            state = {}
            for name, param in engine.module.named_parameters():
                with deepspeed.zero.GatheredParameters([param], enabled=stage == 3):
                    state[name] = param.detach().clone()
            results[stage] = {"fingerprint": sparsifier.fingerprint(), "state": state,
                              "zeros": zeros_everywhere, "sharded": sparsifier.mask_set.sharded}
    except Exception:  # reported: the other rank then fails on its collective
        results["error"] = traceback.format_exc()
    torch.save(results, Path(out) / f"rank{rank}.pt")


def _masked_off_copies_are_zero(engine, sparsifier, stage: int) -> bool:
    """The full weight, fp32 master and momentum of every masked layer (gathered to check)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    masks = sparsifier.mask_set.full_masks()  # a collective where masks are pieces
    ok = True
    for name, param in sparsifier.mask_set.params.items():
        off = ~masks[name]
        with deepspeed.zero.GatheredParameters([param], enabled=stage == 3):
            copies = [param.detach().clone()]
        copies.append(safe_get_full_fp32_param(param).reshape(off.shape))
        copies.append(safe_get_full_optimizer_state(param, "momentum_buffer").reshape(off.shape))
        ok &= all(int(torch.count_nonzero(copy[off])) == 0 for copy in copies)
    return ok


def test_a_users_deepspeed_engine_gets_the_masks_of_one_process(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert all("error" not in r for r in ranks), [r.get("error") for r in ranks]
    fingerprint, state = _one_process()
    for stage in (1, 3):
        for result in ranks:
            assert result[stage]["fingerprint"] == fingerprint, stage
            assert result[stage]["zeros"], stage
            assert result[stage]["sharded"] == (stage == 3)
            for name, value in state.items():
                # float32: DeepSpeed reduces gradients in another order than one process sums.
                torch.testing.assert_close(result[stage]["state"][name], value,
                                           rtol=1e-5, atol=1e-6)
