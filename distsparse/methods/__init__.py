"""Sparsity methods, one module per family, each registered under its config name."""
from distsparse.methods import dense, dense_to_sparse, pruning_at_init, sparse_to_sparse
from distsparse.methods.base import (
    METHODS,
    SparsityMethod,
    TrainingSchedule,
    build_method,
    register,
    resolve_method_config,
)

__all__ = [
    "METHODS",
    "SparsityMethod",
    "TrainingSchedule",
    "build_method",
    "dense",
    "dense_to_sparse",
    "pruning_at_init",
    "register",
    "resolve_method_config",
    "sparse_to_sparse",
]
