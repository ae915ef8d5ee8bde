"""Stateless tiling: plan tile positions, weight them, and run a function tile by tile.

Latent tiles for the backbone overlap and are blended with Gaussian weights normalised by their
sum. VAE tiles get enough context to cover the network's receptive field and are cropped back, so a
tiled encode/decode equals the untiled one up to floating-point rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets along one axis: stride ``tile - overlap``, the last tile anchored to the end.

    This is the official TinySR/TSD-SR rule; a ``length`` no longer than ``tile`` gives one tile.
    """
    if tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"need tile > 0 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((length - tile) / stride) + 1
    return [i * stride for i in range(count - 1)] + [length - tile]


@dataclass(frozen=True)
class Tile:
    """A tile's window ``[y0:y1, x0:x1]`` on the canvas."""

    y0: int
    y1: int
    x0: int
    x1: int


def plan_tiles(height: int, width: int, tile: int, overlap: int) -> list[Tile]:
    """Row-major tiles covering a ``height`` x ``width`` canvas (tiles clipped to the canvas)."""
    tile_h, tile_w = min(tile, height), min(tile, width)
    return [
        Tile(y, y + tile_h, x, x + tile_w)
        for y in tile_starts(height, tile_h, overlap)
        for x in tile_starts(width, tile_w, overlap)
    ]


def gaussian_weights(height: int, width: int) -> torch.Tensor:
    """The official blending window [height, width] (float64).

    Per axis ``exp(-(t - m)^2 / (2 * 0.01 * T^2)) / sqrt(2 * pi * 0.01)``, with ``m = (T - 1) / 2``
    across and ``m = T / 2`` down: the authors' slight asymmetry, kept so that multi-tile outputs
    match theirs.
    """

    def axis(length: int, midpoint: float) -> torch.Tensor:
        t = torch.arange(length, dtype=torch.float64)
        var = 0.01
        return torch.exp(-((t - midpoint) ** 2) / (length * length) / (2 * var)) / math.sqrt(2 * math.pi * var)

    return torch.outer(axis(height, height / 2), axis(width, (width - 1) / 2))


def blend_tiles(
    canvas_shape: tuple[int, ...],
    tiles: list[Tile],
    run: Callable[[list[Tile]], torch.Tensor],
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Run ``run`` on batches of tiles and blend the outputs with normalised Gaussian weights.

    ``canvas_shape`` is (N, C, H, W); ``run(batch)`` returns [N * len(batch), C, th, tw] with the
    tiles of one batch stacked tile-major. The result is float32 on the CPU.
    """
    total = torch.zeros(canvas_shape, dtype=torch.float64)
    weight_sum = torch.zeros(canvas_shape[-2:], dtype=torch.float64)
    frames = canvas_shape[0]
    for batch in batched(tiles, batch_size):
        outputs = run(batch).to("cpu", torch.float64)
        for index, tile in enumerate(batch):
            weights = gaussian_weights(tile.y1 - tile.y0, tile.x1 - tile.x0)
            out = outputs[index * frames : (index + 1) * frames]
            total[..., tile.y0 : tile.y1, tile.x0 : tile.x1] += out * weights
            weight_sum[tile.y0 : tile.y1, tile.x0 : tile.x1] += weights
        if on_batch is not None:
            on_batch(len(batch))
    return (total / weight_sum).float()


def batched(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run_with_context(
    source: torch.Tensor,
    fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    upscale: int = 1,
    downscale: int = 1,
    tile: int,
    context: int,
) -> torch.Tensor:
    """Apply a convolutional ``fn`` tile by tile, exactly.

    ``fn`` maps [N, C, H, W] to [N, C', H * upscale / downscale, W * upscale / downscale]. Tiles of
    ``tile`` output pixels are computed from their input window grown by ``context`` input pixels
    on every side (clipped at the image border, where ``fn``'s own padding applies as it would on
    the whole image) and cropped back. With ``context`` at least the receptive-field radius the
    result equals ``fn(source)``. Windows start on multiples of ``downscale`` so strided layers keep
    their phase.
    """
    height, width = source.shape[-2:]
    context = math.ceil(context / downscale) * downscale
    out_h, out_w = height * upscale // downscale, width * upscale // downscale
    if out_h <= tile and out_w <= tile:
        return fn(source)
    rows = []
    for oy in range(0, out_h, tile):
        row = []
        for ox in range(0, out_w, tile):
            oy1, ox1 = min(oy + tile, out_h), min(ox + tile, out_w)
            iy0, iy1 = oy * downscale // upscale, oy1 * downscale // upscale
            ix0, ix1 = ox * downscale // upscale, ox1 * downscale // upscale
            cy0, cx0 = max(iy0 - context, 0), max(ix0 - context, 0)
            cy1, cx1 = min(iy1 + context, height), min(ix1 + context, width)
            out = fn(source[..., cy0:cy1, cx0:cx1])
            sy, sx = (iy0 - cy0) * upscale // downscale, (ix0 - cx0) * upscale // downscale
            row.append(out[..., sy : sy + (oy1 - oy), sx : sx + (ox1 - ox)])
        rows.append(torch.cat(row, dim=-1))
    return torch.cat(rows, dim=-2)
