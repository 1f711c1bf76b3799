"""SparsityCallback: a Sparsifier inside transformers.Trainer (1 process, torchrun, DeepSpeed)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from distsparse import Sparsifier
from distsparse.errors import CheckpointError
from distsparse.integrations.huggingface import SPARSIFIER_FILE, SparsityCallback
from distsparse.sparsity.allocation import active_count, layer_densities
from tests.conftest import free_port, leave_process_group

ROOT = Path(__file__).resolve().parents[1]
STEPS, INTERVAL, SPARSITY = 12, 3, 0.8
MASKED = [f"transformer.h.{i}.{name}.weight" for i in range(2)
          for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


class Tokens(torch.utils.data.Dataset):
    """Random token blocks (language modelling: labels are the inputs)."""

    def __init__(self, count: int = 96, length: int = 16) -> None:
        self.tokens = torch.randint(0, 64, (count, length), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=16,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config)


class StopAt(TrainerCallback):
    """Stops training after `step` optimizer steps (an interrupted run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


def train(out: Path, method: str = "rigl", resume: bool = False, stop: int | None = None,
          deepspeed: dict | None = None, save_steps: int | None = None) -> tuple[Trainer, SparsityCallback]:
    args = TrainingArguments(
        str(out), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
        use_cpu=deepspeed is None, report_to="none", disable_tqdm=True, logging_steps=100,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, seed=0,
        lr_scheduler_type="constant", deepspeed=deepspeed)
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=Tokens())
    callback = SparsityCallback(method, SPARSITY, trainer=trainer, update_interval=INTERVAL,
                                distribution="erk")
    trainer.add_callback(callback)
    if stop is not None:
        trainer.add_callback(StopAt(stop))
    trainer.train(resume_from_checkpoint=True if resume else None)
    return trainer, callback


def expected_counts(masks: dict[str, torch.Tensor]) -> dict[str, int]:
    shapes = {name: tuple(mask.shape) for name, mask in masks.items()}
    densities = layer_densities("erk", shapes, 1 - SPARSITY)
    return {name: active_count(math.prod(shape), densities[name]) for name, shape in shapes.items()}


def check_model(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                masks: dict[str, torch.Tensor]) -> None:
    """Masked weights and their Adam moments are exactly 0 off the mask; nothing else is masked."""
    params = dict(model.named_parameters())
    assert list(masks) == MASKED  # Conv1D attention/MLP weights; never wte, wpe, ln, bias, lm_head
    assert {name: int(mask.sum()) for name, mask in masks.items()} == expected_counts(masks)
    for name, mask in masks.items():
        assert torch.count_nonzero(params[name].detach()[~mask]) == 0, name
        state = optimizer.state[params[name]]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.count_nonzero(state[key][~mask]) == 0, (name, key)
    for name, p in params.items():
        if name not in masks:
            assert torch.count_nonzero(p.detach()) > 0.9 * p.numel(), name


def test_rigl_under_trainer_keeps_exact_counts_and_zeros_and_steps_then_updates(tmp_path):
    trainer, callback = train(tmp_path / "run")
    sparsifier = callback.sparsifier
    inner = trainer.optimizer.optimizer
    check_model(trainer.model, inner, sparsifier.masks)
    assert sparsifier.step_count == STEPS and sparsifier.last_update.step == 9
    model = tiny_gpt2()
    initial = Sparsifier(model, torch.optim.AdamW(model.parameters()), "rigl", SPARSITY, STEPS,
                         update_interval=INTERVAL, distribution="erk")
    assert initial.fingerprint() != sparsifier.fingerprint()  # the updates changed the masks
    # Trainer owns the step: the optimizer stepped on every step, RigL's update steps included.
    assert {int(state["step"]) for state in inner.state.values()} == {STEPS}


def test_a_resumed_trainer_run_ends_with_the_masks_of_an_uninterrupted_one(tmp_path):
    whole, whole_cb = train(tmp_path / "whole")
    train(tmp_path / "parts", stop=6, save_steps=6)
    saved = torch.load(tmp_path / "parts" / "checkpoint-6" / SPARSIFIER_FILE, weights_only=True)
    assert saved["step"] == 6
    resumed, resumed_cb = train(tmp_path / "parts", resume=True)
    assert resumed_cb.sparsifier.fingerprint() == whole_cb.sparsifier.fingerprint()
    assert resumed_cb.sparsifier.step_count == STEPS
    for (name, a), b in zip(whole.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    check_model(resumed.model, resumed.optimizer.optimizer, resumed_cb.sparsifier.masks)


def test_resuming_without_the_sparsifier_file_names_it(tmp_path):
    train(tmp_path / "run", method="set", stop=6, save_steps=6)
    missing = tmp_path / "run" / "checkpoint-6" / SPARSIFIER_FILE
    missing.unlink()
    with pytest.raises(CheckpointError, match=str(missing)):
        train(tmp_path / "run", method="set", resume=True)


def _torchrun(out: Path, mode: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "-m", "tests.test_huggingface", str(out), mode]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_trainer_under_torchrun_ddp_has_identical_exact_masks_on_both_ranks(tmp_path):
    ranks = _torchrun(tmp_path, "ddp")
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"]
    assert ranks[0]["world_size"] == 2 and ranks[0]["step"] == STEPS
    assert all(rank["checked"] for rank in ranks)


def test_trainer_with_deepspeed_zero3_masks_every_copy_on_both_ranks(tmp_path):
    ranks = _torchrun(tmp_path, "zero3")
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"]
    assert ranks[0]["world_size"] == 2 and ranks[0]["step"] == STEPS
    assert ranks[0]["counts"] == ranks[1]["counts"] and all(rank["checked"] for rank in ranks)


def _zero3_config() -> dict:
    return {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}


def _check_zero3_copies(trainer: Trainer, callback: SparsityCallback) -> dict[str, int]:
    """This rank's piece of every copy (weight, fp32 master, exp_avg, exp_avg_sq) is 0 off the
    mask piece; returns the global active counts."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

    sparsifier = callback.sparsifier
    params = sparsifier.mask_set.params
    assert list(params) == MASKED
    for name, piece in sparsifier.masks.items():
        param = params[name]
        copies = [param.ds_tensor, safe_get_local_fp32_param(param),
                  safe_get_local_optimizer_state(param, "exp_avg"),
                  safe_get_local_optimizer_state(param, "exp_avg_sq")]
        for copy in copies:
            assert torch.count_nonzero(copy.reshape(-1)[: piece.numel()][~piece]) == 0, name
    counts = sparsifier.mask_set.active_counts()
    assert counts == expected_counts(sparsifier.mask_set.full_masks())
    return counts


def _worker(out: Path, mode: str) -> None:
    """One torchrun rank: train, check every copy, write what the test compares."""
    import torch.distributed as dist

    if mode == "zero3":  # DeepSpeed on CPU: gloo (its default there is oneCCL)
        import deepspeed

        deepspeed.init_distributed("gloo")
    trainer, callback = train(out / "run", deepspeed=_zero3_config() if mode == "zero3" else None)
    if mode == "zero3":
        counts = _check_zero3_copies(trainer, callback)
    else:
        check_model(trainer.model, trainer.optimizer.optimizer, callback.sparsifier.masks)
        counts = callback.sparsifier.mask_set.active_counts()
    result = {"fingerprint": callback.sparsifier.fingerprint(), "counts": counts, "checked": True,
              "world_size": dist.get_world_size(), "step": callback.sparsifier.step_count}
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    trainer = callback = None  # the wrapped model holds the group
    leave_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2])
