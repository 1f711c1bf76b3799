"""Post-training sparsity from a trained run: one-shot magnitude pruning (+ fine-tuning) and UniPTS.

load the run -> draw the calibration set -> masks (one-shot top-|w|, or UniPTS's layer-sparsity
search then dynamic sparse training by distillation from the dense network) -> exact zeros ->
test top-1 -> a normal run directory (config.yaml, checkpoints/last.pt, summary.json,
metrics.jsonl, training.png), built in a temporary directory and renamed into place only when
everything succeeded. UniPTS: arXiv 2405.18810, reference xjjxmu/UniPTS `main.py`; the algorithm
pieces are in `distsparse.methods.post_training`.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from distsparse.config import Config, TrainConfig, schedule_relevant, to_yaml
from distsparse.data.loader import TensorLoader
from distsparse.engine.backends import SingleBackend
from distsparse.engine.checkpoint import CHECKPOINT_NAME, MODEL_NAME, save_checkpoint
from distsparse.engine.flops import FlopCounter
from distsparse.engine.metrics import MetricsLog
from distsparse.engine.optim import build_lr_scheduler, build_optimizer
from distsparse.engine.report import format_table, plot_run, write_summary
from distsparse.engine.runs import TrainedRun, load_run
from distsparse.errors import CheckpointError, ConfigError
from distsparse.methods.post_training import (
    ONESHOT_DISTRIBUTIONS,
    SearchResult,
    SearchSettings,
    distillation_loss,
    layer_topk_masks,
    oneshot_masks,
    search_layer_counts,
    ste_sparse_weight,
)
from distsparse.sparsity.masks import MaskSet, sparsifiable_parameters

__all__ = ["POST_TRAINING_METHODS", "PruneSettings", "default_output", "prune", "resolve_run_dir"]

POST_TRAINING_METHODS: tuple[str, ...] = ("oneshot", "unipts")
DEFAULT_EPOCHS = {"oneshot": 0, "unipts": 5}


@dataclass(frozen=True)
class PruneSettings:
    """What `distsparse prune` does; UniPTS's reference settings are batch 64, SGD lr 0.01 cosine.

    Differences from the reference's optimizer: no weight decay on biases and BN (the trainer's
    `build_optimizer`), and no 1-epoch warm-up (the reference warms up 1 of 100 epochs).
    """

    method: str
    sparsity: float
    distribution: str | None = None
    """Oneshot only: global, uniform or erk (default global)."""
    calib_samples: int = 2048
    epochs: int | None = None
    """Fine-tuning epochs over the calibration set (default: oneshot 0, unipts 5)."""
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    search: SearchSettings = field(default_factory=SearchSettings)
    seed: int = 0
    out: Path | None = None
    device: str | None = None
    """cpu, cuda or auto; default: the run's train.device."""
    progress: bool = True

    @property
    def finetune_epochs(self) -> int:
        """The epochs actually run."""
        return DEFAULT_EPOCHS[self.method] if self.epochs is None else self.epochs

    @property
    def allocation(self) -> str:
        """How layers share the sparsity: global, uniform, erk, or searched (UniPTS)."""
        return (self.distribution or "global") if self.method == "oneshot" else "searched"

    def check(self) -> None:
        """Raise ConfigError naming the first bad option."""
        if self.method not in POST_TRAINING_METHODS:
            raise ConfigError(f"--method {self.method!r}: expected one of {', '.join(POST_TRAINING_METHODS)}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"--sparsity {self.sparsity!r}: expected a value in [0, 1)")
        if self.distribution is not None:
            if self.method != "oneshot":
                raise ConfigError("--distribution applies to --method oneshot only "
                                  "(UniPTS searches its own layer-wise sparsity)")
            if self.distribution not in ONESHOT_DISTRIBUTIONS:
                raise ConfigError(f"--distribution {self.distribution!r}: expected one of "
                                  f"{', '.join(ONESHOT_DISTRIBUTIONS)}")
        checks = (
            (self.epochs is None or self.epochs >= 0, "--epochs", self.epochs, "an integer >= 0"),
            (self.batch_size >= 1, "--batch-size", self.batch_size, "an integer >= 1"),
            (self.calib_samples >= self.batch_size, "--calib-samples", self.calib_samples,
             f"at least --batch-size={self.batch_size}"),
            (self.lr > 0, "--lr", self.lr, "a positive number"),
            (self.seed >= 0, "--seed", self.seed, "an integer >= 0"),
        )
        for ok, option, value, expected in checks:
            if not ok:
                raise ConfigError(f"{option} {value!r}: expected {expected}")
        try:
            self.search.check()
        except ValueError as exc:
            raise ConfigError(f"--{str(exc).replace('_', '-')}") from None


def resolve_run_dir(path: Path) -> Path:
    """A run directory, given either it or its checkpoints/last.pt (or a DeepSpeed run's model.pt)."""
    path = Path(path)
    if path.suffix == ".pt":
        if path.parts[-2:] not in (Path(CHECKPOINT_NAME).parts, Path(MODEL_NAME).parts):
            raise CheckpointError(f"{path}: expected a run directory or its {CHECKPOINT_NAME}")
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
        return path.parent.parent
    if not path.is_dir():
        raise CheckpointError(f"run directory {path} does not exist")
    return path


def default_output(run_dir: Path, method: str, sparsity: float) -> Path:
    """runs/<input-name>-<method>-<sparsity>."""
    return Path("runs") / f"{Path(run_dir).resolve().name}-{method}-{sparsity:g}"


def _refuse_non_empty(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"output directory {out} already exists and is not empty; choose another --out")


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    return torch.device(name)


def _calibration_loaders(run: TrainedRun, settings: PruneSettings) -> tuple[TensorLoader, TensorLoader]:
    """N distinct training images (seeded); an augmented loader to train, a plain one to score.

    The reference draws with replacement (np.random.choice); here without, so no image repeats.
    The reference also scores search candidates on augmented images; here on plain ones, so that
    a candidate's fitness does not depend on a random crop.
    """
    train = run.data.train
    available = len(train.labels)
    if settings.calib_samples > available:
        raise ConfigError(f"--calib-samples {settings.calib_samples}: larger than the training set "
                          f"({available})")
    generator = torch.Generator().manual_seed(settings.seed)
    index = torch.randperm(available, generator=generator)[: settings.calib_samples]
    images, labels = train.images[index], train.labels[index]
    common = dict(global_batch=settings.batch_size, seed=settings.seed, mean=train.mean, std=train.std)
    return (TensorLoader(images, labels, train=True, augment=run.config.data.augment, **common),
            TensorLoader(images, labels, train=False, augment=False, **common))


class _Context:
    """The loaded run, where it runs, and the records being written."""

    def __init__(self, run: TrainedRun, device: torch.device, settings: PruneSettings,
                 log: MetricsLog, calibration: tuple[TensorLoader, TensorLoader]) -> None:
        self.run, self.device, self.settings, self.log = run, device, settings, log
        self.dtype = getattr(torch, run.config.train.dtype)
        self.calib_train, self.calib_eval = calibration

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def evaluate(self, forward: Callable[[torch.Tensor], torch.Tensor],
                 loader: TensorLoader) -> dict[str, float]:
        """Top-1 and mean cross-entropy of `forward` over a loader (the caller sets eval mode)."""
        correct = loss = count = 0.0
        for x, y in loader.batches(0):
            output, y = forward(self.to_device(x)), y.to(self.device)
            correct += float((output.argmax(1) == y).sum())
            loss += float(F.cross_entropy(output, y, reduction="sum"))
            count += len(y)
        return {"top1": correct / count, "loss": loss / count}

    @torch.no_grad()
    def recalibrate_batchnorm(self, model: nn.Module) -> None:
        """Reset BN statistics and set them to the exact average over the calibration set.

        The reference resets and runs the calibration set in train mode with BN's momentum (an
        exponential average) on images plus noise of std 1e-6; here momentum=None averages all
        batches equally, so few batches suffice, and no noise is added.
        """
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in norms]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
        model.train()
        for x, _ in self.calib_eval.batches(0):
            model(self.to_device(x))
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.eval()


Scheduler = torch.optim.lr_scheduler.LRScheduler


def _optimizer(model: nn.Module, settings: PruneSettings, steps: int,
               per_epoch: int) -> tuple[torch.optim.Optimizer, Scheduler]:
    config = TrainConfig(lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay,
                         lr_schedule="cosine", warmup_epochs=0.0)
    optimizer = build_optimizer(model, config)
    return optimizer, build_lr_scheduler(optimizer, steps, per_epoch, config)


def _fine_tune(ctx: _Context, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Scheduler,
               loss_of: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
               after_step: Callable[[], None], evaluate_epoch: Callable[[], dict[str, float]],
               sparsity: float, label: str) -> tuple[int, float]:
    """The loop both methods share; returns (steps, training images per second)."""
    epochs, per_epoch = ctx.settings.finetune_epochs, len(ctx.calib_train)
    bar = tqdm(total=epochs * per_epoch, disable=not ctx.settings.progress, desc=label, unit="step")
    step, seconds, images = 0, 0.0, 0
    log_every = ctx.run.config.train.log_every
    for epoch in range(epochs):
        for x, y in ctx.calib_train.batches(epoch):
            tick = time.perf_counter()
            model.train()
            loss = loss_of(ctx.to_device(x), y.to(ctx.device), epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            after_step()
            scheduler.step()
            seconds += time.perf_counter() - tick
            images += len(y)
            step += 1
            bar.update(1)
            if step % log_every == 0 or step == epochs * per_epoch:
                ctx.log.log("train", step, epoch=epoch + 1, loss=loss.item(),
                            lr=scheduler.get_last_lr()[0], sparsity=sparsity)
                bar.set_postfix(loss=f"{loss.item():.3f}")
        result = evaluate_epoch()
        ctx.log.log("eval", step, epoch=epoch + 1, sparsity=sparsity, test_top1=result["top1"],
                    test_loss=result["loss"])
    bar.close()
    return step, images / seconds if seconds else 0.0


def _oneshot(ctx: _Context, masks: MaskSet, optimizer: torch.optim.Optimizer,
             scheduler: Scheduler) -> tuple[int, float]:
    """Global / uniform / ERK top-|w|, then fine-tuning with cross-entropy on the fixed mask."""
    model = ctx.run.model
    weights = {name: p.detach() for name, p in masks.params.items()}
    masks.update(oneshot_masks(weights, ctx.settings.sparsity, ctx.settings.allocation))
    backend = SingleBackend(model, optimizer, masks)
    backend.mask_all_copies(masks)

    def loss_of(x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    def evaluate_epoch() -> dict[str, float]:
        model.eval()
        return ctx.evaluate(model, ctx.run.data.test)

    return _fine_tune(ctx, model, optimizer, scheduler, loss_of,
                      lambda: backend.mask_all_copies(masks), evaluate_epoch,
                      1.0 - masks.density(), f"oneshot {ctx.settings.sparsity:.0%}")


def _search(ctx: _Context, masks: MaskSet) -> SearchResult:
    """UniPTS's layer-sparsity search; fitness = calibration top-1 after BN recalibration."""
    model, settings = ctx.run.model, ctx.settings
    dense_state = copy.deepcopy(model.state_dict())
    dense_weights = {name: p.detach().clone() for name, p in masks.params.items()}
    search = settings.search
    bar = tqdm(total=(search.generations + 1) * search.population, disable=not settings.progress,
               desc="unipts search", unit="candidate")

    def fitness(counts: dict[str, int]) -> float:
        model.load_state_dict(dense_state)
        masks.update(layer_topk_masks(dense_weights, counts))
        masks.apply()
        ctx.recalibrate_batchnorm(model)
        return ctx.evaluate(model, ctx.calib_eval)["top1"]

    def on_generation(generation: int, scores: list[float]) -> None:
        bar.update(len(scores))
        bar.set_postfix(best=f"{max(scores):.3f}")
        ctx.log.log("search", 0, generation=generation, best_fitness=max(scores),
                    mean_fitness=sum(scores) / len(scores))

    numels = {name: p.numel() for name, p in masks.params.items()}
    result = search_layer_counts(numels, settings.sparsity, fitness, search, settings.seed,
                                 on_generation)
    bar.close()
    model.load_state_dict(dense_state)
    return result


def _unipts(ctx: _Context, masks: MaskSet, optimizer: torch.optim.Optimizer, scheduler: Scheduler,
            counts: dict[str, int]) -> tuple[int, float]:
    """Dynamic sparse training by distillation from the dense net at the searched layer counts.

    The teacher runs in train mode (batch statistics), as the reference's `fp_model.train()`.
    """
    model = ctx.run.model
    teacher = copy.deepcopy(model).train()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)

    def loss_of(x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
        sparse = {name: ste_sparse_weight(p, counts[name]) for name, p in masks.params.items()}
        with torch.no_grad():
            target = teacher(x)
        return distillation_loss(torch.func.functional_call(model, sparse, (x,)), target, epoch)

    def evaluate_epoch() -> dict[str, float]:
        model.eval()
        current = layer_topk_masks({n: p.detach() for n, p in masks.params.items()}, counts)
        sparse = {n: p.detach().masked_fill(~current[n], 0) for n, p in masks.params.items()}
        return ctx.evaluate(lambda x: torch.func.functional_call(model, sparse, (x,)),
                            ctx.run.data.test)

    steps, rate = _fine_tune(ctx, model, optimizer, scheduler, loss_of, lambda: None,
                             evaluate_epoch, 1.0 - sum(counts.values()) / _numel(masks),
                             f"unipts {ctx.settings.sparsity:.0%}")
    masks.update(layer_topk_masks({n: p.detach() for n, p in masks.params.items()}, counts))
    SingleBackend(model, optimizer, masks).mask_all_copies(masks)
    return steps, rate


def _numel(masks: MaskSet) -> int:
    return sum(m.numel() for m in masks.masks.values())


def _output_config(config: Config, settings: PruneSettings, out: Path) -> Config:
    """The run's config with the post-training method, its sparsity and allocation, and `out`."""
    method = dataclasses.replace(config.method, name=settings.method, sparsity=settings.sparsity,
                                 prune_scope="global" if settings.allocation == "global" else "layer")
    if settings.allocation in ("uniform", "erk"):
        method = dataclasses.replace(method, distribution=settings.allocation)
    run = dataclasses.replace(config.run, name=out.name, dir=str(out), stop_at_step=None)
    return dataclasses.replace(config, method=method, run=run)


def prune(source: Path, settings: PruneSettings) -> dict[str, Any]:
    """Prune the run at `source` (a run directory or its checkpoints/last.pt); return the summary.

    Refuses (CheckpointError) an output directory that exists and is not empty, before any work
    and again when moving the finished run into place; nothing is written there on failure.
    """
    settings.check()
    run_dir = resolve_run_dir(source)
    out = settings.out or default_output(run_dir, settings.method, settings.sparsity)
    _refuse_non_empty(out)
    started = time.perf_counter()
    run = load_run(run_dir)
    device = _device(settings.device or run.config.train.device)
    run.model.to(device)
    calibration = _calibration_loaders(run, settings)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    log = MetricsLog(staging)
    try:
        ctx = _Context(run, device, settings, log, calibration)
        summary = _prune_into(staging, out, ctx, started)
        log.close()
        plot_run(staging, summary["layer_density"])
        try:
            os.rename(staging, out)
        except OSError:
            raise CheckpointError(f"output directory {out} appeared while pruning; the result is "
                                  "discarded, choose another --out") from None
    except BaseException:
        log.close()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(format_table(summary))
    return summary


def _prune_into(staging: Path, out: Path, ctx: _Context, started: float) -> dict[str, Any]:
    run, settings, log, model = ctx.run, ctx.settings, ctx.log, ctx.run.model
    method_config = run.config.method
    masks = MaskSet(sparsifiable_parameters(model, method_config.dense_first_layer,
                                            method_config.dense_last_layer))
    per_epoch = len(ctx.calib_train)
    optimizer, scheduler = _optimizer(model, settings, settings.finetune_epochs * per_epoch, per_epoch)
    counter = FlopCounter(model, ctx.to_device(next(run.data.test.batches(0))[0]))
    searched = None
    if settings.method == "oneshot":
        steps, rate = _oneshot(ctx, masks, optimizer, scheduler)
    else:
        searched = _search(ctx, masks)
        steps, rate = _unipts(ctx, masks, optimizer, scheduler, searched.counts)
    model.eval()
    evaluation = ctx.evaluate(model, run.data.test)
    counter.set_masks(masks)
    sparse, dense = counter.sparse_forward, counter.dense_forward
    # Per step: forward and input gradient on the active weights; the weight gradient is sparse
    # for a fixed mask, dense through UniPTS's STE, which also runs the dense teacher forward.
    per_step = 3 * sparse if settings.method == "oneshot" else 2 * sparse + 2 * dense
    flops_ratio = per_step / (3.0 * dense) if steps else 0.0
    sparsity = 1.0 - masks.density()
    if steps == 0:  # otherwise the last epoch's record already holds this evaluation
        log.log("eval", 0, epoch=0, sparsity=sparsity, test_top1=evaluation["top1"],
                test_loss=evaluation["loss"])
    config = _output_config(run.config, settings, out)
    wall = time.perf_counter() - started
    summary = {
        "method": settings.method,
        "target_sparsity": settings.sparsity,
        "sparsity": sparsity,
        "layer_density": masks.layer_density(),
        "test_top1": evaluation["top1"],
        "test_loss": evaluation["loss"],
        "world_size": 1,
        "backend": "single",
        "launcher": "local",
        "steps": steps,
        "total_steps": steps,
        "epochs": settings.finetune_epochs,
        "seed": settings.seed,
        "wall_s": wall,
        "train_images_per_s": rate,
        "mask_fingerprint": masks.fingerprint(),
        "train_flops_ratio": flops_ratio,
        "run_dir": str(out),
        "completed": True,
        "source_run": str(run.run_dir),
        "source_test_top1": run.summary.get("test_top1"),
        "distribution": settings.allocation,
        "calib_samples": settings.calib_samples,
        "finetune_epochs": settings.finetune_epochs,
        "batch_size": settings.batch_size,
        "lr": settings.lr,
    }
    if searched is not None:
        summary["search"] = {**dataclasses.asdict(settings.search), "best_fitness": searched.fitness,
                             "evaluations": searched.evaluations, "logits": searched.logits}
    (staging / "config.yaml").write_text(to_yaml(config), encoding="utf-8")
    state = {
        "config": schedule_relevant(config),
        "step": steps,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "masks": masks.state_dict(),
        "method": {"name": settings.method, "source_run": str(run.run_dir),
                   "layer_active": masks.active_counts()},
        "rng": {"torch": torch.get_rng_state()},
        "flops": {"total": flops_ratio * steps, "steps": steps},
        "wall_s": wall,
    }
    save_checkpoint(state, staging / CHECKPOINT_NAME)
    write_summary(staging, summary)
    return summary
