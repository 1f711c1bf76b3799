"""Exact top-k selection with ties broken by global element index, and RigL's drop/grow step.

`torch.topk` does not specify which of several equal scores it returns; here the order is a stable
descending sort, so among equal scores the lower flat (global) index is chosen first. The result
depends only on the scores, never on the device, thread count or world size.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["drop_and_grow", "global_topk_masks", "topk_mask"]


def topk_mask(scores: torch.Tensor, k: int, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the `k` highest scores among `eligible` entries; ties go to lower indices."""
    flat = scores.reshape(-1)
    candidates = (
        torch.arange(flat.numel(), device=flat.device)
        if eligible is None
        else eligible.reshape(-1).nonzero().squeeze(1)
    )
    if not 0 <= k <= candidates.numel():
        raise ValueError(f"cannot select {k} of {candidates.numel()} eligible entries")
    order = torch.argsort(flat[candidates], descending=True, stable=True)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[candidates[order[:k]]] = True
    return mask.view(scores.shape)


def global_topk_masks(
    scores: Mapping[str, torch.Tensor],
    k: int,
    eligible: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Top-k over all layers at once; a layer's global indices follow the mapping's order."""
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).to(torch.float64) for n in names])
    flat_eligible = (
        None if eligible is None else torch.cat([eligible[n].reshape(-1) for n in names])
    )
    selected = topk_mask(flat, k, flat_eligible)
    masks, offset = {}, 0
    for name in names:
        numel = scores[name].numel()
        masks[name] = selected[offset : offset + numel].view(scores[name].shape)
        offset += numel
    return masks


def drop_and_grow(
    mask: torch.Tensor, drop_scores: torch.Tensor, grow_scores: torch.Tensor, n_swap: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One prune-and-regrow step of a layer; returns (new mask, newly grown connections).

    As google-research/rigl `sparse_optimizers_base.py::_get_update_op`: keep the nnz - n_swap
    active entries with the highest drop score, then grow n_swap entries with the highest grow
    score among all entries not kept (a just-dropped entry may be regrown; it then keeps its value,
    as rigl's default `reinit_when_same=False`). The active count is unchanged.
    """
    active = int(mask.sum())
    kept = topk_mask(drop_scores, active - n_swap, eligible=mask)
    grown = topk_mask(grow_scores, n_swap, eligible=~kept)
    return kept | grown, grown & ~mask
