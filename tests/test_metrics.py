"""PSNR/SSIM as BasicSR and pyiqa compute them: against scikit-image, scipy, hand-computed values and
(where it is installed) pyiqa itself; the learned metrics' unavailable path."""

from __future__ import annotations

import importlib.util
import io
import math
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from conftest import photo
from tinysr_cli import metrics

PYIQA_INSTALLED = importlib.util.find_spec("pyiqa") is not None


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def blur(image: np.ndarray, radius: float) -> np.ndarray:
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))


@pytest.fixture(scope="module")
def pair() -> tuple[np.ndarray, np.ndarray]:
    """A real photo and its JPEG-compressed version (prediction, ground truth)."""
    gt = photo("astronaut", (160, 192))
    return jpeg(gt, 20), gt


def y64(rgb: np.ndarray) -> np.ndarray:
    """The BT.601 formula in float64, written out: Y = 16 + 65.481 R + 128.553 G + 24.966 B."""
    r, g, b = (rgb[..., i].astype(np.float64) / 255 for i in range(3))
    return 16 + 65.481 * r + 128.553 * g + 24.966 * b


def ssim_terms(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Luminance and contrast-structure maps of SSIM, computed with scipy's Gaussian filter
    (sigma 1.5, radius 5 = an 11x11 window), on the 'valid' positions."""

    def local_mean(x):
        return ndimage.gaussian_filter(x, 1.5, truncate=3.5)[5:-5, 5:-5]

    mu_a, mu_b = local_mean(a), local_mean(b)
    var_a, var_b = local_mean(a * a) - mu_a**2, local_mean(b * b) - mu_b**2
    cov = local_mean(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    return (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1), (2 * cov + c2) / (var_a + var_b + c2)


@pytest.mark.parametrize(
    ("colour", "expected"),
    [((0, 0, 0), 16.0), ((255, 255, 255), 235.0), ((255, 0, 0), 81.481), ((0, 255, 0), 144.553), ((0, 0, 255), 40.966)],
)
def test_y_of_primaries_by_hand(colour, expected):
    image = np.full((2, 2, 3), colour, np.uint8)
    assert metrics.basicsr_y(image)[0, 0] == pytest.approx(expected, abs=1e-4)
    assert float(metrics.pyiqa_y(image)[0, 0, 0, 0]) * 255 == pytest.approx(expected, abs=1e-4)


def test_y_of_a_photo_matches_the_formula_within_float32_rounding():
    image = photo("coffee")
    # BasicSR stores Y / 255 as float32 on the way, which moves it by < 3e-5 levels.
    assert np.abs(metrics.basicsr_y(image) - y64(image)).max() < 3e-5
    assert np.abs(metrics.pyiqa_y(image)[0, 0].double().numpy() * 255 - y64(image)).max() < 1e-4


def test_psnr_of_a_constant_offset_by_hand():
    # +10 levels on every channel of a flat gray: Y moves by 10 * (65.481 + 128.553 + 24.966) / 255
    # = 8.5882353 everywhere, so PSNR = 20 log10(255 / 8.5882353) = 29.452725 dB (BasicSR) and
    # 10 log10(1 / ((8.5882353 / 255)^2 + 1e-8)) = 29.452687 dB (pyiqa).
    gray = np.full((40, 48, 3), 100, np.uint8)
    assert metrics.psnr(gray + 10, gray) == pytest.approx(29.452725, abs=1e-5)
    assert metrics.psnr(gray + 10, gray, convention="pyiqa") == pytest.approx(29.452687, abs=1e-5)


def test_identical_images():
    image = photo("chelsea", (64, 80))
    assert metrics.psnr(image, image) == math.inf  # BasicSR
    assert metrics.psnr(image, image, convention="pyiqa") == pytest.approx(80.0)  # 10 log10(1 / 1e-8)
    for convention in metrics.CONVENTIONS:
        assert metrics.ssim(image, image, convention=convention) == 1.0


def test_crop_border_trims_every_edge():
    gt = photo("rocket", (64, 64))
    pred = gt.copy()
    pred[:4] ^= 0x20  # differences only within 4 px of the edges
    pred[-4:] ^= 0x20
    pred[:, :4] ^= 0x20
    pred[:, -4:] ^= 0x20
    assert metrics.psnr(pred, gt, crop_border=4) == math.inf
    assert metrics.ssim(pred, gt, crop_border=4) == 1.0
    assert metrics.psnr(pred, gt, crop_border=3) < 40
    assert metrics.psnr(pred, gt, crop_border=0) < metrics.psnr(pred, gt, crop_border=3)


@pytest.mark.parametrize("crop", [0, 4])
def test_basicsr_psnr_matches_scikit_image_on_y(pair, crop):
    pred, gt = pair
    inner = slice(crop, -crop or None)
    expected = peak_signal_noise_ratio(metrics.basicsr_y(gt)[inner, inner], metrics.basicsr_y(pred)[inner, inner], data_range=255)
    assert metrics.psnr(pred, gt, crop_border=crop) == pytest.approx(expected, abs=1e-10)
    # and the float64 formula agrees to the float32 rounding BasicSR adds
    assert metrics.psnr(pred, gt, crop_border=crop) == pytest.approx(
        peak_signal_noise_ratio(y64(gt)[inner, inner], y64(pred)[inner, inner], data_range=255), abs=1e-4
    )


@pytest.mark.parametrize("crop", [0, 4])
def test_basicsr_ssim_matches_scikit_image_gaussian_ssim(pair, crop):
    pred, gt = pair
    inner = slice(crop, -crop or None)
    expected = structural_similarity(
        metrics.basicsr_y(gt)[inner, inner], metrics.basicsr_y(pred)[inner, inner],
        gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255,
    )
    assert metrics.ssim(pred, gt, crop_border=crop) == pytest.approx(expected, abs=1e-10)


def test_pyiqa_psnr_is_on_unrounded_y_in_unit_range(pair):
    pred, gt = pair
    y_pred, y_gt = y64(pred) / 255, y64(gt) / 255
    expected = 10 * math.log10(1 / (np.mean((y_pred - y_gt) ** 2) + 1e-8))
    assert metrics.psnr(pred, gt, crop_border=0, convention="pyiqa") == pytest.approx(expected, abs=1e-3)  # float32 mse


def test_pyiqa_ssim_rounds_y_and_clamps_negative_structure(pair):
    _, gt = pair
    inverted = 255 - gt  # anti-correlated: about a quarter of the contrast-structure terms are negative
    levels = [np.round(y64(image)) for image in (inverted, gt)]
    luminance, structure = ssim_terms(*levels)
    assert (structure < 0).mean() > 0.1
    clamped = float((luminance * np.maximum(structure, 0)).mean())
    # pyiqa's float32 window sums to 1 only within ~1e-7.
    assert metrics.ssim(inverted, gt, crop_border=0, convention="pyiqa") == pytest.approx(clamped, abs=2e-6)
    luminance, structure = ssim_terms(metrics.basicsr_y(inverted), metrics.basicsr_y(gt))
    assert metrics.ssim(inverted, gt, crop_border=0) == pytest.approx(float((luminance * structure).mean()), abs=1e-10)
    assert metrics.ssim(inverted, gt, crop_border=0, convention="pyiqa") > metrics.ssim(inverted, gt, crop_border=0) + 0.05


def test_scores_fall_with_stronger_degradation():
    gt = photo("coffee", (128, 160))
    for convention in metrics.CONVENTIONS:
        psnrs = [metrics.psnr(jpeg(gt, q), gt, convention=convention) for q in (90, 50, 10)]
        ssims = [metrics.ssim(blur(gt, r), gt, convention=convention) for r in (0.5, 1.5, 3)]
        assert psnrs == sorted(psnrs, reverse=True) and len(set(psnrs)) == 3
        assert ssims == sorted(ssims, reverse=True) and len(set(ssims)) == 3


def test_bad_pairs_are_refused(pair):
    pred, gt = pair
    with pytest.raises(ValueError, match="sizes differ: 192x159 vs 192x160"):
        metrics.psnr(pred[:-1], gt)
    with pytest.raises(ValueError, match="too small"):
        metrics.ssim(pred[:20, :20], gt[:20, :20], crop_border=5)  # 10 px left, the window is 11
    with pytest.raises(ValueError, match="uint8"):
        metrics.psnr(pred.astype(np.float32), gt.astype(np.float32))
    with pytest.raises(ValueError, match="convention"):
        metrics.psnr(pred, gt, convention="matlab")


@pytest.mark.skipif(not PYIQA_INSTALLED, reason="pyiqa is not installed: the reference implementation is absent")
@pytest.mark.parametrize("crop", [0, 4])
def test_pyiqa_convention_equals_pyiqa(pair, crop):
    import pyiqa

    pred, gt = pair
    tensors = [torch.tensor(image).permute(2, 0, 1)[None].float() / 255 for image in (pred, 255 - gt, gt)]
    for name, ours in (("psnr", metrics.psnr), ("ssim", metrics.ssim)):
        reference = pyiqa.create_metric(name, test_y_channel=True, color_space="ycbcr", crop_border=crop, device="cpu")
        for image, tensor in ((pred, tensors[0]), (255 - gt, tensors[1])):
            expected = float(reference(tensor, tensors[2]))
            assert ours(image, gt, crop_border=crop, convention="pyiqa") == pytest.approx(expected, abs=1e-9)


@pytest.mark.skipif(PYIQA_INSTALLED, reason="pyiqa is installed here, so its absence cannot be observed")
def test_learned_metrics_without_pyiqa_say_so():
    for name in metrics.LEARNED_METRICS:
        with pytest.raises(metrics.MetricUnavailable, match=r'pyiqa is not installed \(pip install "tinysr\[metrics\]"\)'):
            metrics.load_learned_metric(name, torch.device("cpu"))


def test_unknown_learned_metric():
    with pytest.raises(ValueError, match="unknown learned metric 'psnr'"):
        metrics.load_learned_metric("psnr", torch.device("cpu"))


def test_a_failed_download_is_reported_as_missing_weights():
    # A real connection failure (nothing listens on the discard port), wrapped as loaders do.
    try:
        urllib.request.urlopen("http://127.0.0.1:9/weights.pth", timeout=5)
    except urllib.error.URLError as network_error:
        try:
            raise RuntimeError("failed to build the metric") from network_error
        except RuntimeError as wrapped:
            reason = metrics._why_unavailable(wrapped)
    assert reason.startswith("its weights are not in pyiqa's cache and could not be downloaded (URLError:")
    assert "\n" not in reason
    assert metrics._why_unavailable(KeyError("CFANet")).startswith("pyiqa could not create it (KeyError:")
