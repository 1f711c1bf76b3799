"""Engine-level invariants (DESIGN section 2) on real optimizer steps, for every method."""
from __future__ import annotations

import math

import pytest
import torch

from distsparse.engine.trainer import Trainer, train
from distsparse.methods import METHODS
from distsparse.sparsity.allocation import active_count, layer_densities

DYNAMIC_AT_CONSTANT_DENSITY = {"set", "rigl"}
GRADUAL = {"gmp", "granet", "granet_st"}


def _steps(trainer: Trainer):
    """Drive the trainer one optimizer step at a time, yielding (step, old masks) after each."""
    schedule = trainer.schedule
    for epoch in range(math.ceil(schedule.total_steps / schedule.steps_per_epoch)):
        for x, y in trainer.data.train.batches(epoch):
            old = {n: m.clone() for n, m in trainer.masks.masks.items()}
            step = trainer.step
            trainer._train_step(x, y)  # the Sparsifier counts the step
            yield step, old


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_masked_weights_and_optimizer_state_are_exact_zeros_after_every_step(
    small_config, method, optimizer
):
    config = small_config(f"method.name={method}", f"train.optimizer={optimizer}",
                          "model.name=small_resnet")
    trainer = Trainer(config)
    state = trainer.backend.optimizer.state
    updates = 0
    for step, old in _steps(trainer):
        for name, param in trainer.masks.params.items():
            mask = trainer.masks.masks[name]
            if not trainer.method.uses_masks:
                assert mask.all()
                continue
            assert torch.count_nonzero(param.detach()[~mask]) == 0, (step, name)
            for key, value in state[param].items():
                if torch.is_tensor(value) and value.shape == param.shape:
                    assert torch.count_nonzero(value[~mask]) == 0, (step, name, key)
            grown = mask & ~old[name]
            if trainer.method.is_update_step(step) and grown.any():
                updates += 1
                # Invariant 3: a new connection starts at 0 with zero optimizer state.
                assert torch.count_nonzero(param.detach()[grown]) == 0, (step, name)
                for value in state[param].values():
                    if torch.is_tensor(value) and value.shape == param.shape:
                        assert torch.count_nonzero(value[grown]) == 0
    if method in DYNAMIC_AT_CONSTANT_DENSITY | {"granet", "granet_st"}:
        assert updates > 0, "no connection was regrown during training"


@pytest.mark.parametrize("method", sorted(DYNAMIC_AT_CONSTANT_DENSITY | {"static"}))
def test_sparse_to_sparse_methods_hold_exact_erk_counts_per_layer(small_config, method):
    trainer = Trainer(small_config(f"method.name={method}", "method.sparsity=0.8"))
    shapes = trainer.masks.shapes()
    densities = layer_densities("erk", shapes, 0.2)
    expected = {n: active_count(math.prod(s), densities[n]) for n, s in shapes.items()}
    assert trainer.masks.active_counts() == expected
    changed = False
    for step, old in _steps(trainer):
        assert trainer.masks.active_counts() == expected, step
        changed |= any(not torch.equal(old[n], trainer.masks.masks[n]) for n in old)
    assert changed == (method != "static")


@pytest.mark.parametrize("method", sorted(GRADUAL))
def test_gradual_methods_reach_the_exact_global_target(small_config, method):
    trainer = Trainer(small_config(f"method.name={method}", "method.sparsity=0.9"))
    total = sum(m.numel() for m in trainer.masks.masks.values())
    history = []
    for _step, _old in _steps(trainer):
        history.append(sum(trainer.masks.active_counts().values()))
    assert history == sorted(history, reverse=True)
    assert history[-1] == active_count(total, 0.1)
    assert trainer.step == trainer.schedule.total_steps


def test_masks_depend_only_on_the_seed(small_config):
    torch.manual_seed(123)
    first = Trainer(small_config("method.name=rigl", name="a")).masks.fingerprint()
    torch.manual_seed(456)
    second = Trainer(small_config("method.name=rigl", name="b")).masks.fingerprint()
    other_seed = Trainer(small_config("method.name=rigl", "seed=1", name="c")).masks.fingerprint()
    assert first == second != other_seed


@pytest.mark.parametrize("method", sorted(METHODS))
def test_resume_continues_bit_for_bit(small_config, tmp_path, method):
    # The ResNet (batch norm, convolutions) for the two flagship methods, an MLP for the rest.
    model = [] if method in ("rigl", "granet_st") else ["model.name=mlp"]
    whole = train(small_config(f"method.name={method}", *model, name="whole"))
    half = train(small_config(f"method.name={method}", *model, "run.stop_at_step=7", name="split"))
    assert half["steps"] == 7 and not half["completed"]
    resumed = train(small_config(f"method.name={method}", *model, name="split"),
                    resume=tmp_path / "split")
    assert resumed["completed"] and resumed["steps"] == whole["steps"] == 16
    a = torch.load(tmp_path / "whole/checkpoints/last.pt", weights_only=True)
    b = torch.load(tmp_path / "split/checkpoints/last.pt", weights_only=True)
    for key in ("model", "masks"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    for param_id, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][param_id][key]), (param_id, key)
    assert resumed["mask_fingerprint"] == whole["mask_fingerprint"]
    assert resumed["test_top1"] == whole["test_top1"]
    assert resumed["train_flops_ratio"] == pytest.approx(whole["train_flops_ratio"], abs=0)


def test_flops_ratio_follows_rigl_accounting(small_config):
    """On an MLP every weight is used once per sample, so f_S / f_D is the density."""
    dense = train(small_config("method.name=dense", "model.name=mlp", name="dense"))
    assert dense["train_flops_ratio"] == 1.0
    rigl = Trainer(small_config("method.name=rigl", "model.name=mlp", "method.sparsity=0.9", name="rigl"))
    active = sum(rigl.masks.active_counts().values())
    numel = sum(m.numel() for m in rigl.masks.masks.values())
    summary = rigl.fit()
    total = summary["steps"]
    updates = [s for s in range(total) if rigl.method.is_update_step(s)]
    assert updates == [4, 8, 12]
    density = active / numel
    expected = ((total - len(updates)) * 3 * density + len(updates) * (2 * density + 1)) / (3 * total)
    assert summary["train_flops_ratio"] == pytest.approx(expected, rel=1e-12)


def test_rigl_skips_the_optimizer_step_on_update_steps_and_granet_does_not(small_config):
    # rigl: only SparseRigLOptimizerBase skips the step; SparseSETOptimizerBase steps, then updates.
    for method, skips in (("rigl", True), ("set", False), ("granet", False), ("gmp", False)):
        trainer = Trainer(small_config(f"method.name={method}", name=method))
        for step, _old in _steps(trainer):
            if step == 3:
                before = {n: p.detach().clone() for n, p in trainer.masks.params.items()}
            if step == 4:
                assert trainer.method.is_update_step(4)
                after = trainer.masks.params
                kept = {n: trainer.masks.masks[n] for n in before}
                moved = any(
                    not torch.equal(before[n][kept[n]], after[n].detach()[kept[n]]) for n in before
                )
                assert moved != skips, method
                break


def test_a_run_stopped_before_its_first_epoch_resumes(small_config, tmp_path):
    """The start writes a step-0 checkpoint, so an early stop leaves a resumable directory."""
    Trainer(small_config("method.name=rigl", name="early")).log.close()
    state = torch.load(tmp_path / "early/checkpoints/last.pt", weights_only=True)
    assert state["step"] == 0
    resumed = train(small_config("method.name=rigl", name="early"), resume=tmp_path / "early")
    whole = train(small_config("method.name=rigl", name="whole"))
    assert resumed["steps"] == 16 and resumed["mask_fingerprint"] == whole["mask_fingerprint"]
    assert resumed["test_top1"] == whole["test_top1"]


def test_masking_turns_nan_and_inf_into_exact_zeros(small_config):
    trainer = Trainer(small_config("method.name=static", "model.name=mlp"))
    x, y = next(trainer.data.train.batches(0))
    trainer._train_step(x, y)
    name, param = next(iter(trainer.masks.params.items()))
    pruned = ~trainer.masks.masks[name]
    momentum = trainer.backend.optimizer.state[param]["momentum_buffer"]
    with torch.no_grad():
        param[pruned] = float("nan")
        momentum[pruned] = float("inf")
    trainer.sparsifier.mask_all()
    assert torch.count_nonzero(param.detach()[pruned]) == 0 and not param.isnan().any()
    assert torch.count_nonzero(momentum[pruned]) == 0


def test_a_checkpoint_written_before_a_config_key_existed_resumes_with_its_default(
    small_config, tmp_path
):
    """Keys the schema gained later count as their defaults; a non-default value is refused."""
    from distsparse.engine.checkpoint import save_checkpoint
    from distsparse.errors import CheckpointError

    Trainer(small_config("method.name=rigl", name="old")).log.close()
    path = tmp_path / "old/checkpoints/last.pt"
    state = torch.load(path, weights_only=True)
    del state["config"]["train"]["autocast"], state["config"]["data"]["imagenet"]
    save_checkpoint(state, path)
    with pytest.raises(CheckpointError, match="train.autocast='none'; this config has .*'bf16'"):
        Trainer(small_config("method.name=rigl", "train.autocast=bf16", name="old"),
                resume=tmp_path / "old")
    resumed = train(small_config("method.name=rigl", name="old"), resume=tmp_path / "old")
    whole = train(small_config("method.name=rigl", name="whole"))
    assert resumed["steps"] == 16 and resumed["mask_fingerprint"] == whole["mask_fingerprint"]
