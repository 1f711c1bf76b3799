"""The `write-beton` and `make-smoke-imagenet` verbs of the `distsparse` command line."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = ["VERBS", "add_parsers", "run"]

VERBS = ("write-beton", "make-smoke-imagenet")


def add_parsers(verbs: argparse._SubParsersAction) -> None:
    """Add the write-beton and make-smoke-imagenet sub-commands to the CLI's sub-parsers."""
    write = verbs.add_parser(
        "write-beton", help="write an ImageFolder (ImageNet's train/ or val/) as an FFCV .beton",
        description="Write the ImageFolder SRC (one sub-folder of images per class) as an FFCV "
        ".beton file with an 'image' (RGBImageField, proportion mode) and a 'label' field, as "
        "libffcv/ffcv-imagenet's write_imagenet.py does. Every image is decoded with PIL first; "
        "a bad file is named and nothing is written.",
    )
    write.add_argument("--src", type=Path, required=True, help="ImageFolder directory")
    write.add_argument("--out", type=Path, required=True, help="output .beton file")
    write.add_argument("--max-resolution", type=int, default=500,
                       help="longest image side kept (ffcv-imagenet's ResNet-50 data: 500)")
    write.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality (90)")
    write.add_argument("--compress-probability", type=float, default=0.5,
                       help="fraction of images stored as JPEG, the others raw (0.5)")
    write.add_argument("--num-workers", type=int, default=min(16, os.cpu_count() or 1),
                       help="worker processes (default: min(16, cores))")
    write.add_argument("--chunk-size", type=int, default=100, help="images per writer work item")
    write.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    smoke = verbs.add_parser(
        "make-smoke-imagenet", help="generate a small ImageNet-format data set from Fashion-MNIST",
        description="Write OUT/train and OUT/val: 10 class folders of colorized, resized "
        "Fashion-MNIST JPEGs of varied sizes, for smoke runs of the ImageNet path.",
    )
    smoke.add_argument("--out", type=Path, required=True, help="output folder (new or empty)")
    smoke.add_argument("--train-per-class", type=int, default=100)
    smoke.add_argument("--val-per-class", type=int, default=30)
    smoke.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> None:
    """Run a data verb; bad input raises DataError."""
    if args.verb == "write-beton":
        from distsparse.data.beton import write_beton

        count = write_beton(args.src, args.out, args.max_resolution, args.jpeg_quality,
                            args.compress_probability, args.num_workers, args.chunk_size,
                            args.overwrite)
        print(f"wrote {count} images to {args.out}")
    else:
        from distsparse.data.smoke_imagenet import make_smoke_imagenet

        count = make_smoke_imagenet(args.out, args.train_per_class, args.val_per_class, args.seed)
        print(f"wrote {count} images to {args.out}/train and {args.out}/val")
