"""Discriminators for the GAN losses: a plain patch discriminator, or a projected one on frozen DINO.

The projected discriminator (what TinySR's release uses) reads the image tokens of a frozen DINO
ViT-S/16 after blocks 2, 5, 8 and 11 and puts a small trainable head on each. The ViT is our own
module in DINO's key layout (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.N.{norm1,
attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``); its sizes are read from the weights
file, which must be local (e.g. ``dino_deitsmall16_pretrain.pth`` from the DINO release).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from tinysr_cli.errors import TinySRError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DISCRIMINATORS = ("patch", "projected")


class PatchDiscriminator(nn.Module):
    """PatchGAN: strided 4x4 convs with spectral norm; image in [-1, 1] -> logits [B, h*w]."""

    def __init__(self, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        modules: list[nn.Module] = [spectral_norm(nn.Conv2d(3, channels, 4, 2, 1)), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            wider = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            modules += [spectral_norm(nn.Conv2d(width, wider, 4, stride, 1)), nn.LeakyReLU(0.2)]
            width = wider
        modules.append(spectral_norm(nn.Conv2d(width, 1, 4, 1, 1)))
        self.net = nn.Sequential(*modules)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image).flatten(1)


# ----------------------------------------------------------------------------- DINO ViT


@dataclass(frozen=True)
class ViTConfig:
    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    image_size: int = 224
    mlp_ratio: int = 4


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _ViTBlock(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, config.num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, dim * config.mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, config.embed_dim, config.patch_size, config.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoViT(nn.Module):
    """A DINO-style ViT; ``features`` returns the tokens [B, 1 + N, D] after the requested blocks."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        tokens = (config.image_size // config.patch_size) ** 2
        self.patch_embed = _PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + tokens, config.embed_dim))
        self.blocks = nn.ModuleList(_ViTBlock(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.embed_dim, eps=1e-6)

    def features(self, image: torch.Tensor, blocks: Sequence[int]) -> list[torch.Tensor]:
        x = self.patch_embed(image)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1) + self.pos_embed.to(x.dtype)
        wanted, out = set(blocks), []
        for index, block in enumerate(self.blocks[: max(blocks) + 1]):
            x = block(x)
            if index in wanted:
                out.append(x)
        return out


def _canonical_dino_state(state: dict) -> dict[str, torch.Tensor]:
    """DINO checkpoints come bare, or under ``teacher``/``student``/``model`` with ``module.``/``backbone.`` prefixes."""
    for key in ("teacher", "student", "model", "state_dict"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
            break
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        if key.startswith("head"):  # DINO's projection head is not part of the backbone
            continue
        out[key] = value
    return out


def load_dino_vit(path: Path | None, num_heads: int | None = None) -> DinoViT:
    """A frozen DINO ViT from a local ``.pth`` (read with weights_only) or ``.safetensors`` file."""
    if path is None or not Path(path).is_file():
        raise TinySRError(
            f"the projected discriminator needs DINO ViT weights, and {path or 'no file'} was given",
            hint='download dino_deitsmall16_pretrain.pth (DINO release) and set [discriminator] weights, or use type = "patch"',
        )
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(path)
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable or pickled with objects
        raise TinySRError(f"{path}: cannot read the DINO weights ({exc})") from None
    state = _canonical_dino_state(raw)
    try:
        patch = state["patch_embed.proj.weight"]
        dim, patch_size = patch.shape[0], patch.shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        grid = round((state["pos_embed"].shape[1] - 1) ** 0.5)
        mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] // dim
    except (KeyError, ValueError) as exc:
        raise TinySRError(f"{path}: not a DINO ViT state dict (missing {exc})") from None
    config = ViTConfig(patch_size, dim, depth, num_heads or max(1, dim // 64), grid * patch_size, mlp_ratio)
    model = DinoViT(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise TinySRError(f"{path}: DINO weights do not fit a ViT (missing {missing[:2]}, unexpected {unexpected[:2]})")
    return model.eval().requires_grad_(False)


class _TokenHead(nn.Module):
    """Per-token logits from one block's tokens: 1x1, local conv over the token sequence, 1x1."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            spectral_norm(nn.Conv1d(dim, dim, 1)),
            nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv1d(dim, dim, 3, padding=1, padding_mode="circular")),
            nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv1d(dim, 1, 1)),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens.transpose(1, 2)).flatten(1)


class ProjectedDiscriminator(nn.Module):
    """Frozen ViT features after ``blocks`` -> one trainable head each -> concatenated logits."""

    def __init__(self, backbone: DinoViT, blocks: Sequence[int]) -> None:
        super().__init__()
        if not blocks or max(blocks) >= backbone.config.depth or min(blocks) < 0:
            raise TinySRError(f"discriminator blocks {list(blocks)} must lie within the ViT's {backbone.config.depth} blocks")
        self.backbone = backbone.requires_grad_(False)
        self.blocks = tuple(blocks)
        self.heads = nn.ModuleList(_TokenHead(backbone.config.embed_dim) for _ in self.blocks)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> ProjectedDiscriminator:
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        size = self.backbone.config.image_size
        x = ((image + 1) / 2 - self.mean) / self.std
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        features = self.backbone.features(x, self.blocks)
        return torch.cat([head(tokens) for head, tokens in zip(self.heads, features)], dim=1)


@dataclass(frozen=True)
class DiscriminatorSpec:
    """The ``[discriminator]`` table of a recipe."""

    type: str = "patch"
    channels: int = 64  # patch
    layers: int = 3  # patch
    weights: Path | None = None  # projected: DINO ViT file
    blocks: tuple[int, ...] = (2, 5, 8, 11)  # projected
    num_heads: int | None = None  # projected: default embed_dim // 64 (6 for ViT-S)


def build_discriminator(spec: DiscriminatorSpec) -> nn.Module:
    if spec.type == "patch":
        return PatchDiscriminator(spec.channels, spec.layers)
    if spec.type == "projected":
        return ProjectedDiscriminator(load_dino_vit(spec.weights, spec.num_heads), spec.blocks)
    raise TinySRError(f"unknown discriminator type {spec.type!r}; choose one of {', '.join(DISCRIMINATORS)}")
