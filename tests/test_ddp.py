"""DDP on 2 gloo processes: the same sparse network as one process (DESIGN invariants 4, 5, 6).

Float64 and a model without batch norm: on the CPU, PyTorch's SyncBatchNorm is unavailable, so a
BN model's batch statistics would be per rank; the all-reduced gradient mean (g1 + g2) / 2 differs
from the one-process mean only by rounding, which float64 keeps far below any score gap here.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distsparse.cli import main
from distsparse.methods import METHODS
from distsparse.methods.pruning_at_init import PRUNING_AT_INIT
from tests.conftest import SMALL, free_port

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
EXACT = [*SMALL, "model.name=mlp", "train.dtype=float64"]


@pytest.fixture(autouse=True)
def one_thread_per_process(monkeypatch):
    """The same thread count on both sides of every comparison.

    The CPU thread count changes the order of reductions inside matmuls; with 1 thread in the
    single process and 1 per rank, 1-vs-2-process differences come from the all-reduce alone.
    """
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(capsys, run: Path, *extra: str, nproc: int = 1, resume: bool = False) -> None:
    argv = ["train", "--nproc", str(nproc)]
    argv += ["--resume", str(run), *extra] if resume else [QUICKSTART, *EXACT, f"run.dir={run}", *extra]
    status = main(argv)
    assert status == 0, capsys.readouterr().err


def _final(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)


def _update_steps(run: Path) -> list[int]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r["kind"] == "mask_update"]


def _assert_same_network(a: dict, b: dict, exact: bool) -> None:
    assert a["step"] == b["step"]
    for name in a["masks"]:
        assert torch.equal(a["masks"][name], b["masks"][name]), name
    for name in a["model"]:
        if exact:
            assert torch.equal(a["model"][name], b["model"][name]), name
        else:
            torch.testing.assert_close(a["model"][name], b["model"][name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_processes_train_the_same_sparse_network_as_one(tmp_path, capsys, method):
    """Every rank checks mask digests after each update (a mismatch fails the run)."""
    # Pruning at init scores two global batches, each split across the ranks.
    pai = ["method.pai_batches=2", "method.pai_iterations=8"] if method in PRUNING_AT_INIT else []
    _train(capsys, tmp_path / "one", f"method.name={method}", *pai)
    _train(capsys, tmp_path / "two", f"method.name={method}", *pai, nproc=2)
    one, two = _final(tmp_path / "one"), _final(tmp_path / "two")
    _assert_same_network(one, two, exact=False)
    # GraNet's reference converts epochs to steps with len(loader)/world_size in one place only;
    # here the schedule comes from the global batch, so updates fall on the same steps.
    assert _update_steps(tmp_path / "one") == _update_steps(tmp_path / "two")
    static = ("dense", "static", *PRUNING_AT_INIT)
    assert (_update_steps(tmp_path / "two") != []) == (method not in static)


def test_sparse_gradient_hook_changes_nothing_but_bytes(tmp_path, capsys):
    _train(capsys, tmp_path / "dense", "method.name=rigl", "backend.sparse_gradients=false", nproc=2)
    _train(capsys, tmp_path / "sparse", "method.name=rigl", "backend.sparse_gradients=true", nproc=2)
    # Active entries are reduced as (g1 + g2) / 2 either way; inactive ones are zeroed after the
    # step in both, so the runs agree bit for bit.
    _assert_same_network(_final(tmp_path / "dense"), _final(tmp_path / "sparse"), exact=True)


def test_resume_under_ddp_is_bit_for_bit_and_may_change_world_size(tmp_path, capsys):
    _train(capsys, tmp_path / "whole", "method.name=rigl", nproc=2)
    for name, nproc in (("two", 2), ("one", 1)):
        _train(capsys, tmp_path / name, "method.name=rigl", "run.stop_at_step=7", nproc=2)
        _train(capsys, tmp_path / name, nproc=nproc, resume=True)
    whole = _final(tmp_path / "whole")
    _assert_same_network(whole, _final(tmp_path / "two"), exact=True)
    _assert_same_network(whole, _final(tmp_path / "one"), exact=False)


def _corrupt_worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    from distsparse.distributed.mask_sync import MaskMismatchError, verify_identical_masks
    from distsparse.sparsity.masks import MaskSet

    params = {"a.weight": torch.zeros(4, 4), "b.weight": torch.zeros(3, 5), "c.weight": torch.zeros(6)}
    masks = MaskSet(params)
    verify_identical_masks(masks, torch.device("cpu"), step=0)
    if rank == 1:
        masks.masks["b.weight"][2, 3] = False
    try:
        verify_identical_masks(masks, torch.device("cpu"), step=40)
        queue.put((rank, "no error"))
    except MaskMismatchError as exc:
        queue.put((rank, str(exc)))
    torch.distributed.destroy_process_group()


def test_a_corrupted_mask_on_one_rank_is_caught_and_named():
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    workers = [context.Process(target=_corrupt_worker, args=(r, port, queue)) for r in range(2)]
    for worker in workers:
        worker.start()
    messages = dict(queue.get(timeout=60) for _ in workers)
    for worker in workers:
        worker.join(timeout=30)
    for rank in (0, 1):
        assert "layer 'b.weight'" in messages[rank] and "step 40" in messages[rank], messages


def test_torchrun_launch_equals_nproc_launch(tmp_path, capsys):
    _train(capsys, tmp_path / "nproc", "method.name=rigl", nproc=2)
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "distsparse.cli", "train",
               QUICKSTART, *EXACT, f"run.dir={tmp_path / 'torchrun'}", "method.name=rigl",
               "backend.name=ddp", "launcher.name=torchrun", "launcher.num_workers=2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "torchrun" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["launcher"] == "torchrun"
    _assert_same_network(_final(tmp_path / "nproc"), _final(tmp_path / "torchrun"), exact=True)
