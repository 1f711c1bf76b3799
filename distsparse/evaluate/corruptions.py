"""ImageNet-C-family corruptions and a held-out shift, computed on the fly on batches of images.

Every function maps images of shape N x C x H x W with values in [0, 1] (before normalization) to
corrupted images of the same shape, dtype, device and range, for any channel count. Each is a pure
function of (images, severity, seed): random draws come from a CPU `torch.Generator` seeded from
(corruption name, severity, seed), never from the global RNG, and are moved to the images' device,
so CPU and GPU tensors get the same draws (pixels equal up to floating-point rounding).

Severity parameters are Hendrycks & Dietterich's (ICLR 2019, arXiv 1903.12261), from
hendrycks/robustness `ImageNet-C/create_c/make_cifar_c.py` (CIFAR-10-C, used for images smaller
than 64 px, e.g. Fashion-MNIST at 28 px) and `ImageNet-C/imagenet_c/imagenet_c/corruptions.py`
(ImageNet-C, used otherwise). "Lost in Pruning" (Liebenwein et al., MLSys 2021, arXiv 2103.03014)
evaluates pruned networks on these corruptions (lucaslie/torchprune
`paper/lost/param/hyperparameters/*`). Filters here are torch convolutions and resampling, so
pixels differ slightly from the reference's skimage/OpenCV/PIL output; the severities are theirs.
Colour-only corruptions (saturate) and those needing image assets (frost) or ImageMagick (motion
blur, snow) are left out.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import decode_jpeg, encode_jpeg

from distsparse.errors import ConfigError

__all__ = [
    "CORRUPTIONS", "SEVERITIES", "SHIFTS", "SUITES", "ZOOM_BLUR_RANGES", "Suite", "brightness",
    "contrast", "corrupt", "defocus_blur", "gaussian_blur", "gaussian_noise", "generator",
    "impulse_noise", "jpeg", "pixelate", "rotate_translate", "shot_noise", "speckle_noise",
    "zoom_blur", "zoom_factors",
]

Corruption = Callable[[torch.Tensor, int, int], torch.Tensor]
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
SMALL_IMAGE = 64
"""Images with a side below this many pixels use the CIFAR-10-C table, others ImageNet-C's."""


def _table(images: torch.Tensor, small: tuple, large: tuple, severity: int):
    """The severity's parameter from the CIFAR-10-C (small images) or ImageNet-C (large) table."""
    if severity not in SEVERITIES:
        raise ConfigError(f"corruption severity {severity}: expected one of 1, 2, 3, 4, 5")
    if images.dim() != 4:
        raise ConfigError(f"corruptions take N x C x H x W images, got shape {tuple(images.shape)}")
    table = small if min(images.shape[2:]) < SMALL_IMAGE else large
    return table[severity - 1]


def generator(name: str, severity: int, seed: int) -> torch.Generator:
    """A CPU generator seeded from (name, severity, seed) alone (stable across processes)."""
    digest = hashlib.sha256(f"{name}/{severity}/{seed}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _randn(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(images.shape, generator=gen).to(images.device, images.dtype)


def _rand(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(images.shape, generator=gen).to(images.device, images.dtype)


def gaussian_noise(images: torch.Tensor, severity: int, seed: int) -> torch.Tensor:
    """Additive N(0, c^2) noise."""
    c = _table(images, (0.04, 0.06, 0.08, 0.09, 0.10), (0.08, 0.12, 0.18, 0.26, 0.38), severity)
    noise = _randn(images, generator("gaussian_noise", severity, seed))
    return (images + c * noise).clamp(0, 1)


def shot_noise(images: torch.Tensor, severity: int, seed: int) -> torch.Tensor:
    """Poisson noise: Poisson(c x) / c."""
    c = _table(images, (500, 250, 100, 75, 50), (60, 25, 12, 5, 3), severity)
    rates = images.detach().to("cpu", torch.float64) * c
    counts = torch.poisson(rates, generator=generator("shot_noise", severity, seed))
    return (counts / c).to(images.device, images.dtype).clamp(0, 1)


def impulse_noise(images: torch.Tensor, severity: int, seed: int) -> torch.Tensor:
    """Salt-and-pepper noise: a fraction c of the values set to 0 or 1 with equal odds."""
    c = _table(images, (0.01, 0.02, 0.03, 0.05, 0.07), (0.03, 0.06, 0.09, 0.17, 0.27), severity)
    gen = generator("impulse_noise", severity, seed)
    flipped, salt = _rand(images, gen) <= c, _rand(images, gen) <= 0.5
    out = images.masked_fill(flipped & salt, 1.0)
    return out.masked_fill(flipped & ~salt, 0.0)


def speckle_noise(images: torch.Tensor, severity: int, seed: int) -> torch.Tensor:
    """Multiplicative noise: x + x N(0, c^2)."""
    c = _table(images, (0.06, 0.10, 0.12, 0.16, 0.20), (0.15, 0.20, 0.35, 0.45, 0.60), severity)
    noise = _randn(images, generator("speckle_noise", severity, seed))
    return (images + images * c * noise).clamp(0, 1)


def _gaussian_kernel(sigma: float, radius: int, dtype: torch.dtype) -> torch.Tensor:
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).to(dtype)


def _filter(images: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Correlate every channel with a 2-D kernel; borders padded with `mode` (replicate/reflect)."""
    ry, rx = kernel.shape[0] // 2, kernel.shape[1] // 2
    if mode == "reflect" and (ry >= images.shape[2] or rx >= images.shape[3]):
        mode = "replicate"
    channels = images.shape[1]
    padded = F.pad(images, (rx, rx, ry, ry), mode=mode)
    weight = kernel.to(images.device, images.dtype).expand(channels, 1, *kernel.shape)
    return F.conv2d(padded, weight, groups=channels)


def _gaussian_filter(images: torch.Tensor, sigma: float, radius: int, mode: str) -> torch.Tensor:
    kernel = _gaussian_kernel(sigma, radius, images.dtype)
    return _filter(images, kernel[:, None] * kernel[None, :], mode)


def gaussian_blur(images: torch.Tensor, severity: int, seed: int) -> torch.Tensor:
    """Gaussian blur with standard deviation c px (skimage's truncation at 4 sigma, edge mode)."""
    sigma = _table(images, (0.4, 0.6, 0.7, 0.8, 1.0), (1, 2, 3, 4, 6), severity)
    return _gaussian_filter(images, sigma, int(4 * sigma + 0.5), "replicate").clamp(0, 1)


def defocus_blur(images: torch.Tensor, severity: int, seed: int) -> torch.Tensor:
    """Convolution with an anti-aliased disk of radius r (the reference's `disk(r, alias_blur)`)."""
    radius, alias_blur = _table(
        images,
        ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
        ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
        severity,
    )
    extent = 8 if radius <= 8 else int(radius)
    offsets = torch.arange(-extent, extent + 1, dtype=torch.float64)
    disk = ((offsets[:, None] ** 2 + offsets[None, :] ** 2) <= radius**2).to(torch.float64)
    disk = (disk / disk.sum())[None, None]
    kernel = _gaussian_filter(disk, alias_blur, 1 if radius <= 8 else 2, "reflect")[0, 0]
    return _filter(images, kernel, "reflect").clamp(0, 1)


def _affine(images: torch.Tensor, theta: torch.Tensor, padding: str) -> torch.Tensor:
    """Resample with bilinear interpolation; theta maps output to input coordinates in [-1, 1]."""
    theta = theta.to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding, align_corners=False)


ZOOM_BLUR_RANGES = {
    "cifar": ((1, 1.06, 0.01), (1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.01), (1, 1.26, 0.01)),
    "imagenet": ((1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02),
                 (1, 1.31, 0.03)),
}
"""zoom_blur's `np.arange(start, stop, step)` per severity, as `make_cifar_c.py` and
`make_imagenet_c.py` write them (in float the stop is often included: 12 factors for 1-1.11)."""


def zoom_factors(images: torch.Tensor, severity: int) -> list[float]:
    """The zoom factors of a severity: the reference's float `np.arange`, factor for factor."""
    start, stop, step = _table(images, ZOOM_BLUR_RANGES["cifar"], ZOOM_BLUR_RANGES["imagenet"],
                               severity)
    return np.arange(start, stop, step).tolist()


def zoom_blur(images: torch.Tensor, severity: int, seed: int) -> torch.Tensor:
    """The mean of the image and its centre zooms by each factor of `zoom_factors`."""
    factors = zoom_factors(images, severity)
    total = images.clone()
    for factor in factors:
        theta = torch.tensor([[1 / factor, 0.0, 0.0], [0.0, 1 / factor, 0.0]])
        total += _affine(images, theta.expand(len(images), 2, 3), "border")
    return (total / (len(factors) + 1)).clamp(0, 1)


def contrast(images: torch.Tensor, severity: int, seed: int) -> torch.Tensor:
    """Pull every pixel towards its image's per-channel mean: (x - m) c + m."""
    c = _table(images, (0.75, 0.5, 0.4, 0.3, 0.15), (0.4, 0.3, 0.2, 0.1, 0.05), severity)
    means = images.mean(dim=(2, 3), keepdim=True)
    return ((images - means) * c + means).clamp(0, 1)


def brightness(images: torch.Tensor, severity: int, seed: int) -> torch.Tensor:
    """Add c to the HSV value (the channel maximum), keeping hue and saturation."""
    c = _table(images, (0.05, 0.1, 0.15, 0.2, 0.3), (0.1, 0.2, 0.3, 0.4, 0.5), severity)
    value = images.amax(dim=1, keepdim=True)
    brighter = (value + c).clamp(0, 1)
    # With hue and saturation fixed every channel is proportional to the value; black stays grey.
    scaled = images * (brighter / value.clamp_min(torch.finfo(images.dtype).tiny))
    return torch.where(value > 0, scaled, brighter.expand_as(images)).clamp(0, 1)


def jpeg(images: torch.Tensor, severity: int, seed: int) -> torch.Tensor:
    """JPEG compression at quality c with torchvision's libjpeg (channel by channel unless the
    images have 1 or 3 channels)."""
    quality = _table(images, (80, 65, 58, 50, 40), (25, 18, 15, 10, 7), severity)
    n, channels, height, width = images.shape
    pixels = (images.detach() * 255).round().clamp(0, 255).to("cpu", torch.uint8)
    if channels not in (1, 3):
        pixels = pixels.reshape(n * channels, 1, height, width)
    decoded = torch.stack(decode_jpeg(encode_jpeg(list(pixels), quality=quality)))
    return (decoded.reshape(images.shape).to(images.device, images.dtype) / 255).clamp(0, 1)


def _box_weights(size_in: int, size_out: int) -> torch.Tensor:
    """Resampling matrix (out x in): each output pixel averages the input span it covers,
    weighted by overlap (OpenCV's INTER_AREA; the reference resizes with PIL's BOX)."""
    scale = size_in / size_out
    out = torch.arange(size_out, dtype=torch.float64)[:, None]
    inp = torch.arange(size_in, dtype=torch.float64)[None, :]
    overlap = (torch.minimum((out + 1) * scale, inp + 1) - torch.maximum(out * scale, inp)).clamp_min(0)
    return overlap / overlap.sum(1, keepdim=True)


def _box_resize(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    rows = _box_weights(images.shape[2], height).to(images.device, images.dtype)
    cols = _box_weights(images.shape[3], width).to(images.device, images.dtype)
    return torch.einsum("oh,nchw,pw->ncop", rows, images, cols)


def pixelate(images: torch.Tensor, severity: int, seed: int) -> torch.Tensor:
    """Box-downsample to a fraction c of the side, then box-upsample back. At the CIFAR-10-C
    factors near 1 the distance to the clean image is not monotone in severity on every image
    (aliasing between nearby sizes such as 28 -> 26 and 28 -> 25 px)."""
    c = _table(images, (0.95, 0.9, 0.85, 0.75, 0.65), (0.6, 0.5, 0.4, 0.3, 0.25), severity)
    height, width = images.shape[2:]
    small = _box_resize(images, max(1, int(height * c)), max(1, int(width * c)))
    return _box_resize(small, height, width).clamp(0, 1)


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "speckle_noise": speckle_noise,
    "gaussian_blur": gaussian_blur,
    "defocus_blur": defocus_blur,
    "zoom_blur": zoom_blur,
    "contrast": contrast,
    "brightness": brightness,
    "jpeg": jpeg,
    "pixelate": pixelate,
}


def rotate_translate(images: torch.Tensor, seed: int) -> torch.Tensor:
    """Held-out shift: each image rotated by U(-20, 20) degrees and moved by U(-10 %, 10 %) of its
    side on each axis, zeros outside. Training never rotates, so this is a transform the network
    has not seen; it stands in for a natural distribution shift (CIFAR-10.1, ObjectNet in the
    paper), which cannot be downloaded here."""
    gen = generator("rotate_translate", 0, seed)
    angles = (torch.rand(len(images), generator=gen, dtype=torch.float64) * 2 - 1) * math.radians(20)
    moves = (torch.rand(len(images), 2, generator=gen, dtype=torch.float64) * 2 - 1) * 0.2
    cos, sin = torch.cos(angles), torch.sin(angles)
    rows = [torch.stack([cos, -sin, moves[:, 0]], 1), torch.stack([sin, cos, moves[:, 1]], 1)]
    theta = torch.stack(rows, 1)
    return _affine(images, theta, "zeros").clamp(0, 1)


SHIFTS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {"rotate_translate": rotate_translate}


@dataclass(frozen=True)
class Suite:
    """Test distributions beyond the clean test set: corruption -> severities, and shifts."""

    corruptions: dict[str, tuple[int, ...]]
    shifts: tuple[str, ...]


_DEFAULT = ("gaussian_noise", "impulse_noise", "speckle_noise", "defocus_blur", "contrast", "jpeg")
SUITES: dict[str, Suite] = {
    "default": Suite({name: (1, 3, 5) for name in _DEFAULT}, tuple(SHIFTS)),
    "full": Suite({name: SEVERITIES for name in CORRUPTIONS}, tuple(SHIFTS)),
}


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int) -> torch.Tensor:
    """Apply the registered corruption `name`; an unknown name raises ConfigError."""
    if name not in CORRUPTIONS:
        raise ConfigError(f"unknown corruption {name!r}; expected one of {', '.join(CORRUPTIONS)}")
    return CORRUPTIONS[name](images, severity, seed)
