"""The one-step 4x pipeline around a ``TinySR`` model, tiled so any size fits in memory.

LR [0, 1] -> bicubic x4 (torch, a = -0.75) -> [-1, 1] -> reflect-pad -> encode (tiled, exact) ->
velocity on overlapping latent tiles, batched and Gaussian-blended -> ``z - v`` -> decode (tiled,
exact) -> clamp -> crop -> colour fix against the LR. Images and output canvases stay on the CPU;
only tiles visit the device. Nothing per call is stored on the object, so one ``Upscaler`` may
serve several threads.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tinysr_cli.engine import color
from tinysr_cli.engine.base import ImageUpscaler, placed
from tinysr_cli.engine.tiling import Tile, blend_tiles, plan_tiles, run_with_context
from tinysr_cli.errors import TinySRError
from tinysr_cli.models.tinysr import UPSCALE, TinySR
from tinysr_cli.models.transformer import TransformerConfig
from tinysr_cli.models.vae import decoder_receptive_radius, encoder_receptive_radius
from tinysr_cli.weights.format import COLOR_FIXES  # recorded in a weights file, applied here

# Peak CPU memory of one image through upscale(), resampling and saving, per output pixel: measured
# as the growth of peak RSS between 512, 768 and 1536 px inputs (45 to 78 bytes), with a margin.
CPU_BYTES_PER_OUTPUT_PIXEL = 96
MIN_TILE = 8  # latent pixels: the smallest backbone tile the out-of-memory back-off goes down to
MAX_AUTO_BATCH = 32  # backbone tiles x frames per pass the automatic choice goes up to
FREE_MEMORY_SHARE = 0.5  # share of the device's free memory the automatic batch may plan to use
# torch.compile settings for the backbone: "none"; "inductor" (compiled kernels); "cudagraphs"
# (inductor + CUDA graphs of the fixed tile shape, CUDA only); "dynamo-eager" (graph capture
# without code generation: a quick rehearsal of the compiled path, e.g. on a CPU).
COMPILE_MODES = ("none", "inductor", "cudagraphs", "dynamo-eager")

# progress(stage, done, total): stage is "tiles" for backbone tiles.
ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class UpscaleOptions:
    tile: int = 0  # backbone tile side in latent pixels; 0 = the model's native size (64 = 512 px)
    tile_overlap: int = 8  # latent pixels shared by neighbouring tiles
    batch_size: int = 0  # backbone tiles per forward pass; 0 picks one for the device
    color_fix: str | None = None  # None: the weights file's default
    vae_tile: int = 128  # VAE tile side, in latent pixels (exact at any value)
    compile: str = "none"  # one of COMPILE_MODES; anything but "none" pads batches to one fixed shape

    def __post_init__(self) -> None:
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}")
        if self.color_fix is not None and self.color_fix not in COLOR_FIXES:
            raise ValueError(f"color_fix must be one of {COLOR_FIXES}")
        if self.tile < 0 or self.tile_overlap < 0 or (self.tile and self.tile_overlap >= self.tile):
            raise ValueError("tile must be >= 0 and tile_overlap at least 0 and smaller than tile")
        if self.batch_size < 0 or self.vae_tile < 8:
            raise ValueError("batch_size must be >= 0 and vae_tile >= 8")


class Upscaler(ImageUpscaler):
    """Runs ``model`` on ``device`` in ``dtype``; inputs and outputs are float32 CPU tensors in [0, 1].

    ``model`` itself is left as it was: the upscaler runs a placed copy (sharing the tensors that are
    already on ``device`` in ``dtype``). :meth:`from_pretrained` loads and places a model by name.
    """

    def __init__(
        self,
        model: TinySR,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        options: UpscaleOptions = UpscaleOptions(),
        default_color_fix: str = "adain",
    ) -> None:
        config = model.config
        patch = config.transformer.patch_size
        self.tile = options.tile or config.transformer.max_latent_size
        if self.tile % patch or self.tile > config.transformer.max_latent_size or self.tile <= options.tile_overlap:
            raise ValueError(
                f"tile must be a multiple of {patch}, larger than the overlap and at most "
                f"{config.transformer.max_latent_size} latent pixels for this model"
            )
        self.device = torch.device(device)
        self.dtype = dtype
        self.options = options
        self.color_fix = options.color_fix or default_color_fix
        if options.compile == "cudagraphs" and self.device.type != "cuda":
            raise ValueError("compile='cudagraphs' needs a CUDA device")
        # The VAE is small (a few MB): a float32 copy stays on the CPU for the NaN/inf retry, so a
        # reduced-precision failure is recomputed from the original weights, not from rounded ones.
        self._vae_master = None
        if dtype != torch.float32:
            self._vae_master = placed(model.vae, torch.device("cpu"), torch.float32)
        self._vae_retry: dict[torch.dtype, torch.nn.Module] = {}  # retry copies on the device, made on first need
        self._vae_retry_lock = threading.Lock()
        self.model = placed(model, self.device, dtype, channels_last=("vae",))
        self.downscale = config.vae.downscale
        self.pad_multiple = self.downscale * patch
        self.min_lr_side = config.min_lr_side
        self.encoder_context = math.ceil(encoder_receptive_radius(self.model.vae.encoder))
        self.decoder_context = math.ceil(decoder_receptive_radius(self.model.vae.decoder))
        # On CUDA the automatic batch is chosen once, from the memory free now (with the model loaded):
        # a batch that changed from call to call would change GEMM shapes, and with them the rounding.
        self._auto_tiles = 1 if self.device.type == "cpu" else 8
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            per_tile = backbone_bytes_per_tile(config.transformer, self.tile, dtype)
            self._auto_tiles = choose_batch_size(free, per_tile)
        self.batch_size = options.batch_size or self._auto_tiles
        self._compiled = _compile_backbone(self.model.transformer, options.compile)

    @classmethod
    def from_pretrained(
        cls,
        spec: str | Path | None = None,
        *,
        device: torch.device | str = "auto",
        precision: str | torch.dtype = "auto",
        options: UpscaleOptions = UpscaleOptions(),
        progress: bool = True,
        warn: Callable[[str], None] | None = None,
    ) -> Upscaler:
        """The TinySR model ``spec`` names (registry name, owner/name[@revision], hf:// URI, local file;
        None: the configured default), on ``device`` ("auto": CUDA, MPS, then CPU) in ``precision``
        ("auto": fp16 on a GPU, fp32 on the CPU; or fp32, fp16, bf16, a torch dtype), with the colour
        fix its file names. ``warn`` hears about a file with random weights."""
        from tinysr_cli.engine.device import resolve_device, resolve_precision
        from tinysr_cli.weights.format import RANDOM_INIT_WARNING, load_weights
        from tinysr_cli.weights.hub import resolve_model

        device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        dtype = precision if isinstance(precision, torch.dtype) else resolve_precision(precision, device)
        model, info = load_weights(resolve_model(None if spec is None else str(spec), progress=progress))
        if info.random_init and warn is not None:
            warn(RANDOM_INIT_WARNING.format(path=info.path))
        return cls(model, device=device, dtype=dtype, options=options, default_color_fix=info.color_fix)

    def tiles_per_pass(self, frames: int) -> int:
        """Backbone tiles per forward pass for ``frames`` images at once (each tile carries every frame).

        An explicit ``batch_size`` is kept. Otherwise 1 on the CPU, 8 on MPS, and on CUDA as many as
        the device's free memory allowed when the upscaler was made (``choose_batch_size``), shared
        among the frames.
        """
        if self.options.batch_size:
            return self.options.batch_size
        if self.device.type != "cuda":
            return self._auto_tiles
        return max(1, self._auto_tiles // max(1, frames))

    def memory_needed(self, height: int, width: int) -> int:
        """Bytes of CPU memory one [3, height, width] image needs: canvases, colour fix, resampling, saving.

        Counted at the size actually processed: an input whose short side is under the model's
        minimum is enlarged first, so a 1 x 20000 strip costs what a 128 x 2560000 image does.
        """
        work_height, work_width = self.work_size(height, width)
        return work_height * work_width * UPSCALE * UPSCALE * CPU_BYTES_PER_OUTPUT_PIXEL

    def work_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) the model runs at: the input's, or its enlargement when a side is too short."""
        short = min(height, width)
        if short >= self.min_lr_side:
            return height, width
        factor = self.min_lr_side / short
        return max(self.min_lr_side, math.ceil(height * factor)), max(self.min_lr_side, math.ceil(width * factor))

    @torch.inference_mode()
    def upscale(self, image: torch.Tensor, progress: ProgressCallback | None = None) -> torch.Tensor:
        """[3, H, W] -> [3, 4H, 4W]."""
        return self.upscale_batch(image[None], progress)[0]

    @torch.inference_mode()
    def upscale_batch(self, images: torch.Tensor, progress: ProgressCallback | None = None) -> torch.Tensor:
        """[N, 3, H, W] -> [N, 3, 4H, 4W]; all images share one tile grid, so equal inputs give equal outputs."""
        images = self.check_images(images)
        height, width = images.shape[-2:]
        work = self._enlarge_small(images)
        bicubic = F.interpolate(work, scale_factor=UPSCALE, mode="bicubic", align_corners=False)
        sr = self._restore(bicubic * 2 - 1, progress)
        sr = (sr + 1) / 2
        if work.shape[-2:] != images.shape[-2:]:
            sr = F.interpolate(sr, size=(height * UPSCALE, width * UPSCALE), mode="bicubic", antialias=True, align_corners=False)
        # A one-pixel input has no standard deviation for AdaIN: its (flat) enlargement stands in.
        reference = work if height * width == 1 else images
        return self._color_fix(sr, reference).clamp_(0, 1)

    def _enlarge_small(self, images: torch.Tensor) -> torch.Tensor:
        """Inputs whose short side is below the model's minimum are enlarged to it (bicubic)."""
        size = self.work_size(*images.shape[-2:])
        if size == tuple(images.shape[-2:]):
            return images
        return F.interpolate(images, size=size, mode="bicubic", align_corners=False)

    def _restore(self, pixels: torch.Tensor, progress: ProgressCallback | None) -> torch.Tensor:
        """[-1, 1] bicubic image -> restored image clamped to [-1, 1], same size."""
        height, width = pixels.shape[-2:]
        pad_h, pad_w = -height % self.pad_multiple, -width % self.pad_multiple
        if pad_h or pad_w:
            pixels = F.pad(pixels, (0, pad_w, 0, pad_h), mode="reflect")
        latent = run_with_context(
            pixels,
            self._encode,
            downscale=self.downscale,
            tile=self.options.vae_tile,
            context=self.encoder_context,
        )
        restored = latent - self._velocity(latent, progress)
        out = run_with_context(
            restored,
            self._decode,
            upscale=self.downscale,
            tile=self.options.vae_tile * self.downscale,
            context=self.decoder_context,
        )
        return out[..., :height, :width].clamp_(-1, 1)

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._run_vae("encode", pixels)

    def _decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self._run_vae("decode", latent)

    def _run_vae(self, method: str, x: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """One VAE tile; NaN/inf in reduced precision is recomputed in bf16 (from fp16), then fp32.
        Out of device memory, the tile is computed from tiles of half its side (``tile``: its side in
        latent pixels), exactly, as all VAE tiling is."""
        try:
            out = self._finite_vae(method, x)
        except torch.cuda.OutOfMemoryError:
            out = None  # handled below, once the exception (and the tensors it holds) is gone
        if out is not None:
            return out
        self.free_device_cache()
        decode = method == "decode"
        side = (tile or max(x.shape[-2:]) // (1 if decode else self.downscale)) // 2  # latent pixels
        if side < MIN_TILE:
            raise TinySRError(
                f"out of memory on {self.device} even for a {side * 2}x{side * 2} latent-pixel VAE tile",
                hint="use {opt:precision} fp16/bf16 or {opt:device} cpu",
            )
        return run_with_context(
            x,
            lambda part: self._run_vae(method, part, side),
            upscale=self.downscale if decode else 1,
            downscale=1 if decode else self.downscale,
            tile=side * self.downscale if decode else side,
            context=self.decoder_context if decode else self.encoder_context,
        )

    def _finite_vae(self, method: str, x: torch.Tensor) -> torch.Tensor:
        out = getattr(self.model.vae, method)(self._vae_input(x, self.dtype))
        if bool(torch.isfinite(out).all()):
            return self.to_host(out).contiguous()
        for dtype in self._vae_retry_dtypes():
            out = getattr(self._retry_vae(dtype), method)(self._vae_input(x, dtype))
            if bool(torch.isfinite(out).all()):
                return self.to_host(out).contiguous()
        part = "decoder" if method == "decode" else "encoder"
        raise TinySRError(
            f"the model's VAE {part} produced NaN/inf values even in fp32",
            hint="the weights may be corrupt: check them with `tinysr weights verify`",
        )

    def _vae_input(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.to_device(x, dtype).contiguous(memory_format=torch.channels_last)

    def _vae_retry_dtypes(self) -> list[torch.dtype]:
        if self._vae_master is None:
            return []
        bf16_ok = self.device.type == "cpu" or (self.device.type == "cuda" and torch.cuda.is_bf16_supported())
        return ([torch.bfloat16] if self.dtype == torch.float16 and bf16_ok else []) + [torch.float32]

    def _retry_vae(self, dtype: torch.dtype) -> torch.nn.Module:
        with self._vae_retry_lock:
            if dtype not in self._vae_retry:
                self._vae_retry[dtype] = placed(self._vae_master, self.device, dtype, channels_last=("",))
            return self._vae_retry[dtype]

    def free_device_cache(self) -> None:
        """Return the allocator's cached blocks, so that a retry after an out-of-memory error can use them."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        elif self.device.type == "mps":
            torch.mps.empty_cache()

    def to_device(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """CPU tensor -> device; on CUDA through pinned memory with a non-blocking copy."""
        if self.device.type == "cuda":
            return x.contiguous().pin_memory().to(self.device, dtype, non_blocking=True)
        return x.to(self.device, dtype)

    def to_host(self, x: torch.Tensor) -> torch.Tensor:
        """Device tensor -> float32 CPU tensor; on CUDA a non-blocking copy into pinned memory."""
        if self.device.type == "cuda":
            host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            host.copy_(x, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
            return host.float()
        return x.to("cpu", torch.float32)

    def _velocity(self, latent: torch.Tensor, progress: ProgressCallback | None) -> torch.Tensor:
        """Backbone velocity over overlapping tiles, blended with normalised Gaussian weights."""
        tiles = plan_tiles(*latent.shape[-2:], self.tile, self.options.tile_overlap)
        done = 0

        def report(count: int) -> None:
            nonlocal done
            done += count
            if progress is not None:
                progress("tiles", done, len(tiles))

        if progress is not None:
            progress("tiles", 0, len(tiles))
        limit = self.tiles_per_pass(latent.shape[0])
        run = _BackboneRun(self, latent, self.tile, self.options.tile_overlap, limit, fp32_cache={})
        return blend_tiles(tuple(latent.shape), tiles, run, limit, report)

    def _color_fix(self, sr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        if self.color_fix == "adain":
            return color.adain(sr, lr)
        if self.color_fix == "wavelet":
            lr_up = F.interpolate(lr, size=sr.shape[-2:], mode="bicubic", align_corners=False)
            return color.wavelet(sr, lr_up)
        return sr


def available_memory() -> int | None:
    """Bytes of memory still available: Linux's MemAvailable, capped by a cgroup v2 limit; None if unknown."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
        available = int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo).group(1)) * 1024
    except (OSError, AttributeError):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            available = min(available, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return available


def backbone_bytes_per_tile(config: TransformerConfig, tile: int, dtype: torch.dtype) -> int:
    """Device bytes one latent tile (one frame) needs in a backbone pass, activations only (an upper bound).

    Per block at most about 12 token x hidden tensors are alive (residual, norm, qkv and its
    head-major copy, attention output, the MLP's 4x hidden and its GELU), plus attention's
    heads x tokens x tokens scores in case SDPA takes its math path rather than a fused kernel.
    """
    tokens = (tile // config.patch_size) ** 2
    element = torch.finfo(dtype).bits // 8
    return element * (12 * tokens * config.hidden_size + config.num_heads * tokens * tokens)


def choose_batch_size(free_bytes: int, bytes_per_tile: int, *, share: float = FREE_MEMORY_SHARE, cap: int = MAX_AUTO_BATCH) -> int:
    """Tiles per pass that fit in ``share`` of ``free_bytes``: at least 1, at most ``cap``."""
    if bytes_per_tile <= 0:
        raise ValueError("bytes_per_tile must be positive")
    return max(1, min(cap, int(max(free_bytes, 0) * share) // bytes_per_tile))


def _compile_backbone(backbone: torch.nn.Module, mode: str) -> torch.nn.Module | None:
    """The backbone through ``torch.compile`` for one fixed shape, or None for ``mode`` "none"."""
    if mode == "none":
        return None
    if mode == "dynamo-eager":
        return torch.compile(backbone, backend="eager", dynamic=False)
    return torch.compile(backbone, mode="reduce-overhead" if mode == "cudagraphs" else None, dynamic=False)


class _BackboneRun:
    """Runs batches of backbone tiles for one ``_velocity`` call, backing off instead of failing.

    - Out of device memory: free the allocator's cache, halve the number of tiles per forward pass
      (kept for the rest of this call), and once a single tile fails, compute that tile from tiles
      of half its side blended the same way; the same tile is retried, nothing is skipped.
    - NaN/inf in a reduced-precision output: recompute those tiles with an fp32 copy of the backbone
      on the CPU (slow, but it never asks a device short of memory for twice the weights).
    Everything learnt lives on this per-call object, never on the ``Upscaler``.
    """

    def __init__(self, upscaler: Upscaler, latent: torch.Tensor, tile: int, overlap: int, limit: int, fp32_cache: dict) -> None:
        self.upscaler = upscaler
        self.latent = latent
        self.tile = tile
        self.overlap = overlap
        self.limit = limit
        self.fp32_cache = fp32_cache  # {"model": fp32 backbone}, made on first need, shared with sub-runs

    def __call__(self, batch: list[Tile]) -> torch.Tensor:
        outputs, start = [], 0
        while start < len(batch):
            chunk = batch[start : start + self.limit]
            try:
                out = self._forward(chunk)
            except torch.cuda.OutOfMemoryError:
                out = None  # handled below, once the exception (and the tensors it holds) is gone
            if out is None:
                self.upscaler.free_device_cache()
                if len(chunk) > 1:
                    self.limit = max(1, len(chunk) // 2)
                    continue
                out = self._halve_tile(chunk[0])
            outputs.append(out)
            start += len(chunk)
        return torch.cat(outputs)

    def _forward(self, chunk: list[Tile]) -> torch.Tensor:
        crops = torch.cat([self.latent[..., t.y0 : t.y1, t.x0 : t.x1] for t in chunk])
        upscaler = self.upscaler
        out = self._backbone(crops)
        if bool(torch.isfinite(out).all()):
            return upscaler.to_host(out)
        if upscaler.dtype != torch.float32:  # on the CPU: the device may have no room for an fp32 copy
            out = self._fp32_model()(crops.to("cpu", torch.float32))
            if bool(torch.isfinite(out).all()):
                return out
        raise TinySRError(
            "the model produced NaN/inf values even in fp32",
            hint="the weights may be corrupt: check them with `tinysr weights verify`",
        )

    def _backbone(self, crops: torch.Tensor) -> torch.Tensor:
        """The (compiled, if asked) backbone; a compiled one always sees ``limit`` tiles (padded), one shape."""
        upscaler = self.upscaler
        compiled = upscaler._compiled
        if compiled is None:
            return upscaler.model.transformer(upscaler.to_device(crops, upscaler.dtype))
        count = crops.shape[0]
        full = self.limit * self.latent.shape[0]
        if count < full:
            crops = torch.cat([crops, crops[-1:].expand(full - count, *crops.shape[1:])])
        if upscaler.options.compile == "cudagraphs":
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(upscaler.to_device(crops, upscaler.dtype))[:count]

    def _fp32_model(self) -> torch.nn.Module:
        """The backbone's weights in fp32 on the CPU (the same rounded values), made on first need."""
        if "model" not in self.fp32_cache:
            self.fp32_cache["model"] = placed(self.upscaler.model.transformer, torch.device("cpu"), torch.float32)
        return self.fp32_cache["model"]

    def _halve_tile(self, tile: Tile) -> torch.Tensor:
        """The velocity of one tile that does not fit, from half-side tiles blended together."""
        patch = self.upscaler.model.config.transformer.patch_size
        side = (self.tile // 2) // patch * patch
        if side < MIN_TILE:
            raise TinySRError(
                f"out of memory on {self.upscaler.device} even for one {self.tile}x{self.tile} latent tile",
                hint="use {opt:precision} fp16/bf16, a smaller {opt:tile}, or {opt:device} cpu",
            )
        region = self.latent[..., tile.y0 : tile.y1, tile.x0 : tile.x1]
        overlap = min(self.overlap // 2, side - 1)
        sub_tiles = plan_tiles(*region.shape[-2:], side, overlap)
        sub_run = _BackboneRun(self.upscaler, region, side, overlap, 1, self.fp32_cache)
        return blend_tiles(tuple(region.shape), sub_tiles, sub_run, 1)
