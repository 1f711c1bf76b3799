"""FSDP2 (`torch.distributed.fsdp.fully_shard`): sharding, backward and sharded checkpoints.

As torchtitan's `apply_fsdp` does (torchtitan `models/llama3/parallelize.py`), `fully_shard` is
applied to each child of every `nn.ModuleList` (the transformer blocks: one all-gather each) and
then to the root (embeddings, final norm, the tied head). Parameters become DTensors sharded
Shard(0), so the optimizer is built afterwards from a factory. The masks' side (local shards,
optimizer state) is `distsparse.sparsifier.fsdp_access.FSDPAccess`, this backend's `access`.
A `MixedPrecisionPolicy` passes through (`default_mixed_precision`: bf16 compute with fp32
gradient reduction on a GPU); FSDP2 steps the fp32 shards, the copy masks act on.

Checkpoints go through `torch.distributed.checkpoint` (DCP, `engine.native_checkpoint.save_dcp`):
every rank writes its shards of the model and the optimizer state (no gather), and rank 0 writes
the client state (the Sparsifier's full masks, method state, step, scheduler, RNG...) beside them.
A save goes to a staging directory that rank 0 renames to its place once every rank has finished,
so a crash mid-save never leaves a half checkpoint under the final name. DCP re-shards by global
index on load, so another world size resumes; the masks are full in the client state and
`Sparsifier.load_state_dict` slices them to the new shards. The ranks need a shared filesystem
for the checkpoint directory. In `distsparse train` the checkpoints are tags of
`RUN/checkpoints/fsdp/` (`FSDPCheckpointer`), and the run ends with `checkpoints/model.pt`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from distsparse.distributed.process_group import DistEnv
from distsparse.engine.backends.base import OptimizerFactory
from distsparse.engine.native_checkpoint import (
    CLIENT_STATE,
    FSDP_DIR,
    commit_native,
    load_dcp_model,
    load_dcp_optimizer,
    read_dcp_client_state,
    save_dcp,
    save_model_file,
    step_tag,
)
from distsparse.sparsifier.fsdp_access import FSDPAccess

__all__ = ["CLIENT_STATE", "FSDPBackend", "FSDPCheckpointer", "OptimizerFactory",
           "default_mixed_precision"]

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
        self.checkpointer = FSDPCheckpointer(self)

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
        save_dcp(Path(directory), self.model, self.optimizer, client_state, self.rank)

    def load_checkpoint(self, directory: Path) -> dict[str, Any]:
        """Load model and optimizer shards from `directory` on any world size (a collective);
        return the client state. CheckpointError names the directory when it is not complete."""
        client_state = read_dcp_client_state(Path(directory))
        load_dcp_model(Path(directory), self.model)
        load_dcp_optimizer(Path(directory), self.model, self.optimizer)
        return client_state


class FSDPCheckpointer:
    """A run's checkpoints as DCP tags of `RUN/checkpoints/fsdp` (`native_checkpoint`'s layout).

    Every rank writes its shards (no gather of weights or optimizer state); rank 0 then commits
    the tag (sidecar, `latest`, older tags removed). A resume reads the tag on any backend and
    world size (`native_checkpoint.DCPCheckpoint`). When training ends or stops, the gathered
    model and full masks go to `checkpoints/model.pt`, which evaluation, pruning and export read.
    """

    def __init__(self, backend: FSDPBackend) -> None:
        self.backend = backend

    def save(self, run_dir: Path, step: int, state: dict[str, Any]) -> None:
        backend, directory, tag = self.backend, Path(run_dir) / FSDP_DIR, step_tag(step)
        backend.save_checkpoint(directory / tag, state)
        if backend.rank == 0:
            commit_native(directory, tag, {"step": step, "world_size": backend.world_size,
                                           "config": state["config"]})

    def finish(self, run_dir: Path, state: dict[str, Any]) -> None:
        """Rank 0 writes the model (gathered on every rank) and masks as `checkpoints/model.pt`."""
        model = self.backend.model_state_dict()
        if self.backend.rank == 0:
            save_model_file(run_dir, state, model)
