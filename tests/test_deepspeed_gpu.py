"""DeepSpeed ZeRO 0-3 on a CUDA device: fp16 and bf16 with masks in every copy; fp32 equal to DDP.

Needs one CUDA device (skipped otherwise). Both ranks share it over gloo, which carries CUDA
tensors for every collective DeepSpeed and DDP use here (NCCL refuses two ranks on one device);
the worker creates the group before the trainer, which then keeps it. The checks are those of
test_deepspeed.py: after every step masked-off entries are exactly 0 in the model weight, the fp32
master and every optimizer-state tensor, regrown ones start at 0; fp32 masks equal DDP's after
every update. fp16 uses dynamic loss scaling from 2^4: DeepSpeed's default start, 2^16, overflows
on this model and skips the first steps, which leaves no optimizer state to check there.
"""
from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

import pytest
import torch

from tests.test_deepspeed import STAGES, _compare, _train, run_two_ranks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MIXED = (("fp16", torch.float16, {"initial_scale_power": 4}), ("bf16", torch.bfloat16, {}))


def _worker(rank: int, port: int, root: str, queue) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    errors: list[str] = []
    try:
        root_dir = Path(root)
        cuda = ["train.device=cuda", "method.name=rigl"]
        ddp = root_dir / "ddp"
        _train([*cuda, "backend.name=ddp", f"run.dir={ddp}"])
        for stage in STAGES:
            run = root_dir / f"ds{stage}"
            _train([*cuda, "backend.name=deepspeed", f"backend.zero_stage={stage}", f"run.dir={run}"],
                   errors)
            _compare(ddp, run, f"CUDA DDP vs ZeRO-{stage}", errors, exact=False)
        for key, dtype, options in MIXED:
            settings = root_dir / f"{key}.json"
            settings.write_text(json.dumps({key: {"enabled": True, **options}}))
            for stage in STAGES:
                trainer = _train([*cuda, "backend.name=deepspeed", f"backend.zero_stage={stage}",
                                  f"backend.deepspeed_config={settings}",
                                  f"run.dir={root_dir / f'{key}-ds{stage}'}"], errors)
                found = {(p.dtype, p.device.type) for p in trainer.masks.params.values()}
                if found != {(dtype, "cuda")}:
                    errors.append(f"{key} at ZeRO-{stage}: the model's weights are {found}")
                if trainer.backend.model.skipped_steps:
                    errors.append(f"{key} at ZeRO-{stage}: {trainer.backend.model.skipped_steps} "
                                  "steps skipped on overflow")
    except Exception:  # report, then leave: the other rank fails on its collective timeout
        errors.append(traceback.format_exc())
    queue.put((rank, errors))
    torch.distributed.destroy_process_group()


def test_mixed_precision_masks_hold_in_every_copy_on_cuda(tmp_path):
    results = dict(run_two_ranks(_worker, tmp_path))
    assert results == {0: [], 1: []}, "\n".join(results.get(0, [])[:40] + results.get(1, [])[:5])
