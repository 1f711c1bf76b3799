"""Corruptions: deterministic in (images, severity, seed), monotone in severity, range-preserving."""
from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distsparse.errors import ConfigError
from distsparse.evaluate.corruptions import (
    CORRUPTIONS,
    SEVERITIES,
    SHIFTS,
    SUITES,
    corrupt,
    zoom_factors,
)

NOISE = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise")


def _image(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A fixed, natural-looking image: smooth structure plus a little texture, values in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(shape[0], shape[1], 7, 7, generator=generator)
    smooth = F.interpolate(coarse, size=shape[2:], mode="bilinear", align_corners=False)
    return smooth * 0.8 + 0.1 * torch.rand(shape, generator=generator)


def test_the_full_suite_has_every_corruption_at_every_severity():
    full, default = SUITES["full"], SUITES["default"]
    assert full.corruptions == {name: SEVERITIES for name in CORRUPTIONS}
    assert len(CORRUPTIONS) >= 10 and set(full.shifts) == set(SHIFTS) == {"rotate_translate"}
    assert 4 <= len(default.corruptions) <= 6
    assert set(default.corruptions) <= set(CORRUPTIONS)
    assert all(severities == (1, 3, 5) for severities in default.corruptions.values())


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_same_seed_gives_identical_pixels_without_touching_the_global_rng(name):
    images = _image((3, 1, 28, 28))
    state = torch.get_rng_state()
    first = corrupt(images, name, 3, seed=7)
    torch.manual_seed(12345)  # the global RNG must not matter
    second = corrupt(images, name, 3, seed=7)
    assert torch.equal(first, second)
    torch.manual_seed(0)
    torch.set_rng_state(state)
    corrupt(images, name, 3, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    other_seed = corrupt(images, name, 3, seed=8)
    if name in NOISE:
        assert not torch.equal(first, other_seed)
    else:  # deterministic filters do not depend on the seed
        assert torch.equal(first, other_seed)


def test_the_shift_is_seeded_and_moves_pixels():
    images = _image((4, 3, 32, 32))
    shift = SHIFTS["rotate_translate"]
    assert torch.equal(shift(images, 1), shift(images, 1))
    assert not torch.equal(shift(images, 1), shift(images, 2))
    assert (shift(images, 1) - images).abs().mean() > 0.02


@pytest.mark.parametrize("shape", [(1, 1, 28, 28), (1, 3, 32, 32), (1, 3, 64, 64)], ids=str)
@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_distance_to_the_clean_image_strictly_increases_with_severity(name, shape):
    image = _image(shape)
    distances = [float((corrupt(image, name, severity, seed=0) - image).norm())
                 for severity in SEVERITIES]
    assert distances[0] > 0
    assert all(a < b for a, b in zip(distances, distances[1:])), distances


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((3, 1, 28, 28), torch.float32), ((2, 2, 20, 20), torch.float32), ((2, 3, 64, 64), torch.float64)],
    ids=str,
)
def test_shape_dtype_and_range_are_preserved(shape, dtype):
    images = _image(shape).to(dtype)
    images[0, :, :4, :4] = 0.0  # black and white corners: clipping at both ends
    images[-1, :, -4:, -4:] = 1.0
    outputs = [(name, corrupt(images, name, s, seed=1)) for name in CORRUPTIONS for s in (1, 5)]
    outputs += [(name, shift(images, 1)) for name, shift in SHIFTS.items()]
    for name, out in outputs:
        assert out.shape == images.shape and out.dtype == dtype and out.device == images.device, name
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0, name
        assert torch.isfinite(out).all(), name


def test_severity_tables_follow_image_size():
    """CIFAR-10-C's gaussian_noise sigma (0.04) below 64 px, ImageNet-C's (0.08) from 64 px."""
    for size, sigma in ((32, 0.04), (64, 0.08)):
        grey = torch.full((4, 3, size, size), 0.5)
        noise = corrupt(grey, "gaussian_noise", 1, seed=0) - grey
        assert abs(float(noise.std()) - sigma) < 0.1 * sigma


def test_brightness_adds_to_the_hsv_value():
    images = _image((1, 3, 8, 8), seed=3)
    images[0, :, 0, 0] = 0.0  # black stays grey
    out = corrupt(images, "brightness", 2, seed=0)  # CIFAR-10-C table: +0.1
    for row, col in ((0, 0), (3, 5), (7, 2)):
        h, s, v = colorsys.rgb_to_hsv(*images[0, :, row, col].tolist())
        expected = colorsys.hsv_to_rgb(h, s, min(1.0, v + 0.1))
        assert out[0, :, row, col].tolist() == pytest.approx(expected, abs=1e-6)


def test_bad_severity_or_name_is_a_config_error():
    images = _image((1, 1, 28, 28))
    with pytest.raises(ConfigError, match="severity 6"):
        corrupt(images, "contrast", 6, seed=0)
    with pytest.raises(ConfigError, match="unknown corruption 'fog'"):
        corrupt(images, "fog", 1, seed=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_tensors_give_the_cpu_pixels():
    images = _image((2, 3, 32, 32))
    for name in CORRUPTIONS:
        on_gpu = corrupt(images.cuda(), name, 3, seed=0)
        assert on_gpu.device.type == "cuda"
        assert torch.allclose(on_gpu.cpu(), corrupt(images, name, 3, seed=0), atol=1e-5), name


@pytest.mark.parametrize(("size", "reference"), [
    # hendrycks/robustness ImageNet-C/create_c/make_cifar_c.py zoom_blur
    (28, [np.arange(1, 1.06, 0.01), np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01),
          np.arange(1, 1.21, 0.01), np.arange(1, 1.26, 0.01)]),
    # hendrycks/robustness ImageNet-C/create_c/make_imagenet_c.py zoom_blur
    (64, [np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01), np.arange(1, 1.21, 0.02),
          np.arange(1, 1.26, 0.02), np.arange(1, 1.31, 0.03)]),
], ids=["cifar-10-c", "imagenet-c"])
def test_zoom_blur_factors_are_the_references_float_arange(size, reference):
    images = torch.zeros(1, 3, size, size)
    factors = [zoom_factors(images, severity) for severity in SEVERITIES]
    assert factors == [r.tolist() for r in reference]
    lengths = {28: [7, 12, 16, 21, 26], 64: [12, 16, 11, 13, 11]}[size]
    # in float, (1.06 - 1) / 0.01 and (1.11 - 1) / 0.01 exceed 6 and 11: their stop is a factor
    assert [len(f) for f in factors] == lengths
