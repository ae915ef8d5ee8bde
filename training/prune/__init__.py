"""Depth pruning of a teacher's transformer blocks (TinySR's search, TinyFusion's, and baselines).

``training.stages.prune`` runs it as ``--stage prune``; the pieces are usable on their own:
``space`` (groups, patterns, search-space enumeration), ``masks`` (learnable gates), ``stacks``
(teachers as masked residual block lists), ``search`` (the training step), ``baselines``.
"""

from training.prune.decision import PruneDecision, read_decision, write_decision
from training.prune.space import GroupLayout

__all__ = ["GroupLayout", "PruneDecision", "read_decision", "write_decision"]
