"""Loading a run directory back for evaluation and post-training."""
from __future__ import annotations

import pytest
import torch

from distsparse.engine.runs import load_run
from distsparse.engine.trainer import train
from distsparse.errors import CheckpointError


def test_loaded_run_reproduces_the_trained_model(small_config, tmp_path):
    summary = train(small_config("method.name=rigl", "model.name=mlp", "data.synthetic.image_size=28"))
    run = load_run(tmp_path / "run")
    assert run.step == summary["steps"]
    assert run.config.method.name == "rigl"
    weight = dict(run.model.named_parameters())["1.weight"]
    assert torch.equal(weight[~run.masks["1.weight"]], torch.zeros_like(weight[~run.masks["1.weight"]]))
    correct = total = 0
    with torch.no_grad():
        for x, y in run.data.test.batches(0):
            correct += int((run.model(x).argmax(1) == y).sum())
            total += len(y)
    assert correct / total == summary["test_top1"]


def test_a_directory_without_checkpoint_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.yaml"):
        load_run(tmp_path / "empty")
    (tmp_path / "empty" / "config.yaml").write_text("seed: 1\n")
    with pytest.raises(CheckpointError, match="last.pt does not exist"):
        load_run(tmp_path / "empty")


def test_a_float64_run_loads_without_rounding_through_float32(small_config, tmp_path):
    config = small_config("model.name=mlp", "method.name=rigl", "train.dtype=float64",
                          "train.max_steps=4", name="f64")
    train(config)
    saved = torch.load(tmp_path / "f64" / "checkpoints" / "last.pt", weights_only=True)["model"]
    loaded = load_run(tmp_path / "f64").model.state_dict()
    assert all(value.dtype == torch.float64 for value in saved.values())
    for name, value in saved.items():
        assert loaded[name].dtype == torch.float64 and torch.equal(loaded[name], value), name
