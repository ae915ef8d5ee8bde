"""Tile planning and blending."""

from __future__ import annotations

import math

import pytest
import torch

from tinysr_cli.engine.tiling import blend_tiles, gaussian_weights, plan_tiles, tile_starts


def _official_starts(length: int, tile: int, overlap: int) -> list[int]:
    """The authors' loop, restated: count grows until a tile reaches the end, the last one snaps."""
    count, reach = 0, 0
    while reach < length:
        reach = max(count * tile - overlap * count, 0) + tile
        count += 1
    return [length - tile if i == count - 1 else i * (tile - overlap) for i in range(count)]


@pytest.mark.parametrize("length", [64, 65, 100, 120, 121, 176, 200, 513])
def test_tile_starts_follow_the_official_rule(length):
    assert tile_starts(length, 64, 8) == _official_starts(length, 64, 8)


def test_tile_starts_hand_checked():
    assert tile_starts(200, 64, 8) == [0, 56, 112, 136]
    assert tile_starts(64, 64, 8) == [0]
    assert tile_starts(30, 64, 8) == [0]


def test_tiles_cover_the_canvas_and_stay_inside():
    tiles = plan_tiles(150, 90, 64, 8)
    covered = torch.zeros(150, 90, dtype=torch.int32)
    for t in tiles:
        assert 0 <= t.y0 < t.y1 <= 150 and 0 <= t.x0 < t.x1 <= 90
        assert (t.y1 - t.y0, t.x1 - t.x0) == (64, 64)
        covered[t.y0 : t.y1, t.x0 : t.x1] += 1
    assert covered.min() >= 1


def test_official_weights_values():
    w = gaussian_weights(64, 64)
    peak = 1 / (2 * math.pi * 0.01)
    # Across the peak is between columns 31 and 32 (m = 31.5); down it is on row 32 (m = 32).
    assert w[32, 31] == pytest.approx(peak * math.exp(-(0.5**2) / 64**2 / 0.02))
    assert w[32, 31] == w[32, 32]
    assert w[31, 31] < w[32, 31]


def test_blend_is_exact_for_position_wise_functions():
    # A function of each position alone gives the same value from every tile: blending returns it exactly.
    latent = torch.randn(2, 4, 150, 90)
    tiles = plan_tiles(150, 90, 64, 8)

    def run(batch):
        return torch.cat([torch.tanh(latent[..., t.y0 : t.y1, t.x0 : t.x1]) * 3 for t in batch])

    blended = blend_tiles(tuple(latent.shape), tiles, run, batch_size=3)
    assert torch.allclose(blended, torch.tanh(latent) * 3, atol=1e-6)


def test_blend_has_no_step_at_tile_borders():
    # Each tile outputs its own constant; the blend must move between them smoothly (no jump
    # larger than the Gaussian ramp allows between neighbouring columns).
    tiles = plan_tiles(64, 200, 64, 8)
    values = {t: float(i) for i, t in enumerate(tiles)}

    def run(batch):
        return torch.stack([torch.full((1, 64, 64), values[t]) for t in batch])

    blended = blend_tiles((1, 1, 64, 200), tiles, run, batch_size=2)[0, 0]
    steps = (blended[:, 1:] - blended[:, :-1]).abs().max()
    assert blended.min() >= 0 and blended.max() <= len(tiles) - 1
    assert steps < 0.5  # a hard seam would be a step of 1.0 between adjacent tiles
