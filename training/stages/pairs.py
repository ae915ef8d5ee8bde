"""The ``[data]`` table as a ``PairSource``: HR crops and their degraded LQ, pair ``i`` fixed by the seed.

PROVISIONAL: a plain bicubic x1/4 stands in for the Real-ESRGAN pipeline until ``training.data`` and
``training.degradations`` land; then this module becomes a thin adapter over them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tinysr_cli.errors import TinySRError
from tinysr_cli.io.images import is_image_path, load_image

DATA_KEYS = ("hr_folders", "hr_size", "scale", "seed", "degradation")


class FolderPairs:
    """Random ``hr_size`` crops (with h-flips) of the images in ``folders``, downscaled by ``scale``."""

    def __init__(self, folders: Sequence[Path], hr_size: int, scale: int, seed: int, degradation: str) -> None:
        files = sorted(p for folder in folders for p in Path(folder).rglob("*") if p.is_file() and is_image_path(p))
        if not files:
            raise TinySRError(f"no images found in {', '.join(map(str, folders))}")
        if degradation != "bicubic":
            raise TinySRError(f"degradation {degradation!r} is not available yet; use 'bicubic'")
        self.files, self.hr_size, self.scale, self.seed, self.degradation = files, hr_size, scale, seed, degradation

    def identity(self) -> dict[str, Any]:
        listing = hashlib.sha256("\n".join(f"{p}:{p.stat().st_size}" for p in self.files).encode()).hexdigest()
        return {"files": len(self.files), "listing": listing, "hr_size": self.hr_size, "scale": self.scale, "seed": self.seed, "degradation": self.degradation}

    def _crop(self, index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
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
        hq = torch.stack([self._crop(i) for i in indices]).to(device)
        size = self.hr_size // self.scale
        lq = F.interpolate(hq, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        return hq, lq


def make_pair_source(data: dict[str, Any], base: Path) -> FolderPairs:
    unknown = set(data) - set(DATA_KEYS)
    if unknown:
        raise TinySRError(f"unknown key(s) in [data]: {', '.join(sorted(unknown))}")
    folders = [(base / f).resolve() for f in data.get("hr_folders", [])]
    if not folders:
        raise TinySRError("[data] hr_folders must list at least one folder of HR images")
    return FolderPairs(folders, int(data.get("hr_size", 512)), int(data.get("scale", 4)), int(data.get("seed", 80)), str(data.get("degradation", "bicubic")))
