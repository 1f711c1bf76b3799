"""`SparsityCallback`: a distsparse Sparsifier inside a Hugging Face `transformers.Trainer`.

    from transformers import Trainer, TrainingArguments
    from distsparse.integrations.huggingface import SparsityCallback

    trainer = Trainer(model=model, args=TrainingArguments("out", max_steps=1000),
                      train_dataset=data)
    trainer.add_callback(SparsityCallback("rigl", 0.9, trainer=trainer, update_interval=100))
    trainer.train()                       # or trainer.train(resume_from_checkpoint=True)

The same code runs in one process, under torchrun (DDP) and under Trainer's DeepSpeed integration
(`TrainingArguments(deepspeed=...)`, ZeRO 0-3: every copy is masked, at ZeRO-3 each rank's pieces).
"""
from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from distsparse.errors import CheckpointError, ConfigError
from distsparse.sparsifier import Sparsifier

__all__ = ["SPARSIFIER_FILE", "SparsityCallback"]

SPARSIFIER_FILE = "distsparse_sparsifier.pt"
"""The Sparsifier's `state_dict()`, written into each Trainer checkpoint folder."""


class SparsityCallback(TrainerCallback):
    """Runs a distsparse `Sparsifier` (any method of `distsparse train` but dense) in a Trainer.

    `method`, `sparsity`, `seed` and the keyword arguments are the Sparsifier's; `total_steps` is
    the Trainer's `max_steps` (optimizer steps). The Sparsifier is built on `on_train_begin` from
    the model and optimizer Trainer hands over (the DeepSpeed engine under DeepSpeed: pass
    `trainer=` so the callback can reach it). Each optimizer step: the dense gradient is read
    before the step when the mask update grows by gradient (RigL, GraNet), Trainer steps, then
    every copy is masked and the mask updated on schedule; a step Trainer skips (fp16 overflow) is
    not counted. Each checkpoint gets `SPARSIFIER_FILE` (masks, method state, step), restored when
    Trainer resumes from that checkpoint.

    Departure from rigl: Trainer owns the optimizer step, so on RigL's update steps the optimizer
    steps and the mask is updated after it (rigl and `Sparsifier.step()` skip that step).
    """

    def __init__(self, method: str = "rigl", sparsity: float = 0.9, *, trainer: Any = None,
                 seed: int = 0, **options: Any) -> None:
        self.method, self.sparsity, self.seed, self.options = method, sparsity, seed, options
        self.trainer = trainer
        self.sparsifier: Sparsifier | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, model: nn.Module | None = None,
                       optimizer: torch.optim.Optimizer | None = None, **kwargs: Any) -> None:
        """Build the Sparsifier (from the checkpoint's state when Trainer resumed)."""
        saved = _load_state(args, state) if state.global_step > 0 else None
        engine = self._deepspeed_engine(args)
        target = engine if engine is not None else model
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        self.sparsifier = Sparsifier(target, None if engine is not None else inner, self.method,
                                     self.sparsity, state.max_steps, seed=self.seed, state=saved,
                                     **self.options)
        if engine is not None:
            _read_gradients_before_each_step(engine, self.sparsifier)

    def _deepspeed_engine(self, args: TrainingArguments) -> Any:
        """The DeepSpeed engine Trainer built, or None when Trainer does not run DeepSpeed."""
        if not args.deepspeed:
            return None
        if self.trainer is None:
            raise ConfigError("argument 'trainer': Trainer runs DeepSpeed; pass "
                              "SparsityCallback(..., trainer=trainer) to reach its engine")
        return self.trainer.model_wrapped

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState,
                              control: TrainerControl, **kwargs: Any) -> None:
        """Read the dense gradient for a growth step (under DeepSpeed: inside engine.step)."""
        if not args.deepspeed:
            self.sparsifier.before_optimizer_step()

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState,
                          control: TrainerControl, optimizer: Any = None, **kwargs: Any) -> None:
        """Mask every copy and update the masks on schedule, after Trainer's optimizer step."""
        self.sparsifier.after_optimizer_step(
            skipped=bool(getattr(optimizer, "step_was_skipped", False)))

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        """Write the Sparsifier's state into the checkpoint Trainer just saved (atomically)."""
        saved = self.sparsifier.state_dict()  # a collective where masks are pieces: every rank
        if not args.should_save:
            return
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", SPARSIFIER_FILE)
        torch.save(saved, path + ".tmp")
        os.replace(path + ".tmp", path)


def _load_state(args: TrainingArguments, state: TrainerState) -> dict[str, Any]:
    """The Sparsifier state of the checkpoint Trainer resumed from: `args.resume_from_checkpoint`
    if set, else `output_dir/checkpoint-<global step>` (what `resume_from_checkpoint=True` and a
    checkpoint of this run load)."""
    folder = args.resume_from_checkpoint
    if not isinstance(folder, str):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
    path = os.path.join(folder, SPARSIFIER_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing; resuming a sparse run needs the masks "
                              "SparsityCallback saves beside each checkpoint")
    return torch.load(path, map_location="cpu", weights_only=True)


def _read_gradients_before_each_step(engine: Any, sparsifier: Sparsifier) -> None:
    """Under DeepSpeed, accelerate calls engine.step inside backward, before Trainer's optimizer
    callbacks, and the step frees the gradients: read them at the start of each boundary step."""
    inner = engine.step

    @functools.wraps(inner)
    def step(*args: Any, **kwargs: Any) -> Any:
        if engine.is_gradient_accumulation_boundary():
            sparsifier.before_optimizer_step()
        return inner(*args, **kwargs)

    engine.step = step
