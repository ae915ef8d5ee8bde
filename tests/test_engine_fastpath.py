"""The engine's device fast path, on the CPU where the code allows: the batch chooser, the VAE's
NaN/inf retry, and the fixed-shape compiled backbone (captured by dynamo, run without codegen)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import photo
from tinysr_cli.engine.upscaler import (
    MAX_AUTO_BATCH,
    UpscaleOptions,
    Upscaler,
    backbone_bytes_per_tile,
    choose_batch_size,
)
from tinysr_cli.errors import TinySRError
from tinysr_cli.models.tinysr import NAMED_CONFIGS
from tinysr_cli.weights.format import load_weights

MiB = 2**20


@pytest.fixture(scope="module")
def tiny_model(tiny_weights):
    return load_weights(tiny_weights)[0]


@pytest.fixture(scope="module")
def image():
    return torch.from_numpy(photo("astronaut", (128, 160))).permute(2, 0, 1).float() / 255


def test_batch_chooser_fills_the_share_of_free_memory():
    assert choose_batch_size(1000 * MiB, 100 * MiB) == 5  # half of 1000 MiB holds 5 tiles of 100 MiB
    assert choose_batch_size(1000 * MiB, 100 * MiB, share=1.0) == 10
    assert choose_batch_size(10**6 * MiB, 100 * MiB) == MAX_AUTO_BATCH  # capped
    assert choose_batch_size(10**6 * MiB, 100 * MiB, cap=7) == 7
    assert choose_batch_size(50 * MiB, 100 * MiB) == 1  # never below one tile: the OOM back-off takes over
    assert choose_batch_size(0, 100 * MiB) == 1 and choose_batch_size(-5, 100 * MiB) == 1
    sizes = [choose_batch_size(free * MiB, 37 * MiB) for free in range(0, 4000, 50)]
    assert sizes == sorted(sizes)  # more free memory never gives a smaller batch
    with pytest.raises(ValueError):
        choose_batch_size(1000, 0)


def test_tile_memory_estimate_follows_the_architecture():
    full = NAMED_CONFIGS["full"].transformer
    tokens, hidden, heads = 32 * 32, 1536, 24
    assert backbone_bytes_per_tile(full, 64, torch.float16) == 2 * (12 * tokens * hidden + heads * tokens * tokens)
    assert backbone_bytes_per_tile(full, 64, torch.float32) == 2 * backbone_bytes_per_tile(full, 64, torch.bfloat16)
    assert backbone_bytes_per_tile(full, 32, torch.float16) < backbone_bytes_per_tile(full, 64, torch.float16) / 4
    # An 80 GiB card with 60 GiB free fills the cap with 512-px fp16 tiles; 2 GiB free gives about 11.
    per_tile = backbone_bytes_per_tile(full, 64, torch.float16)
    assert choose_batch_size(60 * 2**30, per_tile) == MAX_AUTO_BATCH
    assert choose_batch_size(2 * 2**30, per_tile) == 2 * 2**30 // 2 // per_tile == 12


def test_cpu_keeps_one_tile_per_pass_and_explicit_batches(tiny_model):
    assert Upscaler(copy.deepcopy(tiny_model)).tiles_per_pass(4) == 1
    assert Upscaler(copy.deepcopy(tiny_model), options=UpscaleOptions(batch_size=6)).tiles_per_pass(4) == 6


def _poison(module: torch.nn.Module) -> None:
    """NaN into the first weight of ``module``: every output it touches becomes NaN."""
    with torch.no_grad():
        next(module.parameters()).view(-1)[0] = float("nan")


def test_vae_nan_in_bf16_is_recomputed_in_fp32_from_the_original_weights(tiny_model):
    upscaler = Upscaler(copy.deepcopy(tiny_model), dtype=torch.bfloat16)
    _poison(upscaler.model.vae.decoder)
    latent = torch.randn(1, 16, 32, 40, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert not torch.isfinite(upscaler.model.vae.decode(latent.bfloat16())).all()  # the poison works
        decoded = upscaler._decode(latent)
        expected = tiny_model.vae.decode(latent)  # the fp32 original, not a bf16-rounded copy
    assert (decoded - expected).abs().max() < 1e-5
    assert list(upscaler._vae_retry) == [torch.float32]


def test_vae_nan_in_fp32_is_a_clear_error(tiny_model, image):
    model = copy.deepcopy(tiny_model)
    _poison(model.vae.encoder)  # poisoned before the upscaler copies it: the fp32 retry fails too
    with pytest.raises(TinySRError, match="VAE (en|de)coder produced NaN/inf values even in fp32"):
        Upscaler(model, dtype=torch.bfloat16).upscale(image)
    with pytest.raises(TinySRError, match="VAE (en|de)coder produced NaN/inf values even in fp32"):
        Upscaler(copy.deepcopy(model)).upscale(image)


def test_compiled_backbone_pads_batches_to_one_shape_and_matches_eager(tiny_model):
    latent = torch.randn(2, 16, 64, 64, generator=torch.Generator().manual_seed(0))
    options = dict(tile=32, tile_overlap=8, batch_size=4)  # 9 tiles: batches of 4, 4 and 1 (padded to 4)
    eager = Upscaler(copy.deepcopy(tiny_model), options=UpscaleOptions(**options))
    compiled = Upscaler(copy.deepcopy(tiny_model), options=UpscaleOptions(**options, compile="dynamo-eager"))
    shapes = []
    compiled._compiled.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    with torch.inference_mode():
        expected = eager._velocity(latent, None)
        got = compiled._velocity(latent, None)
    assert (got - expected).abs().max() < 1e-5
    assert shapes == [(8, 16, 32, 32)] * 3  # 4 tiles x 2 frames, every pass the same shape


def test_cuda_graphs_need_cuda(tiny_model):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Upscaler(copy.deepcopy(tiny_model), options=UpscaleOptions(compile="cudagraphs"))
    with pytest.raises(ValueError, match="compile must be one of"):
        UpscaleOptions(compile="fast")
