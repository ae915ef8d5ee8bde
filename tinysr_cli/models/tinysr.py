"""The whole TinySR model: tiny VAE + one-step backbone, with named configurations."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tinysr_cli.models.transformer import TinySRTransformer, TransformerConfig
from tinysr_cli.models.vae import TinyVAE, VAEConfig

UPSCALE = 4


@dataclass(frozen=True)
class TinySRConfig:
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)

    def to_dict(self) -> dict:
        return {"transformer": self.transformer.to_dict(), "vae": self.vae.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> TinySRConfig:
        return cls(TransformerConfig(**data["transformer"]), VAEConfig(**data["vae"]))

    @property
    def min_lr_side(self) -> int:
        """Smallest LR side whose x4 latent fills one backbone tile (128 px for the release)."""
        return self.transformer.max_latent_size * self.vae.downscale // UPSCALE


NAMED_CONFIGS: dict[str, TinySRConfig] = {
    # The released architecture: 12 x 1536 backbone, 64-channel separable TAESD.
    "full": TinySRConfig(),
    # A few-MB stand-in with the same structure, for tests and plumbing demos.
    "tiny": TinySRConfig(
        TransformerConfig(num_layers=2, hidden_size=64, num_heads=4, pos_grid=32),
        VAEConfig(encoder_channels=(16, 16, 16, 16), decoder_channels=(16, 16, 16, 16), encoder_blocks=(1, 1, 1, 1), decoder_blocks=(1, 1, 1, 1)),
    ),
}


class TinySR(nn.Module):
    """LR-bicubic image in [-1, 1] -> restored image in [-1, 1]; the engine adds tiling around it."""

    def __init__(self, config: TinySRConfig) -> None:
        super().__init__()
        self.config = config
        self.vae = TinyVAE(config.vae)
        self.transformer = TinySRTransformer(config.transformer)

    def restore_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """One step at sigma = 1: the restored latent is ``z - v``."""
        return latent - self.transformer(latent)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Untiled reference path; only for latents that fit one backbone tile."""
        return self.vae.decode(self.restore_latent(self.vae.encode(image))).clamp(-1, 1)
