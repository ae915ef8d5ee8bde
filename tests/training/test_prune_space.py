"""Search-space arithmetic and the learnable gates of the pruning search (no teacher involved)."""

from __future__ import annotations

import math

import pytest
import torch

from training.prune.masks import MaskSampler
from training.prune.space import GATE_MOVES, Group, GroupLayout, dynamic_masks, global_masks, local_masks

SD3_LAYOUT = GroupLayout.uniform(24, keep=2, size=4)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_unconstrained_space_counts_c_24_12() -> None:
    count = sum(1 for _ in global_masks(24, 12))
    assert count == 2_704_156 == math.comb(24, 12)


def test_local_constraint_reaches_6_to_the_6_masks() -> None:
    masks = local_masks(SD3_LAYOUT)
    assert len(masks) == 46_656 == 6**6
    for mask in masks:
        assert [sum(mask[g.start : g.start + 4]) for g in SD3_LAYOUT.groups] == [2] * 6
    # The paper's "1.7%" of the full space.
    assert round(100 * len(masks) / math.comb(24, 12), 1) == 1.7


def test_inter_block_activation_widens_the_space_keeping_pair_totals() -> None:
    masks = dynamic_masks(SD3_LAYOUT)
    per_pair = sum(math.comb(4, k) * math.comb(4, 4 - k) for k in (1, 2, 3))  # 16 + 36 + 16
    assert len(masks) == per_pair**3 == 314_432
    assert local_masks(SD3_LAYOUT) < masks
    for mask in masks:
        for a, b in SD3_LAYOUT.pairs:
            first, second = SD3_LAYOUT.groups[a], SD3_LAYOUT.groups[b]
            kept_first = sum(mask[i] for i in first.layers)
            assert kept_first in (1, 2, 3)
            assert kept_first + sum(mask[i] for i in second.layers) == 4


def test_patterns_follow_itertools_combinations_and_neighbours_share_one_layer() -> None:
    group = Group(start=0, size=4, keep=2)
    assert group.patterns == ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
    assert group.neighbours((0, 1)) == ((0, 2), (0, 3), (1, 2), (1, 3))  # not itself, not (2, 3)
    assert group.corrosions((0, 1)) == {(0,), (1,)}
    assert group.expansions((0, 1)) == {(0, 1, 2), (0, 1, 3)}


@pytest.mark.parametrize(("ratio", "pruned", "nm"), [(0.33, 8, (2, 3)), (0.5, 12, (2, 4)), (0.67, 16, (1, 3))])
def test_table_c2_ratios(ratio: float, pruned: int, nm: tuple[int, int]) -> None:
    layout = GroupLayout.for_ratio(24, ratio)
    assert layout.num_layers - layout.kept_count == pruned
    assert {(g.keep, g.size) for g in layout.groups} == {nm}
    layout.check_pairs_can_move()  # every preset admits the pair moves


def test_hybrid_and_invalid_layouts() -> None:
    hybrid = GroupLayout.from_nm([(2, 4), (1, 2), (3, 6)])
    assert [g.start for g in hybrid.groups] == [0, 4, 6] and hybrid.num_layers == 12 and hybrid.kept_count == 6
    assert hybrid.pairs == ((0, 1),)
    with pytest.raises(ValueError, match="groups of 5"):
        GroupLayout.uniform(24, 2, 5)
    with pytest.raises(ValueError, match="no preset"):
        GroupLayout.for_ratio(24, 0.4)
    with pytest.raises(ValueError, match="inter-block activation needs"):
        MaskSampler(GroupLayout.from_nm([(4, 4), (2, 4)]), inter_block=True)


def _forced_sampler(first: int, second: int, move: int, neighbour_logits: list[list[float]]) -> MaskSampler:
    """A 2-group sampler whose sample is always pattern ``first``/``second`` and gate ``move``."""
    sampler = MaskSampler(GroupLayout.uniform(8, 2, 4), inter_block=True)
    with torch.no_grad():
        for logits, chosen, others in zip(sampler.group_logits, (first, second), neighbour_logits):
            logits.copy_(torch.tensor(others))
            logits[chosen] = 60.0
        sampler.gate_logits.fill_(0.0)
        sampler.gate_logits[0, move] = 60.0
    return sampler


def test_corrosion_is_intersection_and_expansion_is_union_with_the_best_neighbour() -> None:
    group = Group(0, 4, 2)
    generator = torch.Generator().manual_seed(0)
    for move in (0, 2):
        for first in range(6):
            for second in range(6):
                others = torch.rand(2, 6, generator=generator).tolist()
                sampler = _forced_sampler(first, second, move, others)
                mask = sampler.sample(4, tau=1.0, scale=1.0, generator=generator)
                expected = []
                for chosen, logits, shrink in zip((first, second), others, (move == 0, move == 2)):
                    pattern = group.patterns[chosen]
                    best = max(group.neighbours(pattern), key=lambda p: logits[group.patterns.index(p)])
                    layers = set(pattern) & set(best) if shrink else set(pattern) | set(best)
                    expected += [int(i in layers) for i in range(4)]
                assert mask.tolist() == [expected] * 4


def test_sampled_masks_are_binary_and_pair_totals_constant() -> None:
    torch.manual_seed(0)
    sampler = MaskSampler(SD3_LAYOUT, inter_block=True)
    with torch.no_grad():
        for logits in sampler.group_logits:
            logits.normal_()
        sampler.gate_logits.normal_()
    masks = sampler.sample(512, tau=1.0, scale=1.0, generator=torch.Generator().manual_seed(1))
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    first_counts = set()
    for a, b in SD3_LAYOUT.pairs:
        layers = list(SD3_LAYOUT.groups[a].layers) + list(SD3_LAYOUT.groups[b].layers)
        assert (masks[:, layers].sum(-1) == 4).all()
        first_counts |= set(masks[:, list(SD3_LAYOUT.groups[a].layers)].sum(-1).tolist())
    assert first_counts == {1.0, 2.0, 3.0}  # all three gate moves were drawn
    assert (masks.sum(-1) == 12).all()


@pytest.mark.parametrize("inter_block", [True, False])
def test_gradients_reach_every_logit_and_gate(inter_block: bool) -> None:
    sampler = MaskSampler(SD3_LAYOUT, inter_block=inter_block)
    masks = sampler.sample(8, tau=4.0, scale=100.0, generator=torch.Generator().manual_seed(0))
    weights = torch.randn(masks.shape, generator=torch.Generator().manual_seed(1))
    (masks * weights).sum().backward()
    for logits in sampler.group_logits:
        assert logits.grad is not None and (logits.grad != 0).all()
    assert sampler.gate_logits.shape == ((3, 3) if inter_block else (0, 3))
    if inter_block:
        assert (sampler.gate_logits.grad != 0).all()


def test_hard_samples_follow_the_reported_probabilities() -> None:
    sampler = MaskSampler(GroupLayout.uniform(4, 2, 4), inter_block=False)
    with torch.no_grad():
        sampler.group_logits[0].copy_(torch.tensor([0.0, 0.01, 0.02, -0.01, 0.005, 0.0]))
    count = 20_000
    masks = sampler.sample(count, tau=0.5, scale=100.0, generator=torch.Generator().manual_seed(0))
    options = torch.tensor([[int(i in p) for i in range(4)] for p in Group(0, 4, 2).patterns], dtype=masks.dtype)
    frequencies = (masks[:, None, :] == options[None]).all(-1).float().mean(0)
    probabilities = torch.tensor(sampler.decide(scale=100.0).pattern_probabilities[0])
    assert torch.allclose(frequencies, probabilities, atol=0.015)


def test_decision_takes_gate_argmax_then_most_probable_pattern() -> None:
    sampler = MaskSampler(GroupLayout.uniform(8, 2, 4), inter_block=True)
    with torch.no_grad():
        # Group 0: best (1, 3); its complement (0, 2) scores higher than any neighbour but is not one;
        # the best neighbour is (0, 3). Group 1: best (0, 1), complement (2, 3) ignored, neighbour (0, 3).
        sampler.group_logits[0].copy_(torch.tensor([0.0, 0.15, 0.1, 0.0, 0.2, 0.0]))
        sampler.group_logits[1].copy_(torch.tensor([0.3, 0.0, 0.2, 0.0, 0.0, 0.25]))
        sampler.gate_logits.copy_(torch.tensor([[0.0, 0.1, 0.3]]))  # grow the first group
    decision = sampler.decide(scale=100.0)
    assert decision.moves == [GATE_MOVES[2]] and decision.patterns == [4, 0]
    assert decision.kept_layers == [0, 1, 3, 4]  # (1,3) | (0,3) in group 0; (0,1) & (0,3) = {0} in group 1
    assert sum(decision.pattern_probabilities[0]) == pytest.approx(1.0)
