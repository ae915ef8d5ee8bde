"""Batches for the search, as deterministic ``step -> batch`` callables (a resumed run sees the same data).

A batch holds ``latent`` (the model input), ``target`` (the task target) and optionally ``teacher``
(the unpruned teacher's output, used for distillation instead of running the teacher online).
``TeacherTargets`` is a synthetic pool of random latents labelled by the teacher itself;
``CachedLatents`` reads the shared latent cache (``training.latent_cache``: ``z_lq``, ``z_hq`` and
``z_teacher``, pre-encoded as the paper does).
"""

from __future__ import annotations

from pathlib import Path

import torch

from training.latent_cache import LatentCache
from training.prune.stacks import Batch, ResidualStack, forward_masked


class TeacherTargets:
    """``count`` fixed batches of N(0, 1) latents whose target is the full teacher's output.

    Build it before LoRA is attached: the targets are computed here, once.
    """

    def __init__(
        self, stack: ResidualStack, count: int, batch_size: int, latent_size: int, seed: int, device: torch.device
    ) -> None:
        generator = torch.Generator().manual_seed(seed)
        shape = (batch_size, stack.latent_channels, latent_size, latent_size)
        self.pool: list[dict[str, torch.Tensor]] = []
        with torch.no_grad():
            for _ in range(count):
                latent = torch.randn(shape, generator=generator).to(device)
                self.pool.append({"latent": latent, "target": forward_masked(stack, {"latent": latent})})

    def __call__(self, step: int) -> Batch:
        return self.pool[step % len(self.pool)]


class CachedLatents:
    """Random batches from a complete latent cache; the samples of step ``s`` depend only on (seed, s)."""

    def __init__(self, folder: Path, batch_size: int, seed: int, device: torch.device) -> None:
        self.cache = LatentCache(folder, fields=("z_lq", "z_hq", "z_teacher"))
        self.batch_size, self.seed, self.device = batch_size, seed, device

    def __call__(self, step: int) -> Batch:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        picks = torch.randint(len(self.cache), (self.batch_size,), generator=generator).tolist()
        samples = [self.cache[i] for i in picks]
        fields = {"latent": "z_lq", "target": "z_hq", "teacher": "z_teacher"}
        return {key: torch.stack([s[name] for s in samples]).to(self.device) for key, name in fields.items()}
