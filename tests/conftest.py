"""Shared fixtures: small, fast configurations on generated data."""
from __future__ import annotations

import gc
import json
import socket
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from distsparse.config import Config, load_config

def mask_update_fingerprints(run: Path) -> list[tuple[int, str]]:
    """(step, mask fingerprint) of every mask update a run logged in metrics.jsonl."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["fingerprint"]) for r in records if r["kind"] == "mask_update"]


def final_state(run: Path) -> dict:
    """The model and masks a run ended with: a sharded run's model.pt, else its last.pt."""
    model_file = run / "checkpoints" / "model.pt"
    return torch.load(model_file if model_file.is_file() else run / "checkpoints" / "last.pt",
                      map_location="cpu", weights_only=True)


def selection_bytes_bound(numels: list[int], selections: int = 3) -> int:
    """Most bytes a mask update's selections may all-reduce per rank (`sharded_topk`), whatever
    the number of ranks: per selection at most 64 / w histogram rounds of keys, w the first
    (narrowest) digit width, and rounds over the tied entries' indices (all layers' bits, digits
    at least 1 + SPARE_BITS + TIE_SPARE_BITS wide), each of at most
    min(ROUND_COUNTS + layers, layers x (2^cap + 1)) int32 counts, cap the width the largest
    layer allows; and one int64 count per layer."""
    from distsparse.sparsity.sharded_select import ROUND_COUNTS, SPARE_BITS, TIE_SPARE_BITS, \
        round_bits

    layers = len(numels)
    width, cap = round_bits(layers, 64, max(numels)), round_bits(1, 64, max(numels))
    per_round = min(ROUND_COUNTS + layers, layers * (2**cap + 1)) * 4
    index_rounds = -(-(sum(numels) - 1).bit_length() // (1 + SPARE_BITS + TIE_SPARE_BITS))
    per_selection = (-(-64 // width) + index_rounds) * per_round
    return selections * per_selection + layers * 8


def leave_process_group() -> None:
    """End a test worker's process group before its interpreter exits: every rank past its
    collectives (a barrier), what still holds the group collected (DDP's reducer: the caller
    drops its references first), then the group destroyed. A gloo group torn down at exit can
    abort a rank ("terminate called without an active exception") after its work is done."""
    import torch.distributed as dist

    dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a rendezvous or a test service)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


SMALL = [
    "data.name=synthetic",
    "data.loader=synthetic",
    "data.synthetic.train_size=256",
    "data.synthetic.test_size=64",
    "train.batch_size=32",
    "train.epochs=2",
    "train.log_every=4",
    "method.update_interval=4",
    "method.prune_end=0.5",
    "run.progress=false",
]


@pytest.fixture
def small_config(tmp_path):
    """A factory of 16-step configs (8 steps an epoch) writing under tmp_path."""

    def make(*overrides: str, name: str = "run") -> Config:
        return load_config(None, [*SMALL, f"run.dir={tmp_path / name}", *overrides])

    return make


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A one-node Ray head on 127.0.0.2 (launch/ray_local.sh), stopped after the module (a Ray
    started by slurm/ray.sbatch later must not meet it on Ray's fixed default ports)."""
    from tests.services import start_ray_head, stop_ray_head

    state = tmp_path_factory.mktemp("ray-head")
    head = start_ray_head(state)
    try:
        yield head
    finally:
        stop_ray_head(state)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A one-node SLURM cluster (launch/slurm_local.sh), stopped after the session."""
    from tests.services import start_slurm, stop_slurm

    state = tmp_path_factory.mktemp("slurm")
    cluster = start_slurm(state)
    try:
        yield cluster
    finally:
        stop_slurm(state)


def count_host_reads(monkeypatch) -> list[int]:
    """Record every `tolist` (the one batched device-to-host read allowed) by its element count,
    and make per-value reads (`item`, `int()`, `bool()`, ...) raise; `monkeypatch.undo()` ends it."""
    reads: list[int] = []
    tolist = torch.Tensor.tolist

    def counted(tensor):
        reads.append(tensor.numel())
        return tolist(tensor)

    def refused(tensor, *args):
        raise AssertionError("a per-value host read")

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    for attribute in ("item", "__int__", "__bool__", "__index__", "__float__"):
        monkeypatch.setattr(torch.Tensor, attribute, refused)
    return reads


class HiddenSyncs(TorchDispatchMode):
    """Within `with HiddenSyncs() as hidden:`, `hidden.ops` lists the ops that wait for the device
    on an accelerator without a `tolist`: nonzero (and boolean-mask indexing or assignment, which
    call it), masked_select, unique, repeat_interleave with no output size, and one-value reads."""

    SYNCING = {"aten.nonzero", "aten.masked_select", "aten._local_scalar_dense", "aten._unique2",
               "aten.unique_dim", "aten.unique_consecutive"}

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        by_mask = name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
            isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)
            for index in args[1])
        unsized = name == "aten.repeat_interleave" and kwargs.get("output_size") is None \
            and isinstance(args[0], torch.Tensor) and len(args) < 2 and "repeats" not in kwargs
        if name in self.SYNCING or by_mask or unsized:
            self.ops.append(name)
        return func(*args, **kwargs)


class KernelCalls(TorchDispatchMode):
    """Within `with KernelCalls() as calls:`, `calls.count` counts the aten calls that are not
    views: on a GPU, the kernels the host launches."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))
