"""Evaluation beyond test accuracy: agreement, prune potential, evaluate_run, compare and the CLI."""
from __future__ import annotations

import copy
import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from distsparse.cli import main
from distsparse.config import load_config
from distsparse.engine.trainer import train
from distsparse.errors import CheckpointError, DistsparseError
from distsparse.evaluate import evaluation
from distsparse.evaluate.compare import compare_runs
from distsparse.evaluate.corruptions import SUITES
from distsparse.evaluate.evaluation import evaluate_run
from distsparse.evaluate.metrics import agreement, excess_error, prune_potential
from distsparse.models import build_model
from tests.conftest import SMALL

MLP = ("model.name=mlp", "data.synthetic.image_size=28")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Tiny trained runs shared by this module: dense and RigL MLPs, a dense small ResNet."""
    root = tmp_path_factory.mktemp("runs")
    settings = {
        "dense": (*MLP, "method.name=dense"),
        "rigl": (*MLP, "method.name=rigl", "method.sparsity=0.9"),
        "static": (*MLP, "method.name=static", "method.sparsity=0.5"),
        "resnet": ("model.name=small_resnet", "method.name=dense", "train.max_steps=1"),
        "other_seed": (*MLP, "method.name=dense", "seed=1", "train.max_steps=1"),
    }
    for name, overrides in settings.items():
        train(load_config(None, [*SMALL, f"run.dir={root / name}", *overrides]))
    return {name: root / name for name in settings}


@pytest.fixture(scope="module")
def evaluated(runs, tmp_path_factory) -> dict[str, object]:
    """Copies of dense, rigl and static: rigl evaluated against dense, dense against itself,
    static alone (no dense reference)."""
    root = tmp_path_factory.mktemp("evaluated")
    dense, rigl, static = (_copy(runs[name], root) for name in ("dense", "rigl", "static"))
    results = {
        "rigl": evaluate_run(rigl, dense, suite="default", device="cpu", progress=False),
        "dense": evaluate_run(dense, dense, suite="default", device="cpu", progress=False),
        "static": evaluate_run(static, suite="default", device="cpu", progress=False),
    }
    return {"dense": dense, "rigl": rigl, "static": static, "results": results}


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / run.name
    shutil.copytree(run, target)
    return target


# --- metrics -------------------------------------------------------------------------------------

def test_a_model_agrees_with_itself_and_a_class_permutation_as_computed_by_hand():
    torch.manual_seed(0)
    model = build_model("mlp", 10, 1).eval()
    inputs = [torch.randn(50, 1, 28, 28) for _ in range(4)]
    assert agreement(model, model, inputs) == 1.0
    permutation = torch.tensor([1, 0, 2, 3, 5, 4, 6, 7, 9, 8])  # classes 2, 3, 6, 7 stay put
    permuted = copy.deepcopy(model)
    with torch.no_grad():
        permuted[3].weight.copy_(model[3].weight[permutation])
        permuted[3].bias.copy_(model[3].bias[permutation])
    with torch.no_grad():
        original = torch.cat([model(x).argmax(1) for x in inputs])
    expected = sum(int(c) in (2, 3, 6, 7) for c in original) / len(original)
    assert 0 < expected < 1
    assert agreement(model, permuted, inputs) == expected


def test_excess_error_is_run_error_minus_dense_error():
    assert excess_error(0.75, 0.875) == 0.125
    assert excess_error(0.5, 0.25) == -0.25


def test_prune_potential_is_the_largest_ratio_within_delta_of_dense():
    # dense error 0.25 and delta 0.125: errors up to 0.375 qualify (dyadic, so exact)
    sweep = [(0.5, 0.25), (0.75, 0.3125), (0.875, 0.375), (0.9375, 0.5)]
    assert prune_potential(sweep, dense_error=0.25, delta=0.125) == 0.875  # equality qualifies
    assert prune_potential(sweep, dense_error=0.25, delta=0.0) == 0.5
    assert prune_potential(sweep, dense_error=0.25, delta=-0.0625) == 0.0  # none qualifies
    assert prune_potential([], dense_error=0.25, delta=0.125) == 0.0
    # non-monotone: 0.75 fails but 0.9 passes; torchprune takes the largest qualifying ratio overall
    bumpy = [(0.9, 0.3), (0.5, 0.26), (0.75, 0.5), (0.95, 0.6)]
    assert prune_potential(bumpy, dense_error=0.25, delta=0.05) == 0.9
    assert prune_potential(list(reversed(bumpy)), dense_error=0.25, delta=0.05) == 0.9


# --- evaluate_run ---------------------------------------------------------------------------------

def test_evaluate_writes_json_markdown_and_plot(evaluated):
    run, dense, result = evaluated["rigl"], evaluated["dense"], evaluated["results"]["rigl"]
    stored = json.loads((run / "evaluation.json").read_text())
    assert stored == json.loads(json.dumps(result))
    summary = json.loads((run / "summary.json").read_text())
    assert stored["clean_top1"] == summary["test_top1"]
    assert stored["dense_clean_top1"] == json.loads((dense / "summary.json").read_text())["test_top1"]
    suite = SUITES["default"]
    labels = [(r["name"], r["severity"]) for r in stored["distributions"]]
    assert labels == [("clean", None), *((n, s) for n, ss in suite.corruptions.items() for s in ss),
                      ("rotate_translate", None)]
    assert all(r["count"] == 64 for r in stored["distributions"])
    corruption = [r for r in stored["distributions"] if r["kind"] == "corruption"]
    mean = sum(r["top1"] for r in corruption) / len(corruption)
    assert stored["mean_corruption_top1"] == pytest.approx(mean)
    for record in stored["distributions"]:
        assert record["excess_error"] == pytest.approx(record["dense_top1"] - record["top1"])
        assert 0.0 <= record["agreement"] <= 1.0
    assert stored["clean_agreement"] == stored["distributions"][0]["agreement"]
    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    pruned = sum(int((~m).sum()) for m in checkpoint["masks"].values())
    parameters = sum(p.numel() for p in build_model("mlp", 10, 1).parameters())
    assert (stored["pruned_parameters"], stored["parameters"]) == (pruned, parameters)
    assert stored["prune_ratio_all_parameters"] == pruned / parameters < stored["sparsity"]
    markdown = (run / "evaluation.md").read_text()
    assert "| gaussian_noise | 3 |" in markdown and "agreement" in markdown and str(dense) in markdown
    assert (run / "evaluation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(run.glob("*.tmp"))


def test_a_run_against_itself_agrees_everywhere(evaluated):
    for record in evaluated["results"]["dense"]["distributions"]:
        assert record["agreement"] == 1.0 and record["excess_error"] == 0.0
        assert record["top1"] == record["dense_top1"]


def test_without_a_dense_run_only_the_run_is_measured(evaluated):
    alone = evaluated["results"]["static"]
    summary = json.loads((evaluated["static"] / "summary.json").read_text())
    assert alone["clean_top1"] == summary["test_top1"] and alone["dense_dir"] is None
    keys = set(alone) - {"dense_dir"}
    assert not any(key.startswith("dense_") or "agreement" in key for key in keys)
    assert all(set(r) == {"kind", "name", "severity", "count", "top1"} for r in alone["distributions"])


def test_a_directory_without_checkpoint_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.yaml"):
        evaluate_run(tmp_path / "empty", device="cpu", progress=False)


def test_a_dense_run_of_another_architecture_is_refused_naming_both(runs, tmp_path):
    run = _copy(runs["rigl"], tmp_path)
    with pytest.raises(CheckpointError) as caught:
        evaluate_run(run, runs["resnet"], device="cpu", progress=False)
    message = str(caught.value)
    assert str(run) in message and str(runs["resnet"]) in message
    assert "'small_resnet'" in message and "'mlp'" in message
    assert not (run / "evaluation.json").exists()


def test_a_dense_run_on_other_data_is_refused(runs, tmp_path, monkeypatch):
    run = _copy(runs["rigl"], tmp_path)
    with pytest.raises(CheckpointError, match="different test sets"):
        evaluate_run(run, runs["other_seed"], device="cpu", progress=False)
    real_load_run = evaluation.load_run

    def load_run_with_other_data(path, device):
        loaded = real_load_run(path, device)
        if path == runs["dense"]:
            loaded.config.data.name = "fashion_mnist"
        return loaded

    monkeypatch.setattr(evaluation, "load_run", load_run_with_other_data)
    with pytest.raises(CheckpointError, match="data.name='fashion_mnist' vs 'synthetic'"):
        evaluate_run(run, runs["dense"], device="cpu", progress=False)
    assert not (run / "evaluation.json").exists()


def test_an_unknown_suite_or_missing_gpu_is_refused(runs):
    with pytest.raises(DistsparseError, match="--suite 'huge'"):
        evaluate_run(runs["dense"], suite="huge", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DistsparseError, match="no CUDA device"):
            evaluate_run(runs["dense"], device="cuda")


# --- command line ---------------------------------------------------------------------------------

def test_cli_evaluate_repeats_exactly_and_a_failure_leaves_evaluation_json_alone(
        runs, evaluated, tmp_path, capsys):
    run = _copy(runs["rigl"], tmp_path)
    assert main(["evaluate", str(run), "--dense", str(evaluated["dense"]), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "agreement with dense" in out
    before = (run / "evaluation.json").read_bytes()
    # the same evaluation as the fixture's, pixel for pixel: only the run directory differs
    assert before.replace(str(run).encode(), str(evaluated["rigl"]).encode()) == \
        (evaluated["rigl"] / "evaluation.json").read_bytes()
    status = main(["evaluate", str(run), "--dense", str(runs["resnet"]), "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("distsparse: error:") and err.count("\n") == 1, err
    assert str(runs["resnet"]) in err and str(run) in err
    assert (run / "evaluation.json").read_bytes() == before
    assert main(["evaluate", str(tmp_path / "absent"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "absent" in err


def test_cli_help_describes_both_verbs(capsys):
    for verb, words in (("evaluate", ("--dense", "--suite", "corruptions")),
                        ("compare", ("--metric", "--delta", "percentage points", "--out"))):
        with pytest.raises(SystemExit) as exited:
            main([verb, "--help"])
        assert exited.value.code == 0
        text = capsys.readouterr().out
        assert all(word in text for word in words), text


# --- compare --------------------------------------------------------------------------------------

def test_compare_writes_one_row_per_run_with_evaluations(runs, evaluated, tmp_path, capsys):
    dense, rigl, static = runs["dense"], evaluated["rigl"], evaluated["static"]
    out = tmp_path / "compare"
    assert main(["compare", str(dense), str(rigl), str(static), "--out", str(out)]) == 0
    with (out / "compare.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["run"] for r in rows] == [str(dense), str(rigl), str(static)]
    assert [r["method"] for r in rows] == ["dense", "rigl", "static"]
    for row, run in zip(rows, (dense, rigl, static)):
        summary = json.loads((run / "summary.json").read_text())
        assert float(row["test_top1"]) == summary["test_top1"]
        assert float(row["sparsity"]) == summary["sparsity"]
    stored = json.loads((rigl / "evaluation.json").read_text())
    assert float(rows[1]["mean_corruption_top1"]) == stored["mean_corruption_top1"]
    assert float(rows[1]["agreement"]) == stored["clean_agreement"]
    assert rows[0]["mean_corruption_top1"] == ""  # this dense run was not evaluated
    static_result = evaluated["results"]["static"]
    assert float(rows[2]["mean_corruption_top1"]) == static_result["mean_corruption_top1"]
    assert rows[2]["agreement"] == ""  # static was evaluated without a dense run
    markdown = (out / "compare.md").read_text()
    assert markdown.count(f"| {rigl} | rigl |") == 1 and markdown in capsys.readouterr().out
    for name in ("accuracy_vs_sparsity.png", "robustness_vs_sparsity.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert not (out / "prune_potential.csv").exists()


def test_compare_prune_potential_per_method_and_distribution(runs, evaluated, tmp_path, capsys):
    dense, rigl, static = evaluated["dense"], evaluated["rigl"], runs["static"]
    runs_given = [dense, rigl, static]
    generous = compare_runs(runs_given, tmp_path / "a", metric="prune_potential", delta=1.0)
    rigl_sparsity = json.loads((rigl / "summary.json").read_text())["sparsity"]
    static_sparsity = json.loads((static / "summary.json").read_text())["sparsity"]
    rigl_eval = json.loads((rigl / "evaluation.json").read_text())
    rigl_all = rigl_eval["prune_ratio_all_parameters"]
    names = ["clean", *(f"{n}/{s}" for n, ss in SUITES["default"].corruptions.items() for s in ss),
             "shift:rotate_translate", "corruptions[default]"]
    assert generous["prune_potential"] == {"rigl": dict.fromkeys(names, rigl_sparsity),
                                           "static": {"clean": static_sparsity}}
    # static has no evaluation.json: its ratio over all parameters is unknown
    assert generous["prune_potential_all_parameters"] == {"rigl": dict.fromkeys(names, rigl_all),
                                                          "static": {"clean": None}}
    strict = compare_runs(runs_given, tmp_path / "b", metric="prune_potential", delta=-1.0)
    assert all(v == 0.0 for values in strict["prune_potential"].values() for v in values.values())
    # delta 0: hand-computed from the stored accuracies
    dense_eval = json.loads((dense / "evaluation.json").read_text())
    exact = compare_runs(runs_given, tmp_path / "c", metric="prune_potential", delta=0.0)
    for key, name in (("clean_top1", "clean"), ("mean_corruption_top1", "corruptions[default]"),
                      ("shift_top1", "shift:rotate_translate")):
        within = 1 - rigl_eval[key] <= 1 - dense_eval[key]
        assert exact["prune_potential"]["rigl"][name] == (rigl_sparsity if within else 0.0)
    for record, dense_record in zip(rigl_eval["distributions"], dense_eval["distributions"]):
        if record["kind"] == "corruption":
            within = 1 - record["top1"] <= 1 - dense_record["top1"]
            name = f"{record['name']}/{record['severity']}"
            assert exact["prune_potential"]["rigl"][name] == (rigl_sparsity if within else 0.0)
            assert exact["prune_potential_all_parameters"]["rigl"][name] == \
                (rigl_all if within else 0.0)
    assert main(["compare", str(dense), str(rigl), "--metric", "prune_potential", "--delta", "100",
                 "--out", str(tmp_path / "d")]) == 0
    with (tmp_path / "d" / "prune_potential.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert table == [{"test distribution": name, "rigl": str(rigl_sparsity),
                      "rigl (all parameters)": str(rigl_all)} for name in names]
    markdown = (tmp_path / "d" / "compare.md").read_text()
    assert "Prune potential (delta = 100 percentage points" in markdown
    capsys.readouterr()


def _constructed_run(root: Path, name: str, method: str, sparsity: float, all_ratio: float | None,
                     top1: dict[str, float]) -> Path:
    """A run directory holding only summary.json and (with all_ratio) evaluation.json."""
    run = root / name
    run.mkdir()
    summary = {"method": method, "sparsity": sparsity, "test_top1": top1["clean"]}
    (run / "summary.json").write_text(json.dumps(summary))
    if all_ratio is not None:
        records = [{"kind": "clean", "name": "clean", "severity": None, "top1": top1["clean"]}]
        records += [{"kind": "corruption", "name": label.split("/")[0],
                     "severity": int(label.split("/")[1]), "top1": top1[label]}
                    for label in ("gaussian_noise/1", "contrast/5")]
        records.append({"kind": "shift", "name": "rotate_translate", "severity": None,
                        "top1": top1["shift"]})
        evaluation = {"suite": "default", "prune_ratio_all_parameters": all_ratio,
                      "clean_top1": top1["clean"], "shift_top1": top1["shift"],
                      "mean_corruption_top1": (top1["gaussian_noise/1"] + top1["contrast/5"]) / 2,
                      "distributions": records}
        (run / "evaluation.json").write_text(json.dumps(evaluation))
    return run


def test_prune_potential_is_per_corruption_and_severity_with_both_ratios(tmp_path):
    # torchprune: each corruption at each severity is its own test distribution. Dyadic accuracies
    # (exact in float); masked weights are 3/4 of all parameters, so the ratios over all
    # parameters are 3/4 of the sparsities: 0.5 -> 0.375, 0.75 -> 0.5625.
    runs = [
        _constructed_run(tmp_path, "dense", "dense", 0.0, 0.0, {
            "clean": 0.875, "gaussian_noise/1": 0.75, "contrast/5": 0.5, "shift": 0.625}),
        _constructed_run(tmp_path, "rigl50", "rigl", 0.5, 0.375, {
            "clean": 0.875, "gaussian_noise/1": 0.75, "contrast/5": 0.25, "shift": 0.625}),
        _constructed_run(tmp_path, "rigl75", "rigl", 0.75, 0.5625, {
            "clean": 0.75, "gaussian_noise/1": 0.5, "contrast/5": 0.75, "shift": 0.5}),
        _constructed_run(tmp_path, "static50", "static", 0.5, None, {"clean": 0.875}),
    ]
    result = compare_runs(runs, tmp_path / "out", metric="prune_potential", delta=0.0)
    # The suite mean of rigl75 (0.625) equals dense's, so the summary row says 0.75, while on
    # gaussian_noise/1 rigl75 loses 0.25 and only rigl50 qualifies.
    assert result["prune_potential"] == {
        "rigl": {"clean": 0.5, "gaussian_noise/1": 0.5, "contrast/5": 0.75,
                 "shift:rotate_translate": 0.5, "corruptions[default]": 0.75},
        "static": {"clean": 0.5},
    }
    assert result["prune_potential_all_parameters"] == {
        "rigl": {"clean": 0.375, "gaussian_noise/1": 0.375, "contrast/5": 0.5625,
                 "shift:rotate_translate": 0.375, "corruptions[default]": 0.5625},
        "static": {"clean": None},
    }
    with (tmp_path / "out" / "prune_potential.csv").open() as handle:
        table = list(csv.reader(handle))
    assert table == [
        ["test distribution", "rigl", "rigl (all parameters)", "static", "static (all parameters)"],
        ["clean", "0.5", "0.375", "0.5", ""],
        ["gaussian_noise/1", "0.5", "0.375", "", ""],
        ["contrast/5", "0.75", "0.5625", "", ""],
        ["shift:rotate_translate", "0.5", "0.375", "", ""],
        ["corruptions[default]", "0.75", "0.5625", "", ""],
    ]
    markdown = (tmp_path / "out" / "compare.md").read_text()
    assert "| gaussian_noise/1 | 0.5000 | 0.3750 |  |  |" in markdown


def test_compare_bad_input_is_one_line_and_writes_nothing(runs, tmp_path, capsys):
    out = tmp_path / "compare"
    status = main(["compare", str(runs["rigl"]), "--metric", "prune_potential", "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "needs a dense reference" in err
    (tmp_path / "unfinished").mkdir()
    status = main(["compare", str(runs["dense"]), str(tmp_path / "unfinished"), "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "unfinished has no summary.json" in err
    assert not out.exists()
