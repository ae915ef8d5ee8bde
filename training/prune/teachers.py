"""Teachers for the search: TSD-SR through ``training.teacher``, or a tiny random SD3 built in-process.

The real teacher is the shared one (SD3-medium's transformer with TSD-SR's LoRA merged, the default
prompt embeddings), described by the same ``[teacher]`` table as the other stages; only its
transformer is loaded. Either way it is wrapped as an ``SD3Stack``.
"""

from __future__ import annotations

import torch

from training.prune.stacks import SD3Stack
from training.teacher import TeacherSpec, TinyTeacherSpec, load_teacher, resolve_teacher_dtype


def build_teacher(spec: TeacherSpec | TinyTeacherSpec, device: torch.device, seed: int) -> SD3Stack:
    """The teacher on ``device`` in its dtype (always float32 on the CPU), in eval mode."""
    if isinstance(spec, TeacherSpec):
        teacher = load_teacher(spec, device, with_vae=False)
        return SD3Stack(teacher.transformer, teacher.prompt_embeds, teacher.pooled_embeds, spec.timestep)
    from diffusers import SD3Transformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SD3Transformer2DModel(**spec.config).eval()
        prompt = torch.randn(1, spec.prompt_tokens, model.config.joint_attention_dim)
        pooled = torch.randn(1, model.config.pooled_projection_dim)
    stack = SD3Stack(model, prompt, pooled, spec.timestep)
    return stack.to(device=device, dtype=resolve_teacher_dtype(spec.dtype, device))
