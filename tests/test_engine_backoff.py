"""The engine's back-off, on the CPU, with failures injected by a wrapper around the real backbone.

Out of memory: halve the tile batch (remembered for the rest of the call), then the tile; the same
tile is retried. NaN/inf in reduced precision: that batch is recomputed in fp32. The wrapper only
decides when to fail; the numbers always come from the real tiny model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import photo
from tinysr_cli.engine.tiling import blend_tiles, plan_tiles
from tinysr_cli.engine.upscaler import UpscaleOptions, Upscaler
from tinysr_cli.errors import TinySRError
from tinysr_cli.weights.format import load_weights


class CallLog(list):
    """Shared by a module and its deep copies (the engine's fp32 copy logs into the same list)."""

    def __deepcopy__(self, memo):
        return self


class FlakyBackbone(nn.Module):
    """Raises CUDA's OOM error above ``max_tiles`` tiles per call or ``max_side`` latent pixels per tile;
    returns NaN for calls in bf16 while ``nan_calls`` lasts (-1: always). Logs (tiles, side, dtype) per call."""

    def __init__(self, inner: nn.Module, *, max_tiles: int = 1 << 30, max_side: int = 1 << 30, nan_calls: int = 0) -> None:
        super().__init__()
        self.inner = inner
        self.max_tiles, self.max_side, self.nan_calls = max_tiles, max_side, nan_calls
        self.log = CallLog()  # (tiles, side, dtype) per call

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        self.log.append((latent.shape[0], latent.shape[-1], latent.dtype))
        if latent.shape[0] > self.max_tiles or max(latent.shape[-2:]) > self.max_side:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        out = self.inner(latent)
        if latent.dtype == torch.bfloat16 and self.nan_calls:
            self.nan_calls -= 1
            return torch.full_like(out, float("nan"))
        return out


@pytest.fixture(scope="module")
def tiny_model(tiny_weights):
    return load_weights(tiny_weights)[0]


@pytest.fixture(scope="module")
def latent(tiny_model):
    """A real latent: the tiny VAE's encoding of a 128x128 photo enlarged 4x (64x64 latent pixels)."""
    image = torch.from_numpy(photo("astronaut", (128, 128))).permute(2, 0, 1).float()[None] / 255
    pixels = torch.nn.functional.interpolate(image, scale_factor=4, mode="bicubic") * 2 - 1
    with torch.no_grad():
        return tiny_model.vae.encode(pixels)


def _upscaler(model, flaky=None, **options) -> Upscaler:
    model = copy.deepcopy(model)
    dtype = options.pop("dtype", torch.float32)
    if flaky is not None:
        flaky.inner = model.transformer
        model.transformer = flaky
    return Upscaler(model, dtype=dtype, options=UpscaleOptions(**options))


def _velocity(upscaler: Upscaler, latent: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return upscaler._velocity(latent, None)


def test_oom_halves_the_batch_and_keeps_the_smaller_batch(tiny_model, latent):
    flaky = FlakyBackbone(None, max_tiles=2)
    # 64x64 latent, 16-pixel tiles with overlap 4: starts 0, 12, 24, 36, 48 -> 25 tiles, batches of 8.
    got = _velocity(_upscaler(tiny_model, flaky, tile=16, tile_overlap=4, batch_size=8), latent)
    expected = _velocity(_upscaler(tiny_model, tile=16, tile_overlap=4, batch_size=2), latent)
    assert (got - expected).abs().max() < 1e-5
    sizes = [tiles for tiles, _, _ in flaky.log]
    # 8 fails, 4 fails, then pairs; the next batches of 8 start at 2 directly; the last batch has 1 tile.
    assert sizes == [8, 4] + [2] * 4 + [2] * 4 + [2] * 4 + [1]


def test_oom_on_one_tile_halves_the_tile_and_retries_it(tiny_model, latent):
    flaky = FlakyBackbone(None, max_side=32)
    got = _velocity(_upscaler(tiny_model, flaky, tile=64, tile_overlap=8, batch_size=1), latent)
    # Independent composition: the one 64-tile is made of 32-tiles (overlap 4) blended with the same weights.
    plain = copy.deepcopy(tiny_model).transformer
    with torch.no_grad():
        sub_tiles = plan_tiles(64, 64, 32, 4)
        expected = blend_tiles(
            tuple(latent.shape), sub_tiles, lambda batch: plain(torch.cat([latent[..., t.y0 : t.y1, t.x0 : t.x1] for t in batch])), 1
        )
    assert (got - expected).abs().max() < 1e-5
    assert flaky.log[0][:2] == (1, 64)  # the whole tile was tried first
    assert [side for _, side, _ in flaky.log[1:]] == [32] * len(sub_tiles)


def test_oom_on_the_smallest_tile_is_a_clear_error(tiny_model, latent):
    flaky = FlakyBackbone(None, max_tiles=0)
    with pytest.raises(TinySRError, match="out of memory on cpu even for one 8x8 latent tile"):
        _velocity(_upscaler(tiny_model, flaky, tile=16, tile_overlap=4, batch_size=4), latent)


def test_nan_in_bf16_is_recomputed_in_fp32(tiny_model, latent):
    flaky = FlakyBackbone(None, nan_calls=-1)
    got = _velocity(_upscaler(tiny_model, flaky, tile=32, tile_overlap=8, batch_size=2, dtype=torch.bfloat16), latent)
    # Reference: the same bf16-rounded weights, run in fp32 (what a retry in higher precision means).
    rounded = copy.deepcopy(tiny_model).to(torch.bfloat16).float()
    expected = _velocity(Upscaler(rounded, options=UpscaleOptions(tile=32, tile_overlap=8, batch_size=2)), latent)
    assert torch.isfinite(got).all()
    assert (got - expected).abs().max() < 1e-5
    # 9 tiles in batches of 2: every bf16 call (5) is followed by its fp32 retry.
    assert [dtype for _, _, dtype in flaky.log] == [torch.bfloat16, torch.float32] * 5


def test_nan_once_retries_only_that_batch(tiny_model, latent):
    flaky = FlakyBackbone(None, nan_calls=1)
    got = _velocity(_upscaler(tiny_model, flaky, tile=32, tile_overlap=8, batch_size=2, dtype=torch.bfloat16), latent)
    assert torch.isfinite(got).all()
    assert [dtype for _, _, dtype in flaky.log] == [torch.bfloat16, torch.float32] + [torch.bfloat16] * 4


def test_nan_in_fp32_is_a_clear_error(tiny_model, latent):
    class AlwaysNaN(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * float("nan")

    model = copy.deepcopy(tiny_model)
    model.transformer = AlwaysNaN(model.transformer)
    with pytest.raises(TinySRError, match="NaN/inf values even in fp32"):
        _velocity(Upscaler(model, options=UpscaleOptions(tile=32, tile_overlap=8)), latent)


@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_oom_in_the_vae_splits_the_tile_and_gives_the_same_result(tiny_model, part):
    """The VAE backs off like the backbone: a tile that does not fit is made of half-side tiles, exactly."""
    image = torch.from_numpy(photo("astronaut", (96, 80))).permute(2, 0, 1).float()[None] / 255
    whole = Upscaler(tiny_model, options=UpscaleOptions(vae_tile=128))
    flaky = Upscaler(tiny_model, options=UpscaleOptions(vae_tile=128))
    sides = []
    limit = 256 if part == "encoder" else 32  # encoder inputs are pixels, decoder inputs latent pixels

    def refuse_large(module, args):
        sides.append(max(args[0].shape[-2:]))
        if sides[-1] > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    getattr(flaky.model.vae, part).register_forward_pre_hook(refuse_large)
    with torch.inference_mode():
        expected, got = whole.upscale_batch(image), flaky.upscale_batch(image)
    assert torch.equal(got, expected)
    assert sides[0] > limit and len(sides) > 2 and sides[-1] <= limit  # refused, then done in smaller tiles
    assert not getattr(tiny_model.vae, part)._forward_pre_hooks  # the caller's model never saw the hook


def test_vae_oom_on_the_smallest_tile_is_a_clear_error(tiny_model):
    upscaler = Upscaler(tiny_model)

    def refuse(module, args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    upscaler.model.vae.decoder.register_forward_pre_hook(refuse)
    with pytest.raises(TinySRError, match="out of memory on cpu even for a 10x10 latent-pixel VAE tile"), torch.inference_mode():
        upscaler._decode(torch.zeros(1, 16, 40, 40))


def test_the_callers_model_is_left_as_it_was(tiny_model):
    model = copy.deepcopy(tiny_model).train()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    upscaler = Upscaler(model, dtype=torch.bfloat16)
    upscaler.upscale(torch.rand(3, 40, 48, generator=torch.Generator().manual_seed(0)))
    assert model.training and all(m.training for m in model.modules())
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu" and tensor.is_contiguous(), name
        assert torch.equal(tensor, before[name]), name
    assert upscaler.model.transformer.proj_out.weight.dtype == torch.bfloat16 and not upscaler.model.training


def test_an_upscaler_in_the_models_own_precision_shares_its_tensors(tiny_model):
    upscaler = Upscaler(tiny_model)
    assert upscaler.model.transformer.proj_out.weight is tiny_model.transformer.proj_out.weight


def test_from_pretrained_loads_and_places_by_name(tiny_weights, tiny_model):
    upscaler = Upscaler.from_pretrained(str(tiny_weights), device="cpu", precision="bf16")
    assert upscaler.device == torch.device("cpu") and upscaler.dtype == torch.bfloat16
    expected = tiny_model.transformer.proj_out.weight.to(torch.bfloat16)
    assert torch.equal(upscaler.model.transformer.proj_out.weight, expected)
    with pytest.raises(TinySRError, match="fp16 is not supported on the CPU"):
        Upscaler.from_pretrained(str(tiny_weights), device="cpu", precision="fp16")
