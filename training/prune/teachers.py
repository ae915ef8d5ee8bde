"""Teachers for the search: a local diffusers SD3 folder (+ optional LoRA), or a tiny random SD3.

Deliberately thin: load, merge the teacher's LoRA into its weights (the search later puts its own
LoRA on top), and wrap as an ``SD3Stack`` with the fixed prompt conditioning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tinysr_cli.errors import TinySRError
from training.prune.stacks import SD3Stack

TEACHER_KINDS = ("sd3", "tiny_sd3")


@dataclass(frozen=True)
class TeacherSpec:
    kind: str
    path: Path | None = None  # sd3: the diffusers transformer folder (config.json + weights)
    lora: Path | None = None  # sd3: a PEFT LoRA .safetensors with ``transformer.``-prefixed keys
    prompt_embeds: Path | None = None  # sd3: [1, S, 4096] tensor file (.pt or .safetensors)
    pooled_embeds: Path | None = None  # sd3: [1, 2048]
    timestep: float = 1000.0
    config: dict[str, Any] = field(default_factory=dict)  # tiny_sd3: SD3Transformer2DModel arguments
    prompt_tokens: int = 8  # tiny_sd3: length of the random prompt embedding


def _load_tensor(path: Path) -> torch.Tensor:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(path)
            if len(tensors) != 1:
                raise TinySRError(f"{path} holds {len(tensors)} tensors; expected exactly one")
            return next(iter(tensors.values()))
        tensor = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as error:
        raise TinySRError(f"cannot read the tensor file {path}: {error}") from error
    if not isinstance(tensor, torch.Tensor):
        raise TinySRError(f"{path} does not hold a single tensor")
    return tensor


def build_teacher(spec: TeacherSpec, device: torch.device, dtype: torch.dtype, seed: int) -> SD3Stack:
    from diffusers import SD3Transformer2DModel

    if spec.kind == "tiny_sd3":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = SD3Transformer2DModel(**spec.config)
            prompt = torch.randn(1, spec.prompt_tokens, model.config.joint_attention_dim)
            pooled = torch.randn(1, model.config.pooled_projection_dim)
    elif spec.kind == "sd3":
        if spec.path is None or spec.prompt_embeds is None or spec.pooled_embeds is None:
            raise TinySRError("an sd3 teacher needs path, prompt_embeds and pooled_embeds in [teacher]")
        try:
            model = SD3Transformer2DModel.from_pretrained(spec.path)
        except (OSError, ValueError) as error:
            raise TinySRError(f"cannot load the SD3 transformer from {spec.path}: {error}") from error
        if spec.lora is not None:
            merge_teacher_lora(model, spec.lora)
        prompt, pooled = _load_tensor(spec.prompt_embeds), _load_tensor(spec.pooled_embeds)
    else:
        raise TinySRError(f"unknown teacher kind {spec.kind!r}", hint=f"use one of {', '.join(TEACHER_KINDS)}")
    model.eval()
    return SD3Stack(model, prompt, pooled, spec.timestep).to(device=device, dtype=dtype)


def merge_teacher_lora(model: torch.nn.Module, lora: Path) -> None:
    """Load a diffusers/PEFT LoRA (keys ``transformer.<module>.lora_A/B.weight``) and merge it in place."""
    try:
        model.load_lora_adapter(str(lora), prefix="transformer", adapter_name="teacher")
    except (OSError, ValueError, KeyError) as error:
        raise TinySRError(f"cannot load the teacher LoRA {lora}: {error}") from error
    model.fuse_lora(lora_scale=1.0, adapter_names=["teacher"])
    model.unload_lora()
