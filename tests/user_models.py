"""Models a user defines outside distsparse, named as `model.name=tests.user_models:<factory>`."""
from __future__ import annotations

import torch
from torch import nn

PATCH = 4
"""Side of the square patches a 28 px image is cut into (7 x 7 = 49 tokens)."""

NOT_CALLABLE = 3


class PatchMixer(nn.Module):
    """Patch conv, learned position embedding, LayerNorm, a Linear token mixer and a Linear head."""

    def __init__(self, num_classes: int, in_channels: int, width: int = 8, tokens: int = 49,
                 embedding: bool = True) -> None:
        super().__init__()
        self.patches = nn.Conv2d(in_channels, width, PATCH, stride=PATCH)
        self.position = nn.Embedding(tokens, width) if embedding else None
        self.norm = nn.LayerNorm(width)
        self.mix = nn.Linear(width, 2 * width)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(images).flatten(2).transpose(1, 2)
        if self.position is not None:
            tokens = tokens + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        return self.head(torch.relu(self.mix(self.norm(tokens))).mean(dim=1))


def build(num_classes: int, in_channels: int, width: int = 8, embedding: bool = True) -> nn.Module:
    """The factory of the tests: data arguments by name, the rest from model.kwargs."""
    return PatchMixer(num_classes, in_channels, width, embedding=embedding)


def without_data_arguments(width: int) -> nn.Module:
    """A factory that does not take num_classes or in_channels: 1 channel, 10 classes fixed."""
    return PatchMixer(10, 1, width)


def broken(width: int = 8) -> nn.Module:
    """A factory that fails."""
    raise ValueError(f"width {width} is not supported\nsecond line")


def not_a_module() -> int:
    """A factory that returns something other than an nn.Module."""
    return 42
