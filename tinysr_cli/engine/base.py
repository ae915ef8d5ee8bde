"""What every upscaler shares: its input contract and how it places a caller's model on a device."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ImageUpscaler:
    """The interface of :class:`~tinysr_cli.engine.upscaler.Upscaler` and
    :class:`~tinysr_cli.engine.pixel.PixelUpscaler`: float32 CPU images in [0, 1], [N, 3, H, W]."""

    device: torch.device
    dtype: torch.dtype

    @staticmethod
    def check_images(images: torch.Tensor) -> torch.Tensor:
        """``images`` as float32 on the CPU; anything but [N, 3, H, W] with H, W >= 1 is refused."""
        if images.ndim != 4 or images.shape[1] != 3 or min(images.shape[-2:]) < 1:
            raise ValueError(f"expected [N, 3, H, W] images, got {tuple(images.shape)}")
        return images.to("cpu", torch.float32)


def placed(
    module: nn.Module, device: torch.device, dtype: torch.dtype, *, channels_last: tuple[str, ...] = ()
) -> nn.Module:
    """``module`` on ``device`` in ``dtype`` (floating-point tensors only) and in eval mode, leaving
    ``module`` itself untouched.

    Tensors already where they should be are shared, not copied (a CPU fp32 model run on the CPU in
    fp32 costs no memory); the others are converted into new tensors of a structural copy. A module
    with nothing to change is returned as it is (a compiled backbone keeps its compiled forward).
    ``channels_last``: submodules ("" for all) whose 4-D tensors take the channels-last layout
    (depthwise/pointwise convolutions run about 2x faster in it, measured on the CPU).
    """
    memo: dict[int, torch.Tensor] = {}
    last = {id(t) for name in channels_last for t in (*module.get_submodule(name).parameters(), *module.get_submodule(name).buffers())}

    def convert(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in memo:
            target = dtype if tensor.is_floating_point() else tensor.dtype
            layout = torch.channels_last if id(tensor) in last and tensor.ndim == 4 else torch.preserve_format
            moved = tensor.detach().to(device, target, memory_format=layout)
            if moved.data_ptr() == tensor.data_ptr() and moved.dtype == tensor.dtype and moved.device == tensor.device:
                moved = tensor  # nothing changed: keep the very object (a Parameter stays one)
            elif isinstance(tensor, nn.Parameter):
                moved = nn.Parameter(moved, requires_grad=False)
            memo[id(tensor)] = moved
        return memo[id(tensor)]

    tensors = [t for m in module.modules() for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]
    if all(convert(t) is t for t in tensors) and not any(m.training for m in module.modules()):
        return module

    def twin(original: nn.Module) -> nn.Module:
        copied = copy.copy(original)
        for key, value in original.__dict__.items():  # hook registries and the like: the twin's own
            if isinstance(value, dict):
                copied.__dict__[key] = copy.copy(value)
        copied._parameters = {k: None if v is None else convert(v) for k, v in original._parameters.items()}
        copied._buffers = {k: None if v is None else convert(v) for k, v in original._buffers.items()}
        copied._modules = {k: None if v is None else twin(v) for k, v in original._modules.items()}
        copied.training = False
        return copied

    return twin(module)
