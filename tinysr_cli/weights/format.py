"""tinysr's single-file weights format: one ``.safetensors`` holding everything needed to run.

Tensors are prefixed ``transformer.`` and ``vae.``; the safetensors header metadata (str -> str)
holds ``format`` = "tinysr", ``format_version``, ``config`` (JSON of ``TinySRConfig``),
``color_fix`` and ``provenance`` (JSON). The loader validates keys, shapes and dtypes against the
architecture the config describes and raises ``WeightsError`` naming the first thing that is wrong.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tinysr_cli.atomic import atomic_path
from tinysr_cli.errors import WeightsError
from tinysr_cli.models.tinysr import NAMED_CONFIGS, TinySR, TinySRConfig

FORMAT_NAME = "tinysr"
FORMAT_VERSION = "1"
COLOR_FIXES = ("adain", "wavelet", "none")
SUPPORTED_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DTYPES_BY_NAME = {name: dtype for dtype, name in SUPPORTED_DTYPES.items()}


@dataclass(frozen=True)
class WeightsInfo:
    """What a weights file says about itself, read from its header without loading tensors."""

    path: Path
    config: TinySRConfig
    dtype: torch.dtype
    color_fix: str = "adain"
    provenance: dict = field(default_factory=dict)

    @property
    def random_init(self) -> bool:
        """True for weights that were never trained (``tinysr weights init``): they make images worse."""
        return self.provenance.get("source") == RANDOM_INIT


RANDOM_INIT = "random-init"
RANDOM_INIT_WARNING = "{path} holds RANDOM, untrained weights (provenance: random-init): its output is noise, not an upscale"


def save_weights(
    model: TinySR,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    color_fix: str = "adain",
    provenance: dict | None = None,
) -> Path:
    """Write ``model`` atomically (temporary file + rename) and return the path."""
    if color_fix not in COLOR_FIXES:
        raise ValueError(f"color_fix must be one of {COLOR_FIXES}, not {color_fix!r}")
    tensors = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None:
            tensor = tensor.to(dtype)
        tensors[name] = tensor.contiguous()
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(model.config.to_dict()),
        "color_fix": color_fix,
        "provenance": json.dumps(provenance or {}),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return path


def read_info(path: str | os.PathLike) -> WeightsInfo:
    """Read and check the header of a weights file (cheap: no tensor data is loaded)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    if path.suffix.lower() in {".pt", ".pth", ".ckpt", ".bin"}:
        raise WeightsError(
            f"{path}: pickled checkpoints are not loaded (they can run code)",
            hint="convert the authors' release with `tinysr weights import-official DIR -o model.safetensors`",
        )
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            keys = list(handle.keys())
            dtypes = {handle.get_slice(k).get_dtype() for k in keys}
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in keys}
    except Exception as exc:  # safetensors raises several unrelated types for a bad header
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from None
    if metadata.get("format") != FORMAT_NAME:
        raise WeightsError(
            f"{path}: not a tinysr weights file (metadata 'format' is {metadata.get('format')!r})",
            hint="official releases are converted with `tinysr weights import-official`",
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise WeightsError(f"{path}: format version {metadata.get('format_version')!r} is not supported (expected {FORMAT_VERSION})")
    try:
        raw_config = json.loads(metadata["config"])
        provenance = json.loads(metadata.get("provenance", "{}"))
    except (KeyError, TypeError, ValueError) as exc:
        raise WeightsError(f"{path}: malformed 'config' metadata ({exc})") from None
    problem = check_config(raw_config, shapes)
    if problem:
        raise WeightsError(f"{path}: malformed 'config' metadata: {problem}")
    try:
        config = TinySRConfig.from_dict(raw_config)
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
        raise WeightsError(f"{path}: malformed 'config' metadata ({exc})") from None
    color_fix = metadata.get("color_fix", "adain")
    if color_fix not in COLOR_FIXES:
        raise WeightsError(f"{path}: unknown colour fix {color_fix!r} in metadata")
    names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    if len(dtypes) != 1 or next(iter(dtypes)) not in names:
        raise WeightsError(f"{path}: tensors must share one of fp32/fp16/bf16, found {sorted(dtypes)}")
    return WeightsInfo(path, config, names[dtypes.pop()], color_fix, provenance)


# Bounds on every config value: generous for any model of this family, small enough that building
# the architecture (before a single tensor is compared) stays cheap.
_INT_BOUNDS = {
    "transformer": {
        "num_layers": (1, 256), "hidden_size": (4, 16384), "num_heads": (1, 1024), "mlp_ratio": (1, 16),
        "patch_size": (1, 16), "latent_channels": (1, 1024), "pos_grid": (1, 1024),
    },
    "vae": {"image_channels": (3, 3), "latent_channels": (1, 1024)},
}
_LIST_BOUNDS = {"encoder_channels": (1, 4096), "decoder_channels": (1, 4096), "encoder_blocks": (0, 64), "decoder_blocks": (0, 64)}
_BOOLS = {"encoder_separable", "decoder_separable"}
_BLOCK_KEY = re.compile(r"^transformer\.blocks\.(\d+)\.")


def check_config(raw: object, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """What is wrong with a config dict (types, bounds, divisibility) and the tensor sizes it implies
    against the file's ``shapes``; None if nothing. Runs before any module is built."""
    if not isinstance(raw, dict) or set(raw) != {"transformer", "vae"}:
        return "expected the sections 'transformer' and 'vae'"
    for section in ("transformer", "vae"):
        values = raw[section]
        if not isinstance(values, dict):
            return f"'{section}' is not a table"
        allowed = set(_INT_BOUNDS[section]) | (set(_LIST_BOUNDS) | _BOOLS | {"scaling_factor"} if section == "vae" else set())
        unknown = sorted(set(values) - allowed)
        if unknown:
            return f"unknown key {section}.{unknown[0]}"
        for key, (low, high) in _INT_BOUNDS[section].items():
            if key in values and not (type(values[key]) is int and low <= values[key] <= high):
                return f"{section}.{key} = {values[key]!r}, expected an integer from {low} to {high}"
    t, v = raw["transformer"], raw["vae"]
    for key, (low, high) in _LIST_BOUNDS.items():
        if key in v:
            items = v[key]
            if not (isinstance(items, list) and 1 <= len(items) <= 8 and all(type(i) is int and low <= i <= high for i in items)):
                return f"vae.{key} = {items!r}, expected 1 to 8 integers from {low} to {high}"
    for key in _BOOLS:
        if key in v and type(v[key]) is not bool:
            return f"vae.{key} = {v[key]!r}, expected true or false"
    if "scaling_factor" in v and not (
        type(v["scaling_factor"]) in (int, float) and math.isfinite(v["scaling_factor"]) and v["scaling_factor"] > 0
    ):
        return f"vae.scaling_factor = {v['scaling_factor']!r}, expected a positive number"
    from tinysr_cli.models.transformer import TransformerConfig
    from tinysr_cli.models.vae import VAEConfig

    defaults_t, defaults_v = TransformerConfig.__dataclass_fields__, VAEConfig.__dataclass_fields__

    hidden, heads = t.get("hidden_size", defaults_t["hidden_size"].default), t.get("num_heads", defaults_t["num_heads"].default)
    if hidden % heads:
        return f"transformer.hidden_size {hidden} is not divisible by transformer.num_heads {heads}"
    if hidden % 4:
        return f"transformer.hidden_size {hidden} is not a multiple of 4 (the 2-D positional table needs it)"
    for side in ("encoder", "decoder"):
        channels, blocks = v.get(f"{side}_channels"), v.get(f"{side}_blocks")
        if channels is not None and blocks is not None and len(channels) != len(blocks):
            return f"vae.{side}_channels and vae.{side}_blocks differ in length"
    latent_t = t.get("latent_channels", defaults_t["latent_channels"].default)
    latent_v = v.get("latent_channels", defaults_v["latent_channels"].default)
    if latent_t != latent_v:
        return f"transformer.latent_channels {latent_t} differs from vae.latent_channels {latent_v}"
    # What the numbers imply, against the tensors the file holds.
    layers = t.get("num_layers", defaults_t["num_layers"].default)
    found = {int(m.group(1)) for key in shapes if (m := _BLOCK_KEY.match(key))}
    if len(found) != layers:
        return f"transformer.num_layers = {layers}, the file holds {len(found)} transformer blocks"
    grid = t.get("pos_grid", defaults_t["pos_grid"].default)
    patch = t.get("patch_size", defaults_t["patch_size"].default)
    expected = {
        "transformer.pos_embed": (1, grid * grid, hidden),
        "transformer.patch_embed.weight": (hidden, latent_t, patch, patch),
    }
    for key, shape in expected.items():
        if key in shapes and shapes[key] != shape:
            return f"the config implies {key} of shape {shape}, the file holds {shapes[key]}"
    return None


def load_weights(path: str | os.PathLike) -> tuple[TinySR, WeightsInfo]:
    """Build the model the file describes and load its tensors, validating every key and shape."""
    info = read_info(path)
    with torch.device("meta"):
        model = TinySR(info.config)
    expected = model.state_dict()
    with safe_open(info.path, framework="pt") as handle:
        found = set(handle.keys())
        missing = sorted(set(expected) - found)
        unexpected = sorted(found - set(expected))
        if missing:
            raise WeightsError(f"{info.path}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
        if unexpected:
            raise WeightsError(f"{info.path}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} unexpected in all)")
        state = {}
        for name, reference in expected.items():
            tensor = handle.get_tensor(name)
            if tuple(tensor.shape) != tuple(reference.shape):
                raise WeightsError(
                    f"{info.path}: tensor {name!r} has shape {tuple(tensor.shape)}, the config needs {tuple(reference.shape)}"
                )
            state[name] = tensor
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False), info


def init_weights(config_name: str, seed: int) -> TinySR:
    """A randomly initialised model of a named config (deterministic for a given seed)."""
    if config_name not in NAMED_CONFIGS:
        raise WeightsError(f"unknown config {config_name!r}; choose from {', '.join(NAMED_CONFIGS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinySR(NAMED_CONFIGS[config_name]).eval()
