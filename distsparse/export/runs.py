"""Export a run directory (single, DDP, DeepSpeed's model.pt, a `prune` output) in one format."""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

from distsparse.engine.post_training import resolve_run_dir
from distsparse.engine.runs import load_run
from distsparse.export.writer import check_request, export_model

__all__ = ["export_run"]


def export_run(run: str | os.PathLike, out: str | os.PathLike, format: str = "sparse",
               dtype: str = "float32") -> Path:
    """Export RUN (a run directory, its checkpoints/last.pt or a DeepSpeed run's model.pt) to `out`.

    The model and masks come from `load_run`, as `evaluate` reads them; the safetensors formats
    carry the run's method, target sparsity, resolved config and step as metadata; ONNX is
    checked on the test set's first batch. A run that cannot be read, or an existing `out`,
    raises a DistsparseError before anything is written.
    """
    out = Path(out)
    check_request(format, dtype, out)
    trained = load_run(resolve_run_dir(Path(run)), device="cpu")
    metadata = {
        "method": str(trained.summary.get("method", trained.config.method.name)),
        "target_sparsity": trained.summary.get("target_sparsity", trained.config.method.sparsity),
        "config": OmegaConf.to_container(OmegaConf.structured(trained.config)),
        "step": trained.step,
        "source_run": str(trained.run_dir),
    }
    inputs = next(iter(trained.data.test.batches(0)))[0] if format == "onnx" else None
    return export_model(trained.model, trained.masks, out, format=format, dtype=dtype,
                        metadata=metadata, example_inputs=inputs)
