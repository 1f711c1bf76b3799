"""Post-training sparsity: one-shot magnitude and UniPTS (`distsparse prune`).

Expected values are computed here by hand or by brute force (sorted() with the key
(-|w|, flat index)), never by the code under test. The end-to-end runs prune one small dense
ResNet trained once per module on generated data, at one CPU thread (the cores are shared).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import distsparse.engine.post_training as post_training
from distsparse.cli import main
from distsparse.config import load_config, to_yaml
from distsparse.engine.checkpoint import CHECKPOINT_NAME
from distsparse.engine.runs import load_run
from distsparse.engine.post_training import PruneSettings
from distsparse.engine.trainer import train
from distsparse.errors import ConfigError
from distsparse.methods.post_training import (
    STE_DECAY,
    SearchSettings,
    distillation_loss,
    kd_temperature,
    oneshot_masks,
    regrow_layer_counts,
    round_to_total,
    search_layer_counts,
    ste_sparse_weight,
)
from distsparse.models import build_model
from distsparse.prune_command import add_prune_parser, prune_settings
from distsparse.sparsity.allocation import active_count, layer_densities
from distsparse.sparsity.masks import sparsifiable_parameters
from tests.conftest import SMALL
from tests.test_imagenet import SMOKE, smoke_betons, smoke_folders  # noqa: F401 (fixtures)

SUMMARY_KEYS = {
    "method", "target_sparsity", "sparsity", "layer_density", "test_top1", "world_size",
    "backend", "launcher", "steps", "wall_s", "train_images_per_s", "mask_fingerprint",
    "train_flops_ratio", "source_run", "calib_samples", "finetune_epochs",
}
FAST = ["--calib-samples", "64", "--batch-size", "32", "--population", "4", "--generations", "1",
        "--parents", "2", "--no-progress"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, one_thread) -> Path:
    """A dense small ResNet (with BN) trained for 16 steps on 16 px generated images."""
    run_dir = tmp_path_factory.mktemp("source") / "dense"
    config = load_config(None, [
        *SMALL, "method.name=dense", "model.name=small_resnet", "data.synthetic.image_size=16",
        "data.augment=false", "train.warmup_epochs=0", f"run.dir={run_dir}",
    ])
    train(config)
    return run_dir


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    run = load_run(run_dir)
    params = sparsifiable_parameters(run.model, run.config.method.dense_first_layer,
                                     run.config.method.dense_last_layer)
    return {name: p.detach().clone() for name, p in params.items()}


def _expected_active(numel: int, sparsity: float) -> int:
    """N - floor(S * N), rigl's count, in integers (S has at most three decimals here)."""
    return numel - numel * round(sparsity * 1000) // 1000


def _brute_topk(values: torch.Tensor, k: int) -> set[int]:
    flat = values.reshape(-1).tolist()
    return set(sorted(range(len(flat)), key=lambda i: (-abs(flat[i]), i))[:k])


def _prune(capsys, *argv: str) -> tuple[int, str]:
    status = main(["prune", *argv])
    return status, capsys.readouterr().err


# ---- one-shot masks -------------------------------------------------------------------------


def test_oneshot_global_keeps_the_exact_count_of_largest_magnitudes(dense_run):
    weights = _weights(dense_run)
    total = sum(w.numel() for w in weights.values())
    masks = oneshot_masks(weights, 0.9, "global")
    expected_active = _expected_active(total, 0.9)
    assert sum(int(m.sum()) for m in masks.values()) == expected_active
    flat = torch.cat([w.reshape(-1) for w in weights.values()])
    kept = torch.cat([m.reshape(-1) for m in masks.values()]).nonzero().squeeze(1).tolist()
    assert set(kept) == _brute_topk(flat, expected_active)


@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_oneshot_layerwise_keeps_rigl_counts_per_layer(dense_run, distribution):
    weights = _weights(dense_run)
    shapes = {name: tuple(w.shape) for name, w in weights.items()}
    densities = layer_densities(distribution, shapes, 0.1)
    masks = oneshot_masks(weights, 0.9, distribution)
    expected_total = 0
    for name, w in weights.items():
        count = active_count(w.numel(), densities[name])
        expected_total += count
        kept = set(masks[name].reshape(-1).nonzero().squeeze(1).tolist())
        assert kept == _brute_topk(w, count), name
    assert sum(int(m.sum()) for m in masks.values()) == expected_total
    assert abs(expected_total - _expected_active(sum(w.numel() for w in weights.values()), 0.9)) < len(weights)


def test_oneshot_ties_go_to_the_lower_index():
    weights = {"a": torch.tensor([1.0, -1.0, 1.0, 0.5]), "b": torch.tensor([[-1.0, 2.0]])}
    masks = oneshot_masks(weights, 0.5, "global")  # keep 3 of 6: 2.0, then the first two |1|s
    assert masks["a"].tolist() == [True, True, False, False]
    assert masks["b"].tolist() == [[False, True]]


# ---- UniPTS allocation and search -----------------------------------------------------------


def test_round_to_total_is_exact_and_respects_caps():
    assert round_to_total([1.6, 2.6, 0.8], [5, 5, 5], 5) == [2, 2, 1]  # largest remainders first
    assert round_to_total([1.6, 2.6, 0.8], [5, 5, 5], 4) == [1, 2, 1]
    assert round_to_total([3.9, 0.2], [3, 9], 5) == [3, 2]  # the capped layer gives way
    with pytest.raises(ValueError):
        round_to_total([1.0], [2], 3)


def test_regrow_allocation_is_the_reference_formula_when_nothing_clamps():
    numels = [4000, 6000, 10000]
    logits = torch.tensor([0.2, 0.5, 0.1], dtype=torch.float64)
    share = torch.softmax(logits, 0).tolist()
    available = 0.05 * sum(numels)
    for count, numel, s in zip(regrow_layer_counts(logits, numels, 0.9), numels, share):
        reference_sparsity = max(0.0, 0.9 + 0.05 - available * s / numel)
        assert abs(count - numel * (1 - reference_sparsity)) <= 1.0
    assert sum(regrow_layer_counts(logits, numels, 0.9)) == _expected_active(sum(numels), 0.9)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.97, 0.995])
def test_regrow_allocation_total_is_exact_even_where_layers_clamp(sparsity):
    numels = [27, 2304, 4608, 9216, 640]
    generator = torch.Generator().manual_seed(3)
    for _ in range(20):
        logits = torch.rand(len(numels), generator=generator, dtype=torch.float64) * 6
        counts = regrow_layer_counts(logits, numels, sparsity)
        assert sum(counts) == _expected_active(sum(numels), sparsity)
        assert all(0 <= c <= n for c, n in zip(counts, numels))
    # A tiny layer with the largest share would regrow past dense: it is dense, the rest still fits.
    counts = regrow_layer_counts(torch.tensor([5.0, 0, 0, 0, 0]), numels, 0.9)
    assert counts[0] == 27 and sum(counts) == _expected_active(sum(numels), 0.9) == 1680


def _toy_fitness(counts: dict[str, int]) -> float:
    """Higher when the second layer keeps more weights: the search should move the budget there."""
    return counts["b"] / 1000 - abs(counts["a"] - 100) / 10_000


def test_search_is_deterministic_and_exact():
    numels = {"a": 1000, "b": 3000, "c": 2000}
    settings = SearchSettings(population=6, generations=3, parents=3)
    first = search_layer_counts(numels, 0.8, _toy_fitness, settings, seed=5)
    again = search_layer_counts(numels, 0.8, _toy_fitness, settings, seed=5)
    assert first.counts == again.counts and first.logits == again.logits
    assert sum(first.counts.values()) == 1200
    constant = dict(zip(numels, regrow_layer_counts(torch.full((3,), 0.8), list(numels.values()), 0.8)))
    assert first.fitness >= _toy_fitness(constant)  # the constant vector is candidate 0
    assert [h["generation"] for h in first.history] == [0, 1, 2, 3]


def test_search_settings_are_checked():
    with pytest.raises(ValueError, match="parents"):
        search_layer_counts({"a": 10}, 0.5, lambda c: 0.0, SearchSettings(population=4, parents=5))


# ---- distillation loss and straight-through estimator ---------------------------------------


def test_distillation_loss_matches_a_hand_computation():
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], dtype=torch.float64)
    teacher = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 4.0]], dtype=torch.float64)
    epoch, temperature = 3, 4.0
    tau = 8 * 0.99**3
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        log_z = math.log(sum(math.exp(v) for v in s_row))
        t_exp = [math.exp(v / temperature) for v in t_row]
        p_t = [v / sum(t_exp) for v in t_exp]
        for s, p in zip(s_row, p_t):
            total += p * (math.log(p) - (s - log_z) / tau)
    expected = total * temperature**2 / 2
    assert kd_temperature(3) == pytest.approx(tau, rel=1e-15)
    assert distillation_loss(student, teacher, epoch).item() == pytest.approx(expected, rel=1e-12)


def test_ste_forward_masks_and_backward_is_g_plus_decay_on_pruned():
    weight = torch.tensor([[0.5, -2.0, 0.1], [-0.3, 1.5, 0.5]], dtype=torch.float64, requires_grad=True)
    upstream = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
    out = ste_sparse_weight(weight, 3)  # keeps -2.0, 1.5 and the first 0.5 (tie to lower index)
    mask = torch.tensor([[1, 1, 0], [0, 1, 0]], dtype=torch.float64)
    assert torch.equal(out.detach(), weight.detach() * mask)
    (out * upstream).sum().backward()
    expected = upstream + STE_DECAY * (1 - mask) * weight.detach()
    assert torch.equal(weight.grad, expected)
    with torch.no_grad():
        weight[0, 2] = 3.0  # the mask is recomputed from the current weight at every call
    assert ste_sparse_weight(weight, 3).detach()[0, 2] == 3.0


# ---- the command ----------------------------------------------------------------------------


def _check_output(out: Path, method: str, sparsity: float, expected_active: int | None,
                  reevaluate: bool = True) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["method"] == method and summary["target_sparsity"] == sparsity
    for name in ("config.yaml", "metrics.jsonl", CHECKPOINT_NAME, "training.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "prune.json").read_text()) == summary
    state = torch.load(out / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    model_state, masks = state["model"], state["masks"]
    active = 0
    for name, mask in masks.items():
        assert torch.equal(model_state[name][~mask], torch.zeros(int((~mask).sum()))), name
        active += int(mask.sum())
        assert summary["layer_density"][name] == int(mask.sum()) / mask.numel()
    if expected_active is not None:
        assert active == expected_active
    total = sum(m.numel() for m in masks.values())
    assert summary["sparsity"] == 1 - active / total
    # Step 0 of a static-mask run that `train --resume` fine-tunes.
    config = load_config(out / "config.yaml")
    assert config.method.name == "static" and config.method.sparsity == sparsity
    assert state["step"] == 0 and state["optimizer"]["state"] == {}
    if not reevaluate:
        return summary
    run = load_run(out)
    correct = count = 0
    with torch.no_grad():
        for x, y in run.data.test.batches(0):
            correct += int((run.model(x).argmax(1) == y).sum())
            count += len(y)
    assert correct / count == summary["test_top1"]
    return summary


def test_prune_oneshot_with_fine_tuning_writes_a_run(dense_run, tmp_path, capsys):
    out = tmp_path / "oneshot"
    status, err = _prune(capsys, str(dense_run), "--method", "oneshot", "--sparsity", "0.9",
                         "--epochs", "1", "--out", str(out), *FAST)
    assert status == 0, err
    total = sum(w.numel() for w in _weights(dense_run).values())
    summary = _check_output(out, "oneshot", 0.9, _expected_active(total, 0.9))
    assert summary["finetune_epochs"] == 1 and summary["steps"] == 2 and summary["calib_samples"] == 64
    assert summary["source_run"] == str(dense_run) and summary["preset"] == "cpu"
    config = load_run(out).config
    assert config.method.prune_scope == "global" and config.run.dir == str(out)


def test_prune_masks_only_the_weights_the_run_masked(dense_run, tmp_path, capsys):
    """The run's method.include / exclude rules choose the pruned weights; others stay as trained."""
    source = tmp_path / "source"
    shutil.copytree(dense_run, source)
    config = load_config(source / "config.yaml")
    method = dataclasses.replace(config.method, exclude=[r"stages\.2\..*", r"fc\..*"])
    (source / "config.yaml").write_text(to_yaml(dataclasses.replace(config, method=method)))
    out = tmp_path / "pruned"
    status, err = _prune(capsys, str(source), "--method", "oneshot", "--sparsity", "0.9",
                         "--epochs", "1", "--out", str(out), *FAST)
    assert status == 0, err
    state = torch.load(out / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    trained = _weights(dense_run)
    kept = [name for name in trained if name.startswith(("stages.2.", "fc."))]
    assert kept and sorted(state["masks"]) == sorted(set(trained) - set(kept))
    total = sum(trained[name].numel() for name in state["masks"])
    _check_output(out, "oneshot", 0.9, _expected_active(total, 0.9), reevaluate=False)
    assert all(torch.count_nonzero(state["model"][name]) == trained[name].numel() for name in kept)


def test_prune_oneshot_erk_from_the_checkpoint_path(dense_run, tmp_path, capsys):
    out = tmp_path / "erk"
    status, err = _prune(capsys, str(dense_run / CHECKPOINT_NAME), "--method", "oneshot",
                         "--sparsity", "0.8", "--distribution", "erk", "--out", str(out), *FAST)
    assert status == 0, err
    weights = _weights(dense_run)
    densities = layer_densities("erk", {n: tuple(w.shape) for n, w in weights.items()}, 0.2)
    expected = sum(active_count(w.numel(), densities[n]) for n, w in weights.items())
    summary = _check_output(out, "oneshot", 0.8, expected)
    assert summary["steps"] == 0 and summary["distribution"] == "erk"
    assert load_run(out).config.method.distribution == "erk"


def test_prune_unipts_is_exact_and_its_search_deterministic(dense_run, tmp_path, capsys):
    out = tmp_path / "unipts"
    status, err = _prune(capsys, str(dense_run), "--method", "unipts", "--sparsity", "0.9",
                         "--epochs", "1", "--out", str(out), *FAST)
    assert status == 0, err
    total = sum(w.numel() for w in _weights(dense_run).values())
    summary = _check_output(out, "unipts", 0.9, _expected_active(total, 0.9))
    assert summary["steps"] == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in records if r["kind"] == "search"] == [0, 1]
    again = tmp_path / "unipts-again"  # the same seed: the same searched layer densities
    status, err = _prune(capsys, str(dense_run), "--method", "unipts", "--sparsity", "0.9",
                         "--epochs", "0", "--out", str(again), *FAST)
    assert status == 0, err
    assert json.loads((again / "summary.json").read_text())["layer_density"] == summary["layer_density"]


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("arguments", "message"), [
    (["--sparsity", "1.0"], "--sparsity 1.0"),
    (["--sparsity", "-0.1"], "--sparsity -0.1"),
    (["--sparsity", "0.5", "--calib-samples", "100000"], "--calib-samples 100000"),
    (["--sparsity", "0.5", "--distribution", "erk", "--method", "unipts"], "--distribution"),
])
def test_bad_options_are_one_line_and_write_nothing(dense_run, tmp_path, capsys, arguments, message):
    out = tmp_path / "out"
    before = _snapshot(dense_run)
    status, err = _prune(capsys, str(dense_run), "--method", "oneshot", *arguments, "--out", str(out),
                         "--no-progress")
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("distsparse: error:") and message in err, err
    assert not out.exists() and not list(tmp_path.iterdir())
    assert _snapshot(dense_run) == before


def test_missing_checkpoint_is_named(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    for source in (run, run / CHECKPOINT_NAME, tmp_path / "absent"):
        status, err = _prune(capsys, str(source), "--method", "oneshot", "--sparsity", "0.5",
                             "--out", str(tmp_path / "out"))
        assert status == 2 and err.count("\n") == 1 and err.startswith("distsparse: error:"), err
        assert "does not exist" in err
    assert not (tmp_path / "out").exists()


def test_an_existing_output_directory_is_never_overwritten(dense_run, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    status, err = _prune(capsys, str(dense_run), "--method", "oneshot", "--sparsity", "0.5",
                         "--out", str(out), *FAST)
    assert status == 2 and err.count("\n") == 1 and "already exists" in err and str(out) in err, err
    assert _snapshot(out) == {"keep.txt": b"mine"}
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_a_failure_mid_run_leaves_no_output(dense_run, tmp_path, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise post_training.ConfigError("injected failure after the staging directory was made")

    monkeypatch.setattr(post_training, "_prune_into", fail)
    status, err = _prune(capsys, str(dense_run), "--method", "unipts", "--sparsity", "0.5",
                         "--out", str(tmp_path / "out"), *FAST)
    assert status == 2 and "injected failure" in err
    assert list(tmp_path.iterdir()) == []


# ---- presets -------------------------------------------------------------------------------


def _settings(*argv: str) -> PruneSettings:
    parser = argparse.ArgumentParser()
    add_prune_parser(parser.add_subparsers())
    return prune_settings(parser.parse_args(["prune", "RUN", *argv]))


def test_preset_paper_is_the_references_settings():
    # xjjxmu/UniPTS: args.py num_samples_for_calib 10240; configs/resnet50.yaml epochs 100,
    # batch_size 64, lr 0.01 cosine, warmup_length 1, momentum 0.9, weight_decay 1e-4;
    # main.py genetic_algorithm population 25, generations 25, parents 10, mutation 0.1, crossover 1.
    paper = _settings("--method", "unipts", "--sparsity", "0.9", "--preset", "paper")
    assert (paper.preset, paper.calib_samples, paper.epochs, paper.batch_size, paper.lr,
            paper.warmup_epochs, paper.momentum, paper.weight_decay) == \
        ("paper", 10240, 100, 64, 0.01, 1.0, 0.9, 1e-4)
    assert paper.search == SearchSettings(population=25, generations=25, parents=10,
                                          mutation_rate=0.1, crossover_rate=1.0, margin=0.05)
    assert _settings("--method", "oneshot", "--sparsity", "0.9", "--preset", "paper").epochs == 0
    cpu = _settings("--method", "unipts", "--sparsity", "0.9")
    assert (cpu.preset, cpu.calib_samples, cpu.epochs, cpu.batch_size, cpu.lr,
            cpu.warmup_epochs) == ("cpu", 2048, 5, 64, 0.01, 0.0)
    assert (cpu.search.population, cpu.search.generations, cpu.search.parents) == (8, 4, 4)


def test_explicit_options_override_the_preset():
    chosen = _settings("--method", "unipts", "--sparsity", "0.9", "--preset", "paper", "--epochs", "3",
                       "--calib-samples", "512", "--population", "6", "--warmup-epochs", "0",
                       "--lr", "0.05", "--batch-size", "32")
    assert (chosen.epochs, chosen.calib_samples, chosen.search.population,
            chosen.warmup_epochs, chosen.lr, chosen.batch_size) == (3, 512, 6, 0.0, 0.05, 32)
    assert (chosen.preset, chosen.search.generations, chosen.search.parents) == ("paper", 25, 10)
    with pytest.raises(ConfigError, match="^--preset 'gpu': expected one of cpu, paper$"):
        PruneSettings.from_preset("gpu", "unipts", 0.9)


def test_the_summary_records_the_preset(dense_run, tmp_path, capsys):
    out = tmp_path / "paper"
    status, err = _prune(capsys, str(dense_run), "--method", "oneshot", "--sparsity", "0.5",
                         "--preset", "paper", "--calib-samples", "64", "--out", str(out), "--no-progress")
    assert status == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["preset"], summary["calib_samples"], summary["finetune_epochs"],
            summary["batch_size"], summary["lr"], summary["warmup_epochs"]) == ("paper", 64, 0, 64, 0.01, 1.0)


# ---- fine-tuning a pruned run ----------------------------------------------------------------


def test_a_pruned_run_fine_tunes_by_resume_with_exactly_its_mask(dense_run, tmp_path, capsys):
    out = tmp_path / "pruned"
    status, err = _prune(capsys, str(dense_run), "--method", "unipts", "--sparsity", "0.8",
                         "--epochs", "1", "--out", str(out), *FAST)
    assert status == 0, err
    pruned = json.loads((out / "summary.json").read_text())
    before = torch.load(out / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    records = (out / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(r)["step"] for r in records]
    assert min(steps) == -2 and max(steps) == 0  # search at -2, fine-tuning steps -1 and 0
    # At step 0 only train.* may change; the mask's own keys may not.
    assert main(["train", "--resume", str(out), "method.sparsity=0.5"]) == 2
    assert "method.sparsity=0.8" in capsys.readouterr().err
    status = main(["train", "--resume", str(out), "train.epochs=1", "train.lr=0.01"])
    assert status == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] and summary["method"] == "static" and summary["steps"] == 8
    assert summary["mask_fingerprint"] == pruned["mask_fingerprint"]
    assert summary["sparsity"] == pruned["sparsity"]
    after = torch.load(out / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    changed = 0
    for name, mask in before["masks"].items():
        assert torch.equal(after["masks"][name], mask), name
        weight = after["model"][name]
        assert torch.equal(weight[~mask], torch.zeros(int((~mask).sum()))), name
        changed += int((weight[mask] != before["model"][name][mask]).sum())
    assert changed > 0
    config = load_config(out / "config.yaml")  # the fine-tuning schedule is the run's now
    assert (config.method.name, config.train.epochs, config.train.lr) == ("static", 1, 0.01)
    now = (out / "metrics.jsonl").read_text().splitlines()
    assert now[: len(records)] == records  # the pruning's records stay, before step 1
    fine_tuning = [json.loads(r) for r in now[len(records):]]
    assert [r["epoch"] for r in fine_tuning if r["kind"] == "eval"] == [1]
    assert 0 < next(r["lr"] for r in fine_tuning if r["kind"] == "train") <= 0.01
    assert json.loads((out / "prune.json").read_text()) == pruned
    # Past step 0 the schedule is fixed again.
    assert main(["train", "--resume", str(out), "train.epochs=2"]) == 2
    assert "train.epochs=1" in capsys.readouterr().err


# ---- ImageNet-format runs --------------------------------------------------------------------

IMAGENET = ["method.name=dense", "train.epochs=1", "data.imagenet.num_workers=1",
            "data.imagenet.min_res=32", "data.imagenet.max_res=32", "data.imagenet.val_res=32",
            "run.progress=false"]


@pytest.fixture(scope="module")
def imagenet_run(request, tmp_path_factory):
    """A factory of dense runs of the smoke ImageNet config (ResNet-18, 32 px, 5 steps), one per loader."""
    made: dict[str, Path] = {}

    def make(loader: str) -> Path:
        if loader not in made:
            data = request.getfixturevalue("smoke_betons" if loader == "ffcv" else "smoke_folders")
            made[loader] = tmp_path_factory.mktemp(loader) / "dense"
            train(load_config(SMOKE, [f"data.path={data}", f"data.loader={loader}",
                                      f"run.dir={made[loader]}", *IMAGENET]))
        return made[loader]

    return make


@pytest.mark.parametrize("loader", ["torchvision", "ffcv"])
def test_prune_an_imagenet_format_run_through_its_own_pipeline(loader, imagenet_run, tmp_path, capsys):
    source = imagenet_run(loader)
    params = sparsifiable_parameters(build_model("resnet18", 10, 3), True, False)  # smoke: dense first conv
    expected = _expected_active(sum(p.numel() for p in params.values()), 0.9)
    for method, epochs in (("oneshot", "0"), ("unipts", "1")):
        out = tmp_path / method
        status, err = _prune(capsys, str(source), "--method", method, "--sparsity", "0.9",
                             "--epochs", epochs, "--out", str(out), *FAST)
        assert status == 0, err
        summary = _check_output(out, method, 0.9, expected, reevaluate=False)
        assert summary["steps"] == 2 * int(epochs) and summary["calib_samples"] == 64
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in records if r["kind"] == "search"] == [0, 1]


def test_imagenet_calibration_is_distinct_seeded_training_images_through_the_run_pipeline(
        imagenet_run):
    run = load_run(imagenet_run("torchvision"))
    settings = _settings("--method", "unipts", "--sparsity", "0.9", "--calib-samples", "64",
                         "--batch-size", "32", "--seed", "3")
    augmented, plain = post_training._calibration_loaders(run, settings)
    chosen = [path for path, _ in plain.dataset.samples]
    assert len(set(chosen)) == 64 and set(chosen) <= {path for path, _ in run.data.train.dataset.samples}
    assert augmented.dataset.samples == plain.dataset.samples
    again = post_training._calibration_loaders(run, settings)[1].dataset.samples
    assert again == plain.dataset.samples  # seeded
    batches = list(augmented.batches(0))
    assert [tuple(x.shape) for x, _ in batches] == [(32, 3, 32, 32)] * 2
    labels = torch.cat([y for _, y in plain.batches(0)]).tolist()
    assert labels == [label for _, label in plain.dataset.samples]
    # The run's seeded augmentation: the same pixels for an epoch again, others the next epoch.
    assert torch.equal(next(augmented.batches(0))[0], batches[0][0])
    assert not torch.equal(next(augmented.batches(1))[0], batches[0][0])
