"""PSNR/SSIM as BasicSR computes them, checked against scikit-image and by hand."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from conftest import photo
from tinysr_cli import metrics


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


@pytest.fixture(scope="module")
def pair():
    gt = photo("astronaut", (200, 240))
    return _jpeg(gt, 20), gt


def test_y_channel_coefficients():
    white = np.full((1, 1, 3), 255, np.uint8)
    black = np.zeros((1, 1, 3), np.uint8)
    assert metrics.rgb_to_y(white)[0, 0] == pytest.approx(235.0)
    assert metrics.rgb_to_y(black)[0, 0] == pytest.approx(16.0)


def test_psnr_by_hand_on_a_constant_offset():
    # A gray image and the same +10 levels: Y moves by 10 * (65.481+128.553+24.966)/255 = 8.588 everywhere.
    a = np.full((32, 32, 3), 100, np.uint8)
    b = a + 10
    dy = 10 * 219.0 / 255
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / dy**2), abs=1e-9)
    assert metrics.psnr(a, a) == float("inf")


def test_psnr_matches_scikit_image_on_y(pair):
    pred, gt = pair
    y_pred, y_gt = metrics.rgb_to_y(pred)[4:-4, 4:-4], metrics.rgb_to_y(gt)[4:-4, 4:-4]
    expected = peak_signal_noise_ratio(y_gt, y_pred, data_range=255)
    assert metrics.psnr(pred, gt, crop_border=4) == pytest.approx(expected, abs=1e-9)


def test_ssim_matches_scikit_image_gaussian_ssim(pair):
    pred, gt = pair
    y_pred, y_gt = metrics.rgb_to_y(pred)[4:-4, 4:-4], metrics.rgb_to_y(gt)[4:-4, 4:-4]
    expected = structural_similarity(y_gt, y_pred, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
    assert metrics.ssim(pred, gt, crop_border=4) == pytest.approx(expected, abs=1e-6)
    assert metrics.ssim(gt, gt) == pytest.approx(1.0)


def test_quality_ordering_and_pyiqa_convention(pair):
    _, gt = pair
    mild, harsh = _jpeg(gt, 90), _jpeg(gt, 10)
    assert metrics.psnr(mild, gt) > metrics.psnr(harsh, gt)
    assert metrics.ssim(mild, gt) > metrics.ssim(harsh, gt)
    # pyiqa: PSNR on Y in [0, 1] with +1e-8 in the MSE; equal to BasicSR's up to that epsilon.
    assert metrics.psnr(harsh, gt, convention="pyiqa") == pytest.approx(metrics.psnr(harsh, gt), abs=1e-4)
    assert abs(metrics.ssim(harsh, gt, convention="pyiqa") - metrics.ssim(harsh, gt)) < 2e-3


def test_size_mismatch_is_refused(pair):
    pred, gt = pair
    with pytest.raises(ValueError, match="sizes differ"):
        metrics.psnr(pred[:-1], gt)


def test_learned_metrics_report_why_they_are_unavailable():
    learned = metrics.LearnedMetrics(["lpips", "fid"])
    try:
        import pyiqa  # noqa: F401
    except ImportError:
        assert set(learned.unavailable) == {"lpips", "fid"}
        assert "pyiqa is not installed" in learned.unavailable["lpips"]
    else:
        assert set(learned.unavailable) | set(learned.metrics) == {"lpips", "fid"}
