"""Optimizer and per-step learning-rate schedule (linear warm-up, then cosine, step or constant)."""
from __future__ import annotations

import math

import torch
from torch import nn

from distsparse.config import TrainConfig

__all__ = ["build_lr_scheduler", "build_optimizer", "lr_factor"]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW (train.betas) over all parameters; no weight decay on biases
    and normalization parameters (every tensor of one dimension)."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas))
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)


def lr_factor(step: int, total_steps: int, warmup_steps: int, config: TrainConfig) -> float:
    """Multiplier of the base LR at a step: a pure function of the step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    if config.lr_schedule == "step":
        passed = sum(step >= round(m * total_steps) for m in config.lr_milestones)
        return config.lr_gamma**passed
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int, config: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepping once per optimizer step."""
    warmup = round(config.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, config)
    )
