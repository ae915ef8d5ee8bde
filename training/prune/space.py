"""The depth-pruning search space: contiguous N:M groups, their patterns, and the masks they reach.

A teacher of L blocks is tiled by groups of M consecutive blocks, each keeping N of them. A group's
candidate patterns are ``itertools.combinations(range(M), N)`` in that order. Adjacent groups are
paired (0, 1), (2, 3), ...; Dynamic Inter-block Activation lets a pair move one kept layer from one
group to the other, through Expansion-Corrosion with a *neighbour* pattern: one that shares exactly
N - 1 layers with the current pattern (for 2:4, "shares a layer but differs").

Everything here is plain Python so that the counts in the tests come from this enumeration.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

Pattern = tuple[int, ...]  # kept positions inside a group, ascending

# Pruning ratios of the paper's Table C.2 as N:M groups (the paper does not say which groups it used).
RATIO_PRESETS: dict[float, tuple[int, int]] = {0.33: (2, 3), 0.5: (2, 4), 0.67: (1, 3)}

# The three moves of a pair gate, in gate-logit order.
GATE_MOVES = ("shrink_first", "balanced", "grow_first")


def ratio_preset(ratio: float) -> tuple[int, int]:
    """(N, M) for one of the preset pruning ratios."""
    for preset, keep_size in RATIO_PRESETS.items():
        if abs(preset - ratio) < 1e-9:
            return keep_size
    raise ValueError(f"no preset for pruning ratio {ratio}; choose one of {sorted(RATIO_PRESETS)}")


@dataclass(frozen=True)
class Group:
    """Blocks ``start .. start + size - 1`` of the teacher, of which ``keep`` survive."""

    start: int
    size: int
    keep: int

    @property
    def layers(self) -> range:
        return range(self.start, self.start + self.size)

    @cached_property
    def patterns(self) -> tuple[Pattern, ...]:
        return tuple(itertools.combinations(range(self.size), self.keep))

    def neighbours(self, pattern: Pattern) -> tuple[Pattern, ...]:
        """Patterns sharing exactly ``keep - 1`` positions with ``pattern`` (so differing by one)."""
        chosen = set(pattern)
        return tuple(p for p in self.patterns if len(chosen & set(p)) == self.keep - 1)

    def corrosions(self, pattern: Pattern) -> set[Pattern]:
        """Patterns of ``keep - 1`` layers reachable by AND with a neighbour."""
        return {tuple(sorted(set(pattern) & set(n))) for n in self.neighbours(pattern)}

    def expansions(self, pattern: Pattern) -> set[Pattern]:
        """Patterns of ``keep + 1`` layers reachable by OR with a neighbour."""
        return {tuple(sorted(set(pattern) | set(n))) for n in self.neighbours(pattern)}


@dataclass(frozen=True)
class GroupLayout:
    """Groups tiling a teacher's depth in order; adjacent groups form the gate pairs."""

    groups: tuple[Group, ...]

    def __post_init__(self) -> None:
        position = 0
        for group in self.groups:
            if group.start != position:
                raise ValueError(f"groups must tile the depth in order: a group starts at {group.start}, not {position}")
            if not 0 <= group.keep <= group.size or group.size < 1:
                raise ValueError(f"a group cannot keep {group.keep} of {group.size} layers")
            position += group.size
        if not self.groups:
            raise ValueError("a layout needs at least one group")

    @classmethod
    def from_nm(cls, pairs: Sequence[tuple[int, int]]) -> GroupLayout:
        """Hybrid layouts: ``[(N, M), ...]`` in depth order."""
        groups, start = [], 0
        for keep, size in pairs:
            groups.append(Group(start, size, keep))
            start += size
        return cls(tuple(groups))

    @classmethod
    def uniform(cls, num_layers: int, keep: int, size: int) -> GroupLayout:
        if size < 1 or num_layers % size:
            raise ValueError(f"{num_layers} layers cannot be split into groups of {size}")
        return cls.from_nm([(keep, size)] * (num_layers // size))

    @classmethod
    def for_ratio(cls, num_layers: int, ratio: float) -> GroupLayout:
        """One of Table C.2's pruning ratios (0.33, 0.5, 0.67) as uniform N:M groups."""
        return cls.uniform(num_layers, *ratio_preset(ratio))

    @property
    def num_layers(self) -> int:
        return sum(group.size for group in self.groups)

    @property
    def kept_count(self) -> int:
        return sum(group.keep for group in self.groups)

    @property
    def pairs(self) -> tuple[tuple[int, int], ...]:
        """Indices of the gate pairs (0, 1), (2, 3), ...; an odd last group stays unpaired."""
        return tuple((i, i + 1) for i in range(0, len(self.groups) - 1, 2))

    def check_pairs_can_move(self) -> None:
        """Every paired group must be able to both lose and gain a layer."""
        for a, b in self.pairs:
            for index in (a, b):
                group = self.groups[index]
                if not 1 <= group.keep < group.size:
                    raise ValueError(
                        f"group {index} keeps {group.keep} of {group.size} layers; inter-block activation needs 1 <= N < M"
                    )

    def to_mask(self, patterns: Sequence[Pattern]) -> tuple[int, ...]:
        """Per-layer 0/1 mask from one pattern per group."""
        mask = [0] * self.num_layers
        for group, pattern in zip(self.groups, patterns, strict=True):
            for position in pattern:
                mask[group.start + position] = 1
        return tuple(mask)


def global_masks(num_layers: int, kept: int) -> Iterator[tuple[int, ...]]:
    """Every way to keep ``kept`` of ``num_layers`` layers, as kept-index tuples (the unconstrained space)."""
    return itertools.combinations(range(num_layers), kept)


def local_masks(layout: GroupLayout) -> set[tuple[int, ...]]:
    """Masks reachable under the static per-group constraint (TinyFusion's space)."""
    return {layout.to_mask(choice) for choice in itertools.product(*(g.patterns for g in layout.groups))}


def pair_options(first: Group, second: Group) -> set[tuple[Pattern, Pattern]]:
    """(first, second) patterns a pair reaches through its gate and Expansion-Corrosion."""
    options = set(itertools.product(first.patterns, second.patterns))
    for a, b in itertools.product(first.patterns, second.patterns):
        options.update(itertools.product(first.corrosions(a), second.expansions(b)))
        options.update(itertools.product(first.expansions(a), second.corrosions(b)))
    return options


def dynamic_masks(layout: GroupLayout) -> set[tuple[int, ...]]:
    """Masks reachable with Dynamic Inter-block Activation (TinySR's space)."""
    layout.check_pairs_can_move()
    per_slot: list[list[tuple[Pattern, ...]]] = []
    for a, b in layout.pairs:
        per_slot.append(list(pair_options(layout.groups[a], layout.groups[b])))
    if len(layout.groups) % 2:
        per_slot.append([(p,) for p in layout.groups[-1].patterns])
    return {layout.to_mask(sum(choice, ())) for choice in itertools.product(*per_slot)}
