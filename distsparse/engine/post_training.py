"""Post-training sparsity from a trained run: one-shot magnitude pruning (+ fine-tuning) and UniPTS.

load the run -> draw the calibration set through the run's own training pipeline -> masks
(one-shot top-|w|, or UniPTS's layer-sparsity search then dynamic sparse training by distillation
from the dense network) -> exact zeros -> test top-1 -> a run directory (config.yaml,
checkpoints/last.pt, summary.json, prune.json, metrics.jsonl, training.png), built in a temporary
directory and renamed into place only when everything succeeded. UniPTS: arXiv 2405.18810,
reference xjjxmu/UniPTS `main.py`; the algorithm pieces are in `distsparse.methods.post_training`.

The output is step 0 of a `static`-mask run: its config.yaml says method.name=static (train.* as
the source run's), its checkpoint holds the pruned weights and masks with a fresh optimizer, so
`distsparse train --resume OUT [train.epochs=N ...]` fine-tunes it with exactly the pruned mask.
The pruning's own records are numbered up to step 0 (search at step -S, fine-tuning steps
-S+1..0, epochs -E+1..0), so fine-tuning continues the same timeline from step 1.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from distsparse.config import Config, TrainConfig, schedule_relevant, to_yaml
from distsparse.data.bundle import model_input
from distsparse.data.imagenet import resolution_at
from distsparse.data.loader import BatchLoader, TensorLoader
from distsparse.data.text import ByteBlockLoader
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
from distsparse.sparsifier import Sparsifier
from distsparse.sparsity.masks import MaskSet, sparsifiable_parameters

__all__ = ["POST_TRAINING_METHODS", "PRESETS", "PruneSettings", "default_output", "prune",
           "resolve_run_dir"]

POST_TRAINING_METHODS: tuple[str, ...] = ("oneshot", "unipts")
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"calib_samples": 2048, "unipts_epochs": 5, "batch_size": 64, "lr": 0.01,
            "warmup_epochs": 0.0, "population": 8, "generations": 4, "parents": 4},
    "paper": {"calib_samples": 10240, "unipts_epochs": 100, "batch_size": 64, "lr": 0.01,
              "warmup_epochs": 1.0, "population": 25, "generations": 25, "parents": 10},
}
"""`--preset` values. paper: xjjxmu/UniPTS (`args.py` num_samples_for_calib, `configs/resnet50.yaml`
epochs, batch_size, lr, warmup_length, `main.py` genetic_algorithm); cpu: sized for a small
network on CPU in seconds. oneshot does not fine-tune (0 epochs) under either preset."""


@dataclass(frozen=True)
class PruneSettings:
    """What `distsparse prune` does, every value resolved (see `from_preset`).

    Difference from the reference's optimizer: no weight decay on biases and BN (the trainer's
    `build_optimizer`).
    """

    method: str
    sparsity: float
    calib_samples: int
    epochs: int
    """Fine-tuning epochs over the calibration set."""
    batch_size: int
    lr: float
    search: SearchSettings
    preset: str = "cpu"
    """The `--preset` the values came from (explicit options override it)."""
    warmup_epochs: float = 0.0
    """Linear warm-up of the LR before the cosine decay, in epochs of the calibration set."""
    distribution: str | None = None
    """Oneshot only: global, uniform or erk (default global)."""
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 0
    out: Path | None = None
    device: str | None = None
    """cpu, cuda or auto; default: the run's train.device."""
    progress: bool = True

    @classmethod
    def from_preset(cls, preset: str, method: str, sparsity: float, **options: Any) -> PruneSettings:
        """A preset's values with every option that is given (not None) overriding it.

        Options are PruneSettings fields, or SearchSettings fields for the UniPTS search.
        """
        if preset not in PRESETS:
            raise ConfigError(f"--preset {preset!r}: expected one of {', '.join(PRESETS)}")
        values = {**PRESETS[preset], **{k: v for k, v in options.items() if v is not None}}
        unipts_epochs = values.pop("unipts_epochs")
        values.setdefault("epochs", unipts_epochs if method == "unipts" else 0)
        search_keys = {f.name for f in dataclasses.fields(SearchSettings)}
        search = SearchSettings(**{k: values.pop(k) for k in list(values) if k in search_keys})
        return cls(method=method, sparsity=sparsity, preset=preset, search=search, **values)

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
            (self.epochs >= 0, "--epochs", self.epochs, "an integer >= 0"),
            (self.warmup_epochs >= 0, "--warmup-epochs", self.warmup_epochs, "a number >= 0"),
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


def _training_set_size(run: TrainedRun) -> int:
    train, loader = run.data.train, run.config.data.loader
    if isinstance(train, TensorLoader):
        return len(train.labels)
    if isinstance(train, ByteBlockLoader):
        return train.blocks
    return len(train.dataset) if loader == "torchvision" else len(train.loader.indices)


def _calibration_loaders(run: TrainedRun,
                         settings: PruneSettings) -> tuple[BatchLoader, BatchLoader] | None:
    """N distinct seeded training images (or text blocks) through the run's own pipeline:
    augmented to train, plain to score.

    None where nothing reads them (oneshot without fine-tuning), after checking N all the same.

    The reference draws with replacement (np.random.choice); here without, so no image repeats.
    The reference also scores search candidates on augmented images; here on plain ones (the
    test pipeline's view), so that a candidate's fitness does not depend on a random crop.
    """
    available = _training_set_size(run)
    if settings.calib_samples > available:
        raise ConfigError(f"--calib-samples {settings.calib_samples}: larger than the training set "
                          f"({available})")
    generator = torch.Generator().manual_seed(settings.seed)
    index = torch.randperm(available, generator=generator)[: settings.calib_samples]
    if settings.method == "oneshot" and settings.epochs == 0:
        return None
    train = run.data.train
    if isinstance(train, ByteBlockLoader):  # blocks of text; training reads them at a random offset
        return tuple(train.subset(index, settings.batch_size, settings.seed, training)
                     for training in (True, False))
    if not isinstance(train, TensorLoader):
        return _imagenet_calibration(run, settings, index.numpy())
    images, labels = train.images[index], train.labels[index]
    common = dict(global_batch=settings.batch_size, seed=settings.seed, mean=train.mean, std=train.std)
    return (TensorLoader(images, labels, train=True, augment=run.config.data.augment, **common),
            TensorLoader(images, labels, train=False, augment=False, **common))


def _imagenet_calibration(run: TrainedRun, settings: PruneSettings,
                          index: np.ndarray) -> tuple[BatchLoader, BatchLoader]:
    """The run's FFCV or torchvision pipelines over the training images `index`.

    Train: random resized crop and flip at the resolution of the run's last training epoch;
    plain: the test pipeline (center crop at val_res) on the same training images.
    """
    data = run.config.data
    last_epoch = max(run.step - 1, 0) // len(run.data.train)
    side = resolution_at(last_epoch, data.imagenet)
    fixed = dataclasses.replace(data.imagenet, min_res=side, max_res=side, start_ramp=0, end_ramp=0)
    root, batch, seed = Path(data.path), settings.batch_size, settings.seed
    if data.loader == "ffcv":
        from distsparse.data.ffcv_loader import ffcv_train_loader, ffcv_val_loader

        path, cpu, indices = root / "train.beton", torch.device("cpu"), index.astype(np.uint64)
        return (ffcv_train_loader(path, fixed, batch, seed, 1, cpu, indices),
                ffcv_val_loader(path, fixed, batch, 0, 1, cpu, indices))
    from distsparse.data.imagefolder import ImageFolderLoader

    loaders = tuple(ImageFolderLoader(root / "train", fixed, batch, seed, train) for train in (True, False))
    for loader in loaders:
        folder = loader.dataset
        folder.samples = folder.imgs = [folder.samples[i] for i in index.tolist()]
        folder.targets = [label for _, label in folder.samples]
    return loaders


class _Context:
    """The loaded run, where it runs, and the records being written."""

    def __init__(self, run: TrainedRun, device: torch.device, settings: PruneSettings,
                 log: MetricsLog, calibration: tuple[BatchLoader, BatchLoader] | None) -> None:
        self.run, self.device, self.settings, self.log = run, device, settings, log
        self.dtype = getattr(torch, run.config.train.dtype)
        self.calib_train, self.calib_eval = calibration or (None, None)
        self.per_epoch = len(self.calib_train) if calibration else 0
        self.phase_steps = settings.epochs * self.per_epoch
        """Fine-tuning steps: records are numbered from -phase_steps up to 0, the pruned state."""

    def record(self, kind: str, step: int, **values: Any) -> None:
        """Log a record at fine-tuning step `step`, numbered so that the last step is step 0."""
        self.log.log(kind, step - self.phase_steps, **values)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs on the device; images in the run's dtype, tokens as they are."""
        return model_input(x, self.device, self.dtype)

    @torch.no_grad()
    def evaluate(self, forward: Callable[[torch.Tensor], torch.Tensor],
                 loader: BatchLoader) -> dict[str, float]:
        """Top-1 and mean cross-entropy of `forward` over a loader (the caller sets eval mode)."""
        correct = loss = count = 0.0
        for x, y in loader.batches(0):
            output, y = _rows(forward(self.to_device(x))), y.to(self.device).flatten()
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
        if not norms:
            return
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


def _rows(output: torch.Tensor) -> torch.Tensor:
    """Logits as (predictions, classes): a language model's (B, T, V) becomes (B * T, V)."""
    return output.flatten(0, -2)


def _optimizer(model: nn.Module, settings: PruneSettings, steps: int,
               per_epoch: int) -> tuple[torch.optim.Optimizer, Scheduler]:
    config = TrainConfig(lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay,
                         lr_schedule="cosine", warmup_epochs=settings.warmup_epochs)
    optimizer = build_optimizer(model, config)
    return optimizer, build_lr_scheduler(optimizer, steps, per_epoch, config)


def _sparsifier(ctx: _Context, optimizer: torch.optim.Optimizer,
                masks: dict[str, torch.Tensor]) -> Sparsifier:
    """A static-mask Sparsifier over the run's masked weights (its include / exclude rules)."""
    method = ctx.run.config.method
    return Sparsifier(ctx.run.model, optimizer, method="static", sparsity=ctx.settings.sparsity,
                      total_steps=max(ctx.phase_steps, 1), masks=masks,
                      dense_first_layer=method.dense_first_layer,
                      dense_last_layer=method.dense_last_layer, include=method.include,
                      exclude=method.exclude)


def _fine_tune(ctx: _Context, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Scheduler,
               loss_of: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
               step_optimizer: Callable[[], object], evaluate_epoch: Callable[[], dict[str, float]],
               sparsity: float, label: str) -> tuple[int, float]:
    """The loop both methods share; returns (steps, training images per second).

    `step_optimizer` takes the optimizer step: `Sparsifier.step` on a fixed mask (oneshot), the
    plain optimizer step where the mask is re-derived in every forward (UniPTS's STE).
    """
    epochs, per_epoch = ctx.settings.epochs, ctx.per_epoch
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
            step_optimizer()
            scheduler.step()
            seconds += time.perf_counter() - tick
            images += len(y)
            step += 1
            bar.update(1)
            if step % log_every == 0 or step == epochs * per_epoch:
                ctx.record("train", step, epoch=epoch + 1 - epochs, loss=loss.item(),
                           lr=scheduler.get_last_lr()[0], sparsity=sparsity)
                bar.set_postfix(loss=f"{loss.item():.3f}")
        result = evaluate_epoch()
        ctx.record("eval", step, epoch=epoch + 1 - epochs, sparsity=sparsity,
                   test_top1=result["top1"], test_loss=result["loss"])
    bar.close()
    return step, images / seconds if seconds else 0.0


def _oneshot(ctx: _Context, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
             scheduler: Scheduler) -> tuple[Sparsifier, int, float]:
    """Global / uniform / ERK top-|w|, then fine-tuning with cross-entropy on the fixed mask."""
    model = ctx.run.model
    weights = {name: p.detach() for name, p in params.items()}
    sparsifier = _sparsifier(ctx, optimizer,
                             oneshot_masks(weights, ctx.settings.sparsity, ctx.settings.allocation))

    def loss_of(x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
        return F.cross_entropy(_rows(model(x)), y.flatten())

    def evaluate_epoch() -> dict[str, float]:
        model.eval()
        return ctx.evaluate(model, ctx.run.data.test)

    steps, rate = _fine_tune(ctx, model, optimizer, scheduler, loss_of, sparsifier.step,
                             evaluate_epoch, 1.0 - sparsifier.density(),
                             f"oneshot {ctx.settings.sparsity:.0%}")
    return sparsifier, steps, rate


def _search(ctx: _Context, params: dict[str, torch.Tensor]) -> SearchResult:
    """UniPTS's layer-sparsity search; fitness = calibration top-1 after BN recalibration."""
    model, settings = ctx.run.model, ctx.settings
    masks = MaskSet(params)
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
        ctx.record("search", 0, generation=generation, best_fitness=max(scores),
                   mean_fitness=sum(scores) / len(scores))

    numels = {name: p.numel() for name, p in masks.params.items()}
    result = search_layer_counts(numels, settings.sparsity, fitness, search, settings.seed,
                                 on_generation)
    bar.close()
    model.load_state_dict(dense_state)
    return result


def _unipts(ctx: _Context, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
            scheduler: Scheduler, counts: dict[str, int]) -> tuple[Sparsifier, int, float]:
    """Dynamic sparse training by distillation from the dense net at the searched layer counts;
    the final top-|w| masks then go to a static Sparsifier, which zeroes every copy.

    The teacher runs in train mode (batch statistics), as the reference's `fp_model.train()`.
    """
    model = ctx.run.model
    teacher = copy.deepcopy(model).train()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)

    def loss_of(x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
        sparse = {name: ste_sparse_weight(p, counts[name]) for name, p in params.items()}
        with torch.no_grad():
            target = teacher(x)
        return distillation_loss(_rows(torch.func.functional_call(model, sparse, (x,))),
                                 _rows(target), epoch)

    def evaluate_epoch() -> dict[str, float]:
        model.eval()
        current = layer_topk_masks({n: p.detach() for n, p in params.items()}, counts)
        sparse = {n: p.detach().masked_fill(~current[n], 0) for n, p in params.items()}
        return ctx.evaluate(lambda x: torch.func.functional_call(model, sparse, (x,)),
                            ctx.run.data.test)

    numel = sum(p.numel() for p in params.values())
    steps, rate = _fine_tune(ctx, model, optimizer, scheduler, loss_of, optimizer.step,
                             evaluate_epoch, 1.0 - sum(counts.values()) / numel,
                             f"unipts {ctx.settings.sparsity:.0%}")
    final = layer_topk_masks({n: p.detach() for n, p in params.items()}, counts)
    return _sparsifier(ctx, optimizer, final), steps, rate


def _continuation_optimizer(model: nn.Module, config: Config,
                            per_epoch: int) -> tuple[torch.optim.Optimizer, Scheduler]:
    """The optimizer and LR schedule at step 0 of the run's config (as the trainer builds them)."""
    optimizer = build_optimizer(model, config.train)
    total = config.train.max_steps or config.train.epochs * per_epoch
    return optimizer, build_lr_scheduler(optimizer, total, per_epoch, config.train)


def _output_config(config: Config, settings: PruneSettings, out: Path) -> Config:
    """The run's config as a static-mask run at the pruned sparsity and allocation, in `out`."""
    method = dataclasses.replace(config.method, name="static", sparsity=settings.sparsity,
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
        (staging / "prune.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
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
    params = sparsifiable_parameters(model, method_config.dense_first_layer,
                                     method_config.dense_last_layer, method_config.include,
                                     method_config.exclude)
    optimizer, scheduler = _optimizer(model, settings, ctx.phase_steps, ctx.per_epoch)
    counter = FlopCounter(model, ctx.to_device(next(run.data.test.batches(0))[0]))
    searched = None
    if settings.method == "oneshot":
        sparsifier, steps, rate = _oneshot(ctx, params, optimizer, scheduler)
    else:
        searched = _search(ctx, params)
        sparsifier, steps, rate = _unipts(ctx, params, optimizer, scheduler, searched.counts)
    masks = sparsifier.mask_set
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
    continuation, continuation_scheduler = _continuation_optimizer(model, config, len(run.data.train))
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
        "epochs": settings.epochs,
        "seed": settings.seed,
        "preset": settings.preset,
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
        "finetune_epochs": settings.epochs,
        "batch_size": settings.batch_size,
        "lr": settings.lr,
        "warmup_epochs": settings.warmup_epochs,
    }
    if searched is not None:
        summary["search"] = {**dataclasses.asdict(settings.search), "best_fitness": searched.fitness,
                             "evaluations": searched.evaluations, "logits": searched.logits}
    (staging / "config.yaml").write_text(to_yaml(config), encoding="utf-8")
    state = {  # step 0 of the static-mask run `distsparse train --resume` continues
        "config": schedule_relevant(config),
        "step": 0,
        "model": model.state_dict(),
        "optimizer": continuation.state_dict(),
        "scheduler": continuation_scheduler.state_dict(),
        "masks": masks.state_dict(),
        "method": {},
        "rng": {"torch": torch.get_rng_state()},
        "flops": {"total": 0.0, "steps": 0},
        "wall_s": wall,
    }
    save_checkpoint(state, staging / CHECKPOINT_NAME)
    write_summary(staging, summary)
    return summary
