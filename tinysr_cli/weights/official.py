"""Convert the authors' TinySR release into tinysr's single-file format.

The release is a folder (see ``ReleaseLayout``): a diffusers ``save_pretrained`` backbone that still
holds SD3's conditioning modules, a PEFT LoRA for it (applied unmerged by the official code), the
tiny VAE, and the pooled prompt embedding shipped with TSD-SR. The official code evaluates the
conditioning once, at t = 1000 with that embedding, and caches the modulation; we do the same
offline and go one step further: the LoRA is merged, q/k/v are fused, and the constant modulation
is folded into the linear layers (``fold_modulation``). Weights are read into float32; the LoRA is
merged in float32, the conditioning MLPs and the modulation vectors are computed in float64 except
the sinusoidal timestep features, which follow the float32 definition the model was trained with
(their float32 rounding is part of the trained function), and the fold is computed in float64.

Only safetensors and ``torch.load(weights_only=True)`` are used to read files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tinysr_cli import __version__
from tinysr_cli.errors import WeightsError
from tinysr_cli.models.tinysr import TinySR, TinySRConfig
from tinysr_cli.models.transformer import (
    ModulatedTransformer,
    TransformerConfig,
    crop_pos_embed,
    fold_modulation,
    sincos_pos_embed,
)
from tinysr_cli.models.vae import VAEConfig
from tinysr_cli.weights.format import save_weights

OFFICIAL_TIMESTEP = 1000.0
# The official backbone only accepts 64x64 latent tiles: a 32x32 grid of 2x2 patches.
OFFICIAL_POS_GRID = 32
TIMESTEP_FREQ_CHANNELS = 256
WEIGHTS_STEM = "diffusion_pytorch_model"

# Keys of SD3's text stream (or the official cache buffers) that the student never runs.
_UNUSED_KEY = re.compile(
    r"^(context_embedder\.|scale$|shift$)"
    r"|^transformer_blocks\.\d+\.(norm1_context|ff_context|attn\.(add_[qkv]_proj|to_add_out|norm_added_[qk]))\."
)

ProgressCallback = Callable[[str], None]


@dataclass(frozen=True)
class ReleaseLayout:
    """Where each piece of the release lives; relative paths are taken under the release folder."""

    transformer: Path = Path("tinybackbone/prune-12-merge-tinysr/transformer")
    lora: Path = Path("tinysr/transformer.safetensors")
    vae: Path = Path("vae/separable")
    pooled_embeds: Path = Path("default/pool_embeds.pt")

    def under(self, root: Path) -> ReleaseLayout:
        return ReleaseLayout(*(root / Path(p) for p in (self.transformer, self.lora, self.vae, self.pooled_embeds)))


class _SourceFiles:
    """Reads the release's files and remembers the sha256 of each one it read."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.digests: dict[str, str] = {}

    def _record(self, path: Path) -> None:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        try:
            name = str(path.resolve().relative_to(self.root.resolve()))
        except ValueError:
            name = str(path.resolve())
        self.digests[name] = digest.hexdigest()

    def json(self, path: Path) -> dict:
        if not path.is_file():
            raise WeightsError(f"{path}: file not found", hint="check the release folder layout or pass the path explicitly")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WeightsError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise WeightsError(f"{path}: expected a JSON object")
        self._record(path)
        return data

    def tensors(self, path: Path) -> dict[str, torch.Tensor]:
        """All tensors of a safetensors file, or of a pickled state dict read with ``weights_only``."""
        if not path.is_file():
            raise WeightsError(f"{path}: file not found", hint="check the release folder layout or pass the path explicitly")
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                state = load_file(path)
            except (SafetensorError, OSError) as exc:
                raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from None
        else:
            state = self.pickled(path)
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise WeightsError(f"{path}: expected a state dict of tensors")
        self._record(path)
        return dict(state)

    def pickled(self, path: Path) -> object:
        """``torch.load`` with ``weights_only=True``: plain tensors and containers, never code."""
        if not path.is_file():
            raise WeightsError(f"{path}: file not found", hint="pass the pooled embedding with --pooled-embeds")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError for forbidden globals, RuntimeError for corrupt archives
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WeightsError(f"{path}: cannot be read with weights_only=True ({first_line})") from None
        self._record(path)
        return obj


def _diffusers_weights(files: _SourceFiles, folder: Path) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """(config, state dict, weights path) of a diffusers ``save_pretrained`` folder."""
    if not folder.is_dir():
        raise WeightsError(f"{folder}: folder not found", hint="check the release folder layout or pass the path explicitly")
    config = files.json(folder / "config.json")
    index = folder / f"{WEIGHTS_STEM}.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(files.json(index).get("weight_map", {}).values()))
        if not shards:
            raise WeightsError(f"{index}: empty 'weight_map'")
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(files.tensors(folder / shard))
        return config, state, index
    candidates = sorted(folder.glob(f"{WEIGHTS_STEM}*.safetensors")) or sorted(folder.glob(f"{WEIGHTS_STEM}*.bin"))
    if len(candidates) != 1:
        found = ", ".join(p.name for p in candidates) or "none"
        raise WeightsError(f"{folder}: expected one {WEIGHTS_STEM}.safetensors (or .bin), found {found}")
    return config, files.tensors(candidates[0]), candidates[0]


def _take(state: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], source: Path) -> torch.Tensor:
    """Remove ``key`` from ``state``, check its shape, return it as float32."""
    if key not in state:
        raise WeightsError(f"{source}: missing tensor {key!r}")
    tensor = state.pop(key)
    if tuple(tensor.shape) != shape:
        raise WeightsError(f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {shape}")
    return tensor.float()


# ---------------------------------------------------------------------------------------- LoRA


def _lora_scale(files: _SourceFiles, lora_path: Path, rank: int, alpha: float | None) -> tuple[float, float]:
    """(alpha, scale). Explicit alpha wins, then a PEFT ``adapter_config.json`` beside the file,
    then alpha = rank (scale 1), which is what the official script configures."""
    use_rslora = False
    config_path = lora_path.parent / "adapter_config.json"
    if alpha is None and config_path.is_file():
        config = files.json(config_path)
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            raise WeightsError(f"{config_path}: per-module rank_pattern/alpha_pattern is not supported")
        if "r" in config and int(config["r"]) != rank:
            raise WeightsError(f"{config_path}: r = {config['r']} but {lora_path} holds rank-{rank} matrices")
        alpha = float(config.get("lora_alpha", rank))
        use_rslora = bool(config.get("use_rslora", False))
    alpha = float(rank) if alpha is None else float(alpha)
    return alpha, alpha / (math.sqrt(rank) if use_rslora else rank)


def _lora_pairs(lora: dict[str, torch.Tensor], source: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name (in the base checkpoint's naming) -> (A, B)."""
    pattern = re.compile(r"^(?:base_model\.model\.)?(?:transformer\.)?(.+)\.lora_([AB])(?:\.default)?\.weight$")
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


def _merge_lora(
    state: dict[str, torch.Tensor], pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float, base: Path, source: Path
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


def _mlp(x: torch.Tensor, state: dict[str, torch.Tensor], prefix: str, dims: tuple[int, int, int], source: Path) -> torch.Tensor:
    """linear_1 -> SiLU -> linear_2, in float64."""
    d_in, d_hidden, d_out = dims
    w1 = _take(state, f"{prefix}.linear_1.weight", (d_hidden, d_in), source).double()
    b1 = _take(state, f"{prefix}.linear_1.bias", (d_hidden,), source).double()
    w2 = _take(state, f"{prefix}.linear_2.weight", (d_out, d_hidden), source).double()
    b2 = _take(state, f"{prefix}.linear_2.bias", (d_out,), source).double()
    return F.linear(F.silu(F.linear(x.double(), w1, b1)), w2, b2)


def _conditioning(state: dict[str, torch.Tensor], pooled: torch.Tensor, hidden: int, source: Path) -> torch.Tensor:
    """SD3's ``temb`` at t = 1000: timestep MLP + pooled-text MLP, [1, hidden] float64."""
    freq = state.get("time_text_embed.timestep_embedder.linear_1.weight")
    channels = freq.shape[1] if freq is not None and freq.ndim == 2 else TIMESTEP_FREQ_CHANNELS
    time = _mlp(timestep_features(OFFICIAL_TIMESTEP, channels), state, "time_text_embed.timestep_embedder", (channels, hidden, hidden), source)
    text = _mlp(pooled, state, "time_text_embed.text_embedder", (pooled.shape[1], hidden, hidden), source)
    return time + text


def _modulation(state: dict[str, torch.Tensor], key: str, temb: torch.Tensor, chunks: int, source: Path) -> torch.Tensor:
    """``Linear(SiLU(temb))`` split into ``chunks`` vectors: [chunks, hidden]."""
    hidden = temb.shape[1]
    weight = _take(state, f"{key}.weight", (chunks * hidden, hidden), source).double()
    bias = _take(state, f"{key}.bias", (chunks * hidden,), source).double()
    return F.linear(F.silu(temb), weight, bias).reshape(chunks, hidden)


# -------------------------------------------------------------------------------- backbone


def _transformer_config(config: dict, state: dict[str, torch.Tensor], source: Path, config_path: Path) -> TransformerConfig:
    if "pos_embed.proj.weight" not in state:
        raise WeightsError(f"{source}: missing tensor 'pos_embed.proj.weight' (not a TinySR/SD3 backbone?)")
    hidden, channels, patch, _ = state["pos_embed.proj.weight"].shape
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}
    layers = len(blocks)
    if blocks != set(range(layers)):
        raise WeightsError(f"{source}: transformer block indices are not contiguous: {sorted(blocks)}")
    heads = config.get("num_attention_heads")
    head_dim = config.get("attention_head_dim")
    if not isinstance(heads, int) or not isinstance(head_dim, int) or heads * head_dim != hidden:
        raise WeightsError(
            f"{config_path}: num_attention_heads={heads} x attention_head_dim={head_dim} does not give the "
            f"hidden size {hidden} of {source}"
        )
    if config.get("num_layers", layers) != layers:
        raise WeightsError(f"{config_path}: num_layers={config['num_layers']}, but {source} holds {layers} blocks")
    if config.get("qk_norm"):
        raise WeightsError(f"{config_path}: qk_norm={config['qk_norm']!r} is not part of TinySR's backbone")
    ff_key = "transformer_blocks.0.ff.net.0.proj.weight"
    inner = state[ff_key].shape[0] if ff_key in state else 4 * hidden
    if inner % hidden:
        raise WeightsError(f"{source}: {ff_key} has {inner} outputs, not a multiple of the hidden size {hidden}")
    return TransformerConfig(
        num_layers=layers, hidden_size=hidden, num_heads=heads, mlp_ratio=inner // hidden,
        patch_size=patch, latent_channels=channels, pos_grid=OFFICIAL_POS_GRID,
    )


def _positional_table(state: dict[str, torch.Tensor], hidden: int, source: Path) -> tuple[torch.Tensor, str]:
    """(table [1, 1024, hidden], where it came from).

    The 32x32 centre of the checkpoint's square table: SD3's crop for a 64x64 latent. A checkpoint
    without a table gets SD3's own sin-cos table, cropped the same way (the official code loads a
    cached copy of it from its repository rather than from the weights).
    """
    if "pos_embed.pos_embed" not in state:
        return sincos_pos_embed(hidden, OFFICIAL_POS_GRID), "SD3's sin-cos table (192 grid, base 64), centre 32x32: the checkpoint has none"
    table = state.pop("pos_embed.pos_embed")
    count = table.shape[1] if table.ndim == 3 else 0
    grid = math.isqrt(count)
    if table.ndim != 3 or table.shape[0] != 1 or table.shape[2] != hidden or grid * grid != count or grid < OFFICIAL_POS_GRID:
        raise WeightsError(
            f"{source}: 'pos_embed.pos_embed' has shape {tuple(table.shape)}, expected [1, G*G, {hidden}] with G >= {OFFICIAL_POS_GRID}"
        )
    cropped = crop_pos_embed(table.float(), grid, OFFICIAL_POS_GRID, OFFICIAL_POS_GRID)
    return cropped, f"centre {OFFICIAL_POS_GRID}x{OFFICIAL_POS_GRID} of the checkpoint's {grid}x{grid} table (SD3's crop for a 64x64 latent)"


def _backbone(
    state: dict[str, torch.Tensor], config: TransformerConfig, pooled: torch.Tensor, source: Path
) -> tuple[ModulatedTransformer, str]:
    """Map the (LoRA-merged) diffusers state onto ``ModulatedTransformer`` and compute its modulation.

    Returns the model and where its positional table came from.
    """
    d, p, c = config.hidden_size, config.patch_size, config.latent_channels
    inner = d * config.mlp_ratio
    temb = _conditioning(state, pooled, d, source)
    table, table_origin = _positional_table(state, d, source)
    ours: dict[str, torch.Tensor] = {
        "patch_embed.weight": _take(state, "pos_embed.proj.weight", (d, c, p, p), source),
        "patch_embed.bias": _take(state, "pos_embed.proj.bias", (d,), source),
        "pos_embed": table,
        "proj_out.weight": _take(state, "proj_out.weight", (p * p * c, d), source),
        "proj_out.bias": _take(state, "proj_out.bias", (p * p * c,), source),
    }
    modulation = []
    for i in range(config.num_layers):
        old, new = f"transformer_blocks.{i}", f"blocks.{i}"
        for kind, shape in (("weight", (d, d)), ("bias", (d,))):
            ours[f"{new}.attn.qkv.{kind}"] = torch.cat([_take(state, f"{old}.attn.to_{x}.{kind}", shape, source) for x in "qkv"])
            ours[f"{new}.attn.proj.{kind}"] = _take(state, f"{old}.attn.to_out.0.{kind}", shape, source)
        ours[f"{new}.mlp.fc1.weight"] = _take(state, f"{old}.ff.net.0.proj.weight", (inner, d), source)
        ours[f"{new}.mlp.fc1.bias"] = _take(state, f"{old}.ff.net.0.proj.bias", (inner,), source)
        ours[f"{new}.mlp.fc2.weight"] = _take(state, f"{old}.ff.net.2.weight", (d, inner), source)
        ours[f"{new}.mlp.fc2.bias"] = _take(state, f"{old}.ff.net.2.bias", (d,), source)
        # (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp)
        modulation.append(_modulation(state, f"{old}.norm1.linear", temb, 6, source))
    ours["modulation"] = torch.stack(modulation).float()
    ours["final_modulation"] = _modulation(state, "norm_out.linear", temb, 2, source).float()  # (scale, shift)
    leftover = sorted(k for k in state if not _UNUSED_KEY.search(k))
    if leftover:
        raise WeightsError(f"{source}: unexpected tensor {leftover[0]!r} ({len(leftover)} unexpected in all)")
    with torch.device("meta"):
        model = ModulatedTransformer(config)
    model.load_state_dict(ours, assign=True)
    return model, table_origin


# ------------------------------------------------------------------------------------- VAE


def _vae(config: dict, state: dict[str, torch.Tensor], source: Path, config_path: Path) -> tuple[VAEConfig, dict[str, torch.Tensor]]:
    """Read AutoencoderTiny's config, detect separable convs per side, and check every tensor."""
    for key, expected in (("act_fn", "relu"), ("upsample_fn", "nearest"), ("upsampling_scaling_factor", 2)):
        if config.get(key, expected) != expected:
            raise WeightsError(f"{config_path}: {key}={config[key]!r} is not supported (TinySR's VAE uses {expected!r})")
    if config.get("shift_factor") not in (None, 0, 0.0):
        raise WeightsError(f"{config_path}: shift_factor={config['shift_factor']} is not supported")
    if config.get("in_channels", 3) != config.get("out_channels", 3):
        raise WeightsError(f"{config_path}: in_channels and out_channels must be equal")
    separable = {}
    for side in ("encoder", "decoder"):
        keys = [k for k in state if k.startswith(f"{side}.")]
        if not keys:
            raise WeightsError(f"{source}: no '{side}.' tensors")
        kinds = {".depthwise." in k or ".pointwise." in k for k in keys if k.endswith(".weight")}
        if len(kinds) != 1:
            raise WeightsError(f"{source}: the {side} mixes separable and plain convolutions")
        separable[side] = kinds.pop()
    try:
        vae_config = VAEConfig(
            image_channels=int(config.get("in_channels", 3)),
            latent_channels=int(config["latent_channels"]),
            encoder_channels=tuple(config["encoder_block_out_channels"]),
            encoder_blocks=tuple(config["num_encoder_blocks"]),
            decoder_channels=tuple(config["decoder_block_out_channels"]),
            decoder_blocks=tuple(config["num_decoder_blocks"]),
            encoder_separable=separable["encoder"],
            decoder_separable=separable["decoder"],
            scaling_factor=float(config.get("scaling_factor", 1.0)),
        )
    except KeyError as exc:
        raise WeightsError(f"{config_path}: missing {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"{config_path}: {exc}") from None
    return vae_config, {f"vae.{k}": v.float() for k, v in state.items()}


# -------------------------------------------------------------------------------- the whole


def _load_pooled(files: _SourceFiles, path: Path, dim: int) -> torch.Tensor:
    obj = files.tensors(path) if path.suffix == ".safetensors" else files.pickled(path)
    if isinstance(obj, dict) and len(obj) == 1:
        obj = next(iter(obj.values()))
    if not isinstance(obj, torch.Tensor):
        raise WeightsError(f"{path}: expected a tensor of shape (1, {dim}), found {type(obj).__name__}")
    if obj.numel() != dim:
        raise WeightsError(f"{path}: pooled embedding has shape {tuple(obj.shape)}, the backbone needs (1, {dim})")
    return obj.reshape(1, dim).double()


def convert_release(
    root: str | os.PathLike,
    layout: ReleaseLayout = ReleaseLayout(),
    *,
    lora_alpha: float | None = None,
    progress: ProgressCallback | None = None,
) -> tuple[TinySR, dict]:
    """Build a float32 ``TinySR`` from the release under ``root``; returns it and its provenance."""
    root = Path(root)
    if not root.is_dir():
        raise WeightsError(f"{root}: not a folder", hint="unpack the release and pass its folder")
    paths = layout.under(root)
    files = _SourceFiles(root)
    note = progress or (lambda message: None)

    note(f"reading the backbone from {paths.transformer}")
    config_json, state, source = _diffusers_weights(files, paths.transformer)
    state = {k: v.float() for k, v in state.items()}
    transformer_config = _transformer_config(config_json, state, source, paths.transformer / "config.json")

    note(f"merging the LoRA {paths.lora}")
    pairs = _lora_pairs(files.tensors(paths.lora), paths.lora)
    if not pairs:
        raise WeightsError(f"{paths.lora}: no LoRA matrices found")
    rank = next(iter(pairs.values()))[0].shape[0]
    alpha, scale = _lora_scale(files, paths.lora, rank, lora_alpha)
    count = _merge_lora(state, pairs, scale, source, paths.lora)

    text_key = "time_text_embed.text_embedder.linear_1.weight"
    if text_key not in state:
        raise WeightsError(f"{source}: missing tensor {text_key!r}")
    pooled = _load_pooled(files, paths.pooled_embeds, state[text_key].shape[1])

    note("computing the modulation at t = 1000 and folding it into the weights")
    modulated, table_origin = _backbone(state, transformer_config, pooled, source)
    if "checkpoint has none" in table_origin:
        note(f"{source} holds no positional table; using SD3's")
    folded = fold_modulation(modulated)
    del modulated

    note(f"reading the VAE from {paths.vae}")
    vae_json, vae_state, vae_source = _diffusers_weights(files, paths.vae)
    vae_config, vae_state = _vae(vae_json, vae_state, vae_source, paths.vae / "config.json")

    config = TinySRConfig(transformer_config, vae_config)
    with torch.device("meta"):
        model = TinySR(config)
    tensors = {f"transformer.{k}": v for k, v in folded.state_dict().items()} | vae_state
    expected = model.state_dict()
    for key, reference in expected.items():
        if key not in tensors:
            raise WeightsError(f"{vae_source}: missing tensor {key.removeprefix('vae.')!r} for the configuration in {paths.vae / 'config.json'}")
        if tensors[key].shape != reference.shape:
            raise WeightsError(
                f"{vae_source}: tensor {key.removeprefix('vae.')!r} has shape {tuple(tensors[key].shape)}, "
                f"the configuration in {paths.vae / 'config.json'} needs {tuple(reference.shape)}"
            )
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise WeightsError(f"{vae_source}: unexpected tensor {unexpected[0].removeprefix('vae.')!r} ({len(unexpected)} unexpected in all)")
    model.load_state_dict(tensors, assign=True)

    provenance = {
        "source": "official-release",
        "converter": f"tinysr {__version__}",
        "release": str(root.resolve()),
        "files_sha256": dict(sorted(files.digests.items())),
        "timestep": OFFICIAL_TIMESTEP,
        "lora": {"rank": int(rank), "alpha": alpha, "scale": scale, "modules": count, "merged": True},
        "vae_separable": {"encoder": vae_config.encoder_separable, "decoder": vae_config.decoder_separable},
        "pos_embed": table_origin,
        "modulation": "computed at t = 1000 with the pooled embedding and folded into the linear layers",
    }
    return model.eval().requires_grad_(False), provenance


def import_release(
    root: str | os.PathLike,
    output: str | os.PathLike,
    *,
    layout: ReleaseLayout = ReleaseLayout(),
    dtype: torch.dtype = torch.float32,
    lora_alpha: float | None = None,
    progress: ProgressCallback | None = None,
) -> Path:
    """Convert the release and write it atomically to ``output`` (a ``.safetensors`` file)."""
    model, provenance = convert_release(root, layout, lora_alpha=lora_alpha, progress=progress)
    if progress is not None:
        progress(f"writing {output}")
    return save_weights(model, output, dtype=dtype, color_fix="adain", provenance=provenance)
