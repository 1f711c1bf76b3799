"""`distsparse.Sparsifier` on an FSDP2 model (`fully_shard`, through `FSDPBackend`) from a
hand-written loop, 2 gloo ranks, float64, against the same loop under DDP.

A small decoder (token embedding tied to the head, a ModuleList of blocks with Linear attention and
MLP projections and LayerNorms; row counts 21, 7, 11, 7 split unevenly over 2 ranks) trains with
RigL (SGD momentum), SET (AdamW) and GraNet-ST (Adam). After every mask update FSDP2's gathered
masks equal DDP's and its per-layer counts (one all-reduce over the pieces) equal DDP's counts;
after every step masked-off entries are exactly 0 in each rank's local shard of the weight and of
every optimizer-state DTensor; updates run with every gathering path raising (DTensor.full_tensor
and redistribute, FSDP2's parameter all-gather, torch.distributed's all-gathers). Float64 and 2
ranks make both reductions exact, so weights equal DDP's bit for bit. Checkpoints: a run saved
at step 7 and resumed on 2 ranks ends bit for bit equal to the uninterrupted one (every local shard
of weights and optimizer state); loaded on 1 rank it has the same masks and weights. The tied
embedding/head is never masked and still tied after a resume. distsparse's GPT (Hugging Face
GPT2, Conv1D weights) under FSDP2 gets DDP's RigL masks, its head still tied. With a bf16
MixedPrecisionPolicy every forward computes with exactly masked bf16 weights. Each rank records failures instead
of raising, so a failed check never leaves the other rank waiting in a collective.
"""
from __future__ import annotations

import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.fsdp._fully_shard import _fsdp_collectives, _fsdp_param_group
from torch.distributed.tensor import DTensor

import distsparse
from distsparse.distributed.process_group import DistEnv
from distsparse.engine.backends.fsdp import FSDPBackend
from distsparse.errors import ConfigError
from distsparse.models.gpt import build_gpt
from distsparse.sparsifier.fsdp_access import FSDPAccess, local_shard
from distsparse.sparsity.masks import MaskSet
from tests.conftest import free_port, selection_bytes_bound

WORLD, STEPS, BATCH, SAVE_AT = 2, 12, 8, 7
VOCAB, WIDTH, HIDDEN, CONTEXT, LAYERS = 13, 7, 11, 6, 2
OPTIMIZERS = {
    "sgd": (lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9), ("momentum_buffer",)),
    "adamw": (lambda params: torch.optim.AdamW(params, lr=0.01), ("exp_avg", "exp_avg_sq")),
    "adam": (lambda params: torch.optim.Adam(params, lr=0.01), ("exp_avg", "exp_avg_sq")),
}
CASES = {"rigl": "sgd", "set": "adamw", "granet_st": "adam"}
OPTIONS = {"sparsity": 0.7, "total_steps": STEPS, "update_interval": 3, "seed": 5}
GATHERS = [(DTensor, "full_tensor"), (DTensor, "redistribute"),
           (_fsdp_collectives, "foreach_all_gather"), (_fsdp_param_group, "foreach_all_gather"),
           (dist, "all_gather"), (dist, "all_gather_into_tensor"), (dist, "all_gather_object")]


class Block(nn.Module):
    """Pre-norm causal self-attention (one head) and a GELU MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.qkv, self.proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.fc, self.out = nn.Linear(WIDTH, HIDDEN), nn.Linear(HIDDEN, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.ln1(x)).split(WIDTH, dim=-1)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyLM(nn.Module):
    """Token and position embeddings, blocks, a final LayerNorm, a head tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(VOCAB, WIDTH), nn.Embedding(CONTEXT, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _model() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM().double()


def _gpt() -> nn.Module:
    """distsparse's GPT (Hugging Face GPT2 from GPT2Config): Conv1D weights of 5 and 20 rows."""
    torch.manual_seed(0)
    return build_gpt(VOCAB, {"n_layer": 2, "n_head": 1, "n_embd": 5, "n_positions": CONTEXT}).double()


def _batches(rank: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's part of each global batch of token sequences and next-token targets."""
    generator = torch.Generator().manual_seed(1)
    part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    batches = []
    for _ in range(STEPS):
        tokens = torch.randint(0, VOCAB, (BATCH, CONTEXT + 1), generator=generator)
        batches.append((tokens[part, :-1], tokens[part, 1:]))
    return batches


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))


def _fsdp(optimizer: str, rank: int, world: int, build=_model) -> FSDPBackend:
    factory = OPTIMIZERS[optimizer][0]
    return FSDPBackend(build(), lambda model: factory(model.parameters()), DistEnv(rank, world, rank),
                       torch.device("cpu"))


def _refuse(what: str):
    def refused(*args, **kwargs):
        raise AssertionError(f"{what} called inside a mask update")

    return refused


def _guarded(call):
    """`call` with every gathering path raising."""
    def run(*args):
        saved = [(owner, name, getattr(owner, name)) for owner, name in GATHERS]
        for owner, name, _ in saved:
            setattr(owner, name, _refuse(name))
        try:
            return call(*args)
        finally:
            for owner, name, original in saved:
                setattr(owner, name, original)

    return run


def _record_updates(sparsifier: distsparse.Sparsifier, guard: bool, errors: list[str],
                    label: str) -> list[dict]:
    """After each mask update: the full masks and per-layer counts; with `guard`, updates and
    gradient reads run with gathers raising, and the selection's bytes are bounded."""
    updates: list[dict] = []
    update_masks, access = sparsifier._update_masks, sparsifier.access
    layout = sparsifier.mask_set.layout

    def recorded(step, grads):
        sent, gathered = getattr(layout, "bytes_sent", 0), getattr(layout, "bytes_gathered", 0)
        before = sparsifier.mask_set.layer_fingerprints()  # this rank's pieces, no collective
        try:
            (_guarded(update_masks) if guard else update_masks)(step, grads)
        except AssertionError as error:
            errors.append(f"{label} step {step}: {error}")
            raise
        if guard:
            selection = layout.bytes_sent - sent
            bound = selection_bytes_bound([layout.numel(name) for name in layout.names])
            # A piece that changed was selected (bytes sent); one that did not may send nothing
            # (no layer had a swap, and the counts of the masks are known).
            changed = sparsifier.mask_set.layer_fingerprints() != before
            if selection > bound or (changed and not selection) or layout.bytes_gathered != gathered:
                errors.append(f"{label} step {step}: sent {selection} bytes, gathered "
                              f"{layout.bytes_gathered - gathered}")
        updates.append({"step": step, "masks": sparsifier.mask_set.full_masks(),
                        "counts": sparsifier.mask_set.active_counts()})

    sparsifier._update_masks = recorded
    if guard:
        access.grads = _guarded(access.grads)
    return updates


def _zero_everywhere(sparsifier: distsparse.Sparsifier, keys: tuple[str, ...]) -> list[str]:
    """Masked-off entries that are not 0 in a local shard of a weight or optimizer state."""
    found = []
    optimizer = sparsifier.access.optimizer
    for name, param in sparsifier.mask_set.params.items():
        off = ~sparsifier.mask_set.masks[name]
        state = optimizer.state.get(param, {})
        copies = {"weight": local_shard(param)}
        copies.update({key: local_shard(state[key]) for key in keys if key in state})
        if len(copies) != 1 + len(keys):
            found.append(f"{name}: optimizer state {sorted(state)} lacks one of {keys}")
        found += [f"{name} {key}: {int(torch.count_nonzero(copy[off]))} masked-off entries not 0"
                  for key, copy in copies.items() if torch.count_nonzero(copy[off])]
    return found


def _train(sparsifier: distsparse.Sparsifier, model: nn.Module, optimizer, batches, steps: range,
           keys: tuple[str, ...] | None, errors: list[str], label: str) -> None:
    """The user's loop; with `keys`, check every local shard after every step."""
    for step in steps:
        x, y = batches[step]
        optimizer.zero_grad(set_to_none=True)
        _loss(model, x, y).backward()
        sparsifier.step()
        if keys is not None:
            errors += [f"{label} step {step}: {message}" for message in _zero_everywhere(sparsifier, keys)]


def _ddp_run(method: str, rank: int, build) -> tuple[list[dict], dict[str, torch.Tensor]]:
    model = build()
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = OPTIMIZERS[CASES[method]][0](model.parameters())
    sparsifier = distsparse.Sparsifier(ddp, optimizer, method=method, **OPTIONS)
    updates = _record_updates(sparsifier, False, [], "ddp")
    _train(sparsifier, ddp, optimizer, _batches(rank, WORLD), range(STEPS), None, [], "ddp")
    return updates, {key: value.clone() for key, value in model.state_dict().items()}


def _compare_with_ddp(method: str, rank: int, errors: list[str],
                      build=_model) -> distsparse.Sparsifier:
    expected, ddp_state = _ddp_run(method, rank, build)
    backend = _fsdp(CASES[method], rank, WORLD, build)
    sparsifier = distsparse.Sparsifier(backend.model, backend.optimizer, method=method, **OPTIONS)
    label = f"fsdp {build.__name__} {method}"
    if not isinstance(sparsifier.access, FSDPAccess) or not sparsifier.mask_set.sharded:
        errors.append(f"{label}: access {type(sparsifier.access).__name__}, masks not pieces")
    initial = sparsifier.mask_set.active_counts()
    updates = _record_updates(sparsifier, True, errors, label)
    _train(sparsifier, backend.model, backend.optimizer, _batches(rank, WORLD), range(STEPS),
           OPTIMIZERS[CASES[method]][1], errors, label)
    if [u["step"] for u in updates] != [u["step"] for u in expected] or not updates:
        errors.append(f"{label}: updates at {[u['step'] for u in updates]}, DDP's at "
                      f"{[u['step'] for u in expected]}")
    for ours, theirs in zip(updates, expected):
        if any(not torch.equal(ours["masks"][name], mask) for name, mask in theirs["masks"].items()):
            errors.append(f"{label} step {ours['step']}: masks differ from DDP's")
        if ours["counts"] != theirs["counts"]:
            errors.append(f"{label} step {ours['step']}: counts {ours['counts']} != {theirs['counts']}")
        if method != "granet_st" and ours["counts"] != initial:
            errors.append(f"{label} step {ours['step']}: counts moved from {initial}")
    state = backend.model_state_dict()  # a collective: full tensors on rank 0
    if rank == 0 and any(not torch.equal(state[key], value) for key, value in ddp_state.items()):
        errors.append(f"{label}: weights differ from DDP's")
    return sparsifier


def _gpt_under_fsdp(rank: int, errors: list[str]) -> None:
    """The GPT's Conv1D weights (stored in x out, sharded by their 5 or 20 rows) are masked and
    match DDP under RigL; the head stays tied to the token embedding, unmasked."""
    sparsifier = _compare_with_ddp("rigl", rank, errors, _gpt)
    expected = {f"gpt2.transformer.h.{i}.{name}.weight" for i in range(2)
                for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    if set(sparsifier.masks) != expected:
        errors.append(f"gpt: masked {sorted(sparsifier.masks)}, expected {sorted(expected)}")
    gpt2 = sparsifier.access.model.gpt2
    if gpt2.lm_head.weight is not gpt2.transformer.wte.weight:
        errors.append("gpt: the head is no longer tied to the token embedding")


def _local_state(backend: FSDPBackend) -> dict[str, torch.Tensor]:
    """Every local shard of weights and optimizer state, and the optimizer's step counts."""
    found = {}
    for name, param in backend.model.named_parameters():
        found[name] = local_shard(param).clone()
        for key, value in backend.optimizer.state.get(param, {}).items():
            found[f"{name}/{key}"] = local_shard(value).clone() if isinstance(value, DTensor) \
                else torch.as_tensor(value).clone()
    return found


def _resume(rank: int, directory: Path, errors: list[str]) -> dict:
    """Rigl, SGD momentum: uninterrupted vs saved at SAVE_AT and resumed in a fresh model."""
    batches, keys = _batches(rank, WORLD), OPTIMIZERS["sgd"][1]
    backend = _fsdp("sgd", rank, WORLD)
    sparsifier = distsparse.Sparsifier(backend.model, backend.optimizer, method="rigl", **OPTIONS)
    _train(sparsifier, backend.model, backend.optimizer, batches, range(SAVE_AT), keys, errors, "saved")
    saved = {"fingerprint": sparsifier.fingerprint(), "model": backend.model_state_dict()}
    backend.save_checkpoint(directory, {"sparsifier": sparsifier.state_dict(), "step": SAVE_AT})
    _train(sparsifier, backend.model, backend.optimizer, batches, range(SAVE_AT, STEPS), keys,
           errors, "uninterrupted")
    uninterrupted = _local_state(backend)

    backend = _fsdp("sgd", rank, WORLD)
    sparsifier = distsparse.Sparsifier(backend.model, backend.optimizer, method="rigl", **OPTIONS)
    client = backend.load_checkpoint(directory)
    sparsifier.load_state_dict(client["sparsifier"])
    if client["step"] != SAVE_AT or sparsifier.fingerprint() != saved["fingerprint"]:
        errors.append("resumed: step or masks differ from the saved ones")
    _train(sparsifier, backend.model, backend.optimizer, batches, range(SAVE_AT, STEPS), keys,
           errors, "resumed")
    resumed = _local_state(backend)
    if resumed.keys() != uninterrupted.keys():
        errors.append(f"resumed: state {sorted(resumed)} != {sorted(uninterrupted)}")
    errors += [f"resumed: {key} differs from the uninterrupted run" for key, value in
               uninterrupted.items() if key in resumed and not torch.equal(resumed[key], value)]
    errors += _tied(backend.model, sparsifier, "resumed")
    return saved


def _tied(model: TinyLM, sparsifier: distsparse.Sparsifier, label: str) -> list[str]:
    """The head is the embedding's tensor, unmasked (no zero among its random entries)."""
    found = []
    if model.head.weight is not model.embed.weight:
        found.append(f"{label}: the head is no longer tied to the embedding")
    if any(name.startswith(("embed", "head", "pos")) for name in sparsifier.masks):
        found.append(f"{label}: masked {sorted(sparsifier.masks)}")
    if torch.count_nonzero(local_shard(model.embed.weight)) != local_shard(model.embed.weight).numel():
        found.append(f"{label}: the embedding has zeros")
    return found


def _guard_works(rank: int, errors: list[str]) -> None:
    """The guard catches a gather (a DTensor.full_tensor inside a guarded call)."""
    backend = _fsdp("sgd", rank, WORLD)
    weight = backend.model.blocks[0].qkv.weight
    try:
        _guarded(weight.full_tensor)()
        errors.append("the guard let DTensor.full_tensor through")
    except AssertionError:
        pass


def _bf16(rank: int, out: Path, errors: list[str], result: dict) -> None:
    """RigL under FSDP2 with bf16 compute and fp32 gradient reduction (MixedPrecisionPolicy)."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    backend = FSDPBackend(_model().float(), lambda model: torch.optim.AdamW(model.parameters()),
                          DistEnv(rank, WORLD, rank), torch.device("cpu"), policy)
    model, optimizer = backend.model, backend.optimizer
    sparsifier = distsparse.Sparsifier(model, optimizer, method="rigl", **OPTIONS)
    initial = sparsifier.mask_set.active_counts()
    result["initial"] = sparsifier.mask_set.full_masks()
    updates = _record_updates(sparsifier, True, errors, "bf16")
    full: dict[str, torch.Tensor] = {}
    seen: list[str] = []

    def computes_masked(name: str):
        def check(module: nn.Module, args) -> None:
            weight = module.weight.detach()  # the all-gathered compute copy
            if weight.dtype != torch.bfloat16 or torch.count_nonzero(weight[~full[name]]):
                errors.append(f"bf16 {name}: computes in {weight.dtype}, "
                              f"{int(torch.count_nonzero(weight[~full[name]]))} masked-off not 0")
            seen.append(name)
        return check

    for name in sparsifier.masks:
        model.get_submodule(name.rsplit(".", 1)[0]).register_forward_pre_hook(computes_masked(name))
    for step, (x, y) in enumerate(_batches(rank, WORLD)):
        full.update(sparsifier.mask_set.full_masks())
        optimizer.zero_grad(set_to_none=True)
        _loss(model, x, y).backward()
        dtypes = {param.grad.dtype for param in sparsifier.mask_set.params.values()}
        if dtypes != {torch.float32} or local_shard(next(model.parameters())).dtype != torch.float32:
            errors.append(f"bf16 step {step}: gradients {dtypes}, not fp32 shards")
        sparsifier.step()
        errors += [f"bf16 step {step}: {message}"
                   for message in _zero_everywhere(sparsifier, ("exp_avg", "exp_avg_sq"))]
    if len(seen) != STEPS * len(sparsifier.masks):
        errors.append(f"bf16: {len(seen)} masked forwards, expected {STEPS * len(sparsifier.masks)}")
    if not updates or any(update["counts"] != initial for update in updates):
        errors.append(f"bf16: counts {[u['counts'] for u in updates]}, initially {initial}")
    result["final"] = updates[-1]["masks"]


def _against_ddp_and_resume(rank: int, out: Path, errors: list[str], result: dict) -> None:
    """Every case against DDP, the GPT, and a checkpoint saved and resumed."""
    _guard_works(rank, errors)
    for method in CASES:
        _compare_with_ddp(method, rank, errors)
    _gpt_under_fsdp(rank, errors)
    result["saved"] = _resume(rank, out / "checkpoint", errors)


JOBS = {"main": _against_ddp_and_resume, "bf16": _bf16}


def _worker(rank: int, port: int, out: str, job: str) -> None:
    """Run JOBS[job] on this rank; its result and failures go to {job}_rank{rank}.pt."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    errors: list[str] = []
    result: dict = {}
    try:
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        JOBS[job](rank, Path(out), errors, result)
    except Exception:  # noqa: BLE001 - recorded for the test to report
        errors.append(traceback.format_exc())
    result["errors"] = errors
    torch.save(result, Path(out) / f"{job}_rank{rank}.pt")
    dist.destroy_process_group()


def _spawn(job: str, directory: Path) -> list[dict]:
    """Both ranks' results of a job; fails with every rank's failures."""
    mp.spawn(_worker, args=(free_port(), str(directory), job), nprocs=WORLD, join=True)
    ranks = [torch.load(directory / f"{job}_rank{rank}.pt", weights_only=True) for rank in range(WORLD)]
    assert [r["errors"] for r in ranks] == [[], []], "\n".join(ranks[0]["errors"] + ranks[1]["errors"])
    return ranks


def _one_rank(directory: Path) -> tuple[dict, list[str]]:
    """Load the 2-rank checkpoint on 1 rank (in this process: the backend starts a one-rank
    group): the masks and weights it was saved with, tied, and training goes on masked."""
    errors: list[str] = []
    try:
        backend = _fsdp("sgd", 0, 1)
        sparsifier = distsparse.Sparsifier(backend.model, backend.optimizer, method="rigl", **OPTIONS)
        sparsifier.load_state_dict(backend.load_checkpoint(directory)["sparsifier"])
        loaded = {"fingerprint": sparsifier.fingerprint(), "model": backend.model_state_dict()}
        errors += _tied(backend.model, sparsifier, "one rank")
        _train(sparsifier, backend.model, backend.optimizer, _batches(0, 1), range(SAVE_AT, STEPS),
               OPTIMIZERS["sgd"][1], errors, "one rank")
    finally:
        dist.destroy_process_group()
    return loaded, errors


def test_fsdp2_masks_equal_ddp_every_shard_is_masked_and_checkpoints_resume(tmp_path):
    ranks = _spawn("main", tmp_path)
    one, errors = _one_rank(tmp_path / "checkpoint")
    assert errors == [], "\n".join(errors)
    saved = ranks[0]["saved"]
    assert one["fingerprint"] == saved["fingerprint"] == ranks[1]["saved"]["fingerprint"]
    assert one["model"].keys() == saved["model"].keys()
    for key, value in saved["model"].items():
        assert torch.equal(one["model"][key], value), key


def test_fsdp2_with_bf16_compute_keeps_exact_masks_in_every_copy(tmp_path):
    """A MixedPrecisionPolicy passes through: every forward computes with bf16 weights whose
    masked-off entries are exactly 0, gradients are reduced in fp32 into fp32 shards, every local
    shard of weight and AdamW state is masked after every step, RigL keeps its exact counts, and
    both ranks hold the same masks, which the updates changed."""
    ranks = _spawn("bf16", tmp_path)
    final = ranks[0]["final"]
    for name, mask in final.items():
        assert torch.equal(ranks[1]["final"][name], mask), name
    assert any(not torch.equal(ranks[0]["initial"][name], mask) for name, mask in final.items())


def test_row_shards_are_contiguous_ranges_in_rank_order():
    from distsparse.sparsity.sharded_select import contiguous_partition

    rows, row = 21, 7  # torch.chunk: 11 + 10 rows; 3 rows on 4 ranks: 1, 1, 1, 0
    assert [contiguous_partition(rows * row, r, 2, row) for r in range(2)] == [(0, 77), (77, 147)]
    assert [contiguous_partition(3 * 5, r, 4, 5) for r in range(4)] == [(0, 5), (5, 10), (10, 15),
                                                                        (15, 15)]
    chunks = torch.arange(rows * row).view(rows, row).chunk(2)
    assert [tuple(c.flatten()[[0, -1]].tolist()) for c in chunks] == [(0, 76), (77, 146)]


def test_a_model_without_fully_shard_parameters_is_refused():
    """FSDPAccess needs DTensor parameters: a plain module's weight is named in the error."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    access = FSDPAccess(model, optimizer)
    masks = MaskSet({"blocks.0.qkv.weight": model.blocks[0].qkv.weight})
    with pytest.raises(ConfigError, match="'blocks.0.qkv.weight' is not sharded by fully_shard"):
        access.bind(masks)
    with pytest.raises(ConfigError, match="argument 'optimizer'"):
        FSDPAccess(model, None)
