"""Pixel-space upscalers (Real-ESRGAN, SPAN, any spandrel model, MATLAB bicubic) behind the
same ``upscale`` / ``upscale_batch`` interface as :class:`~tinysr_cli.engine.upscaler.Upscaler`.

Tiles are computed from their input window grown by the model's receptive-field radius
(:func:`receptive_radius`), so a tiled result equals the untiled one; measured 0.0 max difference
for SPAN x4 (radius 21). Images stay on the CPU in float32; only tiles visit the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from tinysr_cli.engine.base import ImageUpscaler, placed
from tinysr_cli.engine.tiling import run_with_context
from tinysr_cli.errors import TinySRError

# Peak CPU bytes per output pixel for images, canvases and saving (the TinySR engine's figure).
CPU_BYTES_PER_OUTPUT_PIXEL = 96
DEFAULT_TILE = 1024  # output pixels per tile side (256 LR pixels)
ProgressCallback = Callable[[str, int, int], None]


def receptive_radius(model: nn.Module, architecture: str = "") -> int:
    """Input pixels each output pixel depends on, on each side (an upper bound).

    The sum of ``(k - 1) / 2 * dilation`` over every ``Conv2d``; for SPAN only the ``eval_conv``
    of each reparameterised block runs at inference. Exact for plain conv nets (RRDBNet, SPAN);
    attention models reach further than this, so their tiles are approximate.
    """
    radius = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d):
            continue
        if architecture == "SPAN" and (".conv." in f".{name}." or name.endswith(".sk")):
            continue
        radius += max((k - 1) // 2 * d for k, d in zip(module.kernel_size, module.dilation))
    return radius


class PixelUpscaler(ImageUpscaler):
    """Runs a pixel-space ``model`` ([N,3,H,W] in [0,1] -> [N,3,sH,sW]) in tiles on ``device``/``dtype``."""

    def __init__(
        self,
        model: nn.Module,
        *,
        scale: int,
        name: str,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        supported_dtypes: tuple[torch.dtype, ...] = (torch.float32,),
        context: int | None = None,
        tile: int = 0,
    ) -> None:
        if dtype not in supported_dtypes:
            raise TinySRError(
                f"{name} does not support {str(dtype).replace('torch.', '')}",
                option="precision",
                hint=f"use {{opt:precision}} {' or '.join(str(d).replace('torch.float', 'fp').replace('torch.b', 'b') for d in supported_dtypes)}",
            )
        self.name = name
        self.scale = scale
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = placed(model, self.device, dtype)  # ``model`` itself is left as it was
        self.context = receptive_radius(model) if context is None else context
        self.tile = tile or DEFAULT_TILE
        self._fp32: nn.Module | None = None

    def memory_needed(self, height: int, width: int) -> int:
        """Bytes of CPU memory one [3, height, width] image needs."""
        return height * width * self.scale * self.scale * CPU_BYTES_PER_OUTPUT_PIXEL

    @torch.inference_mode()
    def upscale(self, image: torch.Tensor, progress: ProgressCallback | None = None) -> torch.Tensor:
        """[3, H, W] -> [3, sH, sW], float32 on the CPU, clamped to [0, 1]."""
        return self.upscale_batch(image[None], progress)[0]

    @torch.inference_mode()
    def upscale_batch(self, images: torch.Tensor, progress: ProgressCallback | None = None) -> torch.Tensor:
        """[N, 3, H, W] -> [N, 3, sH, sW]."""
        images = self.check_images(images)
        height, width = images.shape[-2:]
        total = math.ceil(height * self.scale / self.tile) * math.ceil(width * self.scale / self.tile)
        done = 0

        def run(window: torch.Tensor) -> torch.Tensor:
            nonlocal done
            out = self._forward(window)
            done += 1
            if progress is not None:
                progress("tiles", done, total)
            return out

        if progress is not None:
            progress("tiles", 0, total)
        out = run_with_context(images, run, upscale=self.scale, tile=self.tile, context=self.context)
        return out.clamp_(0, 1)

    def _forward(self, window: torch.Tensor) -> torch.Tensor:
        out = self.model(window.to(self.device, self.dtype))
        if self.dtype != torch.float32 and not bool(torch.isfinite(out).all()):
            if self._fp32 is None:
                self._fp32 = placed(self.model, self.device, torch.float32)
            out = self._fp32(window.to(self.device, torch.float32))
        return out.to("cpu", torch.float32)


def from_descriptor(descriptor, name: str, device: torch.device | str, dtype: torch.dtype, tile: int = 0) -> PixelUpscaler:
    """A :class:`PixelUpscaler` for a spandrel ``ImageModelDescriptor``, honouring its dtype support."""
    if descriptor.input_channels != 3 or descriptor.output_channels != 3:
        raise TinySRError(f"{name}: only RGB models are supported ({descriptor.input_channels} -> {descriptor.output_channels} channels)")
    supported = (torch.float32,) + ((torch.float16,) if descriptor.supports_half else ()) + ((torch.bfloat16,) if descriptor.supports_bfloat16 else ())
    architecture = descriptor.architecture.id
    return PixelUpscaler(
        descriptor.model,
        scale=descriptor.scale,
        name=name,
        device=device,
        dtype=dtype,
        supported_dtypes=supported,
        context=receptive_radius(descriptor.model, architecture),
        tile=tile,
    )


def load_pixel_upscaler(spec: str | None, device: torch.device | str, dtype: torch.dtype, tile: int = 0) -> PixelUpscaler | None:
    """The pixel-space upscaler a ``--model`` spec names, or None when it names a TinySR model.

    ``bicubic`` (MATLAB-compatible), a peer name (``realesrgan-x4plus``, ``span-x4``), or a local
    ``.pth``/``.pt``/``.ckpt`` file or non-tinysr ``.safetensors`` file that spandrel recognises.
    """
    from pathlib import Path

    from tinysr_cli.models.bicubic import Bicubic
    from tinysr_cli.weights import peers

    if spec is None:
        return None
    if spec == "bicubic":
        return PixelUpscaler(Bicubic(4), scale=4, name="bicubic", device=device, dtype=dtype,
                             supported_dtypes=(torch.float32, torch.float16, torch.bfloat16), context=3, tile=tile)
    if spec in peers.PEERS:
        return _checked_scale(from_descriptor(peers.load_peer(spec), spec, device, dtype, tile))
    path = Path(spec)
    if path.is_file() and path.suffix.lower() in (".pth", ".pt", ".ckpt", ".safetensors") and not _is_tinysr_file(path):
        return _checked_scale(from_descriptor(peers.load_spandrel_file(path), path.name, device, dtype, tile))
    return None


def _is_tinysr_file(path) -> bool:
    if path.suffix.lower() != ".safetensors":
        return False
    from safetensors import safe_open

    from tinysr_cli.weights.format import FORMAT_NAME

    try:
        with safe_open(path, framework="pt") as handle:
            return (handle.metadata() or {}).get("format") == FORMAT_NAME
    except Exception:  # unreadable: let tinysr's own loader report it
        return True


def _checked_scale(upscaler: PixelUpscaler) -> PixelUpscaler:
    if upscaler.scale != 4:
        raise TinySRError(f"{upscaler.name} upscales {upscaler.scale}x; tinysr upscale works at 4x", hint="use a 4x model")
    return upscaler
