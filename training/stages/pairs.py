"""The ``[data]`` table as a ``PairSource`` (``training.data.SyntheticPairs``).

Keys: ``hr_folders`` (list of folders, searched recursively), ``hr_size`` (crop side, default 512),
``scale`` (default 4), ``seed`` (default 80), ``degradation`` (a preset of
``training.degradations``: "realesrgan" (default) or "mild"). Pair ``i`` is a function of the seed
and ``i`` only, which the latent cache relies on.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from tinysr_cli.errors import TinySRError
from training.data import HRCrops, SyntheticPairs
from training.degradations import PRESETS

DATA_KEYS = ("hr_folders", "hr_size", "scale", "seed", "degradation")


def make_pair_source(data: dict[str, Any], base: Path) -> SyntheticPairs:
    """Relative folders are resolved against ``base`` (the recipe's folder)."""
    unknown = set(data) - set(DATA_KEYS)
    if unknown:
        raise TinySRError(f"unknown key(s) in [data]: {', '.join(sorted(unknown))}")
    folders = data.get("hr_folders", [])
    if not isinstance(folders, list) or not folders or not all(isinstance(f, str) for f in folders):
        raise TinySRError("[data] hr_folders must list at least one folder of HR images")
    numbers = {key: data.get(key, default) for key, default in (("hr_size", 512), ("scale", 4), ("seed", 80))}
    for key, value in numbers.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise TinySRError(f"[data] {key} must be a non-negative integer, got {value!r}")
    hr_size, scale, seed = numbers["hr_size"], numbers["scale"], numbers["seed"]
    if scale < 1 or hr_size < scale or hr_size % scale:
        raise TinySRError(f"[data] hr_size {hr_size} must be a positive multiple of the scale {scale}")
    degradation = data.get("degradation", "realesrgan")
    if degradation not in PRESETS:
        raise TinySRError(f"[data] degradation is {degradation!r}; choose one of {', '.join(PRESETS)}")
    crops = HRCrops([(base / f).resolve() for f in folders], hr_size, seed)
    return SyntheticPairs(crops, dataclasses.replace(PRESETS[degradation], scale=scale))
