"""The engine on a real CUDA device. Skipped without one; `benchmarks/gpu_check.py` runs them.

Correctness checks use the tiny config (well conditioned at random init, fast); fp16 end to end,
the out-of-memory back-off and the flash kernel use the full architecture with random weights.
TF32 is switched off where outputs are compared with fp32 references.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tinysr_cli.engine.upscaler import UpscaleOptions, Upscaler
from tinysr_cli.weights.format import init_weights

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CPU_GPU_TOLERANCE = 1e-3  # max abs difference of fp32 outputs in [0, 1], TF32 off


@pytest.fixture
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A smooth random image (bicubic-enlarged noise), closer to a photo than white noise."""
    small = torch.rand(1, 3, height // 8 + 1, width // 8 + 1, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(small, size=(height, width), mode="bicubic").clamp(0, 1)[0]


def test_fp16_end_to_end_full_architecture(no_tf32):
    image = _image(192, 256)
    fp16 = Upscaler(init_weights("full", seed=0), device="cuda", dtype=torch.float16).upscale(image)
    fp32 = Upscaler(init_weights("full", seed=0), device="cuda", dtype=torch.float32).upscale(image)
    assert fp16.shape == (3, 768, 1024) and fp16.device.type == "cpu" and torch.isfinite(fp16).all()
    assert (fp16 - fp32).abs().mean() < 0.02


def test_tiled_vae_equals_untiled_on_the_gpu(no_tf32):
    image = _image(200, 150)
    model = init_weights("tiny", seed=0)
    whole = Upscaler(copy.deepcopy(model), device="cuda", options=UpscaleOptions(vae_tile=512)).upscale(image)
    tiled = Upscaler(copy.deepcopy(model), device="cuda", options=UpscaleOptions(vae_tile=16)).upscale(image)
    assert (whole - tiled).abs().max() < 1e-4


def test_cpu_and_gpu_outputs_agree(no_tf32):
    image = _image(160, 200)
    model = init_weights("tiny", seed=0)
    cpu = Upscaler(copy.deepcopy(model)).upscale(image)
    gpu = Upscaler(copy.deepcopy(model), device="cuda:0").upscale(image)
    assert (cpu - gpu).abs().max() < CPU_GPU_TOLERANCE


def test_deterministic_run_to_run():
    image = _image(256, 320)
    upscaler = Upscaler(init_weights("full", seed=0), device="cuda", dtype=torch.float16)
    assert torch.equal(upscaler.upscale(image), upscaler.upscale(image))


def test_oom_back_off_under_a_real_memory_cap():
    upscaler = Upscaler(init_weights("full", seed=0), device="cuda", dtype=torch.float16, options=UpscaleOptions(batch_size=25))
    latent = torch.randn(1, 16, 256, 256, generator=torch.Generator().manual_seed(0))  # 5 x 5 = 25 tiles
    one = Upscaler(copy.deepcopy(upscaler.model), device="cuda", dtype=torch.float16, options=UpscaleOptions(batch_size=1))
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.inference_mode():
        expected = one._velocity(latent, None)
    per_tile = torch.cuda.max_memory_allocated() - base
    del one
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    ooms = torch.cuda.memory_stats().get("num_ooms", 0)
    # Room for about 4 tiles on top of what is allocated now: 25 at once cannot fit.
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + 4 * per_tile) / total)
    try:
        with torch.inference_mode():
            got = upscaler._velocity(latent, None)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert torch.cuda.memory_stats().get("num_ooms", 0) > ooms  # the allocator really refused
    assert torch.isfinite(got).all()
    # fp16 with other GEMM shapes: equal up to fp16 rounding, relative to the velocity's scale.
    scale = expected.abs().mean()
    assert (got - expected).abs().mean() < 1e-2 * scale and (got - expected).abs().max() < 0.1 * expected.abs().max()


def test_nan_guards_recover_in_higher_precision():
    model = init_weights("full", seed=0)
    upscaler = Upscaler(model, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        # Finite fp16 weights (+-60000) whose outputs overflow fp16 (65504) but not fp32: the backbone's
        # fp32 retry. Random signs: a constant row would sum the layer-normed (zero-mean) tokens to ~0.
        weight = upscaler.model.transformer.proj_out.weight
        signs = torch.randint(0, 2, weight.shape, generator=torch.Generator().manual_seed(0)).to(weight) * 2 - 1
        weight.copy_(signs * 60000.0)
        # NaN in the fp16 VAE: the retry runs bf16 from the fp32 original kept on the CPU.
        next(upscaler.model.vae.decoder.parameters()).view(-1)[0] = float("nan")
        probe = torch.randn(1, 16, 16, 16, device="cuda", dtype=torch.float16)
        assert not torch.isfinite(upscaler.model.transformer(probe)).all()
    out = upscaler.upscale(_image(128, 128))
    assert torch.isfinite(out).all() and out.shape == (3, 512, 512)
    assert torch.bfloat16 in upscaler._vae_retry


def test_backbone_runs_on_the_flash_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backbone = init_weights("full", seed=0).transformer.to("cuda", torch.float16)
    latent = torch.randn(2, 16, 64, 64, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        default = backbone(latent)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if flash cannot run these shapes
            flash = backbone(latent)
    assert (default - flash).abs().max() < 1e-2


def test_pinned_non_blocking_round_trip():
    upscaler = Upscaler(init_weights("tiny", seed=0), device="cuda:0")
    x = torch.rand(2, 16, 40, 48)
    on_device = upscaler.to_device(x, torch.float16)
    assert on_device.device == torch.device("cuda:0") and on_device.dtype == torch.float16
    back = upscaler.to_host(on_device)
    assert back.device.type == "cpu" and back.dtype == torch.float32
    assert torch.equal(back, x.half().float())
    assert upscaler.tiles_per_pass(1) >= 1  # chosen from free memory


def test_cuda_graphs_match_eager():
    model = init_weights("tiny", seed=0)
    frames = torch.stack([_image(128, 192, seed) for seed in range(2)])
    eager = Upscaler(copy.deepcopy(model), device="cuda", dtype=torch.float16, options=UpscaleOptions(tile=32, batch_size=4))
    graphs = Upscaler(copy.deepcopy(model), device="cuda", dtype=torch.float16, options=UpscaleOptions(tile=32, batch_size=4, compile="cudagraphs"))
    expected = eager.upscale_batch(frames)
    for _ in range(2):  # the second call replays the recorded graphs
        assert (graphs.upscale_batch(frames) - expected).abs().max() < 1e-2
