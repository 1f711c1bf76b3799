"""Tests for SmallResNet, the model registry, user factories and torchvision models by name."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from distsparse.cli import main
from distsparse.engine.runs import load_run
from distsparse.errors import ConfigError
from distsparse.models import LANGUAGE_MODELS, MODEL_NAMES, SmallResNet, build_model
from distsparse.sparsity.allocation import active_count, layer_densities
from tests.conftest import SMALL


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


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n not in LANGUAGE_MODELS])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_build_model_forward(name: str, in_channels: int) -> None:
    size = 28 if name in ("mlp", "vit") else 32
    model = build_model(name, num_classes=7, in_channels=in_channels).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 7)


def test_model_names() -> None:
    assert MODEL_NAMES == ("gpt", "mlp", "resnet18", "resnet50", "small_resnet", "vit")
    assert LANGUAGE_MODELS == ("gpt",)


def test_build_model_unknown_name() -> None:
    with pytest.raises(ConfigError) as raised:
        build_model("vgg", num_classes=10, in_channels=1)
    assert str(raised.value) == (
        "config key 'model.name' = 'vgg': expected one of gpt, mlp, resnet18, resnet50, "
        "small_resnet, vit, torchvision:<name> or an importable pkg.module:factory")


def test_builtin_resnet_keeps_its_initialization() -> None:
    """The torchvision path adapts resnet18's stem exactly as the former dedicated builder did."""
    from torchvision.models import resnet18

    torch.manual_seed(5)
    expected = resnet18(weights=None, num_classes=10)
    expected.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    nn.init.kaiming_normal_(expected.conv1.weight, mode="fan_out", nonlinearity="relu")
    torch.manual_seed(5)
    built = build_model("resnet18", 10, 1)
    pairs = zip(expected.state_dict().items(), built.state_dict().items(), strict=True)
    assert all(a == b and torch.equal(x, y) for (a, x), (b, y) in pairs)


# --- a user's own model: model.name=pkg.module:factory, model.kwargs ------------------------------

USER_MODEL = "tests.user_models:build"
QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")


def _cli(capsys, *argv: str) -> tuple[int, str]:
    status = main(list(argv))
    return status, capsys.readouterr().err


def test_user_factory_trains_and_evaluates_with_exact_layer_counts(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    status, err = _cli(capsys, "train", QUICKSTART, *SMALL, "method.name=rigl", "method.sparsity=0.8",
                       f"model.name={USER_MODEL}", "model.kwargs.width=12", f"run.dir={run}")
    assert status == 0, err
    assert "name: tests.user_models:build\n  kwargs:\n    width: 12\n" in \
        (run / "config.yaml").read_text()
    trained = load_run(run)
    model, masks = trained.model, trained.masks
    shapes = {name: tuple(mask.shape) for name, mask in masks.items()}
    # the width reached the factory; the data's 1 channel and 10 classes too
    assert shapes == {"patches.weight": (12, 1, 4, 4), "mix.weight": (24, 12),
                      "head.weight": (10, 24)}
    densities = layer_densities("erk", shapes, 0.2)
    counts = {name: int(mask.sum()) for name, mask in masks.items()}
    assert counts == {name: active_count(math.prod(shapes[name]), densities[name])
                      for name in shapes}
    layer_density = json.loads((run / "summary.json").read_text())["layer_density"]
    assert {name: round(d * math.prod(shapes[name])) for name, d in layer_density.items()} == counts
    weights = dict(model.named_parameters())
    assert all(torch.count_nonzero(weights[name][~mask]) == 0 for name, mask in masks.items())
    dense = {"patches.bias", "position.weight", "norm.weight", "norm.bias", "mix.bias", "head.bias"}
    assert set(weights) - set(masks) == dense
    assert all(torch.count_nonzero(weights[name]) == weights[name].numel() for name in dense)
    assert not torch.equal(weights["norm.weight"], torch.ones(12))  # trained, not just kept
    status, err = _cli(capsys, "evaluate", str(run), "--device", "cpu")
    assert status == 0, err
    assert json.loads((run / "evaluation.json").read_text())["model"] == USER_MODEL


def test_factory_contract_data_arguments_only_by_name() -> None:
    without = build_model("tests.user_models:without_data_arguments", 3, 7, {"width": 5})
    assert (without.patches.in_channels, without.head.out_features) == (1, 10)
    as_class = build_model("tests.user_models:PatchMixer", 3, 2, {"width": 5, "embedding": False})
    assert (as_class.patches.in_channels, as_class.head.out_features) == (2, 3)
    assert as_class.position is None and as_class.patches.out_channels == 5


def test_factory_is_imported_from_the_current_directory(tmp_path, monkeypatch) -> None:
    (tmp_path / "my_own_models.py").write_text(
        "from torch import nn\n\ndef build(num_classes):\n    return nn.Linear(4, num_classes)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        assert build_model("my_own_models:build", 6, 1).out_features == 6
    finally:
        sys.modules.pop("my_own_models", None)


BAD_MODELS = [
    (["model.name=no_such_package.models:build"],
     "config key 'model.name' = 'no_such_package.models:build': no module named 'no_such_package'"),
    (["model.name=tests.user_models:absent"],
     "config key 'model.name' = 'tests.user_models:absent': 'tests.user_models' has no attribute "
     "'absent'"),
    (["model.name=tests.user_models:NOT_CALLABLE"],
     "config key 'model.name' = 'tests.user_models:NOT_CALLABLE': 'NOT_CALLABLE' is not callable "
     "(int)"),
    (["model.name=tests.user_models:broken"],
     "config key 'model.name' = 'tests.user_models:broken': the factory raised ValueError: width 8 "
     "is not supported"),
    (["model.name=tests.user_models:not_a_module"],
     "config key 'model.name' = 'tests.user_models:not_a_module': the factory returned int, "
     "expected a torch.nn.Module"),
    (["model.name=torchvision:no_such_net"],
     "config key 'model.name' = 'torchvision:no_such_net': torchvision has no classification model "
     "'no_such_net'; see torchvision.models.list_models(module=torchvision.models)"),
    (["model.name=tests/user_models.build"],
     "config key 'model.name' = 'tests/user_models.build': expected one of gpt, mlp, resnet18, "
     "resnet50, small_resnet, vit, torchvision:<name> or an importable pkg.module:factory"),
    (["model.kwargs.width=4"],
     "config key 'model.kwargs' = {'width': 4}: the built-in model small_resnet takes none (they go "
     "to gpt, vit, a torchvision:<name> model or a pkg.module:factory)"),
    ([f"model.name={USER_MODEL}", "model.kwargs.num_classes=4"],
     "config key 'model.kwargs.num_classes': tests.user_models:build receives num_classes from the "
     "data; remove it"),
    ([f"model.name={USER_MODEL}", "model.kwargs.depth=4"],
     "config key 'model.kwargs' = {'depth': 4}: tests.user_models:build does not accept them (got "
     "an unexpected keyword argument 'depth'; its parameters: num_classes, in_channels, width, "
     "embedding)"),
    (["model.name=torchvision:resnet18", "model.kwargs.weights=DEFAULT"],
     "config key 'model.kwargs.weights': set by distsparse for torchvision models (weights=None, "
     "num_classes from the data); remove it"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_MODELS,
                         ids=[o[-1] for o, _ in BAD_MODELS])
def test_bad_model_is_one_line_and_writes_nothing(tmp_path, capsys, overrides, message) -> None:
    run = tmp_path / "run"
    status, err = _cli(capsys, "train", QUICKSTART, *SMALL, f"run.dir={run}", *overrides)
    assert (status, err) == (2, f"distsparse: error: {message}\n")
    assert not run.exists()


# --- torchvision's classification models by name --------------------------------------------------

def test_torchvision_model_trains_with_erk_counts_on_every_conv_and_linear(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    status, err = _cli(capsys, "train", QUICKSTART, *SMALL, "data.synthetic.channels=3", "train.max_steps=2",
                       "method.name=static", "method.sparsity=0.9",
                       "model.name=torchvision:mobilenet_v3_small", "model.kwargs.dropout=0.0",
                       f"run.dir={run}")
    assert status == 0, err
    trained = load_run(run)
    model, masks = trained.model, trained.masks
    layers = {f"{name}.weight": m for name, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert list(masks) == list(layers) and len(masks) == 54
    assert model.classifier[2].p == 0.0 and model.classifier[3].out_features == 10
    shapes = {name: tuple(mask.shape) for name, mask in masks.items()}
    densities = layer_densities("erk", shapes, 0.1)
    assert {name: int(mask.sum()) for name, mask in masks.items()} == {
        name: active_count(math.prod(shape), densities[name]) for name, shape in shapes.items()}


def test_torchvision_model_takes_one_channel_data_through_its_first_conv() -> None:
    model = build_model("torchvision:mobilenet_v3_small", 10, 1).eval()
    stem = model.features[0][0]
    assert (stem.in_channels, stem.out_channels, stem.stride, stem.bias) == (1, 16, (2, 2), None)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
