"""Tests for SmallResNet and the model registry."""

from __future__ import annotations

import pytest
import torch

from distsparse.models import MODEL_NAMES, SmallResNet, build_model


def test_small_resnet_output_shapes() -> None:
    gray = SmallResNet(num_classes=10, in_channels=1).eval()
    rgb = SmallResNet(num_classes=10, in_channels=3).eval()
    with torch.no_grad():
        assert gray(torch.randn(4, 1, 28, 28)).shape == (4, 10)
        assert rgb(torch.randn(4, 3, 32, 32)).shape == (4, 10)


def test_small_resnet_parameter_count() -> None:
    stem = 1 * 16 * 9 + 2 * 16
    stage1 = 2 * (2 * 16 * 16 * 9 + 2 * 2 * 16)
    stage2 = (16 * 32 * 9 + 32 * 32 * 9 + 2 * 2 * 32 + 16 * 32 + 2 * 32) + (
        2 * 32 * 32 * 9 + 2 * 2 * 32
    )
    stage3 = (32 * 64 * 9 + 64 * 64 * 9 + 2 * 2 * 64 + 32 * 64 + 2 * 64) + (
        2 * 64 * 64 * 9 + 2 * 2 * 64
    )
    head = 64 * 10 + 10
    expected = stem + stage1 + stage2 + stage3 + head
    model = SmallResNet(10, 1)
    assert sum(p.numel() for p in model.parameters()) == expected == 174970


def test_small_resnet_conv_layers_have_no_bias() -> None:
    convs = [m for m in SmallResNet().modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 6 * 2 + 2
    assert all(conv.bias is None for conv in convs)


def test_small_resnet_deterministic_init() -> None:
    torch.manual_seed(123)
    first = SmallResNet()
    torch.manual_seed(123)
    second = SmallResNet()
    torch.manual_seed(124)
    third = SmallResNet()
    pairs = list(zip(first.state_dict().values(), second.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not torch.equal(first.fc.weight, third.fc.weight)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_build_model_forward(name: str, in_channels: int) -> None:
    size = 28 if name == "mlp" else 32
    model = build_model(name, num_classes=7, in_channels=in_channels).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 7)


def test_model_names() -> None:
    assert MODEL_NAMES == ("mlp", "resnet18", "resnet50", "small_resnet")


def test_build_model_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown model.name 'vgg'; expected one of mlp, resnet18"):
        build_model("vgg", num_classes=10, in_channels=1)
