"""Full-reference metrics computed the way the SR papers compute them.

BasicSR's convention (the default): 8-bit RGB arrays, ``crop_border`` pixels trimmed from every
side, the Y channel of BT.601 YCbCr (``16 + 65.481 R + 128.553 G + 24.966 B`` with RGB in [0, 1]),
PSNR = 10 log10(255^2 / MSE), SSIM with an 11x11 Gaussian window (sigma 1.5), 'valid' filtering and
constants (0.01*255)^2, (0.03*255)^2. pyiqa's convention differs in two places: PSNR on Y in [0, 1]
without rounding, ``10 log10(1 / (MSE + 1e-8))``; SSIM on Y*255 rounded to integers.
Learned metrics (LPIPS, DISTS, NIQE, MUSIQ, ...) come from pyiqa when it and its weights are
available; ``LearnedMetricUnavailable`` says why not.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

CONVENTIONS = ("basicsr", "pyiqa")
CORE_METRICS = ("psnr", "ssim")
# pyiqa names of the metrics the paper reports; "fid" compares folders, the rest images.
LEARNED_METRICS = {
    "lpips": "lpips",
    "dists": "dists",
    "niqe": "niqe",
    "musiq": "musiq",
    "maniqa": "maniqa-pipal",
    "clipiqa": "clipiqa",
    "topiq": "topiq_nr",
    "qalign": "qalign",
    "fid": "fid",
}
NO_REFERENCE = {"niqe", "musiq", "maniqa", "clipiqa", "topiq", "qalign"}
_Y_WEIGHTS = np.array([65.481, 128.553, 24.966])


class LearnedMetricUnavailable(Exception):
    """A pyiqa metric cannot be computed here (pyiqa missing, or its weights cannot be fetched)."""


def rgb_to_y(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB -> float64 Y in [16, 235] (BT.601, as BasicSR's ``bgr2ycbcr(y_only=True)``)."""
    if image.ndim == 2:
        return image.astype(np.float64)
    return image[..., :3].astype(np.float64) / 255.0 @ _Y_WEIGHTS + 16.0


def _crop(image: np.ndarray, border: int) -> np.ndarray:
    return image[border:-border, border:-border] if border else image


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape:
        raise ValueError(f"sizes differ: prediction {pred.shape[1]}x{pred.shape[0]}, ground truth {gt.shape[1]}x{gt.shape[0]}")


def psnr(pred: np.ndarray, gt: np.ndarray, crop_border: int = 0, convention: str = "basicsr") -> float:
    """PSNR on the Y channel of two uint8 RGB (or gray) images of the same size, in dB."""
    _check_pair(pred, gt)
    y_pred, y_gt = _crop(rgb_to_y(pred), crop_border), _crop(rgb_to_y(gt), crop_border)
    if convention == "pyiqa":
        mse = np.mean((y_pred / 255.0 - y_gt / 255.0) ** 2)
        return float(10 * math.log10(1.0 / (mse + 1e-8)))
    mse = np.mean((y_pred - y_gt) ** 2)
    return float("inf") if mse == 0 else float(10 * math.log10(255.0**2 / mse))


def _ssim_plane(a: np.ndarray, b: np.ndarray) -> float:
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    kernel = cv2.getGaussianKernel(11, 1.5)
    window = np.outer(kernel, kernel.transpose())

    def blur(x: np.ndarray) -> np.ndarray:
        return cv2.filter2D(x, -1, window)[5:-5, 5:-5]  # 'valid'

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())


def ssim(pred: np.ndarray, gt: np.ndarray, crop_border: int = 0, convention: str = "basicsr") -> float:
    """SSIM on the Y channel of two uint8 RGB (or gray) images of the same size."""
    _check_pair(pred, gt)
    y_pred, y_gt = _crop(rgb_to_y(pred), crop_border), _crop(rgb_to_y(gt), crop_border)
    if convention == "pyiqa":
        y_pred, y_gt = np.round(y_pred), np.round(y_gt)
    if min(y_pred.shape) < 11:
        raise ValueError("images are smaller than the 11x11 SSIM window after cropping")
    return _ssim_plane(y_pred, y_gt)


class LearnedMetrics:
    """pyiqa metrics created once and reused; creation failures are kept as reasons."""

    def __init__(self, names: list[str], device: str = "cpu") -> None:
        self.metrics: dict[str, object] = {}
        self.unavailable: dict[str, str] = {}
        try:
            import pyiqa
        except ImportError:
            for name in names:
                self.unavailable[name] = 'pyiqa is not installed (pip install "tinysr[metrics]")'
            return
        for name in names:
            try:
                self.metrics[name] = pyiqa.create_metric(LEARNED_METRICS[name], device=device)
            except Exception as exc:  # noqa: BLE001 - pyiqa raises many types when weights cannot be fetched
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                self.unavailable[name] = f"its weights could not be loaded ({reason})"

    def image_scores(self, pred: Path, gt: Path) -> dict[str, float]:
        scores = {}
        for name, metric in self.metrics.items():
            if name == "fid":
                continue
            value = metric(str(pred)) if name in NO_REFERENCE else metric(str(pred), str(gt))
            scores[name] = float(value)
        return scores

    def folder_scores(self, pred_dir: Path, gt_dir: Path) -> dict[str, float]:
        return {"fid": float(self.metrics["fid"](str(pred_dir), str(gt_dir)))} if "fid" in self.metrics else {}
