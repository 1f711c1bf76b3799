"""A GPT-2-style byte-level decoder built from `transformers.GPT2Config` (nothing is downloaded).

`model.name=gpt` with `model.kwargs`: n_layer, n_head, n_embd, n_positions (the longest context;
at least the data's block size, checked by the config), dropout. The vocabulary is the data's
num_classes (256 for bytes). The LM head is tied to the token embedding, as in GPT-2.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from distsparse.errors import ConfigError
from distsparse.models.kwargs import merged_kwargs

__all__ = ["GPT", "GPT_DEFAULTS", "build_gpt", "check_gpt_kwargs"]

GPT_DEFAULTS: dict[str, Any] = {"n_layer": 4, "n_head": 4, "n_embd": 256, "n_positions": 128,
                                "dropout": 0.0}
"""model.kwargs of `model.name=gpt` and their defaults (4 layers, 256 wide, 128 bytes of context)."""


class GPT(nn.Module):
    """`GPT2LMHeadModel` under `gpt2` (Hugging Face's module names below it); forward maps tokens
    (B, T) to logits (B, T, vocabulary)."""

    def __init__(self, vocab_size: int, n_layer: int, n_head: int, n_embd: int, n_positions: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd,
                            n_layer=n_layer, n_head=n_head, resid_pdrop=dropout,
                            embd_pdrop=dropout, attn_pdrop=dropout, use_cache=False,
                            bos_token_id=None, eos_token_id=None, tie_word_embeddings=True)
        self.gpt2 = GPT2LMHeadModel(config)

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks (`GPT2Block`), the units a sharding wrapper wraps one by one."""
        return self.gpt2.transformer.h

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T, vocabulary) for tokens (B, T).

        Floating-point tokens (a loop that casts every input to the parameters' dtype) are read
        as integers: bytes are exact in every float format down to bfloat16.
        """
        if tokens.is_floating_point():
            tokens = tokens.long()
        return self.gpt2(input_ids=tokens).logits


def check_gpt_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """`model.kwargs` over `GPT_DEFAULTS`; ConfigError naming model.kwargs.<key> if invalid."""
    merged = merged_kwargs("gpt", kwargs, GPT_DEFAULTS,
                           ("n_layer", "n_head", "n_embd", "n_positions"))
    if merged["n_embd"] % merged["n_head"]:
        raise ConfigError(f"config key 'model.kwargs.n_embd' = {merged['n_embd']}: expected a "
                          f"multiple of model.kwargs.n_head={merged['n_head']}")
    return merged


def build_gpt(num_classes: int, kwargs: Mapping[str, Any]) -> GPT:
    """The GPT of `model.kwargs` over a vocabulary of `num_classes` tokens."""
    return GPT(num_classes, **check_gpt_kwargs(kwargs))
