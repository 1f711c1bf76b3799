"""distsparse export: the sparse safetensors layout, dense safetensors, ONNX; bad input.

Runs are trained here on generated data (16 steps): a RigL MLP, a static small ResNet (batch norm),
a DeepSpeed run's model file and a `prune` output. Every float32 round trip is compared bit for bit
(the integer view of every tensor), and every masked-off entry must be +0.0 in every copy.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import numpy_helper
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import distsparse
from distsparse.cli import main
from distsparse.config import load_config
from distsparse.engine.checkpoint import CHECKPOINT_NAME, MODEL_NAME, load_checkpoint, save_checkpoint
from distsparse.engine.native_checkpoint import DEEPSPEED_DIR, commit_native, step_tag
from distsparse.engine.runs import load_run
from distsparse.engine.trainer import train
from distsparse.errors import CheckpointError
from distsparse.export.onnx_export import ONNX_TOLERANCE
from distsparse.export.sparse_format import SPARSE_LAYOUT, mask_key, pack_mask, unpack_mask, values_key
from distsparse.export.files import ExportError
from distsparse.models import build_model
from tests.conftest import SMALL
from tests.test_text_data import TEXT, tiny_fortunes

MLP = ("model.name=mlp", "data.synthetic.image_size=28")
RESNET = ("model.name=small_resnet", "data.synthetic.image_size=16", "data.augment=false")
GPT = (*TEXT, "model.kwargs.n_layer=2", "model.kwargs.n_head=2", "model.kwargs.n_embd=32",
       "train.max_steps=4", "method.name=rigl", "method.sparsity=0.8")
"""A tiny byte-level GPT-2 (Hugging Face GPT2LMHeadModel, head tied to the token embedding)."""
BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


class Branching(nn.Module):
    """A model torch.export cannot trace: its forward branches on the value of its input."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels * 28 * 28, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.fc(images.flatten(1))
        return logits if images.sum() > 0 else -logits


def branching(num_classes: int, in_channels: int) -> nn.Module:
    """`model.name=tests.test_export:branching`."""
    return Branching(num_classes, in_channels)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Trained runs: RigL MLP, static small ResNet, a tiny GPT, a model torch.export cannot trace,
    a DeepSpeed-layout run and a prune output."""
    root = tmp_path_factory.mktemp("runs")
    settings = {
        "rigl": (*MLP, "method.name=rigl", "method.sparsity=0.9"),
        "resnet": (*RESNET, "method.name=static", "method.sparsity=0.8"),
        "dense": (*MLP, "method.name=dense", "train.max_steps=4"),
        "branching": ("model.name=tests.test_export:branching", "data.synthetic.image_size=28",
                      "method.name=static", "method.sparsity=0.5", "train.max_steps=2"),
    }
    settings["gpt"] = (*GPT, f"data.path={tiny_fortunes(root / 'fortunes')}")
    for name, overrides in settings.items():
        train(load_config(None, [*SMALL, f"run.dir={root / name}", *overrides]))
    runs = {name: root / name for name in settings}
    runs["deepspeed"] = _as_deepspeed_run(runs["rigl"], root / "deepspeed")
    assert main(["prune", str(runs["dense"]), "--method", "oneshot", "--sparsity", "0.75",
                 "--calib-samples", "64", "--out", str(root / "pruned"), "--no-progress"]) == 0
    runs["pruned"] = root / "pruned"
    return runs


def _as_deepspeed_run(source: Path, target: Path) -> Path:
    """The run directory a DeepSpeed run leaves, written by the writers the DeepSpeed trainer
    uses: the single-process checkpoints/model.pt, a committed native tag and no last.pt (a real
    2-rank DeepSpeed start costs minutes on this CPU; tests/test_deepspeed.py reads real ones)."""
    shutil.copytree(source, target)
    state = load_checkpoint(target / CHECKPOINT_NAME)
    (target / CHECKPOINT_NAME).unlink()
    save_checkpoint({key: state[key] for key in ("config", "step", "model", "masks")},
                    target / MODEL_NAME)
    directory = target / DEEPSPEED_DIR
    (directory / step_tag(state["step"])).mkdir(parents=True)
    commit_native(directory, step_tag(state["step"]),
                  {"step": state["step"], "world_size": 2, "zero_stage": 3, "config": state["config"]})
    return target


def _export(capsys, run: Path | str, out: Path, *options: str) -> tuple[int, str]:
    status = main(["export", str(run), "--out", str(out), *options])
    return status, capsys.readouterr().err


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (so +0.0 and -0.0, or two NaNs, are told apart)."""
    views = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
    return tensor.contiguous().view(views[tensor.element_size()])


def _final(run: Path) -> dict:
    path = run / MODEL_NAME if (run / MODEL_NAME).is_file() else run / CHECKPOINT_NAME
    return load_checkpoint(path, ("model", "masks", "step"))


@torch.no_grad()
def _top1(model: nn.Module, run: Path) -> float:
    data = load_run(run).data
    model.eval()
    correct = count = 0
    for x, y in data.test.batches(0):
        correct += int((model(x).argmax(1) == y).sum())
        count += len(y)
    return correct / count


def _model_with(run: Path, state: dict[str, torch.Tensor]) -> nn.Module:
    loaded = load_run(run)
    model = build_model(loaded.config.model.name, loaded.data.num_classes, loaded.data.in_channels,
                        loaded.config.model.kwargs)
    model.load_state_dict(state)
    return model


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file()}


# ---- the layout --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5, 7), (64, 9)])
def test_masks_are_packed_in_numpy_packbits_order(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape))) > 0.6
    packed = pack_mask(mask)
    expected = np.packbits(mask.numpy().reshape(-1), bitorder="big")
    assert packed.dtype == torch.uint8 and np.array_equal(packed.numpy(), expected)
    assert torch.equal(unpack_mask(packed, shape), mask)


@pytest.mark.parametrize("run_name", ["rigl", "resnet", "deepspeed", "pruned"])
def test_sparse_round_trip_is_bitwise_and_keeps_test_top1(runs, run_name, tmp_path, capsys):
    run = runs[run_name]
    argument = run / MODEL_NAME if run_name == "deepspeed" else run  # `export RUN/checkpoints/model.pt`
    out = tmp_path / "model.safetensors"
    status, err = _export(capsys, argument, out, "--format", "sparse")
    assert (status, err) == (0, "")
    final = _final(run)
    loaded = distsparse.load_sparse(out)
    assert list(loaded) == list(final["model"])
    for key, value in final["model"].items():
        assert loaded[key].dtype == value.dtype and torch.equal(_bits(loaded[key]), _bits(value)), key
    for name, mask in final["masks"].items():
        assert torch.equal(_bits(loaded[name][~mask]), torch.zeros_like(_bits(loaded[name][~mask])))
    summary = json.loads((run / "summary.json").read_text())
    assert _top1(_model_with(run, loaded), run) == summary["test_top1"]
    with safe_open(out, framework="pt") as file:
        metadata = file.metadata()
    counts = {name: int(mask.sum()) for name, mask in final["masks"].items()}
    total = sum(mask.numel() for mask in final["masks"].values())
    assert metadata["layout"] == SPARSE_LAYOUT and metadata["dtype"] == "float32"
    assert json.loads(metadata["step"]) == final["step"]
    assert metadata["method"] == summary["method"]
    assert json.loads(metadata["sparsity"]) == 1 - sum(counts.values()) / total
    assert json.loads(metadata["layer_density"]) == {
        name: counts[name] / final["masks"][name].numel() for name in counts}
    assert json.loads(metadata["config"])["model"]["name"] == load_run(run).config.model.name


def test_a_prune_output_keeps_its_exact_count(runs, tmp_path, capsys):
    out = tmp_path / "pruned.safetensors"
    assert _export(capsys, runs["pruned"], out, "--format", "sparse") == (0, "")
    masks = _final(runs["pruned"])["masks"]
    total = sum(mask.numel() for mask in masks.values())
    with safe_open(out, framework="pt") as file:
        active = sum(file.get_slice(values_key(name)).get_shape()[0] for name in masks)
        assert file.metadata()["method"] == "oneshot"
    assert active == total - math.floor(0.75 * total)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_the_rounded_weights_with_exact_zeros(runs, tmp_path, capsys, dtype):
    name = str(dtype).removeprefix("torch.")
    out = tmp_path / f"{name}.safetensors"
    assert _export(capsys, runs["resnet"], out, "--format", "sparse", "--dtype", name) == (0, "")
    final, loaded = _final(runs["resnet"]), distsparse.load_sparse(out)
    eps = torch.finfo(dtype).eps
    for key, value in final["model"].items():
        if not value.is_floating_point():
            assert torch.equal(loaded[key], value), key  # num_batches_tracked stays int64
            continue
        assert loaded[key].dtype == dtype
        assert torch.equal(_bits(loaded[key]), _bits(value.to(dtype))), key  # round to nearest
        error = (loaded[key].float() - value).abs()
        assert bool((error <= eps / 2 * value.abs() + torch.finfo(dtype).tiny).all()), key
    for layer, mask in final["masks"].items():
        off = loaded[layer][~mask]
        assert torch.equal(_bits(off), torch.zeros_like(_bits(off))), layer


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_file_size_is_the_layout_arithmetic(runs, tmp_path, capsys, dtype):
    out = tmp_path / "model.safetensors"
    assert _export(capsys, runs["resnet"], out, "--format", "sparse", "--dtype", dtype) == (0, "")
    final, width = _final(runs["resnet"]), BYTES[getattr(torch, dtype)]
    masks = final["masks"]
    values = sum(int(mask.sum()) for mask in masks.values()) * width
    packed = sum(math.ceil(mask.numel() / 8) for mask in masks.values())
    dense = sum(t.numel() * (width if t.is_floating_point() else t.element_size())
                for key, t in final["model"].items() if key not in masks)
    raw = out.read_bytes()
    (header_size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_size])
    assert out.stat().st_size == 8 + header_size + values + packed + dense
    assert len(header) - 1 == len(final["model"]) + len(masks)  # + __metadata__; mask & values
    assert all(header[mask_key(name)]["shape"] == [math.ceil(m.numel() / 8)] for name, m in masks.items())


def test_dense_export_is_the_state_dict_with_exact_zeros(runs, tmp_path, capsys):
    out = tmp_path / "dense.safetensors"
    assert _export(capsys, runs["rigl"], out, "--format", "dense") == (0, "")
    final, loaded = _final(runs["rigl"]), load_file(out)
    assert set(loaded) == set(final["model"])
    for key, value in final["model"].items():
        assert torch.equal(_bits(loaded[key]), _bits(value)), key
    for name, mask in final["masks"].items():
        assert int(loaded[name].count_nonzero()) <= int(mask.sum())
        assert not loaded[name][~mask].any()
    model = _model_with(runs["rigl"], loaded)  # strict load
    assert _top1(model, runs["rigl"]) == json.loads((runs["rigl"] / "summary.json").read_text())["test_top1"]
    with pytest.raises(CheckpointError, match=r"is not a distsparse sparse export"):
        distsparse.load_sparse(out)


# ---- ONNX --------------------------------------------------------------------------------------

def test_onnx_agrees_with_torch_and_keeps_exact_zeros(runs, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    assert _export(capsys, runs["resnet"], out, "--format", "onnx") == (0, "")
    run = load_run(runs["resnet"])
    initializers = {item.name: numpy_helper.to_array(item) for item in onnx.load(str(out)).graph.initializer}
    masked_off = 0
    for name, mask in run.masks.items():
        assert name in initializers, name  # batch norm may be folded in: zeros stay zeros
        off = initializers[name][~mask.numpy()]
        assert not off.any(), name
        masked_off += off.size
    assert masked_off == sum(int((~mask).sum()) for mask in run.masks.values()) > 0
    x = next(iter(run.data.test.batches(0)))[0]
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    actual = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        expected = run.model(x).numpy()
    np.testing.assert_allclose(actual, expected, **ONNX_TOLERANCE)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_onnx_refuses_a_model_it_cannot_trace(runs, tmp_path, capsys):
    out = tmp_path / "branching.onnx"
    status, err = _export(capsys, runs["branching"], out, "--format", "onnx")
    assert status == 2 and err.count("\n") == 1, err
    assert err.startswith("distsparse: error: the model cannot be exported to ONNX: ")
    assert "data-dependent" in err
    assert list(tmp_path.iterdir()) == []


# ---- the API -----------------------------------------------------------------------------------

def test_export_model_from_a_sparsifier_round_trips(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = distsparse.Sparsifier(model, optimizer, method="static", sparsity=0.9,
                                       total_steps=10)
    out = distsparse.export_model(model, sparsifier.masks, tmp_path / "m.safetensors",
                                  metadata={"method": "static", "step": 0})
    loaded = distsparse.load_sparse(out)
    for key, value in model.state_dict().items():
        assert torch.equal(_bits(loaded[key]), _bits(value)), key
    with safe_open(out, framework="pt") as file:
        assert json.loads(file.metadata()["sparsity"]) == 1 - sparsifier.density()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"^sparse export .*truncated.safetensors is corrupt"):
        distsparse.load_sparse(truncated)


def test_weights_that_do_not_fit_float16_are_refused(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight.fill_(1e6)
    masks = {"0.weight": torch.ones(4, 4, dtype=torch.bool)}
    with pytest.raises(ExportError, match=r"^--dtype float16: 0.weight holds values beyond its range"):
        distsparse.export_model(model, masks, tmp_path / "m.safetensors", dtype="float16")
    with pytest.raises(ExportError, match=r"mask 'missing.weight' names no tensor"):
        distsparse.export_model(model, {"missing.weight": masks["0.weight"]}, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


# ---- bad input ---------------------------------------------------------------------------------

def test_an_existing_out_is_never_replaced(runs, tmp_path, capsys):
    out = tmp_path / "taken.safetensors"
    out.write_bytes(b"mine")
    status, err = _export(capsys, runs["rigl"], out, "--format", "sparse")
    assert (status, err) == (2, f"distsparse: error: --out {out} already exists; choose another path\n")
    assert _snapshot(tmp_path) == {"taken.safetensors": b"mine"}


def _broken_run(runs: dict[str, Path], tmp_path: Path, damage: str) -> Path:
    run = tmp_path / "run"
    shutil.copytree(runs["rigl"], run)
    checkpoint = run / CHECKPOINT_NAME
    if damage == "no model file":
        checkpoint.unlink()
    elif damage == "corrupt":
        checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    elif damage == "deepspeed without model.pt":
        shutil.rmtree(run)
        shutil.copytree(runs["deepspeed"], run)
        (run / MODEL_NAME).unlink()
    return run


@pytest.mark.parametrize(("damage", "options", "message"), [
    ("no model file", ("--format", "sparse"), r"checkpoint .*checkpoints/last.pt does not exist"),
    ("corrupt", ("--format", "dense"), r"checkpoint .*checkpoints/last.pt is corrupt or truncated"),
    ("deepspeed without model.pt", ("--format", "sparse"),
     r"has a sharded checkpoint \(checkpoints/deepspeed\) .* but no checkpoints/model.pt"),
    ("missing run", ("--format", "sparse"), r"run directory .*absent does not exist"),
    ("out in a missing folder", ("--format", "sparse"), r"--out .*: folder .*nowhere does not exist"),
    ("onnx in bfloat16", ("--format", "onnx", "--dtype", "bfloat16"),
     r"--dtype bfloat16: ONNX export is float32 only"),
])
def test_bad_input_is_one_line_and_writes_nothing(runs, tmp_path, capsys, damage, options, message):
    run = tmp_path / "absent" if damage == "missing run" else _broken_run(runs, tmp_path, damage)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    out = outputs / ("nowhere/m.safetensors" if damage == "out in a missing folder" else "m.out")
    before = _snapshot(tmp_path)
    status, err = _export(capsys, run, out, *options)
    assert status == 2 and err.count("\n") == 1 and err.startswith("distsparse: error: "), err
    assert re.search(message, err), err
    assert _snapshot(tmp_path) == before and list(outputs.iterdir()) == []


def test_the_readme_reader_loads_the_layout_without_distsparse(runs, tmp_path, capsys):
    """The README's reader (safetensors and torch only) gives what load_sparse gives."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("A reader without distsparse:", 1)[1]
    source = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "distsparse" not in source
    namespace: dict = {}
    exec(compile(source, "README.md", "exec"), namespace)
    out = tmp_path / "model.safetensors"
    assert _export(capsys, runs["resnet"], out, "--format", "sparse", "--dtype", "bfloat16") == (0, "")
    read, loaded = namespace["load"](out), distsparse.load_sparse(out)
    assert list(read) == list(loaded)
    assert all(torch.equal(_bits(read[key]), _bits(loaded[key])) for key in loaded)


# ---- the Hugging Face GPT ----------------------------------------------------------------------

def test_gpt_dense_export_is_a_folder_from_pretrained_loads_with_exact_zeros(runs, tmp_path, capsys):
    from transformers import GPT2LMHeadModel

    out = tmp_path / "gpt"
    status, err = _export(capsys, runs["gpt"], out, "--format", "dense")
    assert (status, err) == (0, "")
    pretrained = GPT2LMHeadModel.from_pretrained(out)
    final = _final(runs["gpt"])
    state = pretrained.state_dict()
    assert {f"gpt2.{key}" for key in state} == set(final["model"])
    for key, value in state.items():
        assert torch.equal(_bits(value), _bits(final["model"][f"gpt2.{key}"])), key
    for name, mask in final["masks"].items():
        off = state[name.removeprefix("gpt2.")][~mask]
        assert off.numel() and torch.equal(_bits(off), torch.zeros_like(_bits(off))), name
    assert pretrained.lm_head.weight is pretrained.transformer.wte.weight
    run = load_run(runs["gpt"])
    tokens = next(iter(run.data.test.batches(0)))[0]
    with torch.no_grad():
        assert torch.equal(pretrained.eval()(input_ids=tokens).logits, run.model(tokens))
    info = json.loads((out / "distsparse_export.json").read_text())
    assert (info["method"], info["step"], info["dtype"]) == ("rigl", final["step"], "float32")
    assert [p.name for p in tmp_path.iterdir()] == ["gpt"]


def test_gpt_sparse_export_stores_the_tied_head_once(runs, tmp_path, capsys):
    out = tmp_path / "gpt.safetensors"
    assert _export(capsys, runs["gpt"], out, "--format", "sparse") == (0, "")
    loaded, final = distsparse.load_sparse(out), _final(runs["gpt"])
    assert loaded["gpt2.lm_head.weight"] is loaded["gpt2.transformer.wte.weight"]
    for key, value in final["model"].items():
        assert torch.equal(_bits(loaded[key]), _bits(value)), key
    with safe_open(out, framework="pt") as file:
        assert "gpt2.lm_head.weight" not in file.keys()
        aliases = json.loads(file.metadata()["aliases"])
    assert aliases == {"gpt2.lm_head.weight": "gpt2.transformer.wte.weight"}
