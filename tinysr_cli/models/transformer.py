"""The TinySR backbone: SD3's MM-DiT reduced to its image stream, run once at t = 1000.

With the timestep and the pooled prompt fixed, every adaLN modulation vector of SD3 is a constant.
``ModulatedTransformer`` keeps them as explicit parameters (the form training and the official
release use); ``TinySRTransformer`` is the run-time form, in which the constants are folded into the
linear layers so that each block is a plain pre-LayerNorm transformer block. ``fold_modulation``
maps the first onto the second.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS = 1e-6


@dataclass(frozen=True)
class TransformerConfig:
    num_layers: int = 12
    hidden_size: int = 1536
    num_heads: int = 24
    mlp_ratio: int = 4
    patch_size: int = 2
    latent_channels: int = 16
    # Side of the positional-embedding grid, in patches: 32 patches = a 64x64 latent = 512 px.
    pos_grid: int = 32

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")

    @property
    def max_latent_size(self) -> int:
        """Largest latent tile side the positional table covers."""
        return self.pos_grid * self.patch_size

    def to_dict(self) -> dict:
        return asdict(self)


def sincos_pos_embed(
    hidden_size: int, grid: int, sd3_grid: int = 192, sd3_base_size: int = 64
) -> torch.Tensor:
    """SD3's 2-D sin-cos positional table, centre-cropped to ``grid`` x ``grid`` patches.

    Equal to ``crop_pos_embed`` of SD3's full ``sd3_grid`` table (coordinates divided by
    ``sd3_grid / sd3_base_size``), computed directly. Shape [1, grid*grid, hidden], rows slowest.
    """
    offset = (sd3_grid - grid) // 2
    coords = (torch.arange(grid, dtype=torch.float64) + offset) / (sd3_grid / sd3_base_size)
    grid_h, grid_w = torch.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(hidden_size // 4, dtype=torch.float64) / (hidden_size / 4.0))

    def axis(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    # SD3 puts the width coordinate first.
    return torch.cat([axis(grid_w), axis(grid_h)], dim=1).float().unsqueeze(0)


def crop_pos_embed(table: torch.Tensor, grid: int, rows: int, cols: int) -> torch.Tensor:
    """Centre crop of a square positional table, the way SD3 crops its 192x192 table.

    ``table`` is [1, grid*grid, D]; returns [1, rows*cols, D].
    """
    if rows > grid or cols > grid:
        raise ValueError(f"a {rows}x{cols} patch grid exceeds the {grid}x{grid} positional table")
    top, left = (grid - rows) // 2, (grid - cols) // 2
    spatial = table.reshape(1, grid, grid, -1)[:, top : top + rows, left : left + cols, :]
    return spatial.reshape(1, rows * cols, -1)


class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, N, head_dim]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class FeedForward(nn.Module):
    def __init__(self, hidden_size: int, inner_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, inner_size)
        self.fc2 = nn.Linear(inner_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=LAYER_NORM_EPS)


class Block(nn.Module):
    """Pre-LN transformer block; ``modulation`` [6, D] is SD3's adaLN-Zero, or None when folded."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.attn = Attention(config.hidden_size, config.num_heads)
        self.mlp = FeedForward(config.hidden_size, config.hidden_size * config.mlp_ratio)

    def forward(self, h: torch.Tensor, modulation: torch.Tensor | None = None) -> torch.Tensor:
        if modulation is None:
            h = h + self.attn(_layer_norm(h))
            return h + self.mlp(_layer_norm(h))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        h = h + gate_msa * self.attn(_layer_norm(h) * (1 + scale_msa) + shift_msa)
        return h + gate_mlp * self.mlp(_layer_norm(h) * (1 + scale_mlp) + shift_mlp)


class _Backbone(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        d, p, c = config.hidden_size, config.patch_size, config.latent_channels
        self.patch_embed = nn.Conv2d(c, d, kernel_size=p, stride=p)
        self.register_buffer("pos_embed", sincos_pos_embed(d, config.pos_grid))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.proj_out = nn.Linear(d, p * p * c)

    def _embed(self, latent: torch.Tensor) -> torch.Tensor:
        p = self.config.patch_size
        height, width = latent.shape[-2:]
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not a multiple of the patch size {p}")
        tokens = self.patch_embed(latent).flatten(2).transpose(1, 2)  # [B, N, D]
        pos = crop_pos_embed(self.pos_embed, self.config.pos_grid, height // p, width // p)
        return tokens + pos.to(tokens.dtype)

    def _unpatchify(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        p, c = self.config.patch_size, self.config.latent_channels
        rows, cols = height // p, width // p
        x = tokens.reshape(tokens.shape[0], rows, cols, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(tokens.shape[0], c, height, width)


class TinySRTransformer(_Backbone):
    """Run-time backbone: latent [B, C, H, W] -> velocity [B, C, H, W], modulation folded in."""

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        h = self._embed(latent)
        for block in self.blocks:
            h = block(h)
        return self._unpatchify(self.proj_out(_layer_norm(h)), *latent.shape[-2:])


class ModulatedTransformer(_Backbone):
    """The same backbone with SD3's constant adaLN modulation kept as parameters.

    ``modulation`` [L, 6, D] holds (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp)
    per block; ``final_modulation`` [2, D] holds (scale, shift) of the output norm.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        d = config.hidden_size
        self.modulation = nn.Parameter(torch.zeros(config.num_layers, 6, d))
        self.final_modulation = nn.Parameter(torch.zeros(2, d))

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        h = self._embed(latent)
        for block, modulation in zip(self.blocks, self.modulation):
            h = block(h, modulation)
        scale, shift = self.final_modulation
        h = _layer_norm(h) * (1 + scale) + shift
        return self._unpatchify(self.proj_out(h), *latent.shape[-2:])


def _fold_input(linear: nn.Linear, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """W((1+s)n + t) + b  ==  (W diag(1+s)) n + (W t + b)."""
    weight = linear.weight.double()
    linear.bias.copy_((weight @ shift.double() + linear.bias.double()).to(linear.bias.dtype))
    linear.weight.copy_((weight * (1 + scale.double())[None, :]).to(linear.weight.dtype))


def _fold_output(linear: nn.Linear, gate: torch.Tensor) -> None:
    """g * (W a + b)  ==  (diag(g) W) a + g b."""
    gate = gate.double()
    linear.weight.copy_((linear.weight.double() * gate[:, None]).to(linear.weight.dtype))
    linear.bias.copy_((linear.bias.double() * gate).to(linear.bias.dtype))


@torch.no_grad()
def fold_modulation(modulated: ModulatedTransformer) -> TinySRTransformer:
    """Fold the constant modulation into the linear layers; computed in float64, exact up to rounding."""
    folded = TinySRTransformer(modulated.config).to(modulated.pos_embed.device)
    state = {k: v for k, v in modulated.state_dict().items() if "modulation" not in k}
    folded.load_state_dict(state)
    folded.to(modulated.proj_out.weight.dtype)
    for block, modulation in zip(folded.blocks, modulated.modulation):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        _fold_input(block.attn.qkv, scale_msa, shift_msa)
        _fold_output(block.attn.proj, gate_msa)
        _fold_input(block.mlp.fc1, scale_mlp, shift_mlp)
        _fold_output(block.mlp.fc2, gate_mlp)
    scale, shift = modulated.final_modulation
    _fold_input(folded.proj_out, scale, shift)
    return folded
