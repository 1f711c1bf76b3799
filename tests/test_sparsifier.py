"""The library API: `distsparse.Sparsifier` in hand-written training loops."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import distsparse
from distsparse.errors import ConfigError
from distsparse.sparsity.allocation import active_count, layer_densities
from tests.conftest import free_port, leave_process_group

VOCAB, WIDTH, CONTEXT = 48, 16, 6


class TinyLM(nn.Module):
    """A model distsparse does not ship: embedding, LayerNorms, biases and a head tied to the
    embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.block = nn.Sequential(nn.LayerNorm(WIDTH), nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(),
                                   nn.Linear(4 * WIDTH, WIDTH))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(tokens)
        hidden = hidden + self.block(hidden)
        return self.head(self.norm(hidden))


MASKED = ["block.1.weight", "block.3.weight"]


def _batches(count: int, batch: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (count, batch, CONTEXT + 1), generator=generator)
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def _setup(method: str = "rigl", dtype: torch.dtype = torch.float32, **options):
    torch.manual_seed(0)
    model = TinyLM().to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    options = {"update_interval": 4, "distribution": "erk", **options}
    sparsifier = distsparse.Sparsifier(model, optimizer, method=method, sparsity=0.8,
                                       total_steps=24, **options)
    return model, optimizer, sparsifier


@pytest.mark.parametrize("method", ["static", "set", "rigl", "gmp", "granet", "granet_st"])
def test_a_users_model_keeps_exact_counts_and_zeros_in_every_copy(method):
    model, optimizer, sparsifier = _setup(method, torch.float32,
                                          **({"prune_scope": "layer"} if method == "gmp" else {}))
    assert list(sparsifier.masks) == MASKED  # no embedding, norm, bias or tied head
    shapes = {name: tuple(mask.shape) for name, mask in sparsifier.masks.items()}
    untouched = {name: p for name, p in model.named_parameters() if name not in MASKED}
    changed = 0
    for step, (x, y) in enumerate(_batches(24, 8)):
        before = {name: mask.clone() for name, mask in sparsifier.masks.items()}
        _loss(model, x, y).backward()
        sparsifier.step()
        optimizer.zero_grad(set_to_none=True)
        params = dict(model.named_parameters())
        for name, mask in sparsifier.masks.items():
            assert torch.count_nonzero(params[name].detach()[~mask]) == 0, (step, name)
            for value in optimizer.state[params[name]].values():
                assert torch.count_nonzero(value[~mask]) == 0, (step, name)
            changed += int(not torch.equal(mask, before[name]))
        for name, p in untouched.items():
            assert torch.count_nonzero(p.detach()) == p.numel(), name  # never masked
    if method in ("set", "rigl", "static"):
        densities = layer_densities("erk", shapes, 0.2)
        expected = {name: active_count(math.prod(shape), densities[name])
                    for name, shape in shapes.items()}
        assert sparsifier.mask_set.active_counts() == expected
    else:
        total = sum(math.prod(shape) for shape in shapes.values())
        assert sum(sparsifier.mask_set.active_counts().values()) == total - math.floor(0.8 * total)
    assert (changed > 0) == (method != "static")
    assert f"method={method}" in repr(sparsifier) and "block.1.weight" in sparsifier.summary()


class _FunctionalMomentum(torch.optim.Optimizer):
    """Momentum kept in place, and from the third step on a second state tensor that each step
    replaces with a new one (as functional code does)."""

    def __init__(self, params) -> None:
        super().__init__(params, {"lr": 0.1})

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                velocity = state.setdefault("velocity", torch.zeros_like(p))
                velocity.mul_(0.9).add_(p.grad)
                state["calls"] = state.get("calls", 0) + 1
                if state["calls"] >= 3:
                    state["trace"] = state.get("trace", torch.zeros_like(p)) + p.grad.abs()
                p.sub_(group["lr"] * velocity)


def test_every_copy_is_masked_when_the_optimizer_replaces_or_adds_state_and_storage_moves():
    """The tensors masked after each step are listed once, yet a state tensor the optimizer
    replaces or adds, a loaded optimizer state and a weight given new storage are all masked."""
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = _FunctionalMomentum(model.parameters())
    sparsifier = distsparse.Sparsifier(model, optimizer, method="set", sparsity=0.8,
                                       total_steps=12, update_interval=4, distribution="erk")
    params = dict(model.named_parameters())
    for step, (x, y) in enumerate(_batches(12, 8)):
        if step == 6:
            optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        if step == 9:  # not an update step: the masks stay the same objects
            params["block.3.weight"].data = torch.randn_like(params["block.3.weight"])
        _loss(model, x, y).backward()
        sparsifier.step()
        optimizer.zero_grad()
        for name, mask in sparsifier.masks.items():
            state = optimizer.state[params[name]]
            assert ("trace" in state) == (step >= 2)
            for tensor in (params[name].detach(), state["velocity"], state.get("trace")):
                if tensor is not None:
                    assert torch.count_nonzero(tensor[~mask]) == 0, (step, name)


def test_four_micro_batches_give_the_masks_of_one_batch():
    whole_model, whole_opt, whole = _setup("rigl", torch.float64)
    micro_model, micro_opt, micro = _setup("rigl", torch.float64)
    for x, y in _batches(16, 16):
        _loss(whole_model, x, y).backward()
        whole.step()
        whole_opt.zero_grad()
        for xs, ys in zip(x.chunk(4), y.chunk(4)):
            (_loss(micro_model, xs, ys) / 4).backward()
        micro.step()
        micro_opt.zero_grad()
    assert whole.last_update is not None and whole.last_update.layers_changed > 0
    assert whole.fingerprint() == micro.fingerprint()
    for a, b in zip(whole_model.parameters(), micro_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_a_step_the_grad_scaler_skips_is_not_a_mask_update():
    model, optimizer, sparsifier = _setup("rigl", torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    batches = _batches(8, 8)
    for x, y in batches[:4]:
        scaler.scale(_loss(model, x, y)).backward()
        assert sparsifier.step(scaler)
        optimizer.zero_grad()
    assert sparsifier.method.is_update_step(sparsifier.step_count)  # step 4 updates the mask
    masks = {name: mask.clone() for name, mask in sparsifier.masks.items()}
    weights = copy.deepcopy(model.state_dict())
    scaler.scale(_loss(model, *batches[4])).backward()
    model.block[1].weight.grad[0, 0] = float("inf")
    assert not sparsifier.step(scaler)
    optimizer.zero_grad()
    assert sparsifier.step_count == 4 and sparsifier.last_update is None
    assert all(torch.equal(masks[name], mask) for name, mask in sparsifier.masks.items())
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    scaler.scale(_loss(model, *batches[5])).backward()
    assert not sparsifier.step(scaler)  # RigL's update step replaces the optimizer step
    assert sparsifier.step_count == 5 and sparsifier.last_update.step == 4
    assert any(not torch.equal(masks[name], mask) for name, mask in sparsifier.masks.items())


@pytest.mark.parametrize("method", ["set", "rigl", "granet_st"])
def test_state_dict_round_trip_continues_bit_for_bit(method):
    batches = _batches(20, 8)
    model, optimizer, sparsifier = _setup(method)

    def train(model, optimizer, sparsifier, part):
        for x, y in part:
            _loss(model, x, y).backward()
            sparsifier.step()
            optimizer.zero_grad()

    train(model, optimizer, sparsifier, batches[:10])
    saved = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "sparsifier": sparsifier.state_dict()})
    train(model, optimizer, sparsifier, batches[10:])
    resumed_model, resumed_opt, resumed = _setup(method)
    resumed_model.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["optimizer"])
    resumed.load_state_dict(saved["sparsifier"])
    train(resumed_model, resumed_opt, resumed, batches[10:])
    assert resumed.fingerprint() == sparsifier.fingerprint() and resumed.step_count == 20
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))


def test_the_method_readies_its_layout_once_at_the_first_step_of_a_run_or_resume():
    # `prepare` runs at the first step a Sparsifier takes, not at construction, with the step
    # the run is at: once for a fresh run (step 0), once for a resumed one (its step 10) however
    # many times masks were set before (construction, then load_state_dict).
    batches = _batches(12, 8)
    calls = []

    def recording(model, optimizer, sparsifier):
        prepare = sparsifier.method.prepare
        sparsifier.method.prepare = lambda step, masks, weights: (
            calls.append(step), prepare(step, masks, weights))
        return model, optimizer, sparsifier

    model, optimizer, sparsifier = recording(*_setup("rigl"))
    assert calls == []
    for x, y in batches[:10]:
        _loss(model, x, y).backward()
        sparsifier.step()
        optimizer.zero_grad()
    assert calls == [0]
    state = sparsifier.state_dict()
    model, optimizer, resumed = recording(*_setup("rigl"))
    resumed.load_state_dict(state)
    for x, y in batches[10:]:
        _loss(model, x, y).backward()
        resumed.step()
        optimizer.zero_grad()
    assert calls == [0, 10]


def test_include_exclude_and_dense_layers_choose_the_masked_weights():
    model = TinyLM()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def masked(**options) -> list[str]:
        return list(distsparse.Sparsifier(model, optimizer, method="static", total_steps=4,
                                          **options).masks)

    assert masked(include=[r"embed\.weight", r"block\.\d\.weight"]) == [
        "embed.weight", "block.0.weight", "block.1.weight", "block.3.weight"]
    assert masked(exclude=[r"block\.3\..*"]) == ["block.1.weight"]
    assert masked(dense_last_layer=True) == ["block.1.weight"]
    assert masked(include=[r"head\.weight"]) == ["embed.weight"]  # the tied tensor, once


@pytest.mark.parametrize(("options", "message"), [
    ({"method": "magic"}, "argument 'method' = 'magic'"),
    ({"method": "dense"}, "argument 'method' = 'dense'"),
    ({"sparsity": 1.0}, "argument 'sparsity' = 1.0"),
    ({"update_interval": 0}, "argument 'update_interval' = 0"),
    ({"distribution": "gaussian"}, "argument 'distribution' = 'gaussian'"),
    ({"drop_fractions": 0.3}, "unknown argument 'drop_fractions'"),
    ({"total_steps": None}, "argument 'total_steps'"),
    ({"include": ["attention.*"]}, "include pattern 'attention.*' matches no parameter"),
    ({"exclude": ["["]}, "exclude pattern is not a regular expression"),
    ({"sparse_gradients": True}, "argument 'sparse_gradients'"),
])
def test_a_wrong_argument_is_one_config_error_naming_it(options, message):
    model = TinyLM()
    arguments = {"method": "rigl", "total_steps": 10, **options}
    with pytest.raises(ConfigError, match=None) as error:
        distsparse.Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), **arguments)
    assert message in str(error.value) and "\n" not in str(error.value)


WORLD = 2


def _ddp_worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    torch.manual_seed(0)
    model = TinyLM().double()
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.5, momentum=0.9)
    sparsifier = distsparse.Sparsifier(ddp, optimizer, method="rigl", sparsity=0.8,
                                       total_steps=24, update_interval=4, sparse_gradients=True)
    for x, y in _batches(16, 16):
        _loss(ddp, x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]).backward()
        sparsifier.step()
        optimizer.zero_grad()
    torch.save({"fingerprint": sparsifier.fingerprint(), "state": model.state_dict(),
                "bytes": sparsifier.access.gradient_state.bytes_sent},
               Path(out) / f"rank{rank}.pt")
    del sparsifier, optimizer, ddp  # DDP's reducer holds the group
    leave_process_group()


def test_a_ddp_model_gets_identical_masks_equal_to_one_process(tmp_path):
    mp.spawn(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    model, optimizer, single = _setup("rigl", torch.float64, sparse_gradients=False)
    for x, y in _batches(16, 16):
        _loss(model, x, y).backward()
        single.step()
        optimizer.zero_grad()
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"] == single.fingerprint()
    assert ranks[0]["bytes"] > 0
    for name, value in model.state_dict().items():
        # float64: the 2-rank mean and the full-batch mean differ only by rounding.
        torch.testing.assert_close(ranks[0]["state"][name], value, rtol=0, atol=1e-12)
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name])


def test_the_readme_example_runs_and_leaves_an_exact_resumable_checkpoint(tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Use it in your own training loop", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    sparsifier, model = namespace["sparsifier"], namespace["model"]
    assert sparsifier.step_count == 200 and sparsifier.last_update.step == 150
    assert list(sparsifier.masks) == ["1.weight", "4.weight"]
    weights = dict(model.named_parameters())
    for name, mask in sparsifier.masks.items():
        assert torch.count_nonzero(weights[name].detach()[~mask]) == 0
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["sparsifier"]["step"] == 200
    shapes = {name: tuple(mask.shape) for name, mask in sparsifier.masks.items()}
    densities = layer_densities("erk", shapes, 0.1)
    expected = {name: active_count(math.prod(shape), densities[name])
                for name, shape in shapes.items()}
    assert {name: int(m.sum()) for name, m in saved["sparsifier"]["masks"].items()} == expected


def test_given_masks_are_the_starting_masks_and_a_static_mask_stays_fixed():
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    generator = torch.Generator().manual_seed(3)
    given = {name: torch.rand(getattr(model.block, name.split(".")[1]).weight.shape,
                              generator=generator) < 0.3 for name in MASKED}
    sparsifier = distsparse.Sparsifier(model, optimizer, method="static", total_steps=8,
                                       masks=given)
    for x, y in _batches(8, 4):
        _loss(model, x, y).backward()
        sparsifier.step()
        optimizer.zero_grad()
        for name in MASKED:
            assert torch.equal(sparsifier.masks[name], given[name]), name
            weight = model.get_parameter(name)
            assert torch.count_nonzero(weight[~given[name]]) == 0, name
            assert torch.count_nonzero(optimizer.state[weight]["momentum_buffer"][~given[name]]) == 0
    assert sparsifier.step_count == 8


@pytest.mark.parametrize(("edit", "message"), [
    (lambda masks: masks.pop("block.3.weight"), "argument 'masks': no mask for 'block.3.weight'"),
    (lambda masks: masks.update(extra=torch.ones(2, dtype=torch.bool)),
     "argument 'masks': no sparsifiable parameter named 'extra'"),
    (lambda masks: masks.update({"block.1.weight": torch.ones(3, dtype=torch.bool)}),
     "argument 'masks': mask for 'block.1.weight' has shape (3,)"),
])
def test_wrong_given_masks_are_one_config_error(edit, message):
    model = TinyLM()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    masks = {name: torch.ones_like(model.get_parameter(name), dtype=torch.bool) for name in MASKED}
    edit(masks)
    with pytest.raises(ConfigError) as error:
        distsparse.Sparsifier(model, optimizer, method="static", total_steps=4, masks=masks)
    assert message in str(error.value) and "\n" not in str(error.value)
    state = distsparse.Sparsifier(model, optimizer, method="static", total_steps=4).state_dict()
    with pytest.raises(ConfigError, match="arguments 'state' and 'masks'"):
        distsparse.Sparsifier(model, optimizer, method="static", total_steps=4, state=state,
                              masks=state["masks"])
