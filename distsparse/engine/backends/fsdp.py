"""FSDP2 (`torch.distributed.fsdp.fully_shard`): sharding, backward and sharded checkpoints.

As torchtitan's `apply_fsdp` does (torchtitan `models/llama3/parallelize.py`), `fully_shard` is
applied to each child of every `nn.ModuleList` (the transformer blocks: one all-gather each) and
then to the root (embeddings, final norm, the tied head). Parameters become DTensors sharded
Shard(0), so the optimizer is built afterwards from a factory. The masks' side (local shards,
optimizer state) is `distsparse.sparsifier.fsdp_access.FSDPAccess`, this backend's `access`.

Checkpoints go through `torch.distributed.checkpoint` (DCP): every rank writes its shards of the
model and the optimizer state (no gather), and rank 0 writes the client state (the Sparsifier's
full masks, method state, step, scheduler, RNG...) beside them. A save goes to a staging directory
that rank 0 renames to its place once every rank has finished, so a crash mid-save never leaves a
half checkpoint under the final name. DCP re-shards by global index on load, so another world
size resumes; the masks are full in the client state and `Sparsifier.load_state_dict` slices
them to the new shards. The ranks need a shared filesystem for the checkpoint directory.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from distsparse.distributed.process_group import DistEnv
from distsparse.engine.checkpoint import load_checkpoint, save_checkpoint
from distsparse.errors import CheckpointError
from distsparse.sparsifier.fsdp_access import FSDPAccess

__all__ = ["CLIENT_STATE", "FSDPBackend", "OptimizerFactory", "default_mixed_precision"]

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]
CLIENT_STATE = "client_state.pt"
"""The file of a checkpoint directory that holds the client state (rank 0 writes it)."""
_FULL_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


def default_mixed_precision(device: torch.device) -> MixedPrecisionPolicy | None:
    """bf16 compute with fp32 gradient reduction on a GPU; none (full precision) elsewhere."""
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


class FSDPBackend:
    """A model sharded with `fully_shard` per ModuleList child and on the root, and its optimizer."""

    input_dtype: torch.dtype | None = None
    """FSDP2 casts floating inputs itself (MixedPrecisionPolicy.cast_forward_inputs)."""

    def __init__(
        self, model: nn.Module, optimizer_factory: OptimizerFactory, env: DistEnv,
        device: torch.device, mixed_precision: MixedPrecisionPolicy | None = None,
    ) -> None:
        """Shard `model` (moved to `device`) over all `env.world_size` ranks, then build the
        optimizer with `optimizer_factory(model)`. One process starts its own one-rank group."""
        self.rank, self.world_size = env.rank, env.world_size
        if not dist.is_initialized() and env.world_size == 1:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    store=dist.HashStore(), rank=0, world_size=1)
        mesh = init_device_mesh(device.type, (env.world_size,))
        options: dict[str, Any] = {"mesh": mesh}
        if mixed_precision is not None:
            options["mp_policy"] = mixed_precision
        model.to(device)
        for module in list(model.modules()):
            if isinstance(module, nn.ModuleList):
                for child in module:
                    fully_shard(child, **options)
        fully_shard(model, **options)
        self.model = model
        self.optimizer = optimizer_factory(model)
        self.access = FSDPAccess(model, self.optimizer)

    def backward(self, loss: torch.Tensor) -> None:
        """Clear the previous gradients, then backpropagate (FSDP2 reduce-scatters gradients)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The full model state dict under canonical names on the CPU, on rank 0 (other ranks get
        an empty dict): a collective, gathered one parameter at a time."""
        state = get_model_state_dict(self.model, options=_FULL_ON_CPU)
        if self.world_size == 1:  # one rank's "gathered" CPU tensors are the parameters themselves
            state = {key: value.clone() for key, value in state.items()}
        return state

    def optimizer_state_dict(self) -> dict[str, Any]:
        """The full optimizer state keyed by parameter name (DCP's layout) on rank 0's CPU: a
        collective; checkpoints use `save_checkpoint`, which gathers nothing."""
        return get_optimizer_state_dict(self.model, self.optimizer, options=_FULL_ON_CPU)

    def save_checkpoint(self, directory: Path, client_state: dict[str, Any]) -> None:
        """Every rank writes its shards of model and optimizer under `directory`, rank 0 the client
        state (a collective); `directory` appears, or is replaced, only once all are written."""
        directory = Path(directory)
        staging = directory.with_name(f".{directory.name}.partial")
        if self.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)  # left by a crash
            staging.mkdir(parents=True)
        dist.barrier()
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=staging)
        if self.rank == 0:
            save_checkpoint(client_state, staging / CLIENT_STATE)
        dist.barrier()
        if self.rank == 0:
            previous = directory.with_name(f".{directory.name}.previous")
            if directory.exists():
                directory.rename(previous)
            staging.rename(directory)
            shutil.rmtree(previous, ignore_errors=True)
        dist.barrier()

    def load_checkpoint(self, directory: Path) -> dict[str, Any]:
        """Load model and optimizer shards from `directory` on any world size (a collective);
        return the client state. CheckpointError names the directory when it is not complete."""
        directory = Path(directory)
        if not (directory / ".metadata").is_file() or not (directory / CLIENT_STATE).is_file():
            raise CheckpointError(f"checkpoint {directory} is not a complete FSDP checkpoint "
                                  f"(expected .metadata and {CLIENT_STATE})")
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=directory)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        client_state = load_checkpoint(directory / CLIENT_STATE, required=())
        client_state.pop("format")
        return client_state
