"""The training loop every backend and launcher shares, a user of `distsparse.Sparsifier`.

load or start -> for each step: forward, backward through the backend's wrapper, Sparsifier.step
(optimizer step or RigL's skip, every copy masked, the mask updated on schedule), LR step -> log,
checkpoint, evaluate at epoch ends -> summary, plot. The backend wraps the model; its access
(handed to the Sparsifier) reaches the weight, master copy and optimizer state, and its
checkpointer writes the run's stateful parts in the wrapper's format. Nothing here depends on
which backend runs.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from distsparse.config import Config, run_directory, schedule_relevant, to_yaml
from distsparse.data.bundle import model_input
from distsparse.data.loader import BatchLoader, DataBundle, build_data
from distsparse.distributed.process_group import (
    DistEnv,
    all_reduce,
    env_from_variables,
    init_process_group,
    leave_process_group,
)
from distsparse.engine.backends import Backend, backend_settings, build_backend
from distsparse.engine.checkpointer import SavedCheckpoint, find_checkpoint
from distsparse.engine.flops import FlopCounter
from distsparse.engine.metrics import MetricsLog, truncate_metrics
from distsparse.engine.optim import build_lr_scheduler, build_optimizer
from distsparse.engine.report import format_table, plot_run, write_summary
from distsparse.engine.stop_signal import StopSignal
from distsparse.errors import CheckpointError, ConfigError, DistsparseError
from distsparse.methods import SparsityMethod, TrainingSchedule, build_method
from distsparse.methods.init_masks import InitContext
from distsparse.models import build_model
from distsparse.sparsifier import MaskUpdate, Sparsifier
from distsparse.sparsity.masks import MaskSet, sparsifiable_parameters

__all__ = ["CheckpointCallback", "Trainer", "train"]

CheckpointCallback = Callable[[Path, dict[str, Any]], None]
"""Called on every rank after each checkpoint with the run directory and the step's metrics."""

_FRESH_SCHEDULE_KEYS = ("epochs", "max_steps", "batch_size", "optimizer", "lr", "momentum",
                        "nesterov", "weight_decay", "lr_schedule", "warmup_epochs", "lr_milestones",
                        "lr_gamma", "label_smoothing", "betas")
"""train.* keys a resume from step 0 may change (fine-tuning a pruned run): nothing trained yet."""


def train(config: Config, resume: Path | None = None,
          on_checkpoint: CheckpointCallback | None = None) -> dict[str, Any]:
    """Train a run (or resume one) and return its summary."""
    trainer = Trainer(config, resume, on_checkpoint)
    try:
        summary = trainer.fit()
    finally:
        if trainer.owns_process_group:
            leave_process_group()
    if trainer.env.is_main:
        print(format_table(summary))
        if "stopped_by_signal" in summary:
            print(f"distsparse: stopped by {summary['stopped_by_signal']} at step {summary['steps']} "
                  f"with a checkpoint; continue with --resume {trainer.run_dir}", file=sys.stderr)
    return summary


class Trainer:
    """Builds everything from a config, validates before writing, then runs `fit`."""

    def __init__(self, config: Config, resume: Path | None = None,
                 on_checkpoint: CheckpointCallback | None = None) -> None:
        self.env: DistEnv = env_from_variables()
        self.on_checkpoint = on_checkpoint
        self.last_evaluation: dict[str, float] = {}
        if self.env.world_size > 1 and config.backend.name == "single":
            raise ConfigError(
                f"config key 'backend.name' = 'single': {self.env.world_size} workers were "
                "started; expected ddp, deepspeed or fsdp"
            )
        self.device = _device(config.train.device, self.env)
        self.input_dtype: torch.dtype = getattr(torch, config.train.dtype)
        self.owns_process_group = init_process_group(self.env, self.device)
        self.data: DataBundle = build_data(config, self.env.rank, self.env.world_size,
                                           self.device)
        self.schedule = _schedule(config, self.data.train)
        if config.method.pai_batches > len(self.data.train):
            raise ConfigError(
                f"config key 'method.pai_batches' = {config.method.pai_batches}: expected at most "
                f"the {len(self.data.train)} batches of an epoch"
            )
        self.method: SparsityMethod = build_method(config.method, self.schedule, config.seed)
        self.config = dataclasses.replace(config, method=self.method.config)
        # merged and checked before anything is written
        settings = backend_settings(config, self.env.world_size)
        torch.manual_seed(config.seed)  # the model is built before anything is written
        model = build_model(config.model.name, self.data.num_classes, self.data.in_channels,
                            config.model.kwargs)
        self.run_dir = resume if resume is not None else run_directory(config)
        checkpoint = self._check_resume() if resume is not None else None
        if checkpoint is None:
            self._on_main_then_agree(lambda: _claim_empty(self.run_dir))

        model = model.to(device=self.device, dtype=getattr(torch, config.train.dtype))
        if config.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        method = self.method.config
        try:
            shapes = {name: tuple(p.shape) for name, p in sparsifiable_parameters(
                model, method.dense_first_layer, method.dense_last_layer, method.include,
                method.exclude).items()}
        except ValueError as exc:
            raise ConfigError(f"config key 'method.include' / 'method.exclude': {exc}") from None
        self.previous_wall_s = 0.0
        sample = next(self.data.test.batches(0))[0]
        self.flops = FlopCounter(model, self._to_device(sample))
        if checkpoint is None:  # full masks before wrapping: pruning at init scores the model
            masks = self.method.initial_masks(shapes, self._init_context(model))
        else:  # replaced by the checkpoint's once the wrapper exists
            masks = {name: torch.ones(shape, dtype=torch.bool) for name, shape in shapes.items()}
            checkpoint.restore_model(model)
        sparse_gradients = config.backend.sparse_gradients and self.method.uses_masks
        self.backend: Backend = build_backend(config, model, self._optimizer_factory(checkpoint),
                                              self.env, self.device, settings, sparse_gradients)
        self.sparsifier = Sparsifier.from_method(
            self.method, getattr(self.backend.model, "module", self.backend.model),
            self.backend.access, masks)
        self.masks: MaskSet = self.sparsifier.mask_set
        if checkpoint is not None:
            self._restore_training_state(checkpoint.restore_wrapped(self.backend.checkpointer),
                                         checkpoint.source)
        self.input_dtype = self.backend.input_dtype or self.input_dtype
        self.flops.set_masks(self.masks)
        self.log: MetricsLog | None = None
        if self.step == 0 and self.env.is_main:  # a resume from step 0 may change the schedule
            (self.run_dir / "config.yaml").write_text(to_yaml(self.config), encoding="utf-8")
        if checkpoint is None:
            self._save(0.0)  # a run stopped before its first epoch ends can still resume
        if self.env.is_main:
            if checkpoint is not None:
                truncate_metrics(self.run_dir, self.step)
            self.log = MetricsLog(self.run_dir)

    def _optimizer_factory(
        self, checkpoint: SavedCheckpoint | None
    ) -> Callable[[torch.nn.Module], torch.optim.Optimizer]:
        """Builds the optimizer over the module a backend gives it (bare or sharded) and the LR
        scheduler on it, then loads the checkpoint's optimizer state: after the scheduler, which
        would otherwise reset the saved learning rates."""
        def build(module: torch.nn.Module) -> torch.optim.Optimizer:
            optimizer = build_optimizer(module, self.config.train)
            self.scheduler = build_lr_scheduler(optimizer, self.schedule.total_steps,
                                                self.schedule.steps_per_epoch, self.config.train)
            if checkpoint is not None:
                checkpoint.restore_optimizer(module, optimizer)
            return optimizer

        return build

    def _init_context(self, model: torch.nn.Module) -> InitContext:
        """The model and the first method.pai_batches global batches, for pruning at init."""
        count = self.config.method.pai_batches

        def batches():
            for _, (x, y) in zip(range(count), self.data.train.batches(0)):
                yield self._to_device(x), y.to(self.device)

        input_shape = tuple(next(self.data.test.batches(0))[0].shape[1:])
        progress = self.config.run.progress and self.env.is_main
        return InitContext(model, batches, self.config.train.batch_size, input_shape, all_reduce,
                           progress)

    @property
    def step(self) -> int:
        """Optimizer steps taken (the Sparsifier's count)."""
        return self.sparsifier.step_count

    @step.setter
    def step(self, step: int) -> None:
        self.sparsifier.step_count = step

    def _on_main_then_agree(self, action) -> None:
        """Run a check-and-write on rank 0 only; every rank stops if it failed."""
        error = None
        if self.env.is_main:
            try:
                action()
            except DistsparseError as exc:
                error = exc
        failed = all_reduce(torch.tensor([int(error is not None)], device=self.device))
        if error is not None:
            raise error
        if int(failed):
            raise DistsparseError("rank 0 stopped with an error (see its message)")

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs on the device (`model_input`), channels-last where the run asks."""
        x = model_input(x, self.device, self.input_dtype)
        if self.config.train.channels_last and x.is_floating_point() and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _autocast(self) -> torch.autocast:
        """bf16 autocast of forward and loss when train.autocast=bf16 (parameters stay fp32)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.config.train.autocast == "bf16")

    def _check_resume(self) -> SavedCheckpoint:
        """The run's newest checkpoint, checked against this config and backend; not loaded."""
        checkpoint = find_checkpoint(self.run_dir)
        checkpoint.check(self.config.backend, self.env.world_size)
        written = checkpoint.config
        if checkpoint.step == 0:  # nothing trained yet: the schedule may change
            current = schedule_relevant(self.config)["train"]
            fresh = {key: current[key] for key in _FRESH_SCHEDULE_KEYS}
            written = {**written, "train": {**written["train"], **fresh}}
        # Keys added to the schema after the run was written count as their defaults.
        stored = _merged(schedule_relevant(Config()), written)
        current = schedule_relevant(self.config)
        difference = _first_difference(stored, current)
        if difference is not None:
            key, old, new = difference
            raise CheckpointError(
                f"run {self.run_dir} was trained with {key}={old!r}; this config has {key}={new!r}"
            )
        return checkpoint

    def fit(self) -> dict[str, Any]:
        """Train to the end of the schedule (or run.stop_at_step); return the summary."""
        start_time = time.perf_counter()
        total, per_epoch = self.schedule.total_steps, self.schedule.steps_per_epoch
        stop = min(total, self.config.run.stop_at_step or total)
        bar = tqdm(total=total, initial=self.step,
                   disable=not (self.config.run.progress and self.env.is_main),
                   desc=f"{self.method.name} {self.config.method.sparsity:.0%}", unit="step")
        signals = StopSignal(self.config.run.signal_check_every)
        with signals:
            evaluation = self._loop(stop, per_epoch, total, start_time, bar, signals)
        bar.close()
        if evaluation is None:
            evaluation = self.evaluate()
        self.backend.checkpointer.finish(self.run_dir, self._training_state(
            time.perf_counter() - start_time))
        wall = self.previous_wall_s + time.perf_counter() - start_time
        summary = self._summary(evaluation, wall, self.images / self.train_seconds
                                if self.train_seconds else 0.0)
        summary["completed"] = self.step >= total
        if signals.received is not None and self.step < total:
            summary["stopped_by_signal"] = signals.received.name
        if self.log is not None:
            write_summary(self.run_dir, summary)
            plot_run(self.run_dir, summary["layer_density"])
            self.log.close()
        return summary

    def _loop(self, stop: int, per_epoch: int, total: int, start_time: float, bar: tqdm,
              signals: StopSignal) -> dict[str, float] | None:
        """Steps until `stop` or a stop signal; returns the last evaluation, if any."""
        self.train_seconds, self.images = 0.0, 0
        evaluation = None
        while self.step < stop:
            epoch, first_batch = divmod(self.step, per_epoch)
            for x, y in self.data.train.batches(epoch, first_batch):
                tick = time.perf_counter()
                loss, correct = self._train_step(self._to_device(x), y.to(self.device))
                self.train_seconds += time.perf_counter() - tick
                self.images += len(y) * self.env.world_size
                bar.update(1)
                if self.step % self.config.train.log_every == 0:
                    loss_value = loss.item()  # the only host sync of a step, on logging steps
                    self._log_train(epoch, loss_value, int(correct) / y.numel())
                    bar.set_postfix(loss=f"{loss_value:.3f}", sparsity=f"{self._sparsity():.3f}")
                epoch_done = self.step % per_epoch == 0 or self.step == total
                if epoch_done:
                    evaluation = self.last_evaluation = self.evaluate()
                    self._log("eval", epoch=epoch + 1, sparsity=self._sparsity(), **evaluation)
                if signals.agreed(self.step):
                    stop = self.step  # every rank saw the same flag: checkpoint here and stop
                every = self.config.run.checkpoint_every
                if epoch_done or self.step == stop or (every and self.step % every == 0):
                    self._save(time.perf_counter() - start_time)
                if self.step >= stop:
                    break
        return evaluation

    def _log(self, kind: str, **values: Any) -> None:
        if self.log is not None:
            self.log.log(kind, self.step, **values)

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; returns the loss and the count of correct predictions (on device)."""
        model = self.backend.model
        model.train()
        step = self.step
        dense = self.sparsifier.grows_by_gradient(step)
        with self._autocast():
            output = model(x)
            loss = F.cross_entropy(output.flatten(0, -2), y.flatten(),
                                   label_smoothing=self.config.train.label_smoothing)
        self.backend.backward(loss)
        self.sparsifier.step()
        update = self.sparsifier.last_update
        if update is not None and update.step == step:
            self._log_mask_update(update)
        self.scheduler.step()
        self.flops.add_step(dense_gradient=dense)
        return loss.detach(), (output.detach().argmax(-1) == y).sum()

    def _log_mask_update(self, update: MaskUpdate) -> None:
        self.flops.set_masks(self.masks)
        # Only the logging rank needs it, but where masks are pieces every rank joins the gather.
        fingerprint = self.masks.fingerprint() if self.log is not None or self.masks.sharded else None
        if self.log is not None:
            self.log.log("mask_update", update.step, sparsity=self._sparsity(),
                         layers_changed=update.layers_changed, fingerprint=fingerprint,
                         seconds=update.seconds)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Top-1 and mean loss on the whole test set (per token for a language model)."""
        model = self.backend.model
        model.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)
        for x, y in self.data.test.batches(0):
            x, y = self._to_device(x), y.to(self.device)
            with self._autocast():
                output = model(x)
            totals[0] += (output.argmax(-1) == y).sum()
            totals[1] += F.cross_entropy(output.flatten(0, -2).float(), y.flatten(),
                                         reduction="sum").double()
            totals[2] += y.numel()
        correct, loss_sum, count = all_reduce(totals).tolist()
        result = {"test_top1": correct / count, "test_loss": loss_sum / count}
        if self.data.byte_level:  # nats per byte to bits per byte
            result["test_bits_per_byte"] = result["test_loss"] / math.log(2)
        return result

    def _sparsity(self) -> float:
        return 1.0 - self.masks.density() if self.method.uses_masks else 0.0

    def _log_train(self, epoch: int, loss: float, accuracy: float) -> None:
        self._log("train", epoch=epoch + 1, loss=loss, train_top1=accuracy,
                  lr=self.scheduler.get_last_lr()[0], sparsity=self._sparsity())

    def _training_state(self, wall_s: float) -> dict[str, Any]:
        """Everything a checkpoint holds but the model and optimizer (a collective where masks are
        pieces)."""
        return {
            "config": schedule_relevant(self.config),
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "masks": self.masks.state_dict(),
            "method": self.method.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
            "flops": self.flops.state_dict(),
            "wall_s": self.previous_wall_s + wall_s,
        }

    def _save(self, wall_s: float) -> None:
        self.backend.checkpointer.save(self.run_dir, self.step, self._training_state(wall_s))
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.run_dir, {"step": self.step, "sparsity": self._sparsity(),
                                              **self.last_evaluation})

    def _restore_training_state(self, state: dict[str, Any], source: Path) -> None:
        """Masks, method and step (through the Sparsifier), schedule, FLOPs, RNG and wall time."""
        try:
            self.sparsifier.load_state_dict(state)
        except (RuntimeError, ValueError) as exc:
            raise CheckpointError(
                f"checkpoint {source} does not fit the model: {str(exc).splitlines()[0]}"
            ) from None
        if int(state["step"]) > 0:  # at step 0 the fresh schedule of the current config
            self.scheduler.load_state_dict(state["scheduler"])
        self.flops.load_state_dict(state["flops"])
        torch.set_rng_state(state["rng"]["torch"])
        self.previous_wall_s = float(state["wall_s"])

    def _summary(self, evaluation: dict[str, float], wall_s: float, images_per_s: float) -> dict[str, Any]:
        config = self.config
        layer_density = self.masks.layer_density() if self.method.uses_masks else \
            dict.fromkeys(self.masks.names, 1.0)
        return {
            "method": self.method.name,
            "target_sparsity": config.method.sparsity if self.method.uses_masks else 0.0,
            "sparsity": self._sparsity(),
            "layer_density": layer_density,
            "test_top1": evaluation["test_top1"],
            "test_loss": evaluation["test_loss"],
            **({"test_bits_per_byte": evaluation["test_bits_per_byte"]}
               if "test_bits_per_byte" in evaluation else {}),
            "world_size": self.env.world_size,
            "backend": config.backend.name,
            "launcher": config.launcher.name,
            "steps": self.step,
            "total_steps": self.schedule.total_steps,
            "epochs": config.train.epochs,
            "seed": config.seed,
            "wall_s": wall_s,
            "train_images_per_s": images_per_s,
            "mask_fingerprint": self.masks.fingerprint(),
            "train_flops_ratio": self.flops.ratio(),
            "run_dir": str(self.run_dir),
        }


def _device(name: str, env: DistEnv) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'train.device' = 'cuda': no CUDA device is available")
    return torch.device("cuda", env.local_rank) if name == "cuda" else torch.device("cpu")


def _schedule(config: Config, loader: BatchLoader) -> TrainingSchedule:
    per_epoch = len(loader)
    total = config.train.max_steps or config.train.epochs * per_epoch
    return TrainingSchedule(total_steps=total, steps_per_epoch=per_epoch)


def _claim_empty(run_dir: Path) -> None:
    try:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise CheckpointError(
                f"run directory {run_dir} already exists; resume it with --resume {run_dir} "
                "or choose another run.name or run.dir"
            )
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"config key 'run.dir' = '{run_dir}': cannot create the run directory "
                          f"({exc.strerror or exc})") from None


def _merged(defaults: Any, stored: Any) -> Any:
    """`stored` with the keys it lacks taken from `defaults`, recursively."""
    if isinstance(defaults, dict) and isinstance(stored, dict):
        return {**defaults, **{key: _merged(defaults.get(key), value) for key, value in stored.items()}}
    return stored


def _first_difference(stored: Any, current: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    if isinstance(stored, dict) and isinstance(current, dict):
        for key in sorted(set(stored) | set(current)):
            found = _first_difference(stored.get(key), current.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if stored == current else (prefix.rstrip("."), stored, current)
