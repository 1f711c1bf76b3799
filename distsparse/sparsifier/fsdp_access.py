"""FSDP2's parameter access (`torch.distributed.fsdp.fully_shard`): masks as DTensor local shards.

`fully_shard` replaces every parameter of the modules it wraps with a DTensor sharded Shard(0) over
a 1-D device mesh: rank r holds rows [r*c, min((r+1)*c, rows)) of dim 0, c = ceil(rows / world)
(`torch.chunk`'s split: uneven when the rows do not divide, empty on the last ranks when there
are fewer rows than ranks), which is one contiguous range of the flattened weight. Masks live as
those ranges (`PieceLayout` with a row as its unit). A mask update reads the local shard of each
weight and of its reduce-scattered gradient (already averaged over ranks: DDP's |mean g|) and
selects with the sharded radix select: no weight, gradient or score is gathered; what moves is the
selection's histograms and per-layer counts (kilobytes). After every step the local shard of the
weight and of every optimizer-state DTensor of its shape (SGD momentum, Adam exp_avg and
exp_avg_sq) is masked in place; FSDP2 steps the sharded fp32 parameter itself (a
MixedPrecisionPolicy casts only the all-gathered copy), so there is no other copy.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

from distsparse.errors import ConfigError
from distsparse.sparsifier.access import StepCopies
from distsparse.sparsity.layout import FullLayout, PieceLayout
from distsparse.sparsity.masks import MaskSet

__all__ = ["FSDPAccess", "local_shard"]


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, flattened: a view, so in-place writes reach the DTensor."""
    with torch.no_grad():  # outside autograd `to_local` returns the local tensor itself
        return tensor.to_local().view(-1)


class FSDPAccess:
    """The local shards of an FSDP2 model's masked weights, their gradients and optimizer state."""

    def __init__(self, model: FSDPModule, optimizer: torch.optim.Optimizer | None) -> None:
        """`optimizer`: the torch optimizer built over the sharded (DTensor) parameters."""
        if optimizer is None:
            raise ConfigError("argument 'optimizer': expected the torch optimizer of the model, "
                              "built after fully_shard")
        self.model, self.optimizer = model, optimizer
        self.mask_set: MaskSet | None = None
        self.copies = StepCopies(optimizer, view=local_shard, state_type=DTensor)
        self.group: dist.ProcessGroup | None = None
        self.rank, self.world_size = 0, 1

    def bind(self, masks: MaskSet) -> None:
        """Serve these masks; each masked weight must be a Shard(0) DTensor on one 1-D mesh."""
        meshes = set()
        for name, param in masks.params.items():
            if not isinstance(param, DTensor):
                raise ConfigError(f"parameter '{name}' is not sharded by fully_shard: apply "
                                  "fully_shard to the module that holds it (or exclude it)")
            mesh = param.device_mesh
            if mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
                raise ConfigError(f"parameter '{name}' is sharded as {tuple(param.placements)} on a "
                                  f"{mesh.ndim}-D mesh: expected Shard(0) on a 1-D mesh")
            meshes.add(mesh)
        if len(meshes) > 1:
            raise ConfigError("the masked parameters are sharded over different device meshes")
        mesh = meshes.pop()
        self.group, self.rank, self.world_size = mesh.get_group(), mesh.get_local_rank(), mesh.size()
        stepped = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        if any(id(p) not in stepped for p in masks.params.values()):
            raise ConfigError("argument 'optimizer': it does not hold the model's sharded "
                              "parameters (build it after fully_shard)")
        self.mask_set = masks

    def selection_layout(self, shapes: dict[str, tuple[int, ...]]) -> FullLayout:
        """Row shards of each flattened weight, as fully_shard split them (checked)."""
        units = {name: math.prod(shape[1:]) for name, shape in shapes.items()}
        layout = PieceLayout(shapes, self.rank, self.world_size, self._all_reduce, self._all_gather,
                             units)
        for name, param in self.mask_set.params.items():
            start, stop = layout.bounds[name]
            held = local_shard(param).numel()
            if held != stop - start:
                raise ConfigError(f"parameter '{name}': the local shard holds {held} elements, "
                                  f"expected the rows of "
                                  f"[{start}, {stop}) of the flattened weight")
        return layout

    def _all_reduce(self, tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor, group=self.group)

    def _all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor, group=self.group)
        return parts

    def weights(self) -> dict[str, torch.Tensor]:
        """The local shard of every masked weight, flattened (the parameter FSDP2 steps)."""
        return {name: local_shard(p).detach() for name, p in self.mask_set.params.items()}

    def grads(self) -> dict[str, torch.Tensor]:
        """The local shard of each reduce-scattered gradient (the mean over ranks), or zeros."""
        return {name: p.grad.to_local().detach().reshape(-1).clone() if p.grad is not None
                else torch.zeros_like(local_shard(p))
                for name, p in self.mask_set.params.items()}

    @torch.no_grad()
    def mask_all_copies(self, masks: MaskSet) -> None:
        """Zero masked-off entries in the local shard of each weight and of each optimizer-state
        DTensor of its shape."""
        self.copies.mask(masks)

    def step(self) -> None:
        """optimizer.step() on the sharded parameters."""
        self.optimizer.step()

    def skip_step(self) -> None:
        """Nothing to undo: the gradients are cleared by the caller's zero_grad."""

    def set_dense_gradients(self, needed: bool) -> None:
        """Nothing to switch: FSDP2 reduce-scatters whole gradients."""
