"""The transformers (model.name=gpt on fortunes bytes, model.name=vit): what is masked by default,
exact counts and zeros through `distsparse train`, the tied head through training and resume,
and the GPT under DeepSpeed ZeRO-3 on 2 ranks with the masks of DDP."""
from __future__ import annotations

import json
import math
import os
import traceback
from pathlib import Path

import pytest
import torch

from distsparse.cli import main
from distsparse.config import load_config
from distsparse.engine.flops import FlopCounter
from distsparse.engine.trainer import Trainer
from distsparse.models import build_model
from distsparse.sparsity.allocation import active_count, layer_densities
from distsparse.sparsity.masks import MaskSet, sparsifiable_parameters
from tests.conftest import SMALL, mask_update_fingerprints
from tests.test_text_data import RECIPE, TEXT, tiny_fortunes

GPT_KWARGS = {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 16}
TINY_GPT = [*TEXT, *(f"model.kwargs.{key}={value}" for key, value in GPT_KWARGS.items()),
            "train.max_steps=12", "train.optimizer=adamw", "train.lr=3e-3", "train.log_every=4",
            "method.update_interval=4", "method.sparsity=0.8", "run.progress=false"]
GPT_MASKED = [f"gpt2.transformer.h.{i}.{layer}.weight" for i in range(2)
              for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
VIT_KWARGS = ["model.name=vit", "model.kwargs.num_layers=2", "model.kwargs.hidden_dim=32",
              "model.kwargs.mlp_dim=64", "model.kwargs.num_heads=2", "train.optimizer=adamw",
              "train.lr=1e-3"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return tiny_fortunes(tmp_path_factory.mktemp("fortunes"))


def _erk_counts(shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, int]:
    densities = layer_densities("erk", shapes, density)
    return {name: active_count(math.prod(shape), densities[name]) for name, shape in shapes.items()}


def test_gpt_masks_the_conv1d_projections_and_never_embeddings_norms_biases_or_the_tied_head():
    model = build_model("gpt", 256, 1, GPT_KWARGS)
    params = sparsifiable_parameters(model)
    assert list(params) == GPT_MASKED
    assert params["gpt2.transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # in x out
    gpt2 = model.gpt2
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    never = [p for name, p in model.named_parameters() if name not in GPT_MASKED]
    assert all(p.dim() == 1 for p in never if p is not gpt2.transformer.wte.weight
               and p is not gpt2.transformer.wpe.weight)
    tokens = torch.randint(0, 256, (3, 16))
    with torch.no_grad():
        logits = model(tokens)
        assert logits.shape == (3, 16, 256)
        assert torch.equal(model(tokens.float()), logits)  # a loop that casts inputs to float


def test_vit_masks_attention_mlp_patch_projection_and_head_never_tokens_or_norms():
    model = build_model("vit", 10, 1, {"num_layers": 2, "hidden_dim": 32, "mlp_dim": 64,
                                       "num_heads": 2})
    names = list(sparsifiable_parameters(model))
    layers = [f"encoder.layers.encoder_layer_{i}.{p}" for i in range(2) for p in (
        "self_attention.in_proj_weight", "self_attention.out_proj.weight", "mlp.0.weight",
        "mlp.3.weight")]
    assert names == ["conv_proj.weight", *layers, "heads.head.weight"]
    assert model.conv_proj.in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_flops_count_each_projection_once_per_token_with_the_tied_head_dense():
    """f_D and f_S of RigL's accounting for transformers: every weight matrix (HF Conv1D, the
    attention's in/out projections, the MLP, the head) counts its active entries times tokens."""
    tokens = 16
    gpt = build_model("gpt", 256, 1, GPT_KWARGS)
    counter = FlopCounter(gpt, torch.randint(0, 256, (4, tokens)))
    params = sparsifiable_parameters(gpt)
    head = gpt.gpt2.lm_head.weight.numel()
    assert counter.dense_forward == tokens * (sum(p.numel() for p in params.values()) + head)
    masks = MaskSet(params)
    counts = _erk_counts({name: tuple(p.shape) for name, p in params.items()}, 0.2)
    masks.update({name: torch.arange(p.numel()).reshape(p.shape) < counts[name]
                  for name, p in params.items()})
    counter.set_masks(masks)
    assert counter.sparse_forward == tokens * (sum(counts.values()) + head)

    vit = build_model("vit", 10, 1, {"num_layers": 2, "hidden_dim": 32, "mlp_dim": 64,
                                     "num_heads": 2})
    counter = FlopCounter(vit, torch.randn(4, 1, 28, 28))
    sequence = vit.seq_length  # 16 patches of 7 px and the class token
    per_token = sum(p.numel() for name, p in sparsifiable_parameters(vit).items()
                    if name.startswith("encoder."))
    patches = vit.conv_proj.weight.numel() * (sequence - 1)
    assert counter.dense_forward == sequence * per_token + patches + vit.heads.head.weight.numel()


def _check_gpt_run(trainer: Trainer, summary: dict) -> None:
    """Exact ERK counts per layer, exact zeros in the weight and AdamW's moments, the tied head."""
    masks = trainer.masks
    assert list(masks.names) == GPT_MASKED
    assert masks.active_counts() == _erk_counts(masks.shapes(), 0.2)
    state = trainer.backend.optimizer.state
    for name, param in masks.params.items():
        off = ~masks.masks[name]
        assert torch.count_nonzero(param.detach()[off]) == 0, name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.count_nonzero(state[param][key][off]) == 0, (name, key)
    gpt2 = trainer.backend.model.gpt2
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    assert summary["test_bits_per_byte"] == pytest.approx(summary["test_loss"] / math.log(2),
                                                          rel=1e-12)
    assert summary["steps"] == 12 and summary["completed"]


def test_a_tiny_gpt_trains_to_exact_counts_and_stays_tied_through_a_resume(corpus, tmp_path):
    common = [*TINY_GPT, f"data.path={corpus}", "method.name=rigl"]
    whole = Trainer(load_config(None, [*common, f"run.dir={tmp_path / 'whole'}"]))
    summary = whole.fit()
    _check_gpt_run(whole, summary)
    assert any(json.loads(line)["kind"] == "mask_update"
               for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines())

    split = tmp_path / "split"
    first = Trainer(load_config(None, [*common, f"run.dir={split}", "run.stop_at_step=5"]))
    assert first.fit()["steps"] == 5
    resumed = Trainer(load_config(None, [*common, f"run.dir={split}"]), resume=split)
    resumed_summary = resumed.fit()
    _check_gpt_run(resumed, resumed_summary)
    assert resumed_summary["mask_fingerprint"] == summary["mask_fingerprint"]
    assert resumed_summary["test_bits_per_byte"] == summary["test_bits_per_byte"]
    a, b = (torch.load(run / "checkpoints" / "last.pt", weights_only=True)
            for run in (tmp_path / "whole", split))
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    assert torch.equal(b["model"]["gpt2.lm_head.weight"], b["model"]["gpt2.transformer.wte.weight"])


def test_distsparse_train_runs_the_gpt_recipe_keys_from_the_command_line(corpus, tmp_path, capsys):
    run = tmp_path / "cli"
    status = main(["train", RECIPE, *TINY_GPT, f"data.path={corpus}",
                   "model.kwargs.dropout=0.1", f"run.dir={run}"])
    assert status == 0, capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    masks = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["masks"]
    shapes = {name: tuple(mask.shape) for name, mask in masks.items()}
    assert {name: int(mask.sum()) for name, mask in masks.items()} == _erk_counts(shapes, 0.2)
    assert summary["method"] == "rigl" and 2.0 < summary["test_bits_per_byte"] < 8.5


def test_a_vit_run_reaches_the_exact_target_count(tmp_path):
    config = load_config(None, [*SMALL, *VIT_KWARGS, "method.name=granet_st", "method.sparsity=0.9",
                                f"run.dir={tmp_path / 'vit'}"])
    trainer = Trainer(config)
    summary = trainer.fit()
    total = sum(mask.numel() for mask in trainer.masks.masks.values())
    assert sum(trainer.masks.active_counts().values()) == active_count(total, 0.1)
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj_weight" in trainer.masks.names
    assert summary["completed"] and summary["sparsity"] == pytest.approx(0.9, abs=1e-3)
    for name, param in trainer.masks.params.items():
        assert torch.count_nonzero(param.detach()[~trainer.masks.masks[name]]) == 0, name


def _zero3_worker(rank: int, port: int, root: str, queue) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    errors: list[str] = []
    try:
        common = [*TINY_GPT, f"data.path={Path(root) / 'corpus'}", "method.name=rigl",
                  "launcher.num_workers=2", "train.max_steps=8"]
        for name, backend in (("ddp", ["backend.name=ddp"]),
                              ("zero3", ["backend.name=deepspeed", "backend.zero_stage=3"])):
            trainer = Trainer(load_config(None, [*common, *backend, f"run.dir={Path(root) / name}"]))
            trainer.fit()
            if backend[0] == "backend.name=deepspeed" and not trainer.masks.sharded:
                errors.append("ZeRO-3 holds full masks, not this rank's pieces")
            torch.distributed.barrier()
    except Exception:  # report, then leave: the other rank fails on its collective timeout
        errors.append(traceback.format_exc())
    queue.put((rank, errors, []))


def test_the_gpt_under_deepspeed_zero3_gets_the_masks_of_ddp(tmp_path):
    from tests.test_deepspeed import run_two_ranks

    tiny_fortunes(tmp_path / "corpus")
    reports = run_two_ranks(_zero3_worker, tmp_path, timeout=400)
    assert {rank: errors for rank, errors, _ in reports} == {0: [], 1: []}
    ddp, zero3 = mask_update_fingerprints(tmp_path / "ddp"), mask_update_fingerprints(tmp_path / "zero3")
    assert [step for step, _ in ddp] == [4] and ddp == zero3
    final_ddp = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=True)
    final_zero3 = torch.load(tmp_path / "zero3" / "checkpoints" / "model.pt", weights_only=True)
    assert list(final_zero3["masks"]) == GPT_MASKED
    for name, mask in final_ddp["masks"].items():
        assert torch.equal(mask, final_zero3["masks"][name]), name
        assert torch.count_nonzero(final_zero3["model"][name][~mask]) == 0, name
    for name, value in final_ddp["model"].items():
        assert torch.allclose(value, final_zero3["model"][name], rtol=1e-4, atol=1e-5), name
