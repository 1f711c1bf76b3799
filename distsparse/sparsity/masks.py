"""MaskSet: one boolean mask per sparsifiable weight, applied in place, counted and fingerprinted.

Masks are held in the layout of the pieces this rank owns (`sparsity.layout`): full tensors, or
ZeRO-3's 1-D pieces once `use_layout` is given a `PieceLayout`. With pieces, counts and densities
come from a cache refreshed by one all-reduce whenever masks change (so reading them is free and no
collective), and `fingerprint` and `state_dict` gather the bit-packed masks (collectives: every
rank calls them, at checkpoints, summaries and mask-update logs only).
"""
from __future__ import annotations

import hashlib
import re
import weakref
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from distsparse.sparsity.layout import FullLayout, pack_bits

__all__ = ["ATTENTION_PROJECTIONS", "MaskSet", "canonical_name", "is_hf_conv1d",
           "sparsifiable_parameters"]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def canonical_name(name: str) -> str:
    """A parameter name without the prefixes DDP, DeepSpeed and torch.compile add."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def sparsifiable_parameters(
    model: nn.Module, dense_first_layer: bool = False, dense_last_layer: bool = False,
    include: Sequence[str] = (), exclude: Sequence[str] = (),
) -> dict[str, nn.Parameter]:
    """The weights to mask, by canonical name in module order; each tensor once.

    By default the weights of Conv and Linear layers, of Hugging Face's `Conv1D` (GPT-2's
    attention and MLP projections, stored transposed: in x out) and the input projections of
    `nn.MultiheadAttention` (`in_proj_weight`, or q/k/v_proj_weight; its out_proj is a Linear).
    Biases, normalization parameters, embeddings, positional embeddings and class tokens are
    never masked (as in rigl and GraNet), nor is a weight tied to an embedding (a tied LM head).
    `include` (regular expressions, each fully matching a canonical parameter name)
    replaces that default with the parameters it names; `exclude` removes matches; then the first
    and last of the selected layers may stay dense. A tensor under several names (weight tying)
    is selected once, under its first name. A pattern that matches no parameter raises ValueError.
    """
    named = {canonical_name(name): p for name, p in model.named_parameters(remove_duplicate=False)}
    first_name = {}
    for name, p in named.items():
        first_name.setdefault(id(p), name)
    if include:
        _check_all_match(include, named, "include")
        chosen = [p for name, p in named.items() if _matches(include, name, "include")]
    else:
        embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        chosen = [weight for module in model.modules() for weight in _default_weights(module)
                  if id(weight) not in embedded]
    selected = {first_name[id(p)]: p for p in chosen}
    _check_all_match(exclude, named, "exclude")
    selected = {name: p for name, p in selected.items() if not _matches(exclude, name, "exclude")}
    names = list(selected)
    if names and dense_first_layer:
        selected.pop(names[0])
    if len(names) > 1 and dense_last_layer:
        selected.pop(names[-1])
    return selected


_MASKED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
ATTENTION_PROJECTIONS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
"""nn.MultiheadAttention's input projection weights (one packed, or q/k/v apart)."""


def _default_weights(module: nn.Module) -> list[nn.Parameter]:
    """The weights of `module` itself (not its children) that are masked by default."""
    if isinstance(module, _MASKED_LAYERS) or is_hf_conv1d(module):
        return [module.weight]
    if isinstance(module, nn.MultiheadAttention):
        return [p for p in (getattr(module, key) for key in ATTENTION_PROJECTIONS) if p is not None]
    return []


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether `module` is Hugging Face's `transformers.pytorch_utils.Conv1D` (a Linear whose
    weight is stored in x out), recognised by class without importing transformers."""
    return any(cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")
               for cls in type(module).__mro__)


def _matches(patterns: Sequence[str], name: str, argument: str) -> bool:
    try:
        return any(re.fullmatch(pattern, name) for pattern in patterns)
    except re.error as exc:
        raise ValueError(f"{argument} pattern is not a regular expression: {exc}") from None


def _check_all_match(patterns: Sequence[str], named: Mapping[str, nn.Parameter], argument: str) -> None:
    for pattern in patterns:
        if not any(_matches([pattern], name, argument) for name in named):
            raise ValueError(f"{argument} pattern {pattern!r} matches no parameter of the model")


_SAME_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}
"""The integer dtype whose bits a floating-point element of that many bytes is viewed as."""


class MaskSet:
    """Boolean masks keyed by canonical parameter name, in the order of `params`."""

    def __init__(self, params: Mapping[str, torch.Tensor]) -> None:
        self.params = dict(params)
        # A ZeRO-3 parameter is empty outside gathers; `ds_shape` is its full shape.
        shapes = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in self.params.items()}
        self.masks = {name: torch.ones(shapes[name], dtype=torch.bool, device=p.device)
                      for name, p in self.params.items()}
        self.layout = FullLayout(shapes)
        self._forms: dict[str, tuple[torch.Tensor, int, dict[torch.dtype, torch.Tensor]]] = {}
        self._targets: dict[int, tuple] = {}  # by id() of each tensor zero_off masks
        self._batch: tuple[list, list] | None = None  # the kept copies of zero_off_all, prepared

    @property
    def names(self) -> list[str]:
        """Layer names in global-index order."""
        return list(self.params)

    @property
    def sharded(self) -> bool:
        """Whether masks are this rank's pieces, not full replicas."""
        return self.layout.sharded

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Full shape of every masked parameter."""
        return dict(self.layout.shapes)

    def use_layout(self, layout: FullLayout) -> None:
        """Hold the masks as this rank's pieces in `layout`, counted (a collective for a
        `PieceLayout`), so that the first update needs no count."""
        self.masks = {name: layout.piece(name, mask).clone() for name, mask in self.masks.items()}
        self.layout = layout
        layout.active_counts(self.masks)

    def _recount(self) -> None:
        """Pieces: count new masks now, on every rank (a collective unless the layout made them
        and knows their counts), so that reports on one rank later need no collective."""
        if self.sharded:
            self.layout.active_counts(self.masks)

    def update(self, new_masks: Mapping[str, torch.Tensor]) -> None:
        """Replace the masks of the named layers (shapes checked; nothing changes on an error)."""
        for name, mask in new_masks.items():
            if name not in self.masks:
                raise KeyError(f"no sparsifiable parameter named '{name}'")
            if mask.shape != self.masks[name].shape:
                raise ValueError(
                    f"mask for '{name}' has shape {tuple(mask.shape)}, "
                    f"expected {tuple(self.masks[name].shape)}"
                )
        for name, mask in new_masks.items():
            self.masks[name] = mask.to(dtype=torch.bool, device=self.masks[name].device)
        self._recount()

    def _form(self, name: str, kind: torch.dtype) -> torch.Tensor:
        """The layer's mask as `kind`, made once per mask change: bool `~mask`, or an integer
        with every bit set where the mask is on and none where it is off."""
        mask = self.masks[name]
        cached = self._forms.get(name)
        if cached is None or cached[0] is not mask or cached[1] != mask._version:
            cached = (mask, mask._version, {})  # _version: also an in-place edit of the mask
            self._forms[name] = cached
        forms = cached[2]
        if kind not in forms:
            forms[kind] = ~mask if kind == torch.bool else mask.to(kind).neg_()
        return forms[kind]

    def zero_off(self, name: str, tensor: torch.Tensor) -> None:
        """Set the layer's masked-off entries of `tensor` (its mask's numel, any shape) to +0.0 in
        place, leaving every other entry's bits as they are (no autograd record).

        Not a multiply: inf * 0 and nan * 0 are nan, and -w * 0 is -0.0. On the CPU an AND of the
        tensor's bits with the mask's all-ones integer form (masked_fill_'s CPU kernel runs many
        times slower there; the integer forms cost 2-8 bytes an element, on the host); elsewhere
        `masked_fill_`. Both give the same bits. What a tensor needs is prepared once per mask
        change and storage (a step masks the same weights and optimizer state every time).
        """
        self.zero_off_all([(name, tensor)], keep=False)

    def zero_off_all(self, copies: list[tuple[str, torch.Tensor]], keep: bool = True) -> None:
        """`zero_off` for every (layer name, tensor) of `copies`. `keep`: the caller keeps this
        list while its tensors stay the same (every step's weights and optimizer state), and its
        preparation is checked in one pass."""
        if keep and self._batch is not None and self._batch[0] is copies:
            targets = self._batch[1]
        else:
            targets = [self._targets.get(id(tensor)) for _, tensor in copies]
            if keep:
                self._batch = (copies, targets)
        masks = self.masks
        for index, (name, tensor) in enumerate(copies):  # checks inlined: this runs every step
            target = targets[index]
            if target is None or masks[name] is not target[0] or target[0]._version != target[1] \
                    or tensor.data_ptr() != target[2]:
                target = targets[index] = self._prepare(name, tensor)
            if target[4]:
                target[3].bitwise_and_(target[5])
            else:
                target[3].masked_fill_(target[5], 0)

    def _prepare(self, name: str, tensor: torch.Tensor) -> tuple:
        """(mask, its version, the tensor's data_ptr, a detached alias, whether by bits, the
        mask's form, a weakref that forgets the entry when the tensor dies)."""
        bits = _SAME_WIDTH.get(tensor.element_size())
        on_bits = tensor.device.type == "cpu" and tensor.is_floating_point() and bits is not None
        form = self._form(name, bits if on_bits else torch.bool)
        if form.shape != tensor.shape:
            form = form.view(tensor.shape)
        alias = tensor.detach().view(bits) if on_bits else tensor.detach()
        key, targets = id(tensor), self._targets
        forget = weakref.ref(tensor, lambda _: targets.pop(key, None))  # no alias outlives it
        mask = self.masks[name]
        targets[key] = (mask, mask._version, tensor.data_ptr(), alias, on_bits, form, forget)
        return targets[key]

    def apply(self, tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        """Zero masked-off entries in place: in the parameters, or in tensors of the same names."""
        targets = self.params if tensors is None else tensors
        for name, tensor in targets.items():
            self.zero_off(name, tensor)

    def active_counts(self) -> dict[str, int]:
        """Number of active (unmasked) entries per layer, over the full masks (remembered by the
        layout while the masks are unchanged; else one device read for all layers)."""
        return self.layout.active_counts(self.masks)

    def layer_density(self) -> dict[str, float]:
        """Fraction of active entries per layer."""
        return {name: count / self.layout.numel(name) for name, count in self.active_counts().items()}

    def density(self) -> float:
        """Fraction of active entries over all masked parameters."""
        total = sum(self.layout.numel(name) for name in self.masks)
        return sum(self.active_counts().values()) / total if total else 1.0

    def full_masks(self) -> dict[str, torch.Tensor]:
        """Full-shape masks (pieces are gathered bit-packed: a collective, numel / 8 bytes)."""
        return self.layout.full_masks(self.masks)

    def layer_fingerprints(self) -> dict[str, int]:
        """A 63-bit digest of each layer's mask as held here (fits an int64 all-reduce)."""
        return {name: _digest([mask]) for name, mask in self.masks.items()}

    def fingerprint(self) -> str:
        """Hex SHA-256 over every layer name and full-mask bit, in order (a collective for pieces)."""
        h = hashlib.sha256()
        for name, mask in self.full_masks().items():
            h.update(name.encode())
            h.update(_packed(mask))
        return h.hexdigest()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full masks as CPU bool tensors (loadable with torch.load(weights_only=True)).

        The single-process layout whatever the backend; pieces are gathered (a collective).
        """
        return {name: mask.cpu().clone() for name, mask in self.full_masks().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load full masks (sliced to this rank's pieces); the layer names and shapes must match."""
        missing = set(self.masks) - set(state)
        unexpected = set(state) - set(self.masks)
        if missing or unexpected:
            raise ValueError(
                f"mask layers do not match the model: missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)}"
            )
        for name, mask in state.items():
            if tuple(mask.shape) != self.layout.shapes[name]:
                raise ValueError(f"mask for '{name}' has shape {tuple(mask.shape)}, "
                                 f"expected {self.layout.shapes[name]}")
        self.update({name: self.layout.piece(name, mask) for name, mask in state.items()})


def _packed(mask: torch.Tensor) -> bytes:
    """The mask's bits, eight a byte, most significant first, zero-padded: packed where the mask
    lives, so a GPU sends and the hash reads an eighth of the mask."""
    flat = mask.detach().reshape(-1).bool()
    padding = -flat.numel() % 8
    bits = torch.cat([flat, flat.new_zeros(padding)]) if padding else flat
    return pack_bits(bits).cpu().numpy().tobytes()


def _digest(masks: Iterable[torch.Tensor]) -> int:
    h = hashlib.sha256()
    for mask in masks:
        h.update(_packed(mask))
    return int.from_bytes(h.digest()[:8], "little") >> 1
