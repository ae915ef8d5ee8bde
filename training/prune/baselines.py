"""Depth-pruning baselines of the paper's Table 2, all returning a ``PruneDecision``.

- ``random_min``: random masks, keep the one with the lowest loss (perturbation-based).
- ``shortgpt``: Block Influence 1 - cos(in, out) of the image stream; keep the most influential.
- ``flux_lite``: mean squared change ``(out - in)^2`` of the image stream (Flux.1 Lite's criterion).
- ``sensitivity``: loss increase when that one block alone is dropped.
- ``snapfusion``: greedy removal, each round the block whose removal costs the least loss per
  parameter saved.
- ``bk_sdm``: a fixed pattern. BK-SDM keeps the first block of each encoder stage and the last of
  each decoder stage; for a plain stack (TinyFusion's "oracle" reading) the first half is the encoder,
  the second the decoder, and each N:M group keeps its first (encoder) or last (decoder) N blocks.
- TinyFusion (learnable N:M masks without pair gates) is ``search.MaskSearch`` with
  ``inter_block=False``.

"Loss" is the search's objective (task + distillation) of the pruned model, averaged over a fixed
set of evaluation batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from training.prune.decision import PruneDecision
from training.prune.search import Objective
from training.prune.space import GroupLayout
from training.prune.stacks import Batch, ResidualStack, forward_kept, forward_masked, trace_image_stream


class PrunedLoss:
    """Objective of a pruned teacher over fixed batches; the full teacher's outputs are computed once."""

    def __init__(self, stack: ResidualStack, batches: Sequence[Batch], objective: Objective) -> None:
        self.stack, self.batches, self.objective = stack, list(batches), objective
        with torch.no_grad():
            self.teacher = [forward_masked(stack, batch) for batch in self.batches]

    @torch.no_grad()
    def __call__(self, kept: Sequence[int]) -> float:
        total = 0.0
        for batch, teacher in zip(self.batches, self.teacher):
            total += float(self.objective(forward_kept(self.stack, batch, kept), batch, teacher))
        return total / len(self.batches)


def _keep_top(scores: Sequence[float], count: int) -> tuple[int, ...]:
    """Indices of the ``count`` highest scores, ascending; ties keep the shallower block."""
    ranked = sorted(range(len(scores)), key=lambda i: -scores[i])
    return tuple(sorted(ranked[:count]))


def random_min(loss: PrunedLoss, kept_count: int, candidates: int, generator: torch.Generator) -> PruneDecision:
    num_layers = loss.stack.num_blocks
    tried = []
    for _ in range(candidates):
        kept = tuple(sorted(torch.randperm(num_layers, generator=generator)[:kept_count].tolist()))
        tried.append({"kept_layers": list(kept), "loss": loss(kept)})
    best = min(tried, key=lambda entry: entry["loss"])
    return PruneDecision("random_min", num_layers, tuple(best["kept_layers"]), {"candidates": tried})


@torch.no_grad()
def _stream_scores(stack: ResidualStack, batches: Sequence[Batch], criterion: str) -> list[float]:
    totals = [0.0] * stack.num_blocks
    for batch in batches:
        for index, (before, after) in enumerate(trace_image_stream(stack, batch)):
            if criterion == "shortgpt":
                totals[index] += float((1 - F.cosine_similarity(before, after, dim=-1)).mean())
            else:
                totals[index] += float(F.mse_loss(after, before))
    return [total / len(batches) for total in totals]


def shortgpt(stack: ResidualStack, batches: Sequence[Batch], kept_count: int) -> PruneDecision:
    scores = _stream_scores(stack, batches, "shortgpt")
    return PruneDecision("shortgpt", stack.num_blocks, _keep_top(scores, kept_count), {"block_influence": scores})


def flux_lite(stack: ResidualStack, batches: Sequence[Batch], kept_count: int) -> PruneDecision:
    scores = _stream_scores(stack, batches, "flux_lite")
    return PruneDecision("flux_lite", stack.num_blocks, _keep_top(scores, kept_count), {"block_mse": scores})


def sensitivity(loss: PrunedLoss, kept_count: int) -> PruneDecision:
    layers = range(loss.stack.num_blocks)
    base = loss(tuple(layers))
    scores = [loss(tuple(j for j in layers if j != i)) - base for i in layers]
    return PruneDecision(
        "sensitivity", len(layers), _keep_top(scores, kept_count), {"full_loss": base, "loss_increase": scores}
    )


def snapfusion(loss: PrunedLoss, kept_count: int) -> PruneDecision:
    stack = loss.stack
    kept = list(range(stack.num_blocks))
    current = loss(kept)
    removals = []
    while len(kept) > kept_count:
        best = None
        for index in kept:
            trial = loss([j for j in kept if j != index])
            ratio = (trial - current) / stack.block_cost(index)
            if best is None or ratio < best[0]:
                best = (ratio, index, trial)
        ratio, index, current = best
        kept.remove(index)
        removals.append({"layer": index, "loss": current, "loss_increase_per_parameter": ratio})
    return PruneDecision("snapfusion", stack.num_blocks, tuple(kept), {"removals": removals})


def bk_sdm(layout: GroupLayout) -> PruneDecision:
    half = layout.num_layers / 2
    kept: list[int] = []
    for group in layout.groups:
        layers = list(group.layers)
        in_encoder = group.start + group.size / 2 <= half
        kept += layers[: group.keep] if in_encoder else layers[group.size - group.keep :]
    rule = "first N of each encoder group, last N of each decoder group"
    return PruneDecision("bk_sdm", layout.num_layers, tuple(kept), {"rule": rule})
