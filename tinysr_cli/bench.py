"""Speed and memory of our engine against the official-style pipeline and the TSD-SR architecture.

Timings are medians of device-synchronised runs after a warm-up. Peak host memory is the largest
resident set sampled while a measurement runs (Linux ``/proc``; elsewhere the process maximum),
peak device memory is CUDA's allocator peak.
"""

from __future__ import annotations

import copy
import os
import resource
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from tinysr_cli.counting import TSD_SR_PROMPT_TOKENS
from tinysr_cli.engine.upscaler import UpscaleOptions, Upscaler
from tinysr_cli.errors import TinySRError
from tinysr_cli.models.tinysr import UPSCALE, TinySR
from tinysr_cli.models.transformer import ModulatedTransformer

OFFICIAL_LORA_RANK = 64


@dataclass
class Measurement:
    pipeline: str
    latency_s: float  # median time of one size x size output
    runs: int
    megapixels_per_s: float | None = None  # output megapixels per second on the large image
    peak_host_mib: float | None = None
    peak_device_mib: float | None = None
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _rss_mib() -> float:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float | None]]:
    """Yields a dict filled on exit with ``host_mib`` and ``device_mib`` peaks."""
    result: dict[str, float | None] = {}
    peak = [_rss_mib()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], _rss_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()
        result["host_mib"] = round(max(peak[0], _rss_mib()), 1)
        result["device_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_call(fn: Callable[[], object], device: torch.device, runs: int) -> list[float]:
    fn()  # warm-up (kernel selection, compilation, allocator)
    times = []
    for _ in range(runs):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def measure_upscaler(name: str, upscaler: Upscaler, size: int, large: int, runs: int, note: str = "") -> Measurement:
    """Latency of one ``size``-square output and throughput on one ``large``-square output."""
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, size // UPSCALE, size // UPSCALE, generator=generator)
    big = torch.rand(3, large // UPSCALE, large // UPSCALE, generator=generator)
    with peak_memory(upscaler.device) as peak:
        latency = statistics.median(time_call(lambda: upscaler.upscale(image), upscaler.device, runs))
        throughput = None
        if large:
            seconds = min(time_call(lambda: upscaler.upscale(big), upscaler.device, 1))
            throughput = round(large * large / 1e6 / seconds, 3)
    return Measurement(name, round(latency, 4), runs, throughput, peak["host_mib"], peak["device_mib"], note)


def official_style(model: TinySR, rank: int = OFFICIAL_LORA_RANK) -> TinySR:
    """The same weights run the way the authors' script runs them.

    Modulation computed at run time (a ``ModulatedTransformer`` whose constants are the identity:
    scale 0, shift 0, gate 1, so the outputs are ours), a rank-64 PEFT LoRA on every linear left
    unmerged (B = 0, so it adds cost, not change), and — set by the caller — one tile per pass.
    """
    from peft import LoraConfig, inject_adapter_in_model

    folded = model.transformer
    modulated = ModulatedTransformer(folded.config).to(folded.proj_out.weight.device, folded.proj_out.weight.dtype)
    modulated.load_state_dict(folded.state_dict(), strict=False)
    with torch.no_grad():
        modulated.modulation.zero_()
        modulated.modulation[:, 2] = 1  # gate_msa
        modulated.modulation[:, 5] = 1  # gate_mlp
        modulated.final_modulation.zero_()
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["qkv", "proj", "fc1", "fc2", "proj_out"])
    modulated = inject_adapter_in_model(config, modulated)
    return with_backbone(model, modulated.to(folded.proj_out.weight.dtype).eval().requires_grad_(False))


def with_backbone(model: TinySR, backbone: torch.nn.Module) -> TinySR:
    """A TinySR sharing ``model``'s VAE with another backbone; ``model`` itself is left as it was."""
    twin = copy.copy(model)
    twin._modules = dict(model._modules)  # copy.copy shares the submodule dict; give the twin its own
    twin.transformer = backbone
    return twin


def tsdsr_pipeline(
    device: torch.device,
    dtype: torch.dtype,
    transformer_config: dict | None = None,
    vae_config: dict | None = None,
    prompt_tokens: int = TSD_SR_PROMPT_TOKENS,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """TSD-SR's architecture (SD3-medium transformer + SD3 VAE by default) with random weights, one step at t = 1000."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from tinysr_cli.counting import SD3_MEDIUM_TRANSFORMER, SD3_VAE

    transformer_config = transformer_config or SD3_MEDIUM_TRANSFORMER
    vae_config = vae_config or SD3_VAE
    with torch.device(device), _no_cast_notice():
        transformer = SD3Transformer2DModel(**transformer_config).to(dtype).eval().requires_grad_(False)
        vae = AutoencoderKL(**vae_config).to(dtype).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randn(1, prompt_tokens, transformer_config["joint_attention_dim"], generator=generator).to(device, dtype)
    pooled = torch.randn(1, transformer_config["pooled_projection_dim"], generator=generator).to(device, dtype)
    timestep = torch.tensor([1000.0], device=device, dtype=dtype)
    scale = vae_config["scaling_factor"]

    @torch.inference_mode()
    def run(lr: torch.Tensor) -> torch.Tensor:
        pixels = F.interpolate(lr[None], scale_factor=UPSCALE, mode="bicubic", align_corners=False) * 2 - 1
        latent = vae.encode(pixels.to(device, dtype)).latent_dist.mode() * scale
        velocity = transformer(latent, encoder_hidden_states=prompt, pooled_projections=pooled, timestep=timestep).sample
        return vae.decode((latent - velocity) / scale).sample.clamp(-1, 1)

    return run


@contextmanager
def _no_cast_notice():
    """Silences diffusers' "There are modules in ... that should be kept in float32: []" printed on any
    ``.to(dtype)``: these models keep no module in float32 (the list is empty), so it tells the user nothing."""
    import logging

    logger = logging.getLogger("diffusers.models.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def measure_tsdsr(device: torch.device, dtype: torch.dtype, size: int, runs: int) -> Measurement:
    with peak_memory(device) as peak:
        run = tsdsr_pipeline(device, dtype)
        image = torch.rand(3, size // UPSCALE, size // UPSCALE, generator=torch.Generator().manual_seed(0))
        latency = statistics.median(time_call(lambda: run(image), device, runs))
    return Measurement("tsdsr-architecture", round(latency, 4), runs, None, peak["host_mib"], peak["device_mib"], "random weights, 333 text tokens")


def with_compiled_backbone(model: TinySR, device: torch.device) -> TinySR:
    """A shallow copy of ``model`` whose backbone runs through ``torch.compile`` (CUDA graphs on GPU)."""
    mode = "max-autotune" if device.type == "cuda" else None
    return with_backbone(model, torch.compile(model.transformer, mode=mode, dynamic=False))


def run_suite(
    ours: Upscaler,
    size: int,
    large: int,
    runs: int,
    *,
    official: bool = True,
    tsdsr: bool = False,
    span: bool = False,
    realesrgan: bool = False,
    compile_model: bool = False,
    step: Callable[[str], None] = lambda message: None,
) -> Iterator[Measurement]:
    """Our engine, then each comparison asked for, one `Measurement` at a time, on ``ours``'s device
    and precision (a generator, so an interrupted run keeps what it measured). ``step`` hears what
    is being timed. Comparisons whose packages are missing raise `TinySRError` naming the extra."""
    from tinysr_cli.engine.pixel import load_pixel_upscaler

    device, dtype = ours.device, ours.dtype
    step("timing our engine ...")
    yield measure_upscaler("tinysr", ours, size, large, runs, f"batch {ours.batch_size}, folded, merged")
    if compile_model:
        step("timing our engine with torch.compile ...")
        fast = Upscaler(with_compiled_backbone(ours.model, device), device=device, dtype=dtype, options=ours.options)
        yield measure_upscaler("tinysr+compile", fast, size, large, runs, "torch.compile")
    if official:
        step("timing the official-style pipeline ...")
        try:
            official_model = official_style(ours.model)
        except ModuleNotFoundError as exc:
            raise TinySRError(
                f"the official-style comparison needs the {exc.name} package, which is not installed",
                hint='pip install "tinysr[bench]"', option="official",
            ) from None
        slow = Upscaler(official_model, device=device, dtype=dtype, options=UpscaleOptions(batch_size=1))
        yield measure_upscaler("official-style", slow, size, large, runs, "run-time modulation, unmerged rank-64 LoRA, batch 1")
    if tsdsr:
        step("timing the TSD-SR architecture (building 2.1 B random parameters) ...")
        try:
            yield measure_tsdsr(device, dtype, size, max(1, min(runs, 3)))
        except ModuleNotFoundError as exc:
            raise TinySRError(
                f"{{opt:tsdsr}} needs the {exc.name} package, which is not installed", hint='pip install "tinysr[bench]"', option="tsdsr"
            ) from None
    peers = (("span-x4", span, "SPAN x4 via spandrel, exact tiles"), ("realesrgan-x4plus", realesrgan, "RRDBNet via spandrel, exact tiles"))
    for name, wanted, note in peers:
        if wanted:
            step(f"timing {name} ...")
            yield measure_upscaler(name, load_pixel_upscaler(name, device, dtype), size, large, runs, note)
