"""Convert the authors' TinySR release into tinysr's single-file format.

The release is a folder (see ``ReleaseLayout``): a diffusers ``save_pretrained`` backbone that still
holds SD3's conditioning modules, a PEFT LoRA for it (applied unmerged by the official code), the
tiny VAE, and the pooled prompt embedding shipped with TSD-SR. The official code evaluates the
conditioning once, at t = 1000 with that embedding, and caches the modulation; we do the same
offline and go one step further: the LoRA is merged, q/k/v are fused, and the constant modulation
is folded into the linear layers (``fold_modulation``). Weights are read into float32; the SD3 maths
(LoRA merge, key mapping, modulation) is ``weights.sd3``'s, shared with training; the fold is
computed in float64.

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

from tinysr_cli import __version__
from tinysr_cli.errors import WeightsError
from tinysr_cli.models.tinysr import TinySR, TinySRConfig
from tinysr_cli.models.transformer import TransformerConfig, fold_modulation
from tinysr_cli.models.vae import VAEConfig
from tinysr_cli.weights.format import save_weights
from tinysr_cli.weights.sd3 import SD3_TIMESTEP, lora_pairs, merge_lora, sd3_to_modulated, timestep_features

OFFICIAL_TIMESTEP = SD3_TIMESTEP
# The official backbone only accepts 64x64 latent tiles: a 32x32 grid of 2x2 patches.
OFFICIAL_POS_GRID = 32
WEIGHTS_STEM = "diffusion_pytorch_model"

__all__ = ["ReleaseLayout", "convert_release", "import_release", "timestep_features"]

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
    pairs = lora_pairs(files.tensors(paths.lora), paths.lora)
    if not pairs:
        raise WeightsError(f"{paths.lora}: no LoRA matrices found")
    rank = next(iter(pairs.values()))[0].shape[0]
    alpha, scale = _lora_scale(files, paths.lora, rank, lora_alpha)
    count = merge_lora(state, pairs, scale, source, paths.lora)

    text_key = "time_text_embed.text_embedder.linear_1.weight"
    if text_key not in state:
        raise WeightsError(f"{source}: missing tensor {text_key!r}")
    pooled = _load_pooled(files, paths.pooled_embeds, state[text_key].shape[1])

    note("computing the modulation at t = 1000 and folding it into the weights")
    modulated, table_origin = sd3_to_modulated(state, transformer_config, pooled, source, timestep=OFFICIAL_TIMESTEP)
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
