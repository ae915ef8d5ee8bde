"""LoRA on the teacher's blocks during the search (recoverability), through peft.

peft is imported lazily: it belongs to the ``train`` extra, and importing ``training.prune`` for its
search-space arithmetic should not require it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from training.prune.stacks import ResidualStack

LORA_MARKER = "lora_"


def block_linear_names(stack: ResidualStack) -> list[str]:
    """Qualified names (relative to ``stack``) of every ``nn.Linear`` inside the blocks."""
    names = {id(module): name for name, module in stack.named_modules()}
    targets = []
    for block in stack.blocks:
        prefix = names[id(block)]
        targets += [f"{prefix}.{name}" for name, module in block.named_modules() if isinstance(module, nn.Linear)]
    return targets


def attach_lora(stack: ResidualStack, rank: int, alpha: float) -> list[nn.Parameter]:
    """Freeze the teacher and put a float32 LoRA (B = 0: output unchanged) on every block Linear.

    Returns the trainable LoRA parameters.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    stack.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=block_linear_names(stack), init_lora_weights=True)
    inject_adapter_in_model(config, stack)
    for module in stack.modules():
        if isinstance(module, BaseTunerLayer):  # fp32 adapters on a bf16/fp16 teacher; peft casts around them
            for name in module.adapter_layer_names:
                getattr(module, name).to(torch.float32)
    params = []
    for name, param in stack.named_parameters():
        is_lora = LORA_MARKER in name
        param.requires_grad_(is_lora)
        if is_lora:
            params.append(param)
    return params


def lora_state(stack: ResidualStack) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in stack.named_parameters() if LORA_MARKER in name}


def load_lora_state(stack: ResidualStack, state: dict[str, torch.Tensor]) -> None:
    params = dict(stack.named_parameters())
    missing = [name for name in params if LORA_MARKER in name and name not in state]
    unknown = [name for name in state if name not in params]
    if missing or unknown:
        raise ValueError(f"LoRA state does not match the model (missing {missing[:3]}, unknown {unknown[:3]})")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


@contextmanager
def adapters_disabled(stack: ResidualStack) -> Iterator[None]:
    """Run the plain teacher: every LoRA layer bypassed, re-enabled (and trainable) afterwards."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [module for module in stack.modules() if isinstance(module, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
