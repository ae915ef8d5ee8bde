"""Colour correction run once on the stitched SR image (never per tile).

Both follow the StableSR/TSD-SR/TinySR definitions: AdaIN matches per-channel mean and std to the
LR input (unbiased variance + 1e-5); the wavelet fix keeps the SR image's high frequencies and takes
the low frequencies of the bicubic-upscaled LR (5-level a-trous, [1,2,1]^2/16, replicate padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ADAIN_EPS = 1e-5
WAVELET_LEVELS = 5


def _mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.flatten(2)
    return flat.mean(dim=2)[..., None, None], (flat.var(dim=2) + ADAIN_EPS).sqrt()[..., None, None]


def adain(sr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """Give ``sr`` [N, C, H, W] the per-channel mean and std of ``lr`` [N, C, h, w]."""
    sr_mean, sr_std = _mean_std(sr.double())
    lr_mean, lr_std = _mean_std(lr.double())
    return ((sr.double() - sr_mean) / sr_std * lr_std + lr_mean).to(sr.dtype)


def _blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    kernel = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=x.dtype, device=x.device) / 16
    kernel = kernel.expand(x.shape[1], 1, 3, 3)
    padded = F.pad(x, (dilation,) * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=x.shape[1], dilation=dilation)


def _split_frequencies(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low): the sum of the a-trous detail layers and the final low-pass residual."""
    high = torch.zeros_like(x)
    for level in range(WAVELET_LEVELS):
        low = _blur(x, 2**level)
        high += x - low
        x = low
    return high, x


def wavelet(sr: torch.Tensor, lr_upscaled: torch.Tensor) -> torch.Tensor:
    """SR high frequencies plus the low frequencies of the same-size upscaled LR."""
    high, _ = _split_frequencies(sr)
    _, low = _split_frequencies(lr_upscaled)
    return high + low
