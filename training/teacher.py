"""The teacher TSD-SR: SD3-medium plus its LoRA (transformer and VAE encoder), run once at t = 1000.

Everything is loaded from local files: a diffusers folder holding ``transformer/`` and ``vae/``,
the TSD-SR LoRA files (``transformer.safetensors`` and ``vae.safetensors``, PEFT key layout
``<module>.lora_A.weight`` with an optional ``transformer.``/``vae.`` prefix) and the default
prompt embeddings (``prompt_embeds.pt`` (1, S, 4096) and ``pool_embeds.pt`` (1, 2048)). The LoRA is
merged into the base weights (``tinysr_cli.weights.sd3``), since the teacher is never trained.

``write_random_teacher`` writes a tiny random teacher in the same layout, for tests and for dry runs
of a recipe on a machine without the real weights.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tinysr_cli.errors import TinySRError
from tinysr_cli.weights.sd3 import lora_pairs, merge_lora

SD3_LATENT_SCALE = 1.5305
TEACHER_KINDS = ("sd3", "tiny_sd3")  # the [teacher] table's ``kind``
TEACHER_DTYPES = ("fp16", "bf16", "fp32")  # the run dtype on accelerators; the CPU always runs fp32


@dataclass(frozen=True)
class TeacherSpec:
    """Where the teacher's files are and how it runs (the ``[teacher]`` table of a recipe)."""

    sd3: Path  # diffusers folder holding transformer/ and vae/
    prompt_embeds: Path  # (1, S, 4096), .pt or .safetensors
    pooled_embeds: Path  # (1, 2048)
    transformer_lora: Path | None = None
    vae_lora: Path | None = None
    lora_alpha: float | None = None  # None: alpha = rank (scale 1), as TSD-SR trains it
    latent_scale: float = SD3_LATENT_SCALE
    timestep: float = 1000.0
    dtype: str = "fp16"  # on accelerators; the CPU always runs float32

    def weight_files(self) -> list[Path]:
        """Every file whose bytes define the teacher's outputs (for cache keys)."""
        files = []
        for sub in ("transformer", "vae"):
            files += sorted(p for p in (self.sd3 / sub).glob("*") if p.suffix in {".json", ".safetensors", ".bin"})
        files += [p for p in (self.transformer_lora, self.vae_lora) if p is not None]
        return files + [self.prompt_embeds, self.pooled_embeds]

    def settings(self) -> dict:
        """The settings besides the files that change the teacher's outputs."""
        return {"lora_alpha": self.lora_alpha, "latent_scale": self.latent_scale, "timestep": self.timestep, "dtype": self.dtype}


@dataclass(frozen=True)
class TinyTeacherSpec:
    """``[teacher] kind = "tiny_sd3"``: a random ``SD3Transformer2DModel(**config)`` with a random prompt,
    seeded by the run (transformer only, so for the prune stage: a search test needs no files)."""

    config: dict[str, Any] = field(default_factory=dict)
    prompt_tokens: int = 8
    timestep: float = 1000.0
    dtype: str = "fp32"


def load_embedding(path: Path) -> torch.Tensor:
    """A single tensor from a ``.safetensors`` file (its only tensor) or a ``.pt`` file (weights only)."""
    if not path.is_file():
        raise TinySRError(f"{path}: no such embedding file", hint="TSD-SR ships prompt_embeds.pt and pool_embeds.pt in dataset/default")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(path)
        if len(tensors) != 1:
            raise TinySRError(f"{path}: expected one tensor, found {len(tensors)}")
        return next(iter(tensors.values()))
    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in several types
        raise TinySRError(f"{path}: cannot read the embedding ({exc})") from None
    if not isinstance(tensor, torch.Tensor):
        raise TinySRError(f"{path}: expected a tensor, found {type(tensor).__name__}")
    return tensor


def apply_lora_file(module: nn.Module, path: Path, alpha: float | None) -> None:
    """Merge a LoRA file into ``module``'s float32 weights: ``W += alpha / rank * B @ A``.

    Keys are peft's (``<module>.lora_A.weight``), optionally prefixed ``transformer.``/``vae.``/
    ``base_model.model.``; the reading and the merge are ``tinysr_cli.weights.sd3``'s, the ones the
    official-release importer uses. ``alpha`` None means alpha = rank (scale 1), as TSD-SR trains it.
    """
    from safetensors.torch import load_file

    pairs = lora_pairs(load_file(path), path)
    if not pairs:
        raise TinySRError(f"{path}: holds no LoRA tensors")
    rank = next(iter(pairs.values()))[0].shape[0]
    state = module.state_dict()  # shares storage with the parameters: the merge updates them in place
    merge_lora(state, pairs, (rank if alpha is None else alpha) / rank, f"the {type(module).__name__}", path)


def merge_peft_lora(module: nn.Module) -> None:
    """Merge every peft LoRA layer inside ``module`` and put its plain base layer back in its place."""
    from peft.tuners.lora import LoraLayer

    for name, child in list(module.named_modules()):
        if not isinstance(child, LoraLayer):
            continue
        child.merge()
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, child.get_base_layer())


class Teacher(nn.Module):
    """TSD-SR with its LoRA merged; images in [-1, 1], latents scaled by ``latent_scale``."""

    def __init__(
        self,
        transformer: nn.Module,
        vae: nn.Module | None,
        prompt_embeds: torch.Tensor,
        pooled_embeds: torch.Tensor,
        latent_scale: float = SD3_LATENT_SCALE,
        timestep: float = 1000.0,
    ) -> None:
        super().__init__()
        self.transformer = transformer
        self.vae = vae
        self.register_buffer("prompt_embeds", prompt_embeds, persistent=False)
        self.register_buffer("pooled_embeds", pooled_embeds, persistent=False)
        self.latent_scale = latent_scale
        self.timestep = timestep

    @property
    def num_blocks(self) -> int:
        return len(self.transformer.transformer_blocks)

    def _require_vae(self) -> nn.Module:
        if self.vae is None:
            raise RuntimeError("this teacher was loaded without its VAE")
        return self.vae

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image [B, 3, H, W] in [-1, 1] -> scaled latent (the posterior mean; deterministic)."""
        vae = self._require_vae()
        return vae.encode(image.to(vae.dtype)).latent_dist.mode() * self.latent_scale

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        vae = self._require_vae()
        return vae.decode(latent.to(vae.dtype) / self.latent_scale).sample

    def velocity(self, latent: torch.Tensor) -> torch.Tensor:
        """The one-step prediction ``v`` at t = ``timestep`` with the default prompt."""
        batch = latent.shape[0]
        dtype = self.transformer.dtype
        timestep = torch.full((batch,), self.timestep, device=latent.device, dtype=dtype)
        return self.transformer(
            hidden_states=latent.to(dtype),
            timestep=timestep,
            encoder_hidden_states=self.prompt_embeds.expand(batch, -1, -1).to(dtype),
            pooled_projections=self.pooled_embeds.expand(batch, -1).to(dtype),
            return_dict=False,
        )[0]

    def restore(self, latent: torch.Tensor) -> torch.Tensor:
        """The teacher's restored latent ``z - v`` (flow matching at sigma = 1)."""
        return latent - self.velocity(latent).to(latent.dtype)

    @contextmanager
    def capture_hidden(self, blocks: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
        """Within the block, forward passes store the image-token stream [B, N, D] after each block."""
        captured: dict[int, torch.Tensor] = {}
        handles = []
        for index in blocks:
            if not 0 <= index < self.num_blocks:
                raise TinySRError(f"teacher block {index} does not exist (the teacher has {self.num_blocks})")

            def grab(_module, _args, output, index=index):
                # diffusers' JointTransformerBlock returns (text stream, image stream).
                captured[index] = output[1]

            handles.append(self.transformer.transformer_blocks[index].register_forward_hook(grab))
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()


_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_teacher_dtype(name: str, device: torch.device) -> torch.dtype:
    """The teacher's run dtype; half precision is only used on accelerators."""
    if name not in _DTYPES:
        raise TinySRError(f"teacher dtype must be one of {', '.join(_DTYPES)}, not {name!r}")
    return _DTYPES[name] if device.type != "cpu" else torch.float32


def load_transformer(spec: TeacherSpec) -> nn.Module:
    """SD3's transformer with the TSD-SR LoRA merged, in float32 on the CPU."""
    from diffusers import SD3Transformer2DModel

    model = _from_pretrained(SD3Transformer2DModel, spec.sd3, "transformer")
    if spec.transformer_lora is not None:
        apply_lora_file(model, spec.transformer_lora, spec.lora_alpha)
    return model.eval().requires_grad_(False)


def load_teacher(spec: TeacherSpec, device: torch.device | str = "cpu", with_vae: bool = True) -> Teacher:
    """The teacher on ``device`` in ``spec.dtype`` (float32 on the CPU); LoRA merged in float32.

    ``with_vae=False`` loads the transformer only (for online hidden-state distillation).
    """
    from diffusers import AutoencoderKL

    device = torch.device(device)
    transformer = load_transformer(spec)
    vae = None
    if with_vae:
        vae = _from_pretrained(AutoencoderKL, spec.sd3, "vae")
        if spec.vae_lora is not None:
            apply_lora_file(vae, spec.vae_lora, spec.lora_alpha)
        if vae.config.latent_channels != transformer.config.in_channels:
            raise TinySRError(f"the VAE has {vae.config.latent_channels} latent channels, the transformer {transformer.config.in_channels}")
        vae = vae.eval().requires_grad_(False)
    prompt, pooled = load_prompt_embeddings(spec)
    config = transformer.config
    if prompt.dim() != 3 or prompt.shape[-1] != config.joint_attention_dim:
        raise TinySRError(f"prompt embeddings have shape {tuple(prompt.shape)}, the transformer needs (1, S, {config.joint_attention_dim})")
    if pooled.dim() != 2 or pooled.shape[-1] != config.pooled_projection_dim:
        raise TinySRError(f"pooled embeddings have shape {tuple(pooled.shape)}, the transformer needs (1, {config.pooled_projection_dim})")
    teacher = Teacher(transformer, vae, prompt, pooled, spec.latent_scale, spec.timestep)
    return teacher.to(device=device, dtype=resolve_teacher_dtype(spec.dtype, device))


def load_prompt_embeddings(spec: TeacherSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds (1, S, joint_dim), pooled (1, pooled_dim)) in float32."""
    return load_embedding(spec.prompt_embeds).float(), load_embedding(spec.pooled_embeds).float()


def _from_pretrained(cls, folder: Path, subfolder: str):
    if not (folder / subfolder / "config.json").is_file():
        raise TinySRError(
            f"{folder / subfolder}: not a diffusers model folder (no config.json)",
            hint="[teacher] sd3 must be a local copy of stable-diffusion-3-medium-diffusers",
        )
    return cls.from_pretrained(folder, subfolder=subfolder, torch_dtype=torch.float32, local_files_only=True)


# ----------------------------------------------------------------------------- a tiny random teacher


TINY_TRANSFORMER = dict(
    sample_size=32,
    patch_size=2,
    in_channels=16,
    num_layers=4,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    caption_projection_dim=32,
    pooled_projection_dim=12,
    out_channels=16,
    pos_embed_max_size=32,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 16, 16),
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=4,
    scaling_factor=SD3_LATENT_SCALE,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
# TSD-SR's LoRA targets on the transformer (peft suffix match) and every conv/linear of the VAE encoder.
TSDSR_TRANSFORMER_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "proj", "linear", "proj_out")


def write_random_teacher(folder: Path, seed: int = 0, rank: int = 4, num_layers: int = 4, prompt_tokens: int = 8) -> TeacherSpec:
    """Write a tiny random SD3-style teacher (transformer, VAE, LoRA files, embeddings) under ``folder``.

    The layout is the real one, so the result loads through ``load_teacher``. LoRA B matrices are
    random (not zero) so that the LoRA changes the outputs.
    """
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    folder = Path(folder)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**{**TINY_TRANSFORMER, "num_layers": num_layers})
        vae = AutoencoderKL(**TINY_VAE)
    transformer.save_pretrained(folder / "sd3" / "transformer")
    vae.save_pretrained(folder / "sd3" / "vae")

    vae_targets = [name for name, m in vae.named_modules() if name.startswith("encoder.") and isinstance(m, (nn.Conv2d, nn.Linear))]
    for part, model, targets in (("transformer", transformer, list(TSDSR_TRANSFORMER_TARGETS)), ("vae", vae, vae_targets)):
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), model)
        state = get_peft_model_state_dict(model)
        tensors = {f"{part}.{k}": torch.randn(v.shape, generator=generator) * 0.05 for k, v in state.items()}
        (folder / "lora").mkdir(parents=True, exist_ok=True)
        save_file(tensors, folder / "lora" / f"{part}.safetensors")

    (folder / "embeddings").mkdir(parents=True, exist_ok=True)
    config = transformer.config
    torch.save(torch.randn(1, prompt_tokens, config.joint_attention_dim, generator=generator), folder / "embeddings" / "prompt_embeds.pt")
    torch.save(torch.randn(1, config.pooled_projection_dim, generator=generator), folder / "embeddings" / "pool_embeds.pt")
    return TeacherSpec(
        sd3=folder / "sd3",
        prompt_embeds=folder / "embeddings" / "prompt_embeds.pt",
        pooled_embeds=folder / "embeddings" / "pool_embeds.pt",
        transformer_lora=folder / "lora" / "transformer.safetensors",
        vae_lora=folder / "lora" / "vae.safetensors",
    )
