"""Backends: single process now; DDP and DeepSpeed implement the same seam."""
from distsparse.engine.backends.base import Backend
from distsparse.engine.backends.single import SingleBackend

__all__ = ["Backend", "SingleBackend"]
