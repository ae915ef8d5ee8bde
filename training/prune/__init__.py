"""Depth pruning of a teacher's transformer blocks (TinySR's search, TinyFusion's, and baselines).

``run_prune_stage`` is the entry point of ``--stage prune``; the pieces are usable on their own:
``space`` (groups, patterns, search-space enumeration), ``masks`` (learnable gates), ``stacks``
(teachers as masked residual block lists), ``search`` (the training loop), ``baselines``.
"""

from training.prune.decision import PruneDecision, read_decision, write_decision
from training.prune.space import GroupLayout
from training.prune.stage import run_prune_stage

__all__ = ["GroupLayout", "PruneDecision", "read_decision", "run_prune_stage", "write_decision"]
