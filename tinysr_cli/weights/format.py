"""tinysr's single-file weights format: one ``.safetensors`` holding everything needed to run.

Tensors are prefixed ``transformer.`` and ``vae.``; the safetensors header metadata (str -> str)
holds ``format`` = "tinysr", ``format_version``, ``config`` (JSON of ``TinySRConfig``),
``color_fix`` and ``provenance`` (JSON). The loader validates keys, shapes and dtypes against the
architecture the config describes and raises ``WeightsError`` naming the first thing that is wrong.
"""

from __future__ import annotations

import json
import os
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
        config = TinySRConfig.from_dict(json.loads(metadata["config"]))
        provenance = json.loads(metadata.get("provenance", "{}"))
    except (KeyError, TypeError, ValueError) as exc:
        raise WeightsError(f"{path}: malformed 'config' metadata ({exc})") from None
    color_fix = metadata.get("color_fix", "adain")
    if color_fix not in COLOR_FIXES:
        raise WeightsError(f"{path}: unknown colour fix {color_fix!r} in metadata")
    names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    if len(dtypes) != 1 or next(iter(dtypes)) not in names:
        raise WeightsError(f"{path}: tensors must share one of fp32/fp16/bf16, found {sorted(dtypes)}")
    return WeightsInfo(path, config, names[dtypes.pop()], color_fix, provenance)


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
