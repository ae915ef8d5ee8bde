"""Learnable layer masks: per-group pattern logits and per-pair gates, sampled straight-through.

Forward values are exact 0/1 masks; gradients are those of the softmax relaxation. A group's sample
is a hard Gumbel-softmax over its patterns (``logits * scale``, temperature ``tau``); with pair gates
(TinySR's Dynamic Inter-block Activation) each pair also samples one of three moves, and the moved
groups take the AND (corrosion, ``a * n``) or the OR (expansion, ``a + n - a * n``) of their pattern
with its neighbour: the most probable pattern that shares ``N - 1`` layers with it. The neighbour is
picked by argmax, straight-through over the softmax restricted to the eligible patterns, so that
its logits get gradients too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from training.prune.space import GATE_MOVES, GroupLayout

INIT_LOGIT = 0.02  # TinyFusion's constant initial logit; any constant gives a uniform start


def straight_through(soft: torch.Tensor) -> torch.Tensor:
    """One-hot of ``soft``'s argmax in the forward pass, ``soft``'s gradient in the backward pass."""
    hard = torch.zeros_like(soft).scatter_(-1, soft.argmax(-1, keepdim=True), 1.0)
    return hard + (soft - soft.detach())  # exactly ``hard`` in value


def gumbel_straight_through(
    logits: torch.Tensor, tau: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Hard Gumbel-softmax sample of the categorical ``softmax(logits)``; [..., K] -> one-hot [..., K]."""
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(logits.dtype).tiny)))
    return straight_through(torch.softmax((logits + gumbel) / tau, dim=-1))


@dataclass
class MaskDecision:
    """The final per-layer keep mask and what it came from."""

    mask: list[int]
    patterns: list[int]  # chosen pattern index per group
    moves: list[str]  # chosen gate move per pair (empty without inter-block activation)
    pattern_probabilities: list[list[float]]
    gate_probabilities: list[list[float]]

    @property
    def kept_layers(self) -> list[int]:
        return [i for i, keep in enumerate(self.mask) if keep]


class MaskSampler(nn.Module):
    """The learnable parameters of the search; ``sample`` draws [B, L] masks, ``decide`` the final one."""

    def __init__(self, layout: GroupLayout, inter_block: bool) -> None:
        super().__init__()
        if inter_block:
            layout.check_pairs_can_move()
        self.layout = layout
        self.inter_block = inter_block
        self.group_logits = nn.ParameterList(
            nn.Parameter(torch.full((len(g.patterns),), INIT_LOGIT)) for g in layout.groups
        )
        pairs = len(layout.pairs) if inter_block else 0
        self.gate_logits = nn.Parameter(torch.full((pairs, len(GATE_MOVES)), INIT_LOGIT))
        for index, group in enumerate(layout.groups):
            options = torch.zeros(len(group.patterns), group.size)
            for row, pattern in enumerate(group.patterns):
                options[row, list(pattern)] = 1.0
            eligible = torch.tensor(
                [[q in group.neighbours(p) for q in group.patterns] for p in group.patterns], dtype=torch.bool
            )
            self.register_buffer(f"options_{index}", options, persistent=False)
            self.register_buffer(f"neighbours_{index}", eligible, persistent=False)

    def _options(self, group: int) -> torch.Tensor:
        return getattr(self, f"options_{group}")

    def _neighbour(self, group: int, choice: torch.Tensor, scale: float) -> torch.Tensor:
        """Mask [B, M] of the most probable neighbour of each chosen pattern (``choice`` one-hot [B, C])."""
        eligible = getattr(self, f"neighbours_{group}")[choice.argmax(-1)]  # [B, C]
        scores = (self.group_logits[group] * scale).expand_as(choice).masked_fill(~eligible, float("-inf"))
        return straight_through(torch.softmax(scores, dim=-1)) @ self._options(group)

    def sample(
        self, batch_size: int, tau: float, scale: float, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Masks [B, L], exactly 0/1, differentiable in the logits (straight-through)."""
        choices = [
            gumbel_straight_through((logits * scale).expand(batch_size, -1), tau, generator)
            for logits in self.group_logits
        ]
        masks = [choice @ self._options(i) for i, choice in enumerate(choices)]
        if self.inter_block:
            for pair, (a, b) in enumerate(self.layout.pairs):
                gate = gumbel_straight_through((self.gate_logits[pair] * scale).expand(batch_size, -1), tau, generator)
                masks[a], masks[b] = self._move(
                    gate,
                    masks[a],
                    self._neighbour(a, choices[a], scale),
                    masks[b],
                    self._neighbour(b, choices[b], scale),
                )
        return torch.cat(masks, dim=-1)

    @staticmethod
    def _move(
        gate: torch.Tensor, a: torch.Tensor, a_next: torch.Tensor, b: torch.Tensor, b_next: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply a pair gate [B, 3] (shrink first / balanced / grow first) to the two group masks [B, M]."""
        a_and, a_or = a * a_next, a + a_next - a * a_next
        b_and, b_or = b * b_next, b + b_next - b * b_next
        g = gate.unsqueeze(-1)
        first = g[:, 0] * a_and + g[:, 1] * a + g[:, 2] * a_or
        second = g[:, 0] * b_or + g[:, 1] * b + g[:, 2] * b_and
        return first, second

    @torch.no_grad()
    def decide(self, scale: float) -> MaskDecision:
        """Argmax gate per pair, most probable pattern per group, then the gate's move."""
        choices = [torch.nn.functional.one_hot(l.argmax(), len(l)).float()[None] for l in self.group_logits]
        masks = [choice @ self._options(i) for i, choice in enumerate(choices)]
        moves: list[str] = []
        if self.inter_block:
            for pair, (a, b) in enumerate(self.layout.pairs):
                move = int(self.gate_logits[pair].argmax())
                moves.append(GATE_MOVES[move])
                gate = torch.nn.functional.one_hot(torch.tensor([move]), len(GATE_MOVES)).float()
                a_next, b_next = self._neighbour(a, choices[a], scale), self._neighbour(b, choices[b], scale)
                masks[a], masks[b] = self._move(gate, masks[a], a_next, masks[b], b_next)
        mask = torch.cat(masks, dim=-1)[0]
        return MaskDecision(
            mask=[int(v) for v in mask.round().tolist()],
            patterns=[int(c.argmax()) for c in choices],
            moves=moves,
            pattern_probabilities=[torch.softmax(l * scale, -1).tolist() for l in self.group_logits],
            gate_probabilities=torch.softmax(self.gate_logits * scale, -1).tolist(),
        )
