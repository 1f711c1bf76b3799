"""Write an ImageFolder (ImageNet's train/ or val/) as an FFCV .beton file.

As libffcv/ffcv-imagenet's write_imagenet.py: an RGBImageField in 'proportion' mode (each image
stored as JPEG with probability compress_probability, else raw pixels, the longer side at most
max_resolution) and an IntField label. Every image is decoded with PIL first: FFCV's writer
waits forever when one of its workers fails, so a bad file is named before anything is written.
The output appears only when complete (written under a temporary name, then renamed).
"""
from __future__ import annotations

import os
from multiprocessing import get_context
from pathlib import Path

from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

from distsparse.errors import DataError

__all__ = ["check_image", "scan_image_folder", "write_beton"]


def scan_image_folder(src: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names and (path, label) samples in torchvision ImageFolder's order.

    Hidden files are skipped; any other file without an image extension is an error.
    """
    if not src.exists():
        raise DataError(f"source folder {src} does not exist")
    if not src.is_dir():
        raise DataError(f"source {src} is not a folder")
    classes = sorted(e.name for e in os.scandir(src) if e.is_dir() and not e.name.startswith("."))
    samples = []
    for label, name in enumerate(classes):
        for root, _, files in sorted(os.walk(src / name, followlinks=True)):
            for file in sorted(files):
                if file.startswith("."):
                    continue
                path = os.path.join(root, file)
                if not file.lower().endswith(IMG_EXTENSIONS):
                    raise DataError(
                        f"{path} is not an image file (expected {', '.join(IMG_EXTENSIONS)})"
                    )
                samples.append((path, label))
    if not samples:
        raise DataError(
            f"source folder {src} holds no images (expected one sub-folder of images per class, "
            "as torchvision's ImageFolder reads)"
        )
    return classes, samples


def check_image(path: str) -> str | None:
    """None if PIL decodes the whole image, else a one-line reason."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
        return f"{path} is not a readable image ({str(exc).splitlines()[0] or type(exc).__name__})"
    return None


class _FolderImages:
    """(RGB PIL image, label) by index, for FFCV's writer processes."""

    def __init__(self, samples: list[tuple[str, int]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        with Image.open(path) as image:
            return image.convert("RGB"), label


def write_beton(src: Path, out: Path, max_resolution: int = 500, jpeg_quality: int = 90,
                compress_probability: float = 0.5, num_workers: int = 8, chunk_size: int = 100,
                overwrite: bool = False, progress: bool = True) -> int:
    """Write the ImageFolder `src` to `out`; returns the number of images written."""
    if out.exists() and not overwrite:
        raise DataError(f"output file {out} already exists (pass --overwrite to replace it)")
    _, samples = scan_image_folder(src)
    paths = [path for path, _ in samples]
    with get_context("fork").Pool(num_workers) as pool:
        checks = pool.imap(check_image, paths, chunksize=64)
        for problem in tqdm(checks, total=len(paths), desc="checking images", leave=False,
                            disable=not progress):
            if problem is not None:
                raise DataError(problem)
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    fields = {
        "image": RGBImageField(write_mode="proportion", max_resolution=max_resolution,
                               compress_probability=compress_probability,
                               jpeg_quality=jpeg_quality),
        "label": IntField(),
    }
    try:
        DatasetWriter(str(partial), fields, num_workers=num_workers).from_indexed_dataset(
            _FolderImages(samples), chunksize=chunk_size)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return len(samples)
