"""MATLAB-compatible bicubic resize (``imresize(img, scale)``, the field's baseline and LR maker).

Same weights and indices as MATLAB's ``imresize``: cubic kernel with a = -0.5, the output pixel
``i`` (1-based) centred at ``i / scale + 0.5 * (1 - 1 / scale)`` in the input, the kernel widened by
``1 / scale`` when downscaling (antialiasing), each row of weights normalised to sum to one,
symmetric (mirror, edge pixel repeated) indices at the borders, and the dimension with the smaller
scale resized first. Computed in float64.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = -0.5."""
    ax = x.abs()
    ax2, ax3 = ax * ax, ax * ax * ax
    near = 1.5 * ax3 - 2.5 * ax2 + 1
    far = -0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2
    return torch.where(ax <= 1, near, torch.where(ax <= 2, far, torch.zeros_like(ax)))


def resize_matrix(in_len: int, scale: float, out_len: int | None = None, antialias: bool = True) -> torch.Tensor:
    """The [out_len, in_len] float64 matrix MATLAB's ``imresize`` applies along one dimension."""
    out_len = out_len if out_len is not None else math.ceil(in_len * scale)
    kernel_width = 4.0 / scale if (scale < 1 and antialias) else 4.0
    x = torch.arange(1, out_len + 1, dtype=torch.float64) / scale + 0.5 * (1 - 1 / scale)
    left = torch.floor(x - kernel_width / 2)
    taps = math.ceil(kernel_width) + 2
    indices = left[:, None] + torch.arange(taps, dtype=torch.float64)[None, :]  # 1-based
    distance = x[:, None] - indices
    weights = scale * cubic(scale * distance) if (scale < 1 and antialias) else cubic(distance)
    weights = weights / weights.sum(dim=1, keepdim=True)
    period = 2 * in_len
    mirrored = torch.remainder(indices - 1, period).long()
    mirrored = torch.where(mirrored < in_len, mirrored, period - 1 - mirrored)  # symmetric padding
    matrix = torch.zeros(out_len, in_len, dtype=torch.float64)
    matrix.scatter_add_(1, mirrored, weights)
    return matrix


def imresize(image: torch.Tensor, scale: float) -> torch.Tensor:
    """Resize ``[..., H, W]`` by ``scale`` like MATLAB's ``imresize(image, scale)`` (bicubic, antialiased).

    Returns float64 values (not clamped, not rounded: MATLAB rounds when its input is uint8).
    """
    if scale <= 0:
        raise ValueError("scale must be positive")
    work = image.to(torch.float64)
    height, width = work.shape[-2:]
    rows = resize_matrix(height, scale).to(work.device)
    cols = resize_matrix(width, scale).to(work.device)
    # MATLAB resizes along the dimension with the smaller scale first; equal scales: rows first.
    work = torch.einsum("oh,...hw->...ow", rows, work)
    return torch.einsum("pw,...hw->...hp", cols, work)


class Bicubic(nn.Module):
    """MATLAB bicubic upscaling as a model: ``[B, C, H, W]`` -> ``[B, C, sH, sW]``, same dtype."""

    def __init__(self, scale: int = 4) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return imresize(x, self.scale).to(x.dtype)
