"""Real-ESRGAN degradation: sizes, levels, seeding, kernels against closed forms, JPEG against Pillow,
noise statistics, USM against OpenCV, presets. Small crops (64 -> 16) except one 512 -> 128 run."""

from __future__ import annotations

import dataclasses
import io
import math

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.special import j1

from conftest import photo
from tinysr_cli.errors import TinySRError
from tinysr_cli.io.images import to_uint8
from training.degradations import (
    KERNEL_TYPES,
    MILD,
    REALESRGAN,
    DegradationConfig,
    KernelConfig,
    _Draws,
    add_gaussian_noise,
    add_poisson_noise,
    bivariate_kernel,
    degrade,
    jpeg,
    quantisation_tables,
    random_kernel,
    sample_plan,
    sinc_kernel,
    usm_sharpen,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def as_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).float().div(255)[None]


def crops(count: int, size: int = 64) -> torch.Tensor:
    """``count`` different real-photo crops [count, 3, size, size]."""
    image = as_tensor(photo("astronaut"))
    return torch.cat([image[..., 40 * i : 40 * i + size, 30 * i : 30 * i + size] for i in range(count)])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * math.log10(255.0**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


@pytest.mark.parametrize("config", [REALESRGAN, MILD], ids=["realesrgan", "mild"])
def test_lq_has_the_scaled_size_and_8bit_levels_in_range(config):
    hr = crops(12)
    target, lq = degrade(hr, list(range(12)), config)
    assert lq.shape == (12, 3, 16, 16) and lq.dtype == torch.float32
    assert lq.min() >= 0 and lq.max() <= 1
    assert torch.equal(lq * 255, (lq * 255).round())
    assert torch.equal(target, hr)  # no sharpening in the presets: the target is the crop itself


def test_scale_is_configurable():
    _, lq = degrade(crops(2), [0, 1], dataclasses.replace(REALESRGAN, scale=2))
    assert lq.shape == (2, 3, 32, 32)


def test_real_size_512_to_128():
    hr = as_tensor(photo("astronaut")).repeat(2, 1, 1, 1)
    _, lq = degrade(hr, [11, 12])
    assert lq.shape == (2, 3, 128, 128)
    assert torch.equal(lq * 255, (lq * 255).round())
    # Degraded, but still the same picture, aligned: at 16x16 it matches the HR's 16x16 averages
    # (measured <= 0.04 over 30 seeds; the mirrored photo is 0.27 away).
    coarse = torch.nn.functional.avg_pool2d(lq, 8) - torch.nn.functional.avg_pool2d(hr, 32)
    assert coarse.abs().mean() < 0.08
    assert not torch.equal(lq[0], lq[1])


def test_same_seed_same_output_other_seed_differs():
    hr = crops(3)
    first, second, other = degrade(hr, [1, 2, 3])[1], degrade(hr, [1, 2, 3])[1], degrade(hr, [1, 2, 4])[1]
    assert torch.equal(first, second)
    assert torch.equal(first[:2], other[:2]) and not torch.equal(first[2], other[2])


def test_a_sample_does_not_depend_on_its_batch():
    hr = crops(4)
    together = degrade(hr, [7, 8, 9, 10])[1]
    alone = degrade(hr[2:3], [9])[1]
    assert torch.equal(together[2], alone[0])


def test_sharpening_changes_the_target_and_the_lq_comes_from_it():
    hr = crops(2)
    config = dataclasses.replace(REALESRGAN, sharpen=True)
    target, lq = degrade(hr, [3, 4], config)
    assert torch.equal(target, usm_sharpen(hr))
    assert not torch.equal(target, hr)
    assert torch.equal(lq, degrade(target, [3, 4], dataclasses.replace(config, sharpen=False))[1])


# ----------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("kind", KERNEL_TYPES + ("sinc",))
def test_every_kernel_type_is_21x21_normalised_and_point_symmetric(kind):
    if kind == "sinc":
        config = KernelConfig(sinc_prob=1.0)
    else:
        config = KernelConfig(sinc_prob=0.0, types=(kind,), type_probs=(1.0,))
    for seed in range(20):
        kernel = random_kernel(config, 21, _Draws(seed))
        assert kernel.shape == (21, 21)
        assert abs(float(kernel.sum()) - 1.0) < 1e-5
        torch.testing.assert_close(kernel, kernel.flip(0, 1), atol=1e-7, rtol=0)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    axis = np.arange(size) - size // 2
    return np.meshgrid(axis, axis)  # x along columns, y along rows


def test_isotropic_gaussian_matches_the_closed_form_at_any_rotation():
    x, y = _grid(21)
    expected = np.exp(-(x**2 + y**2) / (2 * 2.3**2))
    expected /= expected.sum()
    for rotation in (0.0, 0.7, -2.1):
        np.testing.assert_allclose(bivariate_kernel(21, 2.3, 2.3, rotation).numpy(), expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(("shape", "beta"), [("gaussian", 1.0), ("generalized", 0.7), ("plateau", 1.5)])
def test_anisotropic_kernels_match_the_covariance_formula(shape, beta):
    sigma_x, sigma_y, theta = 2.5, 0.7, 0.6
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    inverse = np.linalg.inv(rotation @ np.diag([sigma_x**2, sigma_y**2]) @ rotation.T)
    x, y = _grid(15)
    points = np.stack([x, y], -1)
    q = np.einsum("...i,ij,...j->...", points, inverse, points)
    expected = {"gaussian": np.exp(-0.5 * q), "generalized": np.exp(-0.5 * q**beta), "plateau": 1 / (q**beta + 1)}[shape]
    expected /= expected.sum()
    np.testing.assert_allclose(bivariate_kernel(15, sigma_x, sigma_y, theta, shape, beta).numpy(), expected, rtol=1e-5, atol=1e-8)


def test_sinc_kernel_matches_scipy_bessel():
    cutoff = 1.3
    x, y = _grid(13)
    r = np.hypot(x, y)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = np.where(r == 0, cutoff**2 / (4 * np.pi), cutoff * j1(cutoff * r) / (2 * np.pi * r))
    expected /= expected.sum()
    np.testing.assert_allclose(sinc_kernel(13, cutoff).numpy(), expected, rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- JPEG


def pillow_jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)  # Pillow's default: 4:2:0
    return np.asarray(Image.open(buffer).convert("RGB"))


@pytest.mark.parametrize(("name", "size"), [("astronaut", (256, 256)), ("coffee", (200, 300))])
def test_torch_jpeg_is_close_to_pillow_and_worse_at_lower_quality(name, size):
    image = photo(name, size)
    scores = {}
    for quality in (95, 30):
        ours = to_uint8(jpeg(as_tensor(image), [quality])[0])
        # Measured 43.7-48 dB on these photos (libjpeg's integer DCT and rounding differ slightly).
        assert psnr(ours, pillow_jpeg(image, quality)) > 40.0
        scores[quality] = psnr(ours, image)
    assert scores[95] > scores[30] + 3.0


def test_quantisation_tables_equal_pillows():
    image = photo("chelsea", (64, 64))
    for quality in (10, 30, 50, 75, 95, 100):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        tables = Image.open(buffer).quantization  # the tables libjpeg wrote, row-major
        luma, chroma = quantisation_tables([quality])
        assert luma[0].flatten().int().tolist() == list(tables[0])
        assert chroma[0].flatten().int().tolist() == list(tables[1])


def test_jpeg_uses_each_samples_quality():
    image = as_tensor(photo("astronaut", (64, 64)))
    batch = jpeg(image.repeat(2, 1, 1, 1), [90, 20])
    torch.testing.assert_close(batch[0:1], jpeg(image, [90]), atol=1e-5, rtol=0)
    torch.testing.assert_close(batch[1:2], jpeg(image, [20]), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- noise


def test_gaussian_noise_has_the_requested_sigma_and_gray_noise_is_shared():
    image = torch.full((2, 3, 128, 128), 0.5)
    generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
    sigma = 10 / 255
    noisy = add_gaussian_noise(image, [sigma, sigma], [False, True], generators)
    noise = noisy - image
    for sample in noise:
        assert abs(float(sample.std()) / sigma - 1) < 0.02  # 49k values: sampling error ~0.3 %
        assert abs(float(sample.mean())) < 0.1 * sigma
    assert not torch.equal(noise[0, 0], noise[0, 1])
    assert torch.equal(noise[1, 0], noise[1, 1]) and torch.equal(noise[1, 1], noise[1, 2])


def test_poisson_noise_variance_follows_the_photon_count():
    levels = torch.arange(256).float().div(255)  # 256 distinct levels -> 256 photons per unit
    image = levels.repeat(3, 64, 1)[None]  # [1, 3, 64, 256]
    scale = 2.0
    noise = add_poisson_noise(image, [scale], [False], [torch.Generator().manual_seed(0)]) - image
    inside = (image > 0.2) & (image < 0.8)  # away from the clamp at 0 and 1
    expected = scale**2 * float(image[inside].mean()) / 256
    assert abs(float(noise[inside].var()) / expected - 1) < 0.05
    assert abs(float(noise[inside].mean())) < 0.01


# ----------------------------------------------------------------------------- USM


def test_usm_sharpening_matches_an_opencv_reference():
    image = photo("chelsea", (96, 96)).astype(np.float32) / 255
    blur = cv2.GaussianBlur(image, (51, 51), 0)  # sigma from the size (8.0); BORDER_REFLECT_101
    residual = image - blur
    mask = (np.abs(residual) * 255 > 10).astype(np.float32)
    soft = cv2.GaussianBlur(mask, (51, 51), 0)
    expected = soft * np.clip(image + 0.5 * residual, 0, 1) + (1 - soft) * image
    ours = usm_sharpen(torch.from_numpy(image).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - expected).max() < 1e-5  # measured 1.2e-7
    assert np.abs(expected - image).mean() > 5e-3  # the reference does sharpen (0.0086)


# ----------------------------------------------------------------------------- presets and config


@pytest.mark.parametrize(
    ("config", "jpeg1", "jpeg2", "blur2"), [(REALESRGAN, (30, 95), (30, 95), 0.8), (MILD, (60, 95), (60, 100), 0.5)], ids=["realesrgan", "mild"]
)
def test_plans_follow_the_preset(config, jpeg1, jpeg2, blur2):
    plans = [sample_plan(config, seed) for seed in range(300)]
    assert all(jpeg1[0] <= p.quality1 <= jpeg1[1] and jpeg2[0] <= p.quality2 <= jpeg2[1] for p in plans)
    blurred = sum(p.kernel2 is not None for p in plans) / len(plans)
    assert abs(blurred - blur2) < 0.1  # binomial sd at n=300 is below 0.03
    low, high = config.stage1.resize_range
    assert all(low <= p.resize1.scale <= high for p in plans)
    assert {p.resize1.mode for p in plans} == {"area", "bilinear", "bicubic"}
    gaussian = [p.noise1.strength * 255 for p in plans if p.noise1.gaussian]
    assert config.stage1.noise_sigma_range[0] <= min(gaussian) and max(gaussian) <= config.stage1.noise_sigma_range[1]
    assert abs(sum(p.resize_first for p in plans) / len(plans) - 0.5) < 0.1
    assert abs(sum(p.sinc is not None for p in plans) / len(plans) - 0.8) < 0.1


@pytest.mark.parametrize(
    "change",
    [
        {"final_sinc_prob": 1.2},
        {"jpeg_range2": (30.0, 120.0)},
        {"stage1": dataclasses.replace(REALESRGAN.stage1, resize_probs=(0.5, 0.6, 0.1))},
        {"stage2": dataclasses.replace(REALESRGAN.stage2, kernel=KernelConfig(sizes=(7, 8)))},
        {"final_resize_modes": ("nearest-exact",)},
    ],
)
def test_invalid_configs_are_refused(change):
    with pytest.raises(TinySRError, match="degradation"):
        DegradationConfig(**change)
