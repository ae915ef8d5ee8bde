"""SD3 (a diffusers ``SD3Transformer2DModel`` state dict) -> TinySR's ``ModulatedTransformer``: the maths, once.

Used by the official-release importer (``weights.official``) and by training's student builder
and teacher loader: LoRA pairs read and merged into the base weights (``W += scale * B @ A`` in
float32), the kept blocks' image stream mapped onto our layout (q/k/v fused, the positional table
centre-cropped), and the constant adaLN modulation computed at a fixed timestep and pooled prompt.
The conditioning MLPs and the modulation vectors are computed in float64 except the sinusoidal
timestep features, which follow the float32 definition the model was trained with (their float32
rounding is part of the trained function).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from tinysr_cli.errors import WeightsError
from tinysr_cli.models.transformer import ModulatedTransformer, TransformerConfig, crop_pos_embed, sincos_pos_embed

SD3_TIMESTEP = 1000.0  # TSD-SR's one step, and TinySR's
TIMESTEP_FREQ_CHANNELS = 256

# Keys of SD3's text stream (or the official cache buffers) that the student never runs.
_UNUSED_KEY = re.compile(
    r"^(context_embedder\.|scale$|shift$)"
    r"|^transformer_blocks\.\d+\.(norm1_context|ff_context|attn\.(add_[qkv]_proj|to_add_out|norm_added_[qk]))\."
)


def take(state: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], source: Path | str) -> torch.Tensor:
    """Remove ``key`` from ``state``, check its shape, return it as float32."""
    if key not in state:
        raise WeightsError(f"{source}: missing tensor {key!r}")
    tensor = state.pop(key)
    if tuple(tensor.shape) != shape:
        raise WeightsError(f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {shape}")
    return tensor.float()


# ---------------------------------------------------------------------------------------- LoRA


def lora_pairs(lora: dict[str, torch.Tensor], source: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name (in the base checkpoint's naming) -> (A, B)."""
    pattern = re.compile(r"^(?:base_model\.model\.)?(?:transformer\.|vae\.|unet\.)?(.+)\.lora_([AB])(?:\.default)?\.weight$")
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in lora.items():
        match = pattern.match(key)
        if match is None:
            raise WeightsError(f"{source}: unexpected key {key!r} (expected '<module>.lora_A.weight' / '.lora_B.weight')")
        halves.setdefault(match.group(1), {})[match.group(2)] = tensor
    pairs = {}
    for module, half in halves.items():
        if set(half) != {"A", "B"}:
            missing = "lora_B" if "A" in half else "lora_A"
            raise WeightsError(f"{source}: {module!r} has no {missing} matrix")
        pairs[module] = (half["A"], half["B"])
    return pairs


def merge_lora(
    state: dict[str, torch.Tensor], pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float, base: Path | str, source: Path
) -> int:
    """W += scale * B @ A for every pair (Linear, or Conv2d with a 1x1 B), in float32, in place."""
    rank = None
    for module, (a, b) in pairs.items():
        key = f"{module}.weight"
        if key not in state:
            raise WeightsError(f"{source}: LoRA targets {module!r}, which {base} does not contain")
        weight = state[key]
        r = a.shape[0]
        rank = rank or r
        if r != rank or b.shape[1] != r:
            raise WeightsError(f"{source}: {module!r} has rank {r} (A) / {b.shape[1]} (B), expected {rank}")
        if weight.ndim == 2:
            fits = a.ndim == 2 and b.ndim == 2 and a.shape[1] == weight.shape[1] and b.shape[0] == weight.shape[0]
        else:
            fits = (
                a.ndim == 4 and b.ndim == 4 and tuple(b.shape[2:]) == (1, 1)
                and tuple(a.shape[1:]) == tuple(weight.shape[1:]) and b.shape[0] == weight.shape[0]
            )
        if not fits:
            raise WeightsError(
                f"{source}: LoRA for {module!r} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                f"which do not fit its weight {tuple(weight.shape)}"
            )
        # A conv LoRA is A (k x k, the layer's stride) then B (1x1): together one k x k conv of B @ A.
        delta = b.float().flatten(1) @ a.float().flatten(1)
        weight.add_(delta.reshape(weight.shape), alpha=scale)
    return len(pairs)


# ---------------------------------------------------------------------------------- modulation


def timestep_features(timestep: float, channels: int = TIMESTEP_FREQ_CHANNELS) -> torch.Tensor:
    """SD3's sinusoidal timestep features [1, channels]: cos half first, then sin (float32)."""
    half = channels // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32) / half
    angles = torch.tensor([timestep], dtype=torch.float32)[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def _mlp(x: torch.Tensor, state: dict[str, torch.Tensor], prefix: str, dims: tuple[int, int, int], source: Path | str) -> torch.Tensor:
    """linear_1 -> SiLU -> linear_2, in float64."""
    d_in, d_hidden, d_out = dims
    w1 = take(state, f"{prefix}.linear_1.weight", (d_hidden, d_in), source).double()
    b1 = take(state, f"{prefix}.linear_1.bias", (d_hidden,), source).double()
    w2 = take(state, f"{prefix}.linear_2.weight", (d_out, d_hidden), source).double()
    b2 = take(state, f"{prefix}.linear_2.bias", (d_out,), source).double()
    return F.linear(F.silu(F.linear(x.double(), w1, b1)), w2, b2)


def conditioning(state: dict[str, torch.Tensor], pooled: torch.Tensor, hidden: int, source: Path | str, timestep: float = SD3_TIMESTEP) -> torch.Tensor:
    """SD3's ``temb`` at ``timestep``: timestep MLP + pooled-text MLP, [1, hidden] float64 (pops its tensors)."""
    freq = state.get("time_text_embed.timestep_embedder.linear_1.weight")
    channels = freq.shape[1] if freq is not None and freq.ndim == 2 else TIMESTEP_FREQ_CHANNELS
    time = _mlp(timestep_features(timestep, channels), state, "time_text_embed.timestep_embedder", (channels, hidden, hidden), source)
    text = _mlp(pooled, state, "time_text_embed.text_embedder", (pooled.shape[1], hidden, hidden), source)
    return time + text


def modulation_vectors(state: dict[str, torch.Tensor], key: str, temb: torch.Tensor, chunks: int, source: Path | str) -> torch.Tensor:
    """``Linear(SiLU(temb))`` split into ``chunks`` vectors: [chunks, hidden]."""
    hidden = temb.shape[1]
    weight = take(state, f"{key}.weight", (chunks * hidden, hidden), source).double()
    bias = take(state, f"{key}.bias", (chunks * hidden,), source).double()
    return F.linear(F.silu(temb), weight, bias).reshape(chunks, hidden)


# -------------------------------------------------------------------------------- backbone


def positional_table(state: dict[str, torch.Tensor], hidden: int, source: Path | str, pos_grid: int) -> tuple[torch.Tensor, str]:
    """(table [1, pos_grid**2, hidden], where it came from).

    The ``pos_grid`` x ``pos_grid`` centre of the checkpoint's square table (32: SD3's crop for a
    64x64 latent). A checkpoint without a table gets SD3's own sin-cos table, cropped the same way
    (the official code loads a cached copy of it from its repository rather than from the weights).
    """
    if "pos_embed.pos_embed" not in state:
        return sincos_pos_embed(hidden, pos_grid), f"SD3's sin-cos table (192 grid, base 64), centre {pos_grid}x{pos_grid}: the checkpoint has none"
    table = state.pop("pos_embed.pos_embed")
    count = table.shape[1] if table.ndim == 3 else 0
    grid = math.isqrt(count)
    if table.ndim != 3 or table.shape[0] != 1 or table.shape[2] != hidden or grid * grid != count or grid < pos_grid:
        raise WeightsError(
            f"{source}: 'pos_embed.pos_embed' has shape {tuple(table.shape)}, expected [1, G*G, {hidden}] with G >= {pos_grid}"
        )
    cropped = crop_pos_embed(table.float(), grid, pos_grid, pos_grid)
    return cropped, f"centre {pos_grid}x{pos_grid} of the checkpoint's {grid}x{grid} table "


def sd3_to_modulated(
    state: dict[str, torch.Tensor],
    config: TransformerConfig,
    pooled: torch.Tensor,
    source: Path | str,
    *,
    kept_layers: Sequence[int] | None = None,
    timestep: float = SD3_TIMESTEP,
) -> tuple[ModulatedTransformer, str]:
    """Map a (LoRA-merged) diffusers SD3 state onto a float32 ``ModulatedTransformer``.

    ``kept_layers`` (default: all ``config.num_layers``) picks the teacher blocks that become blocks
    0, 1, ... (the others are dropped); the modulation is computed at ``timestep`` with ``pooled``;
    the positional table is cropped to ``config.pos_grid``. ``state`` is consumed: every tensor is
    popped, and one that the model does not use is an error. Returns the model and where its
    positional table came from.
    """
    d, p, c = config.hidden_size, config.patch_size, config.latent_channels
    inner = d * config.mlp_ratio
    kept = list(range(config.num_layers)) if kept_layers is None else list(kept_layers)
    if len(kept) != config.num_layers:
        raise ValueError(f"{len(kept)} kept layers for a {config.num_layers}-block config")
    dropped = re.compile(rf"^transformer_blocks\.(?!({'|'.join(map(str, kept))})\.)\d+\.")
    for key in [k for k in state if dropped.match(k)]:
        del state[key]
    temb = conditioning(state, pooled, d, source, timestep)
    table, table_origin = positional_table(state, d, source, config.pos_grid)
    ours: dict[str, torch.Tensor] = {
        "patch_embed.weight": take(state, "pos_embed.proj.weight", (d, c, p, p), source),
        "patch_embed.bias": take(state, "pos_embed.proj.bias", (d,), source),
        "pos_embed": table,
        "proj_out.weight": take(state, "proj_out.weight", (p * p * c, d), source),
        "proj_out.bias": take(state, "proj_out.bias", (p * p * c,), source),
    }
    modulation = []
    for i, teacher_block in enumerate(kept):
        old, new = f"transformer_blocks.{teacher_block}", f"blocks.{i}"
        for kind, shape in (("weight", (d, d)), ("bias", (d,))):
            ours[f"{new}.attn.qkv.{kind}"] = torch.cat([take(state, f"{old}.attn.to_{x}.{kind}", shape, source) for x in "qkv"])
            ours[f"{new}.attn.proj.{kind}"] = take(state, f"{old}.attn.to_out.0.{kind}", shape, source)
        ours[f"{new}.mlp.fc1.weight"] = take(state, f"{old}.ff.net.0.proj.weight", (inner, d), source)
        ours[f"{new}.mlp.fc1.bias"] = take(state, f"{old}.ff.net.0.proj.bias", (inner,), source)
        ours[f"{new}.mlp.fc2.weight"] = take(state, f"{old}.ff.net.2.weight", (d, inner), source)
        ours[f"{new}.mlp.fc2.bias"] = take(state, f"{old}.ff.net.2.bias", (d,), source)
        # (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp)
        modulation.append(modulation_vectors(state, f"{old}.norm1.linear", temb, 6, source))
    ours["modulation"] = torch.stack(modulation).float()
    ours["final_modulation"] = modulation_vectors(state, "norm_out.linear", temb, 2, source).float()  # (scale, shift)
    leftover = sorted(k for k in state if not _UNUSED_KEY.search(k))
    if leftover:
        raise WeightsError(f"{source}: unexpected tensor {leftover[0]!r} ({len(leftover)} unexpected in all)")
    with torch.device("meta"):
        model = ModulatedTransformer(config)
    model.load_state_dict(ours, assign=True)
    return model, table_origin
