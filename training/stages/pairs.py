"""The ``[data]`` table as a ``PairSource``: HR crops and their degraded LQ, pair ``i`` fixed by the seed.

Pair ``i``: a random image of the HR folders, a random ``hr_size`` crop (reflect-padded if the image
is smaller) with a random horizontal flip, all drawn from a generator seeded by (seed, i); then
``training.degradations.degrade`` with the named preset and a seed derived from (seed, i). The HQ
image is the degradation's target (the sharpened crop when the preset sharpens).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tinysr_cli.errors import TinySRError
from tinysr_cli.io.images import is_image_path, load_image
from training.degradations import PRESETS, degrade

DATA_KEYS = ("hr_folders", "hr_size", "scale", "seed", "degradation")


class FolderPairs:
    """Random ``hr_size`` crops (with h-flips) of the images in ``folders``, degraded by a named preset."""

    def __init__(self, folders: Sequence[Path], hr_size: int, scale: int, seed: int, degradation: str) -> None:
        files = sorted(p for folder in folders for p in Path(folder).rglob("*") if p.is_file() and is_image_path(p))
        if not files:
            raise TinySRError(f"no images found in {', '.join(map(str, folders))}")
        if degradation not in PRESETS:
            raise TinySRError(f"[data] degradation is {degradation!r}; choose one of {', '.join(PRESETS)}")
        if hr_size % scale:
            raise TinySRError(f"[data] hr_size {hr_size} is not a multiple of the scale {scale}")
        self.config = dataclasses.replace(PRESETS[degradation], scale=scale)
        self.files, self.hr_size, self.scale, self.seed, self.degradation = files, hr_size, scale, seed, degradation

    def identity(self) -> dict[str, Any]:
        listing = hashlib.sha256("\n".join(f"{p}:{p.stat().st_size}" for p in self.files).encode()).hexdigest()
        degradation = json.loads(json.dumps(dataclasses.asdict(self.config)))
        return {"files": len(self.files), "listing": listing, "hr_size": self.hr_size, "seed": self.seed, "degradation": degradation}

    def _sample_seed(self, index: int) -> int:
        return self.seed * 1_000_003 + index

    def _crop(self, index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self._sample_seed(index))
        path = self.files[int(torch.randint(len(self.files), (1,), generator=generator))]
        image = load_image(path).rgb
        size = self.hr_size
        height, width = image.shape[-2:]
        if height < size or width < size:
            pad = (0, max(0, size - width), 0, max(0, size - height))
            image = F.pad(image[None], pad, mode="reflect")[0]
            height, width = image.shape[-2:]
        top = int(torch.randint(height - size + 1, (1,), generator=generator))
        left = int(torch.randint(width - size + 1, (1,), generator=generator))
        crop = image[:, top : top + size, left : left + size]
        return crop.flip(-1) if bool(torch.rand((), generator=generator) < 0.5) else crop

    def pairs(self, indices: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        crops = torch.stack([self._crop(i) for i in indices]).to(device)
        # Odd, so that the degradation's draws never coincide with a crop's generator stream.
        return degrade(crops, [2 * self._sample_seed(i) + 1 for i in indices], self.config)


def make_pair_source(data: dict[str, Any], base: Path) -> FolderPairs:
    unknown = set(data) - set(DATA_KEYS)
    if unknown:
        raise TinySRError(f"unknown key(s) in [data]: {', '.join(sorted(unknown))}")
    folders = [(base / f).resolve() for f in data.get("hr_folders", [])]
    if not folders:
        raise TinySRError("[data] hr_folders must list at least one folder of HR images")
    return FolderPairs(folders, int(data.get("hr_size", 512)), int(data.get("scale", 4)), int(data.get("seed", 80)), str(data.get("degradation", "realesrgan")))
