"""`distsparse export`: a run's model as sparse safetensors, dense safetensors or ONNX.

Imports nothing heavy at module level: the command line builds this parser before it knows which
verb runs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distsparse.errors import DistsparseError
from distsparse.export.formats import DTYPE_NAMES, FORMATS

__all__ = ["add_export_parser", "run_export"]

_DESCRIPTION = """\
Write RUN's trained model (a run directory of any backend, its checkpoints/last.pt, a DeepSpeed
run's checkpoints/model.pt, or a `distsparse prune` output) to one file (a folder for the dense
export of a Hugging Face model):

sparse: one safetensors file holding, for every masked weight, its bit-packed mask and the values
  at active positions, every other tensor dense, and metadata (method, sparsity, per-layer
  density, config, step); read it with distsparse.load_sparse(PATH) (needs only safetensors and
  torch; layout in the README).
dense:  the state dict with exact zeros as safetensors (safetensors.torch.load_file); for a
  Hugging Face model (model.name=gpt) a save_pretrained folder that from_pretrained loads.
onnx:   torch.onnx.export of the model in eval mode, kept only if onnxruntime agrees with torch on
  the test set's first batch; float32 only.

The output is written beside PATH and renamed onto it when complete; an existing PATH is never
replaced.
"""

_EXAMPLES = """\
examples:
  distsparse export runs/rigl95 --format sparse --out rigl95.safetensors
  distsparse export runs/rigl95 --format sparse --dtype bfloat16 --out rigl95-bf16.safetensors
  distsparse export runs/zero3/checkpoints/model.pt --format dense --out zero3.safetensors
  distsparse export runs/dense-u90 --format onnx --out u90.onnx
"""


def add_export_parser(verbs: argparse._SubParsersAction) -> None:
    """Add the `export` verb and its options to the command line's subparsers."""
    export = verbs.add_parser(
        "export", help="write a run's model as sparse or dense safetensors, or ONNX",
        description=_DESCRIPTION, epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("run", metavar="RUN", type=Path,
                        help="run directory, its checkpoints/last.pt or checkpoints/model.pt")
    export.add_argument("--format", required=True, choices=FORMATS, help="file format")
    export.add_argument("--dtype", choices=DTYPE_NAMES, default="float32",
                        help="floating-point tensors in this dtype (default float32; onnx: float32)")
    export.add_argument("--out", required=True, type=Path, metavar="PATH",
                        help="file to write; must not exist")


def run_export(args: argparse.Namespace) -> int:
    """Run a parsed `export` command; bad input ends with one line and exit status 2."""
    try:
        from distsparse.export.runs import export_run

        out = export_run(args.run, args.out, format=args.format, dtype=args.dtype)
    except DistsparseError as exc:
        print(f"distsparse: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distsparse: interrupted", file=sys.stderr)
        return 130
    files = [path for path in out.rglob("*") if path.is_file()] if out.is_dir() else [out]
    size = sum(path.stat().st_size for path in files)
    print(f"wrote {out} ({args.format}, {args.dtype}, {size / 1e6:.2f} MB)")
    return 0
