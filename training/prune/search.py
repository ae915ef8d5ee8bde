"""The learnable search: masks and LoRA trained together on task + distillation loss.

TinySR's search (pair gates on) and TinyFusion's (``inter_block=False``) share this loop. Each step
samples one mask per batch element, runs the masked teacher with LoRA, and compares its output with
the batch target (task) and with the plain teacher's output (distillation; the batch's cached
``teacher`` latent when it has one). The temperature falls
linearly from ``tau_start`` to ``tau_end``; the logits are multiplied by ``logit_scale``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.prune.lora import adapters_disabled, attach_lora, load_lora_state, lora_state
from training.prune.masks import MaskDecision, MaskSampler
from training.prune.space import GroupLayout
from training.prune.stacks import Batch, ResidualStack, forward_masked

DISTANCES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"l1": F.l1_loss, "mse": F.mse_loss}


@dataclass(frozen=True)
class Objective:
    """``task_weight * d(out, target) + distill_weight * d(out, teacher_out)``."""

    task_weight: float = 1.0
    distill_weight: float = 1.0
    task_loss: str = "mse"
    distill_loss: str = "l1"

    def __post_init__(self) -> None:
        for name in (self.task_loss, self.distill_loss):
            if name not in DISTANCES:
                raise ValueError(f"unknown loss {name!r}; choose one of {sorted(DISTANCES)}")

    def terms(
        self, out: torch.Tensor, batch: Batch, teacher_out: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(task, distillation) losses; a term whose weight is 0 is 0 and is not computed."""
        zero = out.new_zeros(())
        task = DISTANCES[self.task_loss](out, batch["target"]) if self.task_weight else zero
        distill = DISTANCES[self.distill_loss](out, teacher_out) if self.distill_weight else zero
        return task, distill

    def __call__(self, out: torch.Tensor, batch: Batch, teacher_out: torch.Tensor | None) -> torch.Tensor:
        task, distill = self.terms(out, batch, teacher_out)
        return self.task_weight * task + self.distill_weight * distill


@dataclass(frozen=True)
class SearchSettings:
    steps: int = 100_000
    tau_start: float = 4.0
    tau_end: float = 0.1
    logit_scale: float = 100.0
    gate_lr: float = 5e-5
    lora_lr: float = 5e-5
    lora_rank: int = 64  # 0 searches without weight updates
    lora_alpha: float = 64.0
    grad_clip: float = 1.0
    inter_block: bool = True  # False is TinyFusion

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lora_rank < 0:
            raise ValueError("steps must be at least 1 and lora_rank at least 0")
        if min(self.tau_start, self.tau_end, self.logit_scale, self.grad_clip) <= 0:
            raise ValueError("tau_start, tau_end, logit_scale and grad_clip must be positive")

    def temperature(self, step: int) -> float:
        progress = step / max(1, self.steps - 1)
        return self.tau_start + (self.tau_end - self.tau_start) * min(1.0, progress)


@dataclass(frozen=True)
class StepReport:
    step: int  # steps done, this one included
    steps: int
    loss: float
    task_loss: float
    distill_loss: float
    tau: float
    skipped: bool  # the loss was not finite and no update was made


class MaskSearch:
    """Search state: sampler logits, LoRA, optimizer, sampling RNG and the step counter."""

    def __init__(
        self, stack: ResidualStack, layout: GroupLayout, settings: SearchSettings, objective: Objective, seed: int
    ) -> None:
        if layout.num_layers != stack.num_blocks:
            raise ValueError(f"the layout covers {layout.num_layers} layers but the teacher has {stack.num_blocks}")
        device = next(stack.parameters()).device
        self.stack, self.settings, self.objective = stack, settings, objective
        self.sampler = MaskSampler(layout, settings.inter_block).to(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)  # LoRA A matrices are random: make a run reproducible from its seed
            self.lora = attach_lora(stack, settings.lora_rank, settings.lora_alpha) if settings.lora_rank else []
        if not self.lora:
            stack.requires_grad_(False)
        groups = [{"params": list(self.sampler.parameters()), "lr": settings.gate_lr}]
        if self.lora:
            groups.append({"params": self.lora, "lr": settings.lora_lr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.step = 0

    def teacher_output(self, batch: Batch) -> torch.Tensor:
        """The unpruned teacher's output without LoRA: the batch's ``teacher`` if cached, else computed."""
        if "teacher" in batch:
            return batch["teacher"]
        with torch.no_grad(), adapters_disabled(self.stack) if self.lora else nullcontext():
            return forward_masked(self.stack, batch)

    def train_step(self, batch: Batch) -> StepReport:
        settings = self.settings
        tau = settings.temperature(self.step)
        teacher_out = self.teacher_output(batch) if self.objective.distill_weight else None
        masks = self.sampler.sample(batch["latent"].shape[0], tau, settings.logit_scale, self.generator)
        out = forward_masked(self.stack, batch, masks)
        task, distill = self.objective.terms(out, batch, teacher_out)
        loss = self.objective.task_weight * task + self.objective.distill_weight * distill
        self.optimizer.zero_grad(set_to_none=True)
        finite = math.isfinite(loss.item())
        if finite:
            loss.backward()
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            self.optimizer.step()
        self.step += 1
        return StepReport(self.step, settings.steps, loss.item(), task.item(), distill.item(), tau, not finite)

    def decision(self) -> MaskDecision:
        return self.sampler.decide(self.settings.logit_scale)

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "sampler": self.sampler.state_dict(),
            "lora": lora_state(self.stack),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        if self.lora:
            load_lora_state(self.stack, state["lora"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.step = int(state["step"])


def run_search(search: MaskSearch, batches: Callable[[int], Batch]) -> MaskDecision:
    """Train until ``settings.steps`` in memory (no checkpoints; the prune stage runs its steps in the stages' loop)."""
    while search.step < search.settings.steps:
        search.train_step(batches(search.step))
    return search.decision()
