"""Training data: HR crops of photos, degraded on the training device into synthetic LQ/HQ pairs.

Synthetic pairs are addressed by a global sample number g = 0, 1, 2, ...: epoch g // N visits the N
HR files in a permutation fixed by (seed, epoch), the crop and flip of g come from (seed, g), and the
degradation of g from its own seed derived from (seed, g) (see ``training.degradations``). So pair g
is a pure function of the seed and g, whatever the number of loader workers. (The stages batch these
samples by step with ``training.stages.common.StepBatches``.)

Plain torch (``Dataset``); nothing here imports accelerate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from tinysr_cli.errors import TinySRError
from tinysr_cli.io.images import is_image_path, load_image
from training.degradations import REALESRGAN, DegradationConfig, degrade

def derive_seed(seed: int, *parts: int | str) -> int:
    """A 63-bit seed that depends on ``seed`` and every part (stable across runs and platforms)."""
    text = ":".join(str(p) for p in (seed, *parts)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def list_images(folders: Sequence[Path]) -> list[Path]:
    """Image files under ``folders`` (recursive), sorted; raises if there are none."""
    missing = [str(f) for f in folders if not Path(f).is_dir()]
    if missing:
        raise TinySRError(f"not a folder: {', '.join(missing)}")
    files = sorted({p for folder in folders for p in Path(folder).rglob("*") if p.is_file() and is_image_path(p)})
    if not files:
        raise TinySRError(f"no images found in {', '.join(map(str, folders))}")
    return files


def pad_to_size(image: torch.Tensor, size: int) -> torch.Tensor:
    """Reflect-pad [C, H, W] at the bottom and right up to at least ``size`` x ``size``."""
    while image.shape[-2] < size or image.shape[-1] < size:
        height, width = image.shape[-2:]
        pad_h = min(size - height, height - 1) if height < size else 0
        pad_w = min(size - width, width - 1) if width < size else 0
        if (height < size and pad_h < 1) or (width < size and pad_w < 1):  # one pixel: nothing to reflect
            return F.pad(image[None], (0, max(0, size - width), 0, max(0, size - height)), mode="replicate")[0]
        image = F.pad(image[None], (0, pad_w, 0, pad_h), mode="reflect")[0]
    return image


class HRCrops(Dataset):
    """``crops[g]`` -> {"hr": [3, crop_size, crop_size] float in [0, 1], "sample": g} for any g >= 0.

    ``len(crops)`` is the number of files (one epoch); indices past it continue into later epochs,
    each a fresh permutation of the files. Crops are random windows, reflect-padded first where an
    image is smaller than the crop, flipped left-right with ``flip_prob``.
    """

    def __init__(self, folders: Sequence[Path], crop_size: int, seed: int, flip_prob: float = 0.5) -> None:
        if crop_size < 1:
            raise TinySRError(f"crop size must be at least 1, got {crop_size}")
        self.files = list_images([Path(f) for f in folders])
        self.crop_size, self.seed, self.flip_prob = crop_size, seed, flip_prob
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, permutation), the last one used

    def __len__(self) -> int:
        return len(self.files)

    def locate(self, sample: int) -> tuple[int, int]:
        """(epoch, position within the epoch) of global sample ``sample``."""
        return divmod(sample, len(self.files))

    def file_of(self, sample: int) -> Path:
        epoch, position = self.locate(sample)
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            self._order = (epoch, torch.randperm(len(self.files), generator=generator))
        return self.files[int(self._order[1][position])]

    def __getitem__(self, sample: int) -> dict[str, Any]:
        if sample < 0:
            raise IndexError(f"sample numbers start at 0, got {sample}")
        image = pad_to_size(load_image(self.file_of(sample)).rgb, self.crop_size)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "crop", sample))
        height, width = image.shape[-2:]
        top = int(torch.randint(height - self.crop_size + 1, (), generator=generator))
        left = int(torch.randint(width - self.crop_size + 1, (), generator=generator))
        crop = image[:, top : top + self.crop_size, left : left + self.crop_size]
        if float(torch.rand((), generator=generator)) < self.flip_prob:
            crop = crop.flip(-1)
        return {"hr": crop.contiguous(), "sample": sample}

    def identity(self) -> dict[str, Any]:
        """What shapes the crops: the file list (paths and sizes), crop size, flip, seed."""
        listing = hashlib.sha256("\n".join(f"{p}:{p.stat().st_size}" for p in self.files).encode()).hexdigest()
        return {"files": len(self.files), "listing": listing, "crop_size": self.crop_size, "flip_prob": self.flip_prob, "seed": self.seed}


class SyntheticPairs:
    """HR crops and their Real-ESRGAN degradation; pair g depends on the seed and g only.

    Has the ``PairSource`` interface of ``training.latent_cache`` (``identity``, ``pairs``).
    """

    def __init__(self, crops: HRCrops, degradation: DegradationConfig = REALESRGAN) -> None:
        self.crops, self.degradation = crops, degradation

    def identity(self) -> dict[str, Any]:
        return {**self.crops.identity(), "degradation": asdict(self.degradation)}

    def degrade(self, hr: torch.Tensor, samples: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(target, LQ) for the HR crops of ``samples``, already on the device of choice."""
        return degrade(hr, [derive_seed(self.crops.seed, "degrade", int(g)) for g in samples], self.degradation)

    def pairs(self, indices: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(target [B, 3, H, W], LQ [B, 3, H/s, W/s]) of the given samples, floats in [0, 1] on ``device``."""
        hr = torch.stack([self.crops[int(i)]["hr"] for i in indices]).to(device)
        return self.degrade(hr, indices)
