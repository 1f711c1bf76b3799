"""FFCV vs torchvision ImageFolder + DataLoader: training images per second on the same images.

Both loaders are distsparse's own (`ffcv_train_loader`, `ImageFolderLoader`): random resized crop
at the same resolution, horizontal flip, ImageNet normalization, float32 NCHW batches, the same
batch size and worker count (FFCV: numba threads; torchvision: DataLoader processes). The images
are generated ImageNet-format JPEGs (colorized Fashion-MNIST, sides drawn from --sides); FFCV
reads them from .beton files written by `write_beton` (all JPEG, and the ffcv-imagenet recipe's
50 % JPEG / 50 % raw pixels). Epoch 0 of every loader is a warm-up (FFCV compiles its pipeline
with numba then); the following epochs are timed, and the median epoch is reported.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch

from record import append_results, load_average, markdown_table, run_info

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from distsparse.config import load_config  # noqa: E402
from distsparse.data.beton import write_beton  # noqa: E402
from distsparse.data.ffcv_loader import ffcv_train_loader  # noqa: E402
from distsparse.data.imagefolder import ImageFolderLoader  # noqa: E402
from distsparse.data.smoke_imagenet import make_smoke_imagenet  # noqa: E402


def _images_per_second(loader, epochs: int) -> float:
    """Median over timed epochs 1..epochs of images delivered per second (epoch 0: warm-up)."""
    rates = []
    for epoch in range(epochs + 1):
        start, count = time.perf_counter(), 0
        for x, y in loader.batches(epoch):
            count += len(y)
        if epoch:
            rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    """Build the data, time each loader, print the table, append it to RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-class", type=int, default=200, help="images per class (10 classes)")
    parser.add_argument("--sides", default="160,500", help="min,max image side in pixels")
    parser.add_argument("--resolution", type=int, default=160, help="training crop side")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after the warm-up")
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args()
    load_before = load_average()
    torch.set_num_threads(1)
    sides = tuple(int(side) for side in args.sides.split(","))
    config = load_config(None, [
        f"data.imagenet.min_res={args.resolution}", f"data.imagenet.max_res={args.resolution}",
        f"data.imagenet.num_workers={args.workers}",
    ]).data.imagenet
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        count = make_smoke_imagenet(root / "images", args.per_class, 0, sides=sides)
        folder = root / "images" / "train"
        rows = []
        torchvision_rate = _images_per_second(
            ImageFolderLoader(folder, config, args.batch_size, 0, True), args.epochs)
        for label, probability in (("FFCV, all JPEG", 1.0), ("FFCV, 50 % JPEG (recipe)", 0.5)):
            beton = root / f"train-{probability}.beton"
            write_beton(folder, beton, max_resolution=500, compress_probability=probability,
                        num_workers=args.workers, progress=False)
            loader = ffcv_train_loader(beton, config, args.batch_size, 0, 1, cpu)
            rate = _images_per_second(loader, args.epochs)
            rows.append([label, f"{rate:.0f}", f"{rate / torchvision_rate:.2f}x"])
        rows.append(["torchvision ImageFolder + DataLoader (PIL)", f"{torchvision_rate:.0f}", "1.00x"])
    table = markdown_table(["loader", "images/s", "vs torchvision"], rows)
    print(table)
    if not args.no_record:
        settings = (f"{count} JPEGs (quality 90) of {sides[0]}-{sides[1]} px, random resized crop to "
                    f"{args.resolution} px + flip + normalize, batch {args.batch_size}, "
                    f"{args.workers} workers each, median of {args.epochs} epochs after a warm-up epoch")
        extra = {"versions": f"ffcv {version('ffcv')}, numba {version('numba')}, "
                             f"torchvision {version('torchvision')}, pillow {version('pillow')}",
                 "GPU": "not available in this run: ResNet-50 images/s on a GPU was not measured"}
        append_results("Loader throughput: FFCV vs torchvision ImageFolder",
                       run_info(load_before, settings, extra), table)


if __name__ == "__main__":
    main()
