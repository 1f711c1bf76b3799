"""A hand-written loop with `distsparse.Sparsifier` and `distsparse train` on the same config give
the same masks and weights, for every registered method, on one process and on 2 DDP ranks
(float64: the DDP all-reduce of 2 terms is exact, so equality is bitwise), and for the methods
that change masks during training under DeepSpeed ZeRO-3 on 2 ranks (the user builds the engine;
both sides reduce in DeepSpeed's order, so equality is bitwise there too)."""
from __future__ import annotations

import dataclasses
import os
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import distsparse
from distsparse.config import Config, load_config
from distsparse.data.loader import build_data
from distsparse.engine.optim import build_lr_scheduler, build_optimizer
from distsparse.engine.trainer import Trainer
from distsparse.methods import METHODS
from distsparse.models import build_model
from tests.conftest import SMALL, free_port, leave_process_group

SPARSE_METHODS = sorted(set(METHODS) - {"dense"})
OVERRIDES = [*SMALL, "model.name=mlp", "train.dtype=float64"]


def _config(method: str, directory: Path, world: int = 1) -> Config:
    extra = ["backend.name=ddp", f"launcher.num_workers={world}"] if world > 1 else []
    return load_config(None, [*OVERRIDES, f"method.name={method}", f"run.dir={directory}", *extra])


def hand_written_loop(config: Config, rank: int = 0, world: int = 1,
                      wrap: Callable[[nn.Module, torch.optim.Optimizer], nn.Module] | None = None,
                      ) -> distsparse.Sparsifier:
    """What a user writes: their data, model, optimizer and loop, with a Sparsifier added.

    `wrap(model, optimizer)` is the user's distributed wrapper (DDP when `world` > 1 if none).
    """
    data = build_data(config, rank, world)
    dtype = getattr(torch, config.train.dtype)
    torch.manual_seed(config.seed)
    model = build_model(config.model.name, data.num_classes, data.in_channels).to(dtype)
    optimizer = build_optimizer(model, config.train)
    total = config.train.max_steps or config.train.epochs * len(data.train)
    scheduler = build_lr_scheduler(optimizer, total, len(data.train), config.train)
    if wrap is None:
        wrap = (lambda m, _: nn.parallel.DistributedDataParallel(m)) if world > 1 else (lambda m, _: m)
    wrapped = wrap(model, optimizer)
    engine = hasattr(wrapped, "backward")  # a DeepSpeed engine: its backward; its step zeroes
    options = {f.name: getattr(config.method, f.name) for f in dataclasses.fields(config.method)
               if f.name not in ("name", "sparsity") and getattr(config.method, f.name) is not None}

    def init_batches():
        for _, (x, y) in zip(range(config.method.pai_batches), data.train.batches(0)):
            yield x.to(dtype), y

    sparsifier = distsparse.Sparsifier(
        wrapped, optimizer, method=config.method.name, sparsity=config.method.sparsity,
        total_steps=total, seed=config.seed, sparse_gradients=world > 1 and not engine,
        init_batches=init_batches, global_batch=config.train.batch_size, **options)
    for epoch in range(config.train.epochs):
        for x, y in data.train.batches(epoch):
            loss = F.cross_entropy(wrapped(x.to(dtype)), y,
                                   label_smoothing=config.train.label_smoothing)
            if engine:
                wrapped.backward(loss)
            else:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            sparsifier.step()
            scheduler.step()
    return sparsifier


def _trained(config: Config) -> Trainer:
    trainer = Trainer(config)
    trainer.fit()
    return trainer


def _assert_equal(trainer: Trainer, sparsifier: distsparse.Sparsifier, label: str) -> None:
    assert sparsifier.fingerprint() == trainer.masks.fingerprint(), label
    assert sparsifier.step_count == trainer.step, label
    ours = {name: p.detach() for name, p in sparsifier.mask_set.params.items()}
    for name, param in trainer.masks.params.items():
        assert torch.equal(ours[name], param.detach()), (label, name)


@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_a_hand_written_loop_equals_distsparse_train(tmp_path, method):
    trainer = _trained(_config(method, tmp_path / "cli"))
    sparsifier = hand_written_loop(_config(method, tmp_path / "api"))
    _assert_equal(trainer, sparsifier, method)
    assert trainer.masks.density() < 1.0


WORLD = 2


def _ddp_worker(rank: int, port: int, root: str, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    failures = []
    for method in SPARSE_METHODS:
        try:
            trainer = _trained(_config(method, Path(root) / f"cli-{method}", WORLD))
            sparsifier = hand_written_loop(_config(method, Path(root) / f"api-{method}", WORLD),
                                           rank, WORLD)
            _assert_equal(trainer, sparsifier, method)
        except Exception:  # reported, so that the other rank is not left waiting in vain
            failures.append(f"{method}: {traceback.format_exc()}")
    queue.put((rank, failures))
    trainer = sparsifier = None  # their DDP or DeepSpeed engines hold the group
    leave_process_group()


def _failures_on_two_ranks(worker, tmp_path: Path, timeout: float) -> dict[int, list[str]]:
    """Run `worker(rank, port, root, queue)` on 2 spawned ranks; each rank's reported failures."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    workers = [context.Process(target=worker, args=(rank, port, str(tmp_path), queue))
               for rank in range(WORLD)]
    for process in workers:
        process.start()
    reports = dict(queue.get(timeout=timeout) for _ in workers)
    for process in workers:
        process.join(timeout=60)
    return reports


def test_a_hand_written_ddp_loop_equals_distsparse_train_on_two_ranks(tmp_path):
    assert _failures_on_two_ranks(_ddp_worker, tmp_path, timeout=600) == {0: [], 1: []}


DST_METHODS = ("gmp", "granet", "granet_st", "rigl", "set")
"""The methods whose masks change during training: their updates run the sharded select."""


def _deepspeed_worker(rank: int, port: int, root: str, queue) -> None:
    import deepspeed

    from distsparse.engine.backends.deepspeed import deepspeed_config

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    zero3 = ["backend.name=deepspeed", "backend.zero_stage=3", f"launcher.num_workers={WORLD}"]
    failures = []
    for method in DST_METHODS:
        try:
            def config_of(name: str) -> Config:
                return load_config(None, [*OVERRIDES, "train.dtype=float32", f"method.name={method}",
                                          f"run.dir={Path(root) / f'{name}-{method}'}", *zero3])

            trainer = _trained(config_of("cli"))
            settings = deepspeed_config(3, trainer.config.train.batch_size, WORLD, None)
            sparsifier = hand_written_loop(
                config_of("api"), rank, WORLD,
                wrap=lambda model, optimizer: deepspeed.initialize(
                    model=model, optimizer=optimizer, config=settings)[0])
            assert sparsifier.mask_set.sharded and trainer.masks.sharded, method
            assert sparsifier.fingerprint() == trainer.masks.fingerprint(), method
            assert sparsifier.step_count == trainer.step, method
            for name, piece in trainer.masks.params.items():  # this rank's shard of each weight
                assert torch.equal(sparsifier.mask_set.params[name].ds_tensor,
                                   piece.ds_tensor), (method, name)
            assert trainer.masks.density() < 1.0, method
        except Exception:  # reported, so that the other rank is not left waiting in vain
            failures.append(f"{method}: {traceback.format_exc()}")
    queue.put((rank, failures))
    trainer = sparsifier = None  # their DDP or DeepSpeed engines hold the group
    leave_process_group()


def test_a_users_deepspeed_zero3_loop_equals_distsparse_train_on_two_ranks(tmp_path):
    pytest.importorskip("deepspeed")
    assert _failures_on_two_ranks(_deepspeed_worker, tmp_path, timeout=900) == {0: [], 1: []}
