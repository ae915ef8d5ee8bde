"""The student: kept teacher blocks, text stream and time embedding removed, modulation as constants.

``build_student`` turns a diffusers ``SD3Transformer2DModel`` (LoRA already merged) and a list of
kept block indices into our ``ModulatedTransformer``: q/k/v fused, the positional table centre-cropped
to the student's grid, and every adaLN vector computed once from the teacher at t = 1000 with the
default pooled prompt (the maths of ``tinysr_cli.weights.sd3``, shared with the official-release
importer). Training adds a peft LoRA (``attach_lora``) and keeps the modulation trainable; ``export_transformer`` merges the LoRA and folds the modulation into the run-time model.

A student file (``save_student`` / ``load_student``) is a safetensors file holding the model state,
LoRA included (peft's key layout), with the config, LoRA settings and kept layers in its metadata.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tinysr_cli.atomic import atomic_path
from tinysr_cli.errors import TinySRError
from tinysr_cli.models.transformer import ModulatedTransformer, TinySRTransformer, TransformerConfig, fold_modulation
from tinysr_cli.weights.sd3 import sd3_to_modulated
from training.teacher import merge_peft_lora

STUDENT_FORMAT = "tinysr-student"
STUDENT_FORMAT_VERSION = "1"
# Every linear of a block plus the patch embedding and the output projection.
DEFAULT_LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "patch_embed", "proj_out")


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 64
    alpha: float = 64.0
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}


@dataclass(frozen=True)
class StudentInfo:
    """What a student file says about itself."""

    config: TransformerConfig
    lora: LoraSpec | None
    kept_layers: tuple[int, ...]
    provenance: dict = field(default_factory=dict)


def student_config(transformer: nn.Module, num_layers: int, pos_grid: int) -> TransformerConfig:
    config = transformer.config
    dim = config.num_attention_heads * config.attention_head_dim
    inner = transformer.transformer_blocks[0].ff.net[0].proj.out_features
    if inner % dim:
        raise TinySRError(f"the teacher's feed-forward width {inner} is not a multiple of its width {dim}")
    if config.out_channels not in (None, config.in_channels):
        raise TinySRError("the teacher's output channels differ from its input channels")
    if pos_grid > config.pos_embed_max_size:
        raise TinySRError(f"pos_grid {pos_grid} exceeds the teacher's positional table ({config.pos_embed_max_size})")
    return TransformerConfig(
        num_layers=num_layers,
        hidden_size=dim,
        num_heads=config.num_attention_heads,
        mlp_ratio=inner // dim,
        patch_size=config.patch_size,
        latent_channels=config.in_channels,
        pos_grid=pos_grid,
    )


@torch.no_grad()
def build_student(
    transformer: nn.Module, kept_layers: Sequence[int], pooled: torch.Tensor, timestep: float = 1000.0, pos_grid: int = 32
) -> ModulatedTransformer:
    """The kept blocks' image stream of an SD3 transformer as a float32 ``ModulatedTransformer``.

    The mapping (q/k/v fused, positional table cropped, modulation at ``timestep`` with ``pooled``)
    is ``tinysr_cli.weights.sd3``'s, the same the official-release importer uses.
    """
    kept = list(kept_layers)
    total = len(transformer.transformer_blocks)
    if not kept or kept != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= total:
        raise TinySRError(f"kept layers {kept} must be distinct ascending indices below {total}")
    config = student_config(transformer, len(kept), pos_grid)
    state = {key: tensor.detach().to("cpu", torch.float32) for key, tensor in transformer.state_dict().items()}
    state["pos_embed.pos_embed"] = transformer.pos_embed.pos_embed.detach().to("cpu", torch.float32)  # a buffer diffusers may not save
    student, _ = sd3_to_modulated(state, config, pooled.to("cpu", torch.float64).reshape(1, -1), "the teacher", kept_layers=kept, timestep=timestep)
    return student


# ----------------------------------------------------------------------------- LoRA


def attach_lora(model: ModulatedTransformer, spec: LoraSpec, train_modulation: bool = True) -> list[nn.Parameter]:
    """Freeze the base weights, add a peft LoRA (B = 0: output unchanged); return the trainable parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets), init_lora_weights="gaussian")
    try:
        inject_adapter_in_model(config, model)
    except ValueError as exc:
        raise TinySRError(f"LoRA targets {list(spec.targets)} do not fit the student: {exc}") from None
    trainable = []
    for name, param in model.named_parameters():
        wanted = "lora_" in name or (train_modulation and name in ("modulation", "final_modulation"))
        param.requires_grad_(wanted)
        if wanted:
            trainable.append(param)
    return trainable


@torch.no_grad()
def export_transformer(model: ModulatedTransformer) -> TinySRTransformer:
    """LoRA merged, modulation folded: the run-time backbone (the argument is left unchanged)."""
    merged = copy.deepcopy(model).float()
    merge_peft_lora(merged)
    return fold_modulation(merged)


class DistillationStudent(nn.Module):
    """Training wrapper: latent -> (restored latent ``z - v``, image tokens after the ``capture`` blocks).

    A module of its own so that accelerate/DDP wraps the whole training forward; ``checkpointing``
    recomputes each block in the backward pass to save activation memory.
    """

    def __init__(self, model: ModulatedTransformer, capture: Sequence[int] = (), checkpointing: bool = False) -> None:
        super().__init__()
        self.model = model
        self.capture = tuple(capture)
        self.checkpointing = checkpointing

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        from tinysr_cli.models.transformer import _layer_norm

        model = self.model
        h = model._embed(latent)
        hidden = []
        for index, (block, modulation) in enumerate(zip(model.blocks, model.modulation)):
            if self.checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, modulation, use_reentrant=False)
            else:
                h = block(h, modulation)
            if index in self.capture:
                hidden.append(h)
        scale, shift = model.final_modulation
        velocity = model._unpatchify(model.proj_out(_layer_norm(h) * (1 + scale) + shift), *latent.shape[-2:])
        return latent - velocity, hidden


# ----------------------------------------------------------------------------- files


def save_student(
    path: str | os.PathLike,
    model: ModulatedTransformer,
    kept_layers: Sequence[int],
    lora: LoraSpec | None,
    provenance: dict | None = None,
) -> Path:
    """Write a student (LoRA unmerged) atomically."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    metadata = {
        "format": STUDENT_FORMAT,
        "format_version": STUDENT_FORMAT_VERSION,
        "config": json.dumps(model.config.to_dict()),
        "lora": json.dumps(lora.to_dict() if lora else None),
        "kept_layers": json.dumps(list(kept_layers)),
        "provenance": json.dumps(provenance or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return path


def load_student(path: str | os.PathLike) -> tuple[ModulatedTransformer, StudentInfo]:
    """A float32 student with its LoRA re-attached; every parameter frozen (the caller picks what trains)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise TinySRError(f"{path}: no such student file", hint="it is written by `tinysr train --stage restore`")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != STUDENT_FORMAT:
                raise TinySRError(f"{path}: not a student file (format {metadata.get('format')!r})")
            if metadata.get("format_version") != STUDENT_FORMAT_VERSION:
                raise TinySRError(f"{path}: student format version {metadata.get('format_version')!r} is not supported")
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except TinySRError:
        raise
    except Exception as exc:  # safetensors raises several unrelated types for a bad header
        raise TinySRError(f"{path}: not a readable safetensors file ({exc})") from None
    config = TransformerConfig(**json.loads(metadata["config"]))
    lora_data = json.loads(metadata["lora"])
    lora = LoraSpec(lora_data["rank"], lora_data["alpha"], tuple(lora_data["targets"])) if lora_data else None
    info = StudentInfo(config, lora, tuple(json.loads(metadata["kept_layers"])), json.loads(metadata.get("provenance", "{}")))
    model = ModulatedTransformer(config)
    if lora is not None:
        attach_lora(model, lora)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise TinySRError(f"{path}: tensors do not match its config (missing {missing[:2]}, unexpected {unexpected[:2]})")
    return model.requires_grad_(False), info
