"""Image quality metrics as the super-resolution papers compute them.

PSNR and SSIM are taken on the Y channel of BT.601 YCbCr (Y = 16 + 65.481 R + 128.553 G + 24.966 B,
R, G, B in [0, 1]) under one of two conventions:

- ``basicsr``: BasicSR's ``calculate_psnr``/``calculate_ssim`` with ``test_y_channel=True``. Y in
  [16, 235], unrounded; ``crop_border`` pixels trimmed from each edge (the scale, 4, by default);
  PSNR = 10 log10(255^2 / mse), infinite for identical images; SSIM is the mean of the map over the
  'valid' part of an 11x11 Gaussian window (sigma 1.5), C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2.
- ``pyiqa``: pyiqa's ``psnr``/``ssim`` with ``test_y_channel=True, color_space='ycbcr'``, as the
  OSEDiff, TSD-SR and AdcSR evaluation scripts call them (no crop border there). PSNR on Y in
  [0, 1], 10 log10(1 / (mse + 1e-8)); SSIM on Y * 255 rounded to integers, same window and constants,
  with negative contrast-structure terms clamped to zero.

Each convention's arithmetic is reproduced where it changes results (BasicSR's float32 round trip of
Y, pyiqa's float32 colour conversion before rounding), so values agree with the originals far below
the printed digits. The learned metrics (LPIPS, DISTS, FID, NIQE, MUSIQ, MANIQA, CLIP-IQA, TOPIQ,
Q-Align) come from the optional pyiqa package; ``load_learned_metric`` raises ``MetricUnavailable``
with the reason when one cannot be had (pyiqa missing, weights not cached and no internet).
``load_metric`` falls back to tinysr's offline LPIPS, LPIPS-VGG, DISTS and NIQE (``tinysr_cli.iqa``)
when pyiqa cannot give them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

CONVENTIONS = ("basicsr", "pyiqa")
# BasicSR crops the scale (4) from each edge; the papers' pyiqa scripts crop nothing.
DEFAULT_CROP_BORDER = {"basicsr": 4, "pyiqa": 0}
CORE_METRICS = ("psnr", "ssim")
# Our name -> pyiqa's name, with the variants the SR papers report.
LEARNED_METRICS = {
    "lpips": "lpips",  # AlexNet
    "lpips-vgg": "lpips-vgg",
    "dists": "dists",
    "fid": "fid",  # between two folders, clean mode
    "niqe": "niqe",
    "musiq": "musiq",  # KonIQ
    "maniqa": "maniqa-pipal",
    "clipiqa": "clipiqa",
    "topiq": "topiq_nr",
    "qalign": "qalign",
}
ALL_METRICS = (*CORE_METRICS, *LEARNED_METRICS)
FULL_REFERENCE = frozenset({"psnr", "ssim", "lpips", "lpips-vgg", "dists"})
FOLDER_METRICS = frozenset({"fid"})  # one value for a pair of folders, none per image
LOWER_IS_BETTER = frozenset({"lpips", "lpips-vgg", "dists", "fid", "niqe"})
OFFLINE_FALLBACK = ("lpips", "lpips-vgg", "dists", "niqe")  # tinysr_cli.iqa computes these without pyiqa

_Y_WEIGHTS_BGR = np.array([24.966, 128.553, 65.481])  # BasicSR's bgr2ycbcr order
_YCBCR_MATRIX = torch.tensor([[65.481, -37.797, 112.0], [128.553, -74.203, -93.786], [24.966, 112.0, -18.214]])
_YCBCR_BIAS = torch.tensor([16.0, 128.0, 128.0]).view(1, 3, 1, 1)
_WINDOW_SIZE = 11
_SIGMA = 1.5
# BasicSR: the outer product of OpenCV's 1-D Gaussian. pyiqa: the 2-D Gaussian normalised to sum 1 and
# stored as float32 (its weights then sum to 1 only within ~1e-7, which moves SSIM by ~1e-7).
_BASICSR_WINDOW = np.outer(cv2.getGaussianKernel(_WINDOW_SIZE, _SIGMA), cv2.getGaussianKernel(_WINDOW_SIZE, _SIGMA))
_offsets = np.arange(_WINDOW_SIZE) - _WINDOW_SIZE // 2
_gaussian = np.exp(-(_offsets[:, None] ** 2 + _offsets[None, :] ** 2) / (2 * _SIGMA**2))
_PYIQA_WINDOW = (_gaussian / _gaussian.sum()).astype(np.float32).astype(np.float64)
_C1 = (0.01 * 255) ** 2
_C2 = (0.03 * 255) ** 2


def psnr(pred: np.ndarray, gt: np.ndarray, *, crop_border: int = 4, convention: str = "basicsr") -> float:
    """PSNR in dB between two H x W x 3 uint8 RGB images, on Y; ``inf`` for identical images (BasicSR)."""
    pred, gt = _prepare(pred, gt, crop_border, convention, min_side=1)
    if convention == "basicsr":
        mse = np.mean((basicsr_y(pred) - basicsr_y(gt)) ** 2)
        return math.inf if mse == 0 else float(10.0 * np.log10(255.0 * 255.0 / mse))
    mse = torch.mean((pyiqa_y(pred) - pyiqa_y(gt)) ** 2, dim=[1, 2, 3])
    return float(10 * torch.log10(1.0 / (mse + 1e-8)))


def ssim(pred: np.ndarray, gt: np.ndarray, *, crop_border: int = 4, convention: str = "basicsr") -> float:
    """SSIM between two H x W x 3 uint8 RGB images, on Y (at least 11 x 11 after cropping)."""
    pred, gt = _prepare(pred, gt, crop_border, convention, min_side=_WINDOW_SIZE)
    if convention == "basicsr":
        return _ssim(basicsr_y(pred), basicsr_y(gt), pyiqa=False)
    as_levels = [(pyiqa_y(image) * 255).round().to(torch.float64)[0, 0].numpy() for image in (pred, gt)]
    return _ssim(*as_levels, pyiqa=True)


def basicsr_y(rgb: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 RGB -> H x W float64 Y in [16, 235], unrounded, as BasicSR's ``to_y_channel``.

    BasicSR goes uint8 -> float32 / 255 -> BGR dot the weights in float64, + 16 -> / 255 stored as
    float32 -> x 255 (float32); the float32 steps are kept because they move Y by up to about 1e-5.
    """
    unit = rgb.astype(np.float32) / np.float32(255)
    y = np.dot(unit[..., ::-1], _Y_WEIGHTS_BGR) + 16.0
    return ((y / 255.0).astype(np.float32) * np.float32(255)).astype(np.float64)


def pyiqa_y(rgb: np.ndarray) -> torch.Tensor:
    """H x W x 3 uint8 RGB -> [1, 1, H, W] float32 Y in [16/255, 235/255], as pyiqa computes it."""
    x = torch.tensor(rgb).permute(2, 0, 1)[None].float().div(255)
    ycbcr = torch.matmul(x.permute(0, 2, 3, 1), _YCBCR_MATRIX).permute(0, 3, 1, 2) + _YCBCR_BIAS
    return (ycbcr / 255.0)[:, :1]


def _prepare(pred: np.ndarray, gt: np.ndarray, crop_border: int, convention: str, min_side: int) -> tuple[np.ndarray, np.ndarray]:
    """Check the pair and trim ``crop_border`` pixels from every edge."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, not {convention!r}")
    for image in (pred, gt):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected H x W x 3 uint8 RGB arrays, got {image.dtype} {image.shape}")
    if pred.shape != gt.shape:
        raise ValueError(f"sizes differ: {pred.shape[1]}x{pred.shape[0]} vs {gt.shape[1]}x{gt.shape[0]}")
    if crop_border < 0:
        raise ValueError("crop_border must be >= 0")
    height, width = pred.shape[:2]
    if min(height, width) - 2 * crop_border < min_side:
        raise ValueError(
            f"{width}x{height} is too small: {min_side} px must remain on each side after cropping {crop_border} px per edge"
        )
    if crop_border:
        return pred[crop_border:-crop_border, crop_border:-crop_border], gt[crop_border:-crop_border, crop_border:-crop_border]
    return pred, gt


def _ssim(a: np.ndarray, b: np.ndarray, *, pyiqa: bool) -> float:
    """Mean SSIM of two float64 single-channel images in [0, 255] over the window's 'valid' positions.

    ``pyiqa`` selects pyiqa's variant: its float32 window, negative contrast-structure terms set to
    zero, and its order of operations; otherwise BasicSR's.
    """
    window = _PYIQA_WINDOW if pyiqa else _BASICSR_WINDOW
    r = _WINDOW_SIZE // 2

    def local_mean(x: np.ndarray) -> np.ndarray:
        return cv2.filter2D(x, -1, window)[r:-r, r:-r]

    mu_a, mu_b = local_mean(a), local_mean(b)
    mu_aa, mu_bb, mu_ab = mu_a**2, mu_b**2, mu_a * mu_b
    var_a = local_mean(a * a) - mu_aa
    var_b = local_mean(b * b) - mu_bb
    cov = local_mean(a * b) - mu_ab
    if pyiqa:
        contrast_structure = np.maximum((2 * cov + _C2) / (var_a + var_b + _C2), 0)
        ssim_map = ((2 * mu_ab + _C1) / (mu_aa + mu_bb + _C1)) * contrast_structure
    else:
        ssim_map = ((2 * mu_ab + _C1) * (2 * cov + _C2)) / ((mu_aa + mu_bb + _C1) * (var_a + var_b + _C2))
    return float(ssim_map.mean())


# --- pyiqa's learned metrics (optional extra "metrics") ---------------------------------------


class MetricUnavailable(Exception):
    """A learned metric that cannot be computed here; the message says why, in one line."""


@dataclass
class LearnedMetric:
    """A pyiqa metric; images are [3, H, W] float tensors in [0, 1]."""

    name: str
    pyiqa_name: str
    model: Any  # pyiqa's InferenceModel

    @property
    def needs_reference(self) -> bool:
        return self.name in FULL_REFERENCE

    @property
    def implementation(self) -> str:
        return f"pyiqa's {self.pyiqa_name}"

    def score(self, pred: torch.Tensor, gt: torch.Tensor | None = None) -> float:
        """One image's score (``gt`` is ignored by no-reference metrics)."""
        with torch.inference_mode():
            if self.needs_reference:
                return float(self.model(pred[None], gt[None]))
            return float(self.model(pred[None]))

    def score_folders(self, pred_folder: Path, gt_folder: Path) -> float:
        """A folder-level metric (FID) over every image of both folders."""
        with torch.inference_mode():
            return float(self.model(str(pred_folder), str(gt_folder)))


def load_learned_metric(name: str, device: torch.device) -> LearnedMetric:
    """Create pyiqa's metric ``name`` (one of ``LEARNED_METRICS``) on ``device``.

    pyiqa downloads weights on first use and caches them; offline, an uncached metric raises
    ``MetricUnavailable`` saying so, as does a missing pyiqa.
    """
    if name not in LEARNED_METRICS:
        raise ValueError(f"unknown learned metric {name!r}")
    pyiqa = _import_pyiqa()
    try:
        model = pyiqa.create_metric(LEARNED_METRICS[name], device=device, as_loss=False)
    except Exception as exc:  # pyiqa raises whatever its loaders raise
        raise MetricUnavailable(_why_unavailable(exc)) from exc
    return LearnedMetric(name, LEARNED_METRICS[name], model)


def load_metric(name: str, device: torch.device) -> Any:
    """pyiqa's metric ``name``, else tinysr's offline one for ``OFFLINE_FALLBACK`` names; both have
    ``score``, ``needs_reference`` and ``implementation``. ``MetricUnavailable`` gives every reason."""
    try:
        return load_learned_metric(name, device)
    except MetricUnavailable as exc:
        if name not in OFFLINE_FALLBACK:
            raise
        pyiqa_reason = str(exc)
    from tinysr_cli.errors import TinySRError
    from tinysr_cli.iqa import load_offline_metric

    try:
        return load_offline_metric(name, device)
    except TinySRError as exc:
        hint = f" ({exc.hint})" if exc.hint else ""
        raise MetricUnavailable(f"{pyiqa_reason}; and offline: {exc}{hint}") from None


def _import_pyiqa() -> Any:
    try:
        import pyiqa
    except ModuleNotFoundError as exc:
        if exc.name == "pyiqa":
            raise MetricUnavailable('pyiqa is not installed (pip install "tinysr[metrics]")') from None
        raise MetricUnavailable(f"pyiqa cannot be imported: it needs {exc.name}, which is not installed") from None
    except Exception as exc:  # a broken install fails in many ways
        raise MetricUnavailable(f"pyiqa cannot be imported ({type(exc).__name__}: {_first_line(exc)})") from None
    return pyiqa


def _why_unavailable(exc: BaseException) -> str:
    """One line: weights that could not be fetched (offline, no cache) or whatever else failed."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ModuleNotFoundError):
            return f"pyiqa needs the module {cause.name!r} for it, which is not installed"
        if isinstance(cause, OSError):  # urllib, requests and huggingface_hub errors are OSErrors
            return f"its weights are not in pyiqa's cache and could not be downloaded ({type(cause).__name__}: {_first_line(cause)})"
        cause = cause.__cause__ or cause.__context__
    return f"pyiqa could not create it ({type(exc).__name__}: {_first_line(exc)})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"
