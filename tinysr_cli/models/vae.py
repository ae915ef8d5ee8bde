"""TinySR's tiny VAE: TAESD (diffusers ``AutoencoderTiny``) with optional depthwise-separable convs.

The module layout mirrors ``AutoencoderTiny`` (``encoder.layers.N`` / ``decoder.layers.N``) so that
state dicts map one to one; a separable conv stores ``depthwise.weight`` and ``pointwise.{weight,bias}``
where a plain conv stores ``weight`` and ``bias``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class VAEConfig:
    image_channels: int = 3
    latent_channels: int = 16
    encoder_channels: tuple[int, ...] = (64, 64, 64, 64)
    encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    decoder_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    encoder_separable: bool = True
    decoder_separable: bool = True
    scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        for side in ("encoder", "decoder"):
            if len(getattr(self, f"{side}_channels")) != len(getattr(self, f"{side}_blocks")):
                raise ValueError(f"{side}_channels and {side}_blocks must have the same length")
        # JSON round trips turn tuples into lists; keep the config hashable and comparable.
        for name in ("encoder_channels", "encoder_blocks", "decoder_channels", "decoder_blocks"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.encoder_blocks) - 1)

    def to_dict(self) -> dict:
        return asdict(self)


class SeparableConv2d(nn.Module):
    """Depthwise kxk conv (no bias) followed by a 1x1 pointwise conv."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding: int = 0, bias: bool = True):
        super().__init__()
        self.depthwise = nn.Conv2d(in_ch, in_ch, kernel_size, stride, padding, groups=in_ch, bias=False)
        self.pointwise = nn.Conv2d(in_ch, out_ch, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


def _conv(separable: bool, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, bias: bool = True) -> nn.Module:
    cls = SeparableConv2d if separable else nn.Conv2d
    return cls(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias)


class ResBlock(nn.Module):
    """conv-ReLU-conv-ReLU-conv plus skip, then ReLU (TAESD's block)."""

    def __init__(self, in_ch: int, out_ch: int, separable: bool) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv(separable, in_ch, out_ch),
            nn.ReLU(),
            _conv(separable, out_ch, out_ch),
            nn.ReLU(),
            _conv(separable, out_ch, out_ch),
        )
        self.skip = _conv(separable, in_ch, out_ch, kernel_size=1, bias=False) if in_ch != out_ch else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class Encoder(nn.Module):
    """Image in [-1, 1], [B, 3, H, W] -> unscaled latent [B, C, H/8, W/8]."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        sep, layers = config.encoder_separable, []
        for i, (channels, blocks) in enumerate(zip(config.encoder_channels, config.encoder_blocks)):
            if i == 0:
                layers.append(_conv(sep, config.image_channels, channels))
            else:
                layers.append(_conv(sep, config.encoder_channels[i - 1], channels, stride=2, bias=False))
            layers.extend(ResBlock(channels, channels, sep) for _ in range(blocks))
        layers.append(_conv(sep, config.encoder_channels[-1], config.latent_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.layers(image.add(1).div(2))


class Decoder(nn.Module):
    """Unscaled latent [B, C, h, w] -> image in about [-1, 1], [B, 3, 8h, 8w]."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        sep, chans = config.decoder_separable, config.decoder_channels
        layers: list[nn.Module] = [_conv(sep, config.latent_channels, chans[0]), nn.ReLU()]
        for i, (channels, blocks) in enumerate(zip(chans, config.decoder_blocks)):
            last = i == len(chans) - 1
            layers.extend(ResBlock(channels, channels, sep) for _ in range(blocks))
            if not last:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            layers.append(_conv(sep, channels, config.image_channels if last else chans[i + 1], bias=last))
        self.layers = nn.Sequential(*layers)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.tanh(latent / 3) * 3).mul(2).sub(1)


class TinyVAE(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """[-1, 1] image -> scaled latent (``E(x) * scaling_factor``)."""
        return self.encoder(image) * self.config.scaling_factor

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> image in about [-1, 1] (``D(z / scaling_factor)``)."""
        return self.decoder(latent / self.config.scaling_factor)


def _receptive_radius(layers: nn.Sequential) -> float:
    """Input-pixel radius over which one output pixel depends, walking the layers in order.

    Distances are in units of the module's input grid; a stride-s conv multiplies the cost of
    every later conv by s and an x2 upsample halves it.
    """
    radius, step = 0.0, 1.0
    for module in layers:
        if isinstance(module, ResBlock):
            radius += _receptive_radius(module.conv) * step
            continue
        if isinstance(module, nn.Upsample):
            step /= module.scale_factor
            continue
        conv = module.depthwise if isinstance(module, SeparableConv2d) else module
        if isinstance(conv, nn.Conv2d):
            radius += (conv.kernel_size[0] // 2) * step
            step *= conv.stride[0]
    return radius


def encoder_receptive_radius(encoder: Encoder) -> float:
    """Radius, in input pixels, of one latent pixel's receptive field."""
    return _receptive_radius(encoder.layers)


def decoder_receptive_radius(decoder: Decoder) -> float:
    """Radius, in latent pixels, of one output pixel's receptive field."""
    return _receptive_radius(decoder.layers)
