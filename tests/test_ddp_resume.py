"""DDP on 3 gloo ranks: a run stopped and resumed ends bit for bit as the uninterrupted run.

From 3 ranks on, the ring all-reduce sums an element's terms in an order that depends on where
the element sits in its bucket. DDP rebuilds its buckets after the first step of every start, so
without `fix_bucket_layout` the first step after a resume reduces in another layout than the
uninterrupted run's same step (the small ResNet in float64: two buckets once rebuilt, one before).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import traceback
from pathlib import Path

import torch

from tests.conftest import SMALL, free_port
from tests.test_ddp import QUICKSTART, _assert_same_network, _final, _update_steps

WORLD = 3
STOP = 6
# The quickstart model in float64; 24 images a step (8 per rank), 10 steps an epoch, RigL growing
# by the dense gradient every 4 steps (the sparse-gradient hook in between).
RUN = [*SMALL, "model.name=small_resnet", "train.dtype=float64", "train.batch_size=24",
       "method.name=rigl", "backend.name=ddp", f"launcher.num_workers={WORLD}"]


def _worker(rank: int, port: int, root: Path, queue) -> None:
    """Train whole, then stopped at STOP and resumed, in one process group (as --nproc does)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    from distsparse.cli import main

    try:
        statuses = [main(["train", QUICKSTART, *RUN, f"run.dir={root / 'whole'}"]),
                    main(["train", QUICKSTART, *RUN, f"run.dir={root / 'resumed'}",
                          f"run.stop_at_step={STOP}"])]
        summary = root / "resumed" / "summary.json"
        stopped = json.loads(summary.read_text())["steps"] if rank == 0 else STOP
        statuses.append(main(["train", "--resume", str(root / "resumed")]))
        queue.put((rank, (stopped, statuses)))
    except BaseException:  # the test reads the reason instead of waiting for a result
        queue.put((rank, traceback.format_exc()))
    finally:
        torch.distributed.destroy_process_group()


def test_three_ranks_stopped_and_resumed_equal_the_uninterrupted_run(tmp_path):
    context = multiprocessing.get_context("spawn")
    queue, port = context.Queue(), free_port()
    workers = [context.Process(target=_worker, args=(rank, port, tmp_path, queue))
               for rank in range(WORLD)]
    for worker in workers:
        worker.start()
    results = dict(queue.get(timeout=240) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
    assert results == {rank: (STOP, [0, 0, 0]) for rank in range(WORLD)}, results

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    summaries = [json.loads((run / "summary.json").read_text()) for run in (whole, resumed)]
    assert summaries[1]["completed"] and summaries[1]["world_size"] == WORLD
    assert summaries[0]["mask_fingerprint"] == summaries[1]["mask_fingerprint"]
    assert _update_steps(resumed) == _update_steps(whole)
    assert [step for step in _update_steps(whole) if step > STOP], "no mask update after the resume"
    _assert_same_network(_final(whole), _final(resumed), exact=True)
