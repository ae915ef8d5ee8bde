"""The upscaling engine on a tiny random model and real photos."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import photo
from tinysr_cli.engine import color
from tinysr_cli.engine.device import resolve_device, resolve_precision
from tinysr_cli.engine.upscaler import UpscaleOptions, Upscaler
from tinysr_cli.errors import TinySRError
from tinysr_cli.weights.format import load_weights


def _tensor(array) -> torch.Tensor:
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def tiny_model(tiny_weights):
    return load_weights(tiny_weights)[0]


@pytest.mark.parametrize("size", [(130, 97), (128, 128), (131, 257), (200, 129)])
def test_output_is_exactly_4x(tiny_model, size):
    image = _tensor(photo("astronaut", size))
    out = Upscaler(tiny_model).upscale(image)
    assert out.shape == (3, size[0] * 4, size[1] * 4)
    assert out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 1


def test_small_input_is_enlarged_then_resampled_to_4x(tiny_model):
    image = _tensor(photo("coffee", (37, 61)))
    out = Upscaler(tiny_model).upscale(image)
    assert out.shape == (3, 148, 244)


def test_deterministic(tiny_model):
    image = _tensor(photo("chelsea", (150, 170)))
    upscaler = Upscaler(tiny_model)
    assert torch.equal(upscaler.upscale(image), upscaler.upscale(image))


def test_vae_tiling_does_not_change_the_result(tiny_model):
    image = _tensor(photo("astronaut", (200, 150)))
    whole = Upscaler(tiny_model, options=UpscaleOptions(vae_tile=512)).upscale(image)
    tiled = Upscaler(tiny_model, options=UpscaleOptions(vae_tile=16)).upscale(image)
    assert torch.equal(whole, tiled)  # full receptive-field context: exact, not merely close


def test_tile_batch_size_does_not_change_the_result(tiny_model):
    image = _tensor(photo("astronaut", (200, 260)))
    one = Upscaler(tiny_model, options=UpscaleOptions(batch_size=1)).upscale(image)
    four = Upscaler(tiny_model, options=UpscaleOptions(batch_size=4)).upscale(image)
    assert (one - four).abs().max() < 1e-5


def test_batch_of_frames_equals_frames_one_by_one(tiny_model):
    frames = torch.stack([_tensor(photo("astronaut", (128, 160))), _tensor(photo("coffee", (128, 160)))])
    upscaler = Upscaler(tiny_model)
    batch = upscaler.upscale_batch(frames)
    for i in range(2):
        assert (batch[i] - upscaler.upscale(frames[i])).abs().max() < 1e-5


def test_untiled_single_tile_matches_the_plain_model(tiny_model):
    # A 128x128 input is exactly one 64x64 latent tile: the engine equals TinySR.forward + AdaIN.
    image = _tensor(photo("astronaut", (128, 128)))
    out = Upscaler(tiny_model, options=UpscaleOptions(color_fix="none")).upscale(image)
    bicubic = F.interpolate(image[None], scale_factor=4, mode="bicubic", align_corners=False)
    plain = copy.deepcopy(tiny_model)
    plain.vae.to(memory_format=torch.channels_last)  # the engine's layout for the VAE (same maths, its rounding)
    with torch.no_grad():
        expected = (plain(bicubic * 2 - 1) + 1) / 2
    assert (out - expected[0].clamp(0, 1)).abs().max() < 1e-5


def test_the_decoder_gets_the_restored_latent(tiny_model, monkeypatch):
    """The fixture is well conditioned: decoding the unrestored latent gives a clearly different
    image, so an engine that fed the decoder the wrong latent fails here (and in the test above)."""
    image = _tensor(photo("coffee", (128, 128)))
    options = UpscaleOptions(color_fix="none")
    right = Upscaler(tiny_model, options=options).upscale(image)
    bicubic = F.interpolate(image[None], scale_factor=4, mode="bicubic", align_corners=False) * 2 - 1
    with torch.no_grad():
        unrestored = ((tiny_model.vae.decode(tiny_model.vae.encode(bicubic)).clamp(-1, 1) + 1) / 2)[0]
    assert (right - unrestored).abs().mean() > 0.1
    # the same engine with the backbone's velocity dropped (z - 0 = z) is caught
    upscaler = Upscaler(tiny_model, options=options)
    monkeypatch.setattr(upscaler, "_velocity", lambda latent, progress: torch.zeros_like(latent))
    wrong = upscaler.upscale(image)
    assert (wrong - unrestored).abs().max() < 1e-5
    assert (wrong - right).abs().mean() > 0.1


def test_progress_reports_every_tile(tiny_model):
    calls = []
    Upscaler(tiny_model).upscale(_tensor(photo("astronaut", (200, 260))), lambda *a: calls.append(a))
    # latent 100x130: 2 rows x 3 columns of 64-tiles with overlap 8.
    assert calls[0] == ("tiles", 0, 6) and calls[-1] == ("tiles", 6, 6)


def test_adain_matches_lr_statistics():
    lr = _tensor(photo("astronaut", (64, 64)))[None]
    sr = torch.rand(1, 3, 256, 256) * 0.3 + 0.5
    fixed = color.adain(sr, lr)
    assert torch.allclose(fixed.mean(dim=(2, 3)), lr.mean(dim=(2, 3)), atol=1e-5)
    # Equal up to the 1e-5 added to both variances.
    assert torch.allclose(fixed.flatten(2).std(dim=2), lr.flatten(2).std(dim=2), atol=5e-4)


def test_wavelet_keeps_high_and_swaps_low_frequencies():
    lr_up = F.interpolate(_tensor(photo("coffee", (64, 64)))[None], scale_factor=4, mode="bicubic")
    sr = torch.rand(1, 3, 256, 256)
    fixed = color.wavelet(sr, lr_up)
    high_sr, low_sr = color._split_frequencies(sr)
    _, low_lr = color._split_frequencies(lr_up)
    assert torch.allclose(high_sr + low_sr, sr, atol=1e-5)  # the decomposition is complete
    assert torch.allclose(fixed, high_sr + low_lr, atol=1e-6)


def test_device_and_precision_policy():
    cpu = resolve_device("cpu")
    assert resolve_precision("auto", cpu) == torch.float32
    assert resolve_precision("bf16", cpu) == torch.bfloat16
    with pytest.raises(TinySRError, match="fp16 is not supported on the CPU"):
        resolve_precision("fp16", cpu)
    with pytest.raises(TinySRError, match="unknown precision"):
        resolve_precision("fp8", cpu)
    if not torch.cuda.is_available():
        with pytest.raises(TinySRError, match="CUDA"):
            resolve_device("cuda:0")


def test_bf16_on_cpu_stays_close_to_fp32(tiny_model):
    image = _tensor(photo("astronaut", (128, 128)))
    fp32 = Upscaler(tiny_model).upscale(image)
    # The Upscaler takes ownership of its model (moves/casts it): give it a copy.
    bf16 = Upscaler(copy.deepcopy(tiny_model), dtype=torch.bfloat16).upscale(image)
    # The conditioned tiny model passes bf16 rounding on at full strength (measured mean 0.037 on
    # outputs of std ~0.2); a broken cast would give an unrelated image (mean difference ~0.3).
    assert (fp32 - bf16).abs().mean() < 0.06
    assert torch.corrcoef(torch.stack([fp32.flatten(), bf16.flatten()]))[0, 1] > 0.9


def test_default_tile_follows_the_model_grid():
    # A model trained with a 16x16 positional grid accepts 32-latent tiles; the default adapts.
    from tinysr_cli.models.tinysr import TinySR, TinySRConfig
    from tinysr_cli.models.transformer import TransformerConfig
    from tinysr_cli.models.vae import VAEConfig

    torch.manual_seed(0)
    small = TinySR(TinySRConfig(
        TransformerConfig(num_layers=1, hidden_size=32, num_heads=2, pos_grid=16),
        VAEConfig(encoder_channels=(8,) * 4, decoder_channels=(8,) * 4, encoder_blocks=(1,) * 4, decoder_blocks=(1,) * 4),
    ))
    upscaler = Upscaler(small)
    assert upscaler.tile == 32 and upscaler.min_lr_side == 64
    assert upscaler.upscale(_tensor(photo("astronaut", (70, 90)))).shape == (3, 280, 360)
    with pytest.raises(ValueError, match="at most 32 latent pixels"):
        Upscaler(small, options=UpscaleOptions(tile=64))
