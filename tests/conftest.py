"""Shared fixtures: small, fast configurations on generated data."""
from __future__ import annotations

import pytest

from distsparse.config import Config, load_config

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
