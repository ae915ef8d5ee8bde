"""The pruning decision file: which teacher layers to keep, and the evidence behind the choice.

JSON, read back by the restore stage (which builds a student from the kept layer indices)::

    {"format": "tinysr-prune-decision", "version": 1, "method": "tinysr", "num_layers": 24,
     "kept_layers": [...], "pruned_layers": [...], "details": {...method-specific...}}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinysr_cli.atomic import atomic_path
from tinysr_cli.errors import TinySRError

DECISION_FORMAT = "tinysr-prune-decision"
DECISION_VERSION = 1


@dataclass(frozen=True)
class PruneDecision:
    method: str
    num_layers: int
    kept_layers: tuple[int, ...]
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        kept = list(self.kept_layers)
        if kept != sorted(set(kept)) or any(not 0 <= i < self.num_layers for i in kept):
            raise ValueError(f"kept layers {kept} are not distinct ascending indices below {self.num_layers}")

    @property
    def pruned_layers(self) -> tuple[int, ...]:
        kept = set(self.kept_layers)
        return tuple(i for i in range(self.num_layers) if i not in kept)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": DECISION_FORMAT,
            "version": DECISION_VERSION,
            "method": self.method,
            "num_layers": self.num_layers,
            "kept_layers": list(self.kept_layers),
            "pruned_layers": list(self.pruned_layers),
            "details": self.details,
        }


def write_decision(decision: PruneDecision, path: Path) -> None:
    """Write atomically: the file appears only when complete."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(decision.to_json(), indent=2) + "\n", encoding="utf-8")


def read_decision(path: Path) -> PruneDecision:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise TinySRError(f"cannot read the pruning decision {path}: {error}") from error
    if not isinstance(data, dict) or data.get("format") != DECISION_FORMAT:
        raise TinySRError(f"{path} is not a pruning decision file", hint="it is written by `--stage prune`")
    if data.get("version") != DECISION_VERSION:
        raise TinySRError(f"{path} has decision format version {data.get('version')}; this tinysr reads {DECISION_VERSION}")
    try:
        kept = tuple(data["kept_layers"])
        return PruneDecision(data["method"], int(data["num_layers"]), kept, data.get("details", {}))
    except (KeyError, TypeError, ValueError) as error:
        raise TinySRError(f"{path} is a malformed pruning decision: {error}") from error
