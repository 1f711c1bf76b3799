"""Pruning at initialization: exact counts, scores equal to hand computations, the criteria's
defining properties (SynFlow data-free, FORCE resurrection, Iter-SNIP nesting), config errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distsparse.config import INIT_CRITERIA, MethodConfig
from distsparse.engine.trainer import Trainer, train
from distsparse.errors import ConfigError
from distsparse.methods import build_method
from distsparse.methods.base import TrainingSchedule
from distsparse.methods import init_masks
from distsparse.methods.init_masks import InitContext, initial_masks
from distsparse.sparsity.allocation import active_count, layer_densities
from distsparse.sparsity.counter_rng import stream_key
from distsparse.sparsity.masks import sparsifiable_parameters
from distsparse.sparsity.schedules import iterative_densities
from distsparse.sparsity.scores import grasp_scores, mean_gradients, snip_scores, synflow_scores

MLP = ["model.name=mlp", "data.synthetic.image_size=28"]


def _batches(seed: int, count: int = 2, size: int = 8, features: int = 3, classes: int = 4):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, features, generator=generator, dtype=torch.float64),
         torch.randint(0, classes, (size,), generator=generator))
        for _ in range(count)
    ]


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5, bias=False), nn.ReLU(), nn.Linear(5, 4, bias=False)).double()


def _context(model: nn.Module, batches, global_batch: int = 8) -> InitContext:
    return InitContext(model, lambda: iter(batches), global_batch, (3,), lambda t: t)


def _config(criterion: str, **changes) -> MethodConfig:
    return MethodConfig(name="static", init=criterion, **changes)


def _linear_softmax_gradient(weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """dL/dW of mean cross-entropy of softmax(W x): (softmax - onehot)^T x / n."""
    probabilities = torch.softmax(x @ weight.T, dim=1)
    onehot = F.one_hot(y, weight.shape[0]).to(weight.dtype)
    return (probabilities - onehot).T @ x / len(y)


def test_snip_scores_equal_w_times_the_softmax_gradient():
    model = nn.Sequential(nn.Linear(3, 4, bias=False)).double()
    batches = _batches(1)
    params = sparsifiable_parameters(model)
    grads = mean_gradients(model, params, batches, global_batch=8)
    expected = sum(_linear_softmax_gradient(model[0].weight.detach(), x, y) for x, y in batches) / 2
    torch.testing.assert_close(grads["0.weight"], expected, rtol=1e-12, atol=1e-14)
    scores = snip_scores(params, grads)
    torch.testing.assert_close(scores["0.weight"], (model[0].weight.detach() * expected).abs())


def test_scores_of_split_batches_sum_to_those_of_the_global_batch():
    """What each rank computes on its half, summed by the all-reduce, is the global-batch mean."""
    model = nn.Sequential(nn.Linear(3, 4, bias=False)).double()
    params = sparsifiable_parameters(model)
    (x, y), = _batches(2, count=1)
    whole = mean_gradients(model, params, [(x, y)], global_batch=8)
    halves = [mean_gradients(model, params, [(x[i:i + 4], y[i:i + 4])], global_batch=8)
              for i in (0, 4)]
    torch.testing.assert_close(halves[0]["0.weight"] + halves[1]["0.weight"], whole["0.weight"],
                               rtol=1e-12, atol=1e-15)


def test_grasp_scores_equal_w_times_the_hessian_gradient_product():
    model = nn.Sequential(nn.Linear(3, 4, bias=False)).double()
    batches = _batches(3)
    temperature = 200.0
    weight = model[0].weight.detach().clone()

    def loss(flat: torch.Tensor) -> torch.Tensor:
        w = flat.view_as(weight)
        return sum(F.cross_entropy(x @ w.T / temperature, y) for x, y in batches) / len(batches)

    flat = weight.reshape(-1)
    gradient = torch.autograd.functional.jacobian(loss, flat)
    hessian = torch.autograd.functional.hessian(loss, flat)
    expected = weight * (hessian @ gradient).view_as(weight)
    scores = grasp_scores(model, sparsifiable_parameters(model), batches, 8, temperature=temperature)
    torch.testing.assert_close(scores["0.weight"], expected, rtol=1e-9, atol=1e-18)


def _conv_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8, 5, bias=False), nn.ReLU(), nn.Linear(5, 4, bias=False)).double()


def _image_batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 4, 4, generator=generator, dtype=torch.float64),
             torch.randint(0, 4, (8,), generator=generator)) for _ in range(2)]


def _scored_weights(monkeypatch, reinit: bool, seed: int,
                    global_seed: int = 0) -> dict[str, torch.Tensor]:
    """The weights GraSP scores with (spied on), for the conv net at seed `seed`; the global RNG
    (seeded `global_seed`, as another rank might be) is neither read nor changed."""
    seen = {}

    def spy(model, params, *args):
        seen.update({name: p.detach().clone() for name, p in params.items()})
        return grasp_scores(model, params, *args)

    monkeypatch.setattr(init_masks, "grasp_scores", spy)
    shapes = {"0.weight": (2, 1, 3, 3), "3.weight": (5, 8), "5.weight": (4, 5)}
    context = _context(_conv_net(), _image_batches(8))
    torch.manual_seed(global_seed)
    state = torch.get_rng_state()
    initial_masks(_config("grasp", grasp_reinit=reinit), shapes, 0.3, seed, context)
    assert torch.equal(torch.get_rng_state(), state)
    return seen


def test_grasp_scores_xavier_normal_redrawn_linear_weights_by_default(monkeypatch):
    # alecwangcq/GraSP pruner/GraSP.py reinit=True: nn.init.xavier_normal on every nn.Linear of the
    # scoring copy (std sqrt(2 / (fan_in + fan_out))); convolutions keep their weights.
    own = {name: p.detach().clone() for name, p in _conv_net().named_parameters()}
    seen = _scored_weights(monkeypatch, reinit=True, seed=5)
    assert torch.equal(seen["0.weight"], own["0.weight"])
    for name, (fan_out, fan_in) in (("3.weight", (5, 8)), ("5.weight", (4, 5))):
        generator = torch.Generator().manual_seed(stream_key(5, 0, name, "grasp_reinit"))
        std = math.sqrt(2.0 / (fan_in + fan_out))
        expected = torch.empty(fan_out, fan_in, dtype=torch.float64)
        expected.normal_(0, std, generator=generator)
        assert torch.equal(seen[name], expected), name
        assert not torch.equal(seen[name], own[name])
    another_rank = _scored_weights(monkeypatch, reinit=True, seed=5, global_seed=456)
    assert all(torch.equal(another_rank[name], seen[name]) for name in seen)
    other_seed = _scored_weights(monkeypatch, reinit=True, seed=6)
    assert not torch.equal(other_seed["3.weight"], seen["3.weight"])


def test_grasp_without_reinit_scores_the_models_own_weights(monkeypatch):
    own = {name: p.detach().clone() for name, p in _conv_net().named_parameters()}
    for seed in (5, 6):
        seen = _scored_weights(monkeypatch, reinit=False, seed=seed)
        assert seen.keys() == own.keys()
        assert all(torch.equal(seen[name], own[name]) for name in own)


def test_synflow_scores_equal_the_path_norm_derivative():
    """R = 1^T |W2| |W1| 1, so dR/dW1[i, j] = sum_k |W2[k, i]| and dR/dW2[k, i] = sum_j |W1[i, j]|."""
    model = _net()
    w1, w2 = model[0].weight.detach().abs().clone(), model[2].weight.detach().abs().clone()
    scores = synflow_scores(model, sparsifiable_parameters(model), (3,))
    torch.testing.assert_close(scores["0.weight"], w1 * w2.sum(0)[:, None])
    torch.testing.assert_close(scores["2.weight"], w2 * w1.sum(1)[None, :])


def test_synflow_is_data_free():
    config, shapes = _config("synflow", sparsity=0.8, pai_iterations=10), {"0.weight": (5, 3), "2.weight": (4, 5)}
    model = _net()
    one = initial_masks(config, shapes, 0.2, 0, _context(model, _batches(4)))
    other = initial_masks(config, shapes, 0.2, 0, _context(model, _batches(5, size=2)))
    for name in shapes:
        assert torch.equal(one[name], other[name])


@pytest.mark.parametrize("criterion", [c for c in INIT_CRITERIA if c != "random"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_every_criterion_keeps_the_exact_target_count(criterion, scope):
    model = _net()
    shapes = {"0.weight": (5, 3), "2.weight": (4, 5)}
    config = _config(criterion, prune_scope=scope, distribution="uniform", pai_iterations=5)
    masks = initial_masks(config, shapes, 0.3, 0, _context(model, _batches(6)))
    if scope == "global":
        assert sum(int(m.sum()) for m in masks.values()) == active_count(35, 0.3)
    else:
        densities = layer_densities("uniform", shapes, 0.3)
        for name, shape in shapes.items():
            assert int(masks[name].sum()) == active_count(math.prod(shape), densities[name])
    assert all(m.dtype == torch.bool and tuple(m.shape) == shapes[n] for n, m in masks.items())


def test_scoring_leaves_the_model_untouched():
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shapes = {"0.weight": (5, 3), "2.weight": (4, 5)}
    for criterion in ("synflow", "force", "grasp"):
        initial_masks(_config(criterion, pai_iterations=3), shapes, 0.3, 0, _context(model, _batches(7)))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_one_iteration_of_iter_snip_or_force_is_snip():
    model, shapes, batches = _net(), {"0.weight": (5, 3), "2.weight": (4, 5)}, _batches(8)
    snip = initial_masks(_config("snip"), shapes, 0.25, 0, _context(model, batches))
    for criterion in ("iter_snip", "force"):
        masks = initial_masks(_config(criterion, pai_iterations=1), shapes, 0.25, 0, _context(model, batches))
        assert all(torch.equal(masks[n], snip[n]) for n in shapes), criterion


def test_iter_snip_never_regrows_but_force_can(monkeypatch):
    """Iter-SNIP's steps are nested; FORCE re-scores pruned weights with their original values."""
    from distsparse.methods import init_masks as module

    selections: dict[str, list[dict[str, torch.Tensor]]] = {}
    select = module._select

    def recording(scores, density, config, eligible=None):
        masks = select(scores, density, config, eligible)
        selections.setdefault(config.init, []).append(masks)
        return masks

    monkeypatch.setattr(module, "_select", recording)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16, bias=False), nn.ReLU(), nn.Linear(16, 4, bias=False)).double()
    shapes = {"0.weight": (16, 3), "2.weight": (4, 16)}
    batches = _batches(9, count=1, size=16)
    for criterion in ("iter_snip", "force"):
        initial_masks(_config(criterion, pai_iterations=6), shapes, 0.1, 0, _context(model, batches))

    def regrown(steps):
        return sum(int((later[n] & ~earlier[n]).sum())
                   for earlier, later in zip(steps, steps[1:]) for n in shapes)

    assert regrown(selections["iter_snip"]) == 0
    assert regrown(selections["force"]) > 0


def test_iterative_schedules():
    assert iterative_densities(0.01, 2) == pytest.approx([0.1, 0.01])
    assert iterative_densities(0.01, 2)[-1] == 0.01
    assert iterative_densities(0.2, 4, "linear") == pytest.approx([0.8, 0.6, 0.4, 0.2])
    with pytest.raises(ValueError, match="cosine"):
        iterative_densities(0.2, 4, "cosine")


def test_force_at_99_percent_keeps_every_layer_connected(small_config):
    config = small_config(*MLP, "method.name=force", "method.sparsity=0.99", "method.pai_iterations=20")
    masks = Trainer(config).masks
    assert {name: int(m.sum()) > 0 for name, m in masks.masks.items()} == dict.fromkeys(masks.names, True)
    assert sum(masks.active_counts().values()) == active_count(sum(m.numel() for m in masks.masks.values()), 0.01)


def test_a_dynamic_method_starts_from_the_pai_mask(small_config):
    static = Trainer(small_config(*MLP, "method.name=snip", name="snip")).masks
    rigl = Trainer(small_config(*MLP, "method.name=rigl", "method.init=snip", name="rigl")).masks
    assert rigl.fingerprint() == static.fingerprint()
    random = Trainer(small_config(*MLP, "method.name=rigl", name="random")).masks
    assert random.fingerprint() != static.fingerprint()


def test_a_static_pai_run_keeps_its_mask_through_training(small_config, tmp_path):
    config = small_config(*MLP, "method.name=grasp", "method.sparsity=0.95")
    initial = Trainer(config).masks.fingerprint()
    summary = train(small_config(*MLP, "method.name=grasp", "method.sparsity=0.95", name="trained"))
    assert summary["mask_fingerprint"] == initial
    assert summary["method"] == "grasp"


def test_config_errors_name_the_key(small_config):
    with pytest.raises(ConfigError, match="'method.init' = 'obd'"):
        small_config("method.init=obd")
    with pytest.raises(ConfigError, match="method.name='snip' chooses its mask by snip"):
        build_method(MethodConfig(name="snip", init="force"), TrainingSchedule(16, 8), 0)
    with pytest.raises(ConfigError, match="'method.pai_batches' = 9"):
        Trainer(small_config(*MLP, "method.name=snip", "method.pai_batches=9"))
    with pytest.raises(ConfigError, match="'method.pai_iterations' = 0"):
        small_config("method.pai_iterations=0")
    with pytest.raises(ConfigError, match="'method.grasp_reinit': Value 'sometimes' is not a valid"):
        small_config("method.grasp_reinit=sometimes")
    assert small_config("method.grasp_reinit=false").method.grasp_reinit is False
