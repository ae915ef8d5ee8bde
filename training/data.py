"""Training and test data: HR crops degraded on the training device, and paired LR/HR test folders.

Synthetic pairs are addressed by a global sample number g = 0, 1, 2, ...: epoch g // N visits the N
HR files in a permutation fixed by (seed, epoch), the crop and flip of g come from (seed, g), and the
degradation of g from its own seed derived from (seed, g) (see ``training.degradations``). So pair g
is a pure function of the seed and g: a stream resumed at step k yields exactly the batches an
uninterrupted run would, whatever the number of loader workers.

Plain torch (``Dataset``/``Sampler``/``DataLoader``); nothing here imports accelerate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import count
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from tinysr_cli.errors import TinySRError
from tinysr_cli.io.images import is_image_path, load_image
from training.degradations import REALESRGAN, DegradationConfig, degrade

PAIRED_LAYOUTS = (("test_LR", "test_HR"), ("LR", "HR"))  # StableSR test sets use both


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


class StreamSampler(Sampler[int]):
    """Sample numbers for one rank from ``start_step`` on: step s, rank r -> s·B·W + r·B + j, j < B.

    Endless unless ``steps`` is given; ranks of a ``world_size`` group read disjoint samples.
    """

    def __init__(self, batch_size: int, start_step: int = 0, rank: int = 0, world_size: int = 1, steps: int | None = None) -> None:
        if batch_size < 1 or start_step < 0 or world_size < 1 or not 0 <= rank < world_size:
            raise TinySRError(f"bad stream position: batch {batch_size}, step {start_step}, rank {rank} of {world_size}")
        self.batch_size, self.start_step, self.rank, self.world_size, self.steps = batch_size, start_step, rank, world_size, steps

    def __iter__(self) -> Iterator[int]:
        steps = count(self.start_step) if self.steps is None else range(self.start_step, self.start_step + self.steps)
        for step in steps:
            first = first_sample(step, self.batch_size, self.rank, self.world_size)
            yield from range(first, first + self.batch_size)


def first_sample(step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> int:
    """The global sample number that starts batch ``step`` of ``rank``."""
    return (step * world_size + rank) * batch_size


@dataclass(frozen=True)
class PairBatch:
    """One training batch: ``hr`` (the target) [B, 3, H, W] and ``lq`` [B, 3, H/s, W/s] on the device."""

    step: int
    samples: list[int]
    hr: torch.Tensor
    lq: torch.Tensor


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


class PairStream:
    """Endless batches of ``SyntheticPairs`` with a resumable position.

    Iterating yields ``PairBatch`` from ``step`` on; ``step`` advances as each batch is handed out,
    so ``state_dict()`` taken after consuming batch k resumes at k + 1 (it has the
    ``state_dict``/``load_state_dict`` pair that checkpointing helpers expect). Crops are loaded by
    a ``DataLoader`` (``num_workers`` processes); degradation runs batched on ``device``.
    """

    def __init__(
        self,
        pairs: SyntheticPairs,
        batch_size: int,
        device: torch.device | str = "cpu",
        *,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        start_step: int = 0,
    ) -> None:
        StreamSampler(batch_size, start_step, rank, world_size)  # validates the position
        self.pairs, self.batch_size, self.device = pairs, batch_size, torch.device(device)
        self.rank, self.world_size, self.num_workers, self.step = rank, world_size, num_workers, start_step

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, index within the epoch) of the next batch's first sample on this rank."""
        return self.pairs.crops.locate(first_sample(self.step, self.batch_size, self.rank, self.world_size))

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "batch_size": self.batch_size, "world_size": self.world_size, "seed": self.pairs.crops.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position; the batch size, world size and seed must be the saved ones."""
        for key in ("batch_size", "world_size", "seed"):
            ours = self.state_dict()[key]
            if int(state[key]) != ours:
                raise TinySRError(f"cannot resume the data stream: saved {key} {state[key]}, now {ours}")
        self.step = int(state["step"])

    def __iter__(self) -> Iterator[PairBatch]:
        sampler = StreamSampler(self.batch_size, self.step, self.rank, self.world_size)
        loader = DataLoader(
            self.pairs.crops,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        for step, batch in zip(count(self.step), loader):
            samples = [int(g) for g in batch["sample"]]
            hr, lq = self.pairs.degrade(batch["hr"].to(self.device, non_blocking=True), samples)
            self.step = step + 1
            yield PairBatch(step, samples, hr, lq)


class PairedImages(Dataset):
    """Matching LR/HR files of two folders: ``pairs[i]`` -> {"lq", "hr": [3, h, w] floats, "name"}.

    Files pair by their path relative to their folder without the extension (``x.png`` with
    ``x.jpg``); any file without a partner is an error. With ``scale``, every HR must be exactly
    ``scale`` times its LR.
    """

    def __init__(self, lr_folder: Path, hr_folder: Path, scale: int | None = None) -> None:
        lr, hr = _by_name(Path(lr_folder)), _by_name(Path(hr_folder))
        unpaired = sorted(set(lr) ^ set(hr))
        if unpaired:
            shown = ", ".join(unpaired[:5]) + (f" and {len(unpaired) - 5} more" if len(unpaired) > 5 else "")
            raise TinySRError(f"{len(unpaired)} file(s) of {lr_folder} and {hr_folder} have no partner: {shown}")
        self.names = sorted(lr)
        self.lr_files, self.hr_files = [lr[n] for n in self.names], [hr[n] for n in self.names]
        self.scale = scale

    @classmethod
    def from_root(cls, root: Path, scale: int | None = None) -> PairedImages:
        """A test set folder holding ``test_LR``/``test_HR`` or ``LR``/``HR``."""
        for lr_name, hr_name in PAIRED_LAYOUTS:
            if (Path(root) / lr_name).is_dir() and (Path(root) / hr_name).is_dir():
                return cls(Path(root) / lr_name, Path(root) / hr_name, scale)
        layouts = " or ".join(f"{a}/ and {b}/" for a, b in PAIRED_LAYOUTS)
        raise TinySRError(f"{root}: no paired folders found", hint=f"a paired test set holds {layouts}")

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict[str, Any]:
        lq, hr = load_image(self.lr_files[index]).rgb, load_image(self.hr_files[index]).rgb
        if self.scale is not None and (hr.shape[-2] != lq.shape[-2] * self.scale or hr.shape[-1] != lq.shape[-1] * self.scale):
            raise TinySRError(
                f"{self.hr_files[index].name}: HR is {hr.shape[-1]}x{hr.shape[-2]}, LR {lq.shape[-1]}x{lq.shape[-2]}; "
                f"expected exactly x{self.scale}"
            )
        return {"lq": lq, "hr": hr, "name": self.names[index]}


def _by_name(folder: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in list_images([folder]):
        name = path.relative_to(folder).with_suffix("").as_posix()
        if name in files:
            raise TinySRError(f"{folder}: {files[name].name} and {path.name} share the name {name!r}")
        files[name] = path
    return files
