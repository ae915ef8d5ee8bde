"""Batches for the search, as ``step -> {"latent": z_lq, "target": z_hq}`` callables.

Deterministic in the step (so a resumed run sees the same data). ``TeacherTargets`` is a synthetic
pool of random latents labelled by the unpruned teacher itself; ``LatentFolder`` reads cached latent
pairs (the paper pre-encodes LQ and HQ latents), one ``.safetensors`` file per sample.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from tinysr_cli.errors import TinySRError
from training.prune.stacks import Batch, ResidualStack, forward_masked


class TeacherTargets:
    """``count`` fixed batches of N(0, 1) latents whose target is the full teacher's output.

    Build it before LoRA is attached: the targets are computed here, once.
    """

    def __init__(
        self,
        stack: ResidualStack,
        count: int,
        batch_size: int,
        channels: int,
        latent_size: int,
        seed: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.pool: list[dict[str, torch.Tensor]] = []
        with torch.no_grad():
            for _ in range(count):
                latent = torch.randn(batch_size, channels, latent_size, latent_size, generator=generator)
                latent = latent.to(device=device, dtype=dtype)
                self.pool.append({"latent": latent, "target": forward_masked(stack, {"latent": latent})})

    def __call__(self, step: int) -> Batch:
        return self.pool[step % len(self.pool)]


class LatentFolder:
    """Random batches of cached (LQ, HQ) latent pairs; sample ``i`` of step ``s`` depends only on (seed, s)."""

    def __init__(
        self,
        folder: Path,
        batch_size: int,
        seed: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        lq_key: str = "lq",
        hq_key: str = "hq",
    ) -> None:
        self.files = sorted(Path(folder).glob("*.safetensors"))
        if not self.files:
            raise TinySRError(
                f"no .safetensors latent files in {folder}",
                hint=f"each file holds one sample: tensors {lq_key!r} and {hq_key!r} of shape [C, H, W]",
            )
        self.batch_size, self.seed, self.device, self.dtype = batch_size, seed, device, dtype
        self.lq_key, self.hq_key = lq_key, hq_key

    def _sample(self, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = load_file(path)
        try:
            return tensors[self.lq_key], tensors[self.hq_key]
        except KeyError as error:
            raise TinySRError(f"{path} has no tensor {error.args[0]!r}", hint=f"found {sorted(tensors)}") from None

    def __call__(self, step: int) -> Batch:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        picks = torch.randint(len(self.files), (self.batch_size,), generator=generator).tolist()
        lq, hq = zip(*(self._sample(self.files[i]) for i in picks))
        return {
            "latent": torch.stack(lq).to(device=self.device, dtype=self.dtype),
            "target": torch.stack(hq).to(device=self.device, dtype=self.dtype),
        }
