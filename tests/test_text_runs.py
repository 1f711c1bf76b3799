"""A language-model run after training: `distsparse evaluate`, `prune` (oneshot and UniPTS) and
`export --format onnx` read it as they read an image classifier's run (top-1 over every predicted
byte, calibration on text blocks, token inputs)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distsparse.cli import main
from distsparse.config import load_config
from distsparse.engine.checkpoint import CHECKPOINT_NAME
from distsparse.engine.runs import load_run
from distsparse.engine.trainer import train
from tests.test_transformers import GPT_MASKED, TINY_GPT, corpus  # noqa: F401 (fixture)

onnxruntime = pytest.importorskip("onnxruntime")
REPO = Path(__file__).resolve().parents[1]
FAST = ["--calib-samples", "64", "--batch-size", "8", "--epochs", "1", "--population", "4",
        "--generations", "1", "--parents", "2", "--no-progress"]


@pytest.fixture(scope="module")
def gpt_run(corpus, tmp_path_factory) -> Path:  # noqa: F811 (the fixture imported above)
    run_dir = tmp_path_factory.mktemp("text") / "rigl"
    train(load_config(None, [*TINY_GPT, f"data.path={corpus}", "method.name=rigl",
                             f"run.dir={run_dir}"]))
    return run_dir


def test_evaluate_reports_the_trainers_top1_on_the_clean_text_only(gpt_run):
    done = subprocess.run([sys.executable, "-m", "distsparse", "evaluate", str(gpt_run)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads((gpt_run / "evaluation.json").read_text())
    summary = json.loads((gpt_run / "summary.json").read_text())
    assert [record["name"] for record in result["distributions"]] == ["clean"]
    assert result["clean_top1"] == summary["test_top1"]
    batches = load_run(gpt_run).data.test
    assert result["distributions"][0]["count"] == len(batches) * batches.global_batch * 16
    assert "corruptions" not in (gpt_run / "evaluation.md").read_text()


@pytest.mark.parametrize("method", ["oneshot", "unipts"])
def test_prune_a_gpt_run_to_exact_counts_with_the_head_tied(gpt_run, tmp_path, capsys, method):
    out = tmp_path / method
    status = main(["prune", str(gpt_run), "--method", method, "--sparsity", "0.9", "--out",
                   str(out), *FAST])
    assert status == 0, capsys.readouterr().err
    state = torch.load(out / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    masks = state["masks"]
    assert list(masks) == GPT_MASKED
    total = sum(mask.numel() for mask in masks.values())
    assert sum(int(mask.sum()) for mask in masks.values()) == round(0.1 * total)
    for name, mask in masks.items():
        assert torch.count_nonzero(state["model"][name][~mask]) == 0, name
    pruned = load_run(out).model.gpt2
    assert pruned.lm_head.weight is pruned.transformer.wte.weight
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sparsity"] == 1 - round(0.1 * total) / total and summary["steps"] == 8


def test_export_onnx_of_a_gpt_run_takes_tokens_and_gives_the_logits(gpt_run, tmp_path):
    out = tmp_path / "gpt.onnx"
    assert main(["export", str(gpt_run), "--format", "onnx", "--out", str(out)]) == 0
    run = load_run(gpt_run)
    tokens = next(run.data.test.batches(0))[0]
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: tokens.numpy()}
    with torch.no_grad():
        expected = run.model(tokens).numpy()
    np.testing.assert_allclose(session.run(None, feed)[0], expected, rtol=1e-4, atol=1e-5)
