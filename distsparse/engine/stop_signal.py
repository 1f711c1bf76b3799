"""Stop at a step boundary on SIGTERM or SIGUSR1 (SLURM preemption and time limits).

The handler only sets a flag. With several workers the ranks agree on it without touching the
device: every `check_every` steps each rank posts its flag to an asynchronous MAX all-reduce on a
CPU (gloo) side group and reads the result posted at the previous check, which has long finished
in gloo's background thread. Every rank posts and reads at the same steps, so all ranks see the
same answer and stop after the same step (at most two checks after the signal), checkpoint, and
exit.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist

from distsparse.distributed.process_group import is_distributed

__all__ = ["STOP_SIGNALS", "StopSignal"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""Signals that ask a run to checkpoint and stop."""


class StopSignal:
    """A context manager that records STOP_SIGNALS while training runs.

    Handlers can only be installed from the main thread; elsewhere (a Ray Train worker runs the
    training function in a thread) the signals keep their default action. Entering it with
    several workers is a collective (it makes the CPU side group).
    """

    def __init__(self, check_every: int = 1) -> None:
        if check_every < 1:
            raise ValueError(f"check_every must be at least 1, got {check_every}")
        self.check_every = check_every
        self.received: signal.Signals | None = None
        self._previous: dict[int, object] = {}
        self._group: dist.ProcessGroup | None = None
        self._posted: tuple[dist.Work, torch.Tensor] | None = None

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        if is_distributed():
            self._group = dist.new_group(backend="gloo")
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
        if self._posted is not None:
            self._posted[0].wait()  # every rank has the same one outstanding
            self._posted = None
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None

    def _handle(self, number: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(number)

    def agreed(self, step: int) -> bool:
        """True on every rank, after the same `step`, once any rank has received a stop signal.

        Alone it reads the flag. With several workers it acts only on steps divisible by
        `check_every`: it reads the all-reduce posted at the previous check and posts this one.
        """
        if self._group is None:
            return self.received is not None
        if step % self.check_every:
            return False
        stop = False
        if self._posted is not None:
            work, flag = self._posted
            work.wait()
            stop = bool(flag.item())  # a CPU tensor: no device sync
        flag = torch.tensor([int(self.received is not None)], dtype=torch.int32)
        self._posted = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group,
                                        async_op=True), flag)
        return stop
