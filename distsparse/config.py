"""The run configuration: typed dataclasses, YAML load, dotted overrides, validation.

Every key is declared here; an unknown key, a value of the wrong type or one out of range ends
with a ConfigError naming the dotted key. A field left at None takes the chosen method's
published default (resolved by the method and written to the run's config.yaml).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distsparse.errors import ConfigError
from distsparse.models import LANGUAGE_MODELS, MODEL_NAMES, check_model
from distsparse.models.gpt import check_gpt_kwargs

__all__ = [
    "FASHION_MNIST_DIR",
    "FORTUNES_DIR",
    "INIT_CRITERIA",
    "Config",
    "ConfigError",
    "load_config",
    "run_directory",
    "schedule_relevant",
    "to_yaml",
]


FASHION_MNIST_DIR: str = "/usr/share/datasets/fashion-mnist"
"""Where Debian's dataset-fashion-mnist package puts the idx files (data.path's default)."""

FORTUNES_DIR: str = "/usr/share/games/fortunes"
"""Where Debian's fortunes package puts its plain-text fortune files (data.name=fortunes)."""


@dataclass
class MethodConfig:
    name: str = "granet_st"
    """Registered sparsity method: dense, static, set, rigl, gmp, granet, granet_st, or pruning at
    initialization then a static mask: random, magnitude, snip, grasp, synflow, iter_snip, force."""
    sparsity: float = 0.9
    """Target fraction of zeros over the masked weights, in [0, 1)."""
    distribution: str = "erk"
    """Layer-wise allocation of the (initial) mask: uniform, er, erk."""
    dense_first_layer: bool = False
    """Keep the first conv dense (rigl's first_layer_sparsity=0; GraNet's --rm_first)."""
    dense_last_layer: bool = False
    """Keep the last linear layer dense."""
    include: List[str] = field(default_factory=list)
    """Regular expressions fully matching the parameter names to mask (default: Conv and Linear
    weights, never embeddings or a head tied to one)."""
    exclude: List[str] = field(default_factory=list)
    """Regular expressions of parameter names never masked."""
    update_interval: int = 100
    """Steps between mask updates (Delta T)."""
    drop_fraction: Optional[float] = None
    """Initial fraction of active weights dropped and regrown per update (RigL/SET 0.3, GraNet 0.5)."""
    drop_fraction_anneal: str = "cosine"
    """Decay of the drop fraction over training: constant or cosine."""
    update_end: Optional[float] = None
    """Fraction of training after which the mask stops changing (RigL/SET 0.75, GraNet 1.0)."""
    init_density: Optional[float] = None
    """Density at the start of GMP/GraNet (1.0 dense-to-sparse; GraNet-ST 0.5)."""
    prune_start: float = 0.0
    """Fraction of training at which gradual pruning starts (GMP/GraNet)."""
    prune_end: float = 0.3
    """Fraction of training at which gradual pruning reaches the target (GraNet ImageNet: 30 of 100 epochs)."""
    prune_scope: str = "global"
    """Pruning by one global top-k (GraNet, SNIP, FORCE, ...) or per layer with counts from
    method.distribution (Zhu & Gupta): global or layer."""
    growth: str = "gradient"
    """GraNet regrowth criterion: gradient or random."""
    init: Optional[str] = None
    """Initial mask: random (by distribution) or a pruning-at-initialization criterion: magnitude,
    snip, grasp, synflow, iter_snip, force (default: the method's own; random for DST methods)."""
    pai_batches: int = 1
    """Global training batches that SNIP, GraSP, Iter-SNIP and FORCE average gradients over."""
    pai_iterations: Optional[int] = None
    """Pruning iterations of SynFlow (default 100), Iter-SNIP and FORCE (default 60)."""
    pai_schedule: str = "exp"
    """Density schedule of iterative pruning at init: exp (d^(k/n)) or linear."""
    grasp_reinit: bool = True
    """GraSP scores a copy whose nn.Linear weights are redrawn xavier-normal (seeded by `seed`),
    as alecwangcq/GraSP's default reinit=True; false scores the model's own initialization."""


@dataclass
class TrainConfig:
    epochs: int = 3
    """Training epochs (the schedule's length unless max_steps is set)."""
    max_steps: Optional[int] = None
    """If set, the schedule's length in optimizer steps instead of epochs."""
    batch_size: int = 128
    """Global batch size (all workers together)."""
    optimizer: str = "sgd"
    """sgd (momentum, optional Nesterov) or adamw (the transformers' optimizer)."""
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5.0e-4
    """L2 penalty (sgd) or decoupled weight decay (adamw) of weights; never biases or norms."""
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW's two decay rates of the gradient moments, each in [0, 1)."""
    lr_schedule: str = "cosine"
    """cosine, step or constant; per step, after warm-up."""
    warmup_epochs: float = 0.0
    lr_milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    """Step schedule: fractions of training where the LR is multiplied by lr_gamma."""
    lr_gamma: float = 0.1
    label_smoothing: float = 0.0
    device: str = "cpu"
    """cpu, cuda or auto."""
    dtype: str = "float32"
    """Parameter dtype: float32, or float64 for exactness checks."""
    log_every: int = 50
    """Steps between training-metric lines in metrics.jsonl."""
    channels_last: bool = False
    """Model and input batches in channels-last memory format (faster convolutions on GPU)."""
    autocast: str = "none"
    """Mixed precision of forward and loss: none or bf16 (torch.autocast; parameters stay fp32)."""


@dataclass
class SyntheticConfig:
    train_size: int = 2048
    test_size: int = 512
    image_size: int = 28
    channels: int = 1
    num_classes: int = 10


@dataclass
class ImageNetConfig:
    """ImageNet-format data (data.name=imagenet): FFCV's ResNet recipe (libffcv/ffcv-imagenet)."""

    num_workers: int = 8
    """Loader workers per process: FFCV's decoding threads, or torchvision DataLoader processes."""
    in_memory: bool = True
    """FFCV: read the .beton through the OS page cache (ffcv-imagenet's in_memory=1)."""
    min_res: int = 160
    """Training resolution up to epoch start_ramp (progressive resizing)."""
    max_res: int = 192
    """Training resolution from epoch end_ramp on; in between linear, rounded to a multiple of 32."""
    start_ramp: int = 0
    """Epoch at which the training resolution starts to grow from min_res."""
    end_ramp: int = 0
    """Epoch at which the training resolution reaches max_res."""
    val_res: int = 256
    """Test-time resolution (ffcv-imagenet's rn50 configs: 256)."""
    crop_ratio: float = 0.875
    """Test-time center crop: this fraction of the shorter side, resized to val_res (224/256)."""


@dataclass
class TextConfig:
    """A byte-level text corpus (data.name=fortunes): blocks of bytes, a held-out split."""

    block_size: int = 128
    """Bytes per training sequence (the model's context; gpt: at most model.kwargs.n_positions)."""
    val_fraction: float = 0.1
    """Fraction of the fortunes held out for validation (the test set of the run)."""
    split_seed: int = 0
    """Seed of the train/validation split, kept apart from `seed` so that runs of several seeds
    share one validation set."""


@dataclass
class DataConfig:
    name: str = "fashion_mnist"
    """Data set: fashion_mnist, synthetic, imagenet (any ImageNet-format folder or .beton pair)
    or fortunes (the byte-level text of Debian's fortunes package, for a language model)."""
    loader: str = "fmnist"
    """Pipeline: fmnist (idx files, in memory), synthetic (generated), for imagenet ffcv
    (data.path holds train.beton and val.beton) or torchvision (train/ and val/ ImageFolders),
    text for fortunes (blocks of bytes, in memory)."""
    path: str = FASHION_MNIST_DIR
    """Directory of the data set's files."""
    augment: bool = True
    """Random crop (2 px padding) and horizontal flip on training batches."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    imagenet: ImageNetConfig = field(default_factory=ImageNetConfig)
    text: TextConfig = field(default_factory=TextConfig)


@dataclass
class ModelConfig:
    name: str = "small_resnet"
    """small_resnet, resnet18, resnet50, mlp, vit (a small VisionTransformer), gpt (a GPT-2-style
    byte-level language model, with data.name=fortunes); torchvision:<name> (a torchvision
    classification model, untrained); or pkg.module:factory, any importable callable returning
    an nn.Module."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of gpt (n_layer, n_head, n_embd, n_positions, dropout), vit (image_size,
    patch_size, num_layers, num_heads, hidden_dim, mlp_dim, dropout), a torchvision model or a
    factory (which also receives num_classes and in_channels from the data if its signature
    names them); none for the other built-in models."""


@dataclass
class BackendConfig:
    name: str = "single"
    """single (one process), ddp (PyTorch DistributedDataParallel), deepspeed (DeepSpeed ZeRO) or
    fsdp (FSDP2 fully_shard per ModuleList child and the root; DCP checkpoints), one process per
    worker; with one worker every backend runs as single."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 (backend.name=deepspeed only)."""
    deepspeed_config: Optional[str] = None
    """DeepSpeed JSON (backend.name=deepspeed only) merged over distsparse's defaults; the batch
    sizes, ZeRO stage and optimizer come from this config and may only be repeated there with the
    same values."""
    sparse_gradients: bool = True
    """DDP: all-reduce only the gradient entries at active positions between dense-gradient steps."""
    sync_batchnorm: bool = True
    """DDP on CUDA: batch-norm statistics over the global batch (PyTorch supports it on GPU only)."""


@dataclass
class LauncherConfig:
    name: str = "local"
    """local (this process, or --nproc N processes), torchrun (started by torchrun, or by the
    deepspeed launcher with --no_local_rank) or ray (a Ray Train TorchTrainer started by this
    command)."""
    num_workers: int = 1
    """Number of worker processes (the world size)."""
    use_gpu: bool = False
    """Ray: one GPU per worker."""
    max_failures: int = 3
    """Ray: worker failures to recover from (restart from the last reported checkpoint)."""
    address: Optional[str] = None
    """Ray: cluster address (e.g. 127.0.0.1:6379 or auto); unset: RAY_ADDRESS, else a local one."""
    storage_path: Optional[str] = None
    """Ray: where Ray Train keeps reported checkpoints (shared across nodes); unset:
    <run directory's parent>/ray_results."""
    placement_strategy: str = "PACK"
    """Ray: where Ray Train places the workers (ScalingConfig.placement_strategy): PACK (on as
    few nodes as fit), SPREAD (across nodes where it can), STRICT_SPREAD (one worker per node:
    as many nodes as workers) or STRICT_PACK (all on one node)."""


@dataclass
class RunConfig:
    name: str = "run"
    """Run name; the run directory defaults to runs/<name>."""
    dir: Optional[str] = None
    """Explicit run directory (overrides runs/<name>)."""
    stop_at_step: Optional[int] = None
    """Checkpoint and stop after this step (resume later with --resume); not part of the schedule."""
    checkpoint_every: Optional[int] = None
    """Steps between checkpoints, in addition to every epoch end."""
    progress: bool = True
    """Show a progress bar."""
    signal_check_every: int = 1
    """Steps between the ranks' checks for a stop signal (an asynchronous CPU all-reduce)."""


@dataclass
class Config:
    seed: int = 0
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    run: RunConfig = field(default_factory=RunConfig)


INIT_CRITERIA = ("random", "magnitude", "snip", "grasp", "synflow", "iter_snip", "force")
"""Values of method.init: how the initial mask is chosen."""

_CHOICES = {
    "method.distribution": ("uniform", "er", "erk"),
    "method.drop_fraction_anneal": ("constant", "cosine"),
    "method.prune_scope": ("global", "layer"),
    "method.growth": ("gradient", "random"),
    "method.pai_schedule": ("exp", "linear"),
    "train.optimizer": ("sgd", "adamw"),
    "train.lr_schedule": ("cosine", "step", "constant"),
    "train.device": ("cpu", "cuda", "auto"),
    "train.dtype": ("float32", "float64"),
    "train.autocast": ("none", "bf16"),
    "data.name": ("fashion_mnist", "synthetic", "imagenet", "fortunes"),
    "data.loader": ("fmnist", "synthetic", "ffcv", "torchvision", "text"),
    "backend.name": ("single", "ddp", "deepspeed", "fsdp"),
    "launcher.name": ("local", "torchrun", "ray"),
    "launcher.placement_strategy": ("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"),
}


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Load a YAML file (or the defaults), apply `key.sub=value` overrides, validate."""
    merged = OmegaConf.structured(Config)
    try:
        if path is not None:
            merged = OmegaConf.merge(merged, _read_yaml(Path(path)))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override '{item}' is not of the form key.sub=value")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc)) from None
    config: Config = OmegaConf.to_object(merged)
    validate(config)
    return config


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml's scanner/parser errors have no common public base
        first_line = str(exc).strip().splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML: {first_line}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping of keys")
    return loaded


def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or "?"
    message = str(exc).splitlines()[0]
    if "not in" in message or "Missing key" in message:
        return f"unknown config key '{key}'"
    return f"config key '{key}': {message}"


def _check(condition: bool, key: str, value: Any, expected: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}' = {value!r}: expected {expected}")


def validate(config: Config) -> None:
    """Raise ConfigError naming the first invalid key."""
    for key, choices in _CHOICES.items():
        value = _get(config, key)
        _check(value in choices, key, value, "one of " + ", ".join(choices))
    m, t = config.method, config.train
    _check(0.0 <= m.sparsity < 1.0, "method.sparsity", m.sparsity, "a value in [0, 1)")
    _check(m.update_interval >= 1, "method.update_interval", m.update_interval, "an integer >= 1")
    for key in ("drop_fraction", "update_end", "init_density"):
        value = getattr(m, key)
        _check(value is None or 0.0 < value <= 1.0, f"method.{key}", value, "a value in (0, 1]")
    _check(
        0.0 <= m.prune_start < m.prune_end <= 1.0,
        "method.prune_end",
        m.prune_end,
        f"a value in (method.prune_start={m.prune_start}, 1]",
    )
    _check(m.init is None or m.init in INIT_CRITERIA, "method.init", m.init,
           "one of " + ", ".join(INIT_CRITERIA))
    _check(m.pai_batches >= 1, "method.pai_batches", m.pai_batches, "an integer >= 1")
    _check(m.pai_iterations is None or m.pai_iterations >= 1, "method.pai_iterations",
           m.pai_iterations, "an integer >= 1")
    _check(config.seed >= 0, "seed", config.seed, "an integer >= 0")
    _check(t.epochs >= 1, "train.epochs", t.epochs, "an integer >= 1")
    _check(t.max_steps is None or t.max_steps >= 1, "train.max_steps", t.max_steps, ">= 1")
    _check(t.batch_size >= 1, "train.batch_size", t.batch_size, "an integer >= 1")
    _check(t.lr > 0, "train.lr", t.lr, "a positive number")
    _check(0.0 <= t.label_smoothing < 1.0, "train.label_smoothing", t.label_smoothing, "[0, 1)")
    _check(t.warmup_epochs >= 0, "train.warmup_epochs", t.warmup_epochs, ">= 0")
    _check(t.log_every >= 1, "train.log_every", t.log_every, "an integer >= 1")
    _check(
        all(0.0 < f < 1.0 for f in t.lr_milestones), "train.lr_milestones", t.lr_milestones,
        "fractions of training in (0, 1)",
    )
    _check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, ">= 0")
    _check(len(t.betas) == 2 and all(0.0 <= b < 1.0 for b in t.betas), "train.betas", t.betas,
           "two values in [0, 1)")
    _check(config.backend.zero_stage in (0, 1, 2, 3), "backend.zero_stage", config.backend.zero_stage,
           "one of 0, 1, 2, 3")
    if config.backend.name == "fsdp":  # FSDP2 shards everything: no stage, no DeepSpeed JSON
        _check(config.backend.zero_stage == 0, "backend.zero_stage", config.backend.zero_stage,
               "0 (unset): only backend.name=deepspeed takes it")
        _check(config.backend.deepspeed_config is None, "backend.deepspeed_config",
               config.backend.deepspeed_config, "unset: only backend.name=deepspeed takes it")
    workers = config.launcher.num_workers
    _check(config.launcher.max_failures >= 0, "launcher.max_failures", config.launcher.max_failures,
           "an integer >= 0")
    _check(workers >= 1, "launcher.num_workers", workers, "an integer >= 1")
    _check(t.batch_size % workers == 0, "train.batch_size", t.batch_size,
           f"a multiple of launcher.num_workers={workers}")
    r = config.run
    _check(r.stop_at_step is None or r.stop_at_step >= 1, "run.stop_at_step", r.stop_at_step, ">= 1")
    _check(r.checkpoint_every is None or r.checkpoint_every >= 1, "run.checkpoint_every",
           r.checkpoint_every, ">= 1")
    _check(r.signal_check_every >= 1, "run.signal_check_every", r.signal_check_every,
           "an integer >= 1")
    _check(bool(r.name) and "/" not in r.name, "run.name", r.name, "a non-empty name without '/'")
    pairs = {("fashion_mnist", "fmnist"), ("synthetic", "synthetic"), ("imagenet", "ffcv"),
             ("imagenet", "torchvision"), ("fortunes", "text")}
    _check((config.data.name, config.data.loader) in pairs, "data.loader", config.data.loader,
           f"a loader for data.name={config.data.name!r} (fashion_mnist: fmnist; synthetic: "
           "synthetic; imagenet: ffcv or torchvision; fortunes: text)")
    _validate_imagenet(config.data.imagenet)
    _validate_text(config.data.text)
    check_model(config.model.name, config.model.kwargs)
    _validate_model_for_data(config)


def _validate_text(x: TextConfig) -> None:
    key = "data.text."
    _check(x.block_size >= 1, key + "block_size", x.block_size, "an integer >= 1")
    _check(0.0 < x.val_fraction < 1.0, key + "val_fraction", x.val_fraction, "a value in (0, 1)")
    _check(x.split_seed >= 0, key + "split_seed", x.split_seed, "an integer >= 0")


def _validate_model_for_data(config: Config) -> None:
    """A built-in language model takes text and a built-in image model images."""
    name, text = config.model.name, config.data.name == "fortunes"
    if name in LANGUAGE_MODELS:
        _check(text, "model.name", name, "an image model for data.name="
               f"{config.data.name!r} (gpt needs token data: data.name=fortunes)")
        positions = check_gpt_kwargs(config.model.kwargs)["n_positions"]
        block = config.data.text.block_size
        _check(block <= positions, "data.text.block_size", block,
               f"at most model.kwargs.n_positions={positions}, the model's longest context")
    elif text:
        _check(name not in MODEL_NAMES and not name.startswith("torchvision:"), "model.name",
               name, "a language model for data.name='fortunes' (gpt, or a pkg.module:factory)")


def _validate_imagenet(i: ImageNetConfig) -> None:
    key = "data.imagenet."
    _check(i.num_workers >= 1, key + "num_workers", i.num_workers, "an integer >= 1")
    _check(i.min_res >= 8, key + "min_res", i.min_res, "an integer >= 8")
    _check(i.max_res >= i.min_res, key + "max_res", i.max_res,
           f"an integer >= data.imagenet.min_res={i.min_res}")
    _check(i.start_ramp >= 0, key + "start_ramp", i.start_ramp, "an epoch >= 0")
    _check(i.end_ramp >= i.start_ramp, key + "end_ramp", i.end_ramp,
           f"an epoch >= data.imagenet.start_ramp={i.start_ramp}")
    _check(i.val_res >= 8, key + "val_res", i.val_res, "an integer >= 8")
    _check(0.0 < i.crop_ratio <= 1.0, key + "crop_ratio", i.crop_ratio, "a value in (0, 1]")


def _get(config: Config, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def run_directory(config: Config) -> Path:
    """The run directory: run.dir, or runs/<run.name>."""
    return Path(config.run.dir) if config.run.dir else Path("runs") / config.run.name


def to_yaml(config: Config) -> str:
    """The config as YAML text (what config.yaml in a run directory holds)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def schedule_relevant(config: Config) -> dict[str, Any]:
    """What determines the training trajectory: all but how and where it runs.

    Run control, launcher, backend, device and logging may change on resume (a run may continue
    on another world size with the same masks).
    """
    container = OmegaConf.to_container(OmegaConf.structured(config))
    for section in ("run", "launcher", "backend"):
        container.pop(section)
    for key in ("device", "log_every"):
        container["train"].pop(key)
    for key in ("num_workers", "in_memory"):
        container["data"]["imagenet"].pop(key)
    return container
