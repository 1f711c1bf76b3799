"""Tests for distsparse.sparsity.masks: which weights are masked, apply, counts, fingerprints, state."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from distsparse.sparsity.masks import MaskSet, canonical_name, sparsifiable_parameters


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.bn1 = nn.BatchNorm2d(8)
        self.block = nn.Sequential(nn.Conv2d(8, 16, 3, bias=False), nn.ReLU(), nn.BatchNorm2d(16))
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(64, 10)


class Wrapper(nn.Module):
    """Like DDP / DeepSpeedEngine: the model sits under the attribute `module`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


class Compiled(nn.Module):
    """Like torch.compile's OptimizedModule: the model sits under `_orig_mod`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self._orig_mod = module


NAMES = ["conv1.weight", "block.0.weight", "fc.weight"]


def test_picks_conv_and_linear_weights_in_module_order():
    model = TinyNet()
    params = sparsifiable_parameters(model)
    assert list(params) == NAMES
    assert params["conv1.weight"] is model.conv1.weight
    assert params["block.0.weight"] is model.block[0].weight
    assert params["fc.weight"] is model.fc.weight


@pytest.mark.parametrize("wrap", [Wrapper, Compiled, lambda m: Wrapper(Compiled(m)), lambda m: Compiled(Wrapper(m))])
def test_wrapper_prefixes_are_stripped(wrap):
    model = TinyNet()
    wrapped = wrap(model)
    assert any(n.startswith(("module.", "_orig_mod.")) for n, _ in wrapped.named_parameters())
    params = sparsifiable_parameters(wrapped)
    assert list(params) == NAMES
    assert params["fc.weight"] is model.fc.weight


def test_canonical_name_strips_only_leading_wrapper_prefixes():
    assert canonical_name("module._orig_mod.module.fc.weight") == "fc.weight"
    assert canonical_name("encoder.module.fc.weight") == "encoder.module.fc.weight"
    assert canonical_name("modules.fc.weight") == "modules.fc.weight"


def test_dense_first_and_last_layer_are_left_out():
    model = TinyNet()
    assert list(sparsifiable_parameters(model, dense_first_layer=True)) == NAMES[1:]
    assert list(sparsifiable_parameters(model, dense_last_layer=True)) == NAMES[:-1]
    assert list(sparsifiable_parameters(model, True, True)) == NAMES[1:-1]
    assert list(sparsifiable_parameters(Wrapper(model), True, True)) == ["block.0.weight"]


def _maskset(seed: int = 0) -> tuple[MaskSet, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    params = {
        "a": torch.randn(4, 3, 2, 2, generator=g),
        "b": torch.randn(5, 7, generator=g),
    }
    ms = MaskSet(params)
    ms.update({
        "a": torch.arange(48).reshape(4, 3, 2, 2) % 4 == 0,  # 12 active
        "b": torch.arange(35).reshape(5, 7) < 10,  # 10 active
    })
    return ms, params


def test_new_maskset_is_all_ones():
    ms = MaskSet({"a": torch.zeros(2, 3), "b": torch.zeros(4)})
    assert ms.names == ["a", "b"]
    assert ms.shapes() == {"a": (2, 3), "b": (4,)}
    assert ms.active_counts() == {"a": 6, "b": 4}
    assert ms.density() == 1.0


def test_apply_makes_exact_zeros_and_keeps_the_rest():
    ms, params = _maskset()
    before = {n: p.clone() for n, p in params.items()}
    ms.apply()
    for name, p in params.items():
        mask = ms.masks[name]
        assert bool((p[~mask] == 0).all())
        assert not bool(torch.signbit(p[~mask]).any())  # +0.0, not -0.0
        assert torch.equal(p[mask], before[name][mask])


def test_apply_zeroes_non_finite_values_at_masked_positions():
    # A masked-off entry that overflowed must still end up exactly 0 (inf * 0 would be NaN).
    ms, params = _maskset()
    off = ~ms.masks["b"]
    params["b"][off] = torch.tensor([float("inf"), float("-inf"), float("nan")]).repeat(9)[: int(off.sum())]
    ms.apply()
    assert bool((params["b"][off] == 0).all())


def test_apply_to_other_tensors_by_name():
    ms, _ = _maskset()
    momentum = {"a": torch.ones(4, 3, 2, 2), "b": torch.full((5, 7), -2.0)}
    ms.apply(momentum)
    assert int((momentum["a"] != 0).sum()) == 12
    assert int((momentum["b"] != 0).sum()) == 10
    assert torch.equal(momentum["b"] != 0, ms.masks["b"])


def test_active_counts_and_density_are_exact():
    ms, _ = _maskset()
    assert ms.active_counts() == {"a": 12, "b": 10}
    assert ms.layer_density() == {"a": 12 / 48, "b": 10 / 35}
    assert ms.density() == 22 / 83


def test_fingerprint_equal_for_equal_masks_and_changes_on_one_bit():
    ms1, _ = _maskset(seed=0)
    ms2, _ = _maskset(seed=1)  # different weights, same masks
    assert ms1.fingerprint() == ms2.fingerprint()
    assert ms1.layer_fingerprints() == ms2.layer_fingerprints()
    fp, layer_fp = ms1.fingerprint(), ms1.layer_fingerprints()
    for name, index in [("a", (0, 0, 0, 0)), ("a", (3, 2, 1, 1)), ("b", (4, 6))]:
        flipped = ms2.masks[name].clone()
        flipped[index] = not bool(flipped[index])
        ms3, _ = _maskset()
        ms3.update({name: flipped})
        assert ms3.fingerprint() != fp
        other = "b" if name == "a" else "a"
        assert ms3.layer_fingerprints()[name] != layer_fp[name]
        assert ms3.layer_fingerprints()[other] == layer_fp[other]
    for value in layer_fp.values():
        assert 0 <= value < 2**63


def test_pack_bits_puts_eight_booleans_in_a_byte_most_significant_first():
    from distsparse.sparsity.layout import pack_bits

    patterns = torch.tensor([[(value >> (7 - bit)) & 1 for bit in range(8)] for value in range(256)],
                            dtype=torch.bool)
    assert torch.equal(pack_bits(patterns), torch.arange(256, dtype=torch.uint8))


def _bytes_by_hand(bits: torch.Tensor) -> bytes:
    values = bits.tolist()
    return bytes(sum(int(bit) << (7 - i) for i, bit in enumerate(values[start:start + 8]))
                 for start in range(0, len(values), 8))


@pytest.mark.parametrize("numel", [2, 7, 8, 9, 63, 1000])
def test_fingerprint_bits_are_packed_alike_on_every_device(numel):
    """Fingerprints hash the packed bits, zero-padded to whole bytes, wherever the mask lives."""
    from distsparse.sparsity.masks import _packed

    bits = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) < 0.5
    assert _packed(bits) == _bytes_by_hand(bits)
    assert _packed(bits[1:]) == _bytes_by_hand(bits[1:])  # a view at an odd storage offset
    if torch.cuda.is_available():
        assert _packed(bits.cuda()) == _bytes_by_hand(bits)


def test_state_dict_round_trip_through_torch_save(tmp_path):
    ms, _ = _maskset()
    path = tmp_path / "masks.pt"
    torch.save(ms.state_dict(), path)
    loaded = torch.load(path, weights_only=True)
    assert list(loaded) == ["a", "b"]
    fresh = MaskSet({"a": torch.zeros(4, 3, 2, 2), "b": torch.zeros(5, 7)})
    fresh.load_state_dict(loaded)
    for name in ("a", "b"):
        assert fresh.masks[name].dtype == torch.bool
        assert torch.equal(fresh.masks[name], ms.masks[name])
    assert fresh.fingerprint() == ms.fingerprint()


def test_state_dict_is_a_copy():
    ms, _ = _maskset()
    state = ms.state_dict()
    state["a"].fill_(True)
    assert ms.active_counts()["a"] == 12


@pytest.mark.parametrize(
    "state, layer",
    [
        ({"a": torch.ones(4, 3, 2, 2, dtype=torch.bool)}, "b"),  # missing
        (
            {
                "a": torch.ones(4, 3, 2, 2, dtype=torch.bool),
                "b": torch.ones(5, 7, dtype=torch.bool),
                "extra.weight": torch.ones(3, dtype=torch.bool),
            },
            "extra.weight",
        ),
        ({"a": torch.ones(4, 3, 2, 2, dtype=torch.bool), "b": torch.ones(7, 5, dtype=torch.bool)}, "b"),
    ],
    ids=["missing", "extra", "wrong_shape"],
)
def test_load_state_dict_mismatch_raises_naming_the_layer(state, layer):
    ms, _ = _maskset()
    before = ms.state_dict()
    with pytest.raises((ValueError, KeyError), match=re.escape(repr(layer)[1:-1])):
        ms.load_state_dict(state)
    # Nothing was half-loaded.
    for name, mask in before.items():
        assert torch.equal(ms.masks[name], mask)


def test_update_unknown_layer_raises_key_error():
    ms, _ = _maskset()
    with pytest.raises(KeyError, match="nope"):
        ms.update({"nope": torch.ones(3, dtype=torch.bool)})


class TinyDecoder(nn.Module):
    """GPT-2's layer kinds: a tied embedding/head, Hugging Face Conv1D projections, LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.wte = nn.Embedding(11, 6)
        self.wpe = nn.Embedding(5, 6)
        self.ln = nn.LayerNorm(6)
        self.c_attn = Conv1D(18, 6)  # nf=18 outputs, nx=6 inputs: weight (6, 18)
        self.c_proj = Conv1D(6, 18)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.wte.weight


def test_hugging_face_conv1d_is_masked_and_the_tied_head_embeddings_and_norms_never():
    model = TinyDecoder()
    params = sparsifiable_parameters(model)
    assert list(params) == ["c_attn.weight", "c_proj.weight"]
    assert params["c_attn.weight"] is model.c_attn.weight and params["c_attn.weight"].shape == (6, 18)


def test_multihead_attention_input_projection_is_masked_beside_its_out_proj():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.class_token = nn.Parameter(torch.zeros(1, 1, 8))
            self.pos_embedding = nn.Parameter(torch.zeros(1, 5, 8))
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.cross = nn.MultiheadAttention(8, 2, kdim=4, vdim=3)
            self.norm = nn.LayerNorm(8)

    block = Block()
    params = sparsifiable_parameters(block)
    assert list(params) == ["attn.in_proj_weight", "attn.out_proj.weight", "cross.q_proj_weight",
                            "cross.k_proj_weight", "cross.v_proj_weight", "cross.out_proj.weight"]
    assert params["attn.in_proj_weight"] is block.attn.in_proj_weight


def test_erk_gives_a_transposed_conv1d_weight_the_density_of_the_same_linear():
    """ERK scores (n_in + n_out) / (n_in * n_out): the stored orientation cannot change it."""
    from distsparse.sparsity.allocation import layer_densities

    for distribution in ("er", "erk"):
        conv1d = layer_densities(distribution, {"a": (64, 192), "b": (256, 64), "c": (64, 64)}, 0.2)
        linear = layer_densities(distribution, {"a": (192, 64), "b": (64, 256), "c": (64, 64)}, 0.2)
        assert conv1d == linear


def test_apply_follows_every_change_of_a_mask_replaced_or_edited_in_place():
    weight = torch.nn.Parameter(torch.ones(3, 4))
    masks = MaskSet({"w": weight})
    masks.update({"w": torch.arange(12).reshape(3, 4) % 2 == 0})
    masks.apply()
    assert int(torch.count_nonzero(weight)) == 6
    masks.masks["w"][0] = False  # edited in place: the cached complement must not be reused
    with torch.no_grad():
        weight.fill_(1.0)
    masks.apply()
    assert torch.equal(weight != 0, masks.masks["w"]) and int(torch.count_nonzero(weight)) == 4
    replaced = torch.zeros(3, 4, dtype=torch.bool)
    replaced[2] = True
    masks.update({"w": replaced})
    with torch.no_grad():
        weight.fill_(1.0)
    masks.apply()
    assert torch.equal(weight != 0, replaced)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_zero_off_gives_masked_fill_bits_for_every_float_dtype(dtype):
    """Masked-off entries become +0.0 whatever they held (inf, NaN, -0.0); active ones keep their
    bits exactly (NaN payloads, -0.0, subnormals): the CPU's integer AND equals `masked_fill_`,
    also on a flattened view of another shape."""
    special = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0, -1.5,
                            torch.finfo(dtype).tiny / 4, -torch.finfo(dtype).max], dtype=dtype)
    g = torch.Generator().manual_seed(0)
    values = torch.randn(96, generator=g).to(dtype)
    values[:16] = special.repeat_interleave(2)  # each special value once on, once off
    values = values.reshape(8, 12)
    mask = (torch.arange(96) % 2 == 0).reshape(8, 12)
    masks = MaskSet({"w": torch.zeros(8, 12, dtype=dtype)})
    masks.update({"w": mask})
    expected = values.clone().masked_fill_(~mask, 0)
    for tensor in (values.clone(), values.clone().reshape(-1)):
        masks.zero_off("w", tensor)
        width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
        assert torch.equal(tensor.reshape(8, 12).view(width), expected.view(width))
        assert torch.equal(tensor.reshape(8, 12)[mask].view(width), values[mask].view(width))
        assert not tensor.reshape(8, 12)[~mask].view(width).any()  # +0.0: every bit clear


def test_zero_off_follows_new_storage_and_holds_no_dead_tensor():
    """Masking prepares each tensor once, yet still masks a parameter whose storage was replaced
    (`module.to`, `param.data = ...`) or whose mask changed, and forgets tensors that died."""
    layer = torch.nn.Linear(6, 4)
    masks = MaskSet({"weight": layer.weight})
    mask = torch.arange(24).reshape(4, 6) % 3 == 0
    masks.update({"weight": mask})
    masks.apply()
    assert torch.equal(layer.weight != 0, mask)
    layer.to(torch.float64)  # new storage under the same Parameter
    with torch.no_grad():
        layer.weight.fill_(2.0)
    masks.apply()
    assert layer.weight.dtype == torch.float64 and torch.equal(layer.weight != 0, mask)
    layer.weight.data = torch.full((4, 6), 3.0, dtype=torch.float64)
    masks.apply()
    assert torch.equal(layer.weight != 0, mask)
    masks.update({"weight": ~mask})
    with torch.no_grad():
        layer.weight.fill_(1.0)
    masks.apply()
    assert torch.equal(layer.weight != 0, ~mask)
    prepared = len(masks._targets)
    for _ in range(5):
        masks.apply({"weight": torch.ones(4, 6)})  # temporaries: each forgotten when it dies
    assert len(masks._targets) == prepared
