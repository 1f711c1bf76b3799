"""Backends: single process and DDP implement the same seam (DeepSpeed next)."""
from distsparse.engine.backends.base import Backend
from distsparse.engine.backends.ddp import DDPBackend
from distsparse.engine.backends.single import SingleBackend

__all__ = ["Backend", "DDPBackend", "SingleBackend"]
