"""Stop at the next step boundary on SIGTERM or SIGUSR1 (SLURM preemption and time limits).

The handler only sets a flag; the trainer asks every step whether any rank saw a signal (one
all-reduce of a single number with several workers), so all ranks stop after the same step,
checkpoint, and exit.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType

import torch

from distsparse.dist.process_group import all_reduce, is_distributed

__all__ = ["STOP_SIGNALS", "StopSignal"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""Signals that ask a run to checkpoint and stop."""


class StopSignal:
    """A context manager that records STOP_SIGNALS while training runs.

    Handlers can only be installed from the main thread; elsewhere (a Ray Train worker runs the
    training function in a thread) the signals keep their default action.
    """

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(number)

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank received a stop signal (a collective).

        Alone, no tensor is made (no host sync). With several workers it is one all-reduce of one
        number per step, which on CUDA waits for the step's kernels to finish.
        """
        if not is_distributed():
            return self.received is not None
        flag = torch.tensor([float(self.received is not None)], device=device)
        return bool(all_reduce(flag, torch.distributed.ReduceOp.MAX).item())
