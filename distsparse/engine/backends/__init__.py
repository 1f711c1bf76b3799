"""Backends: single process, DDP and DeepSpeed (imported on use: distsparse.engine.backends.deepspeed)."""
from distsparse.engine.backends.base import Backend
from distsparse.engine.backends.ddp import DDPBackend
from distsparse.engine.backends.single import SingleBackend

__all__ = ["Backend", "DDPBackend", "SingleBackend"]
