"""Losses of the VAE and restoration stages: regression, perceptual (pluggable) and hinge GAN.

The perceptual losses are tinysr's offline LPIPS (AlexNet or VGG16) and DISTS (``tinysr_cli.iqa``),
whose weights ``tinysr metrics fetch`` puts in the cache once. For LPIPS, when those are missing, the
``lpips`` package (torchvision's weights, downloaded on first use) and then pyiqa are tried. A recipe
without any of them must choose ``perceptual = "none"``; asking for one that cannot be built is an
error that says what to do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tinysr_cli.errors import TinySRError

REGRESSION_LOSSES = ("l1", "l2")
PERCEPTUAL_LOSSES = ("none", "lpips", "lpips-vgg", "dists")


def regression_loss(kind: str, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean L1 or mean squared error, computed in float32."""
    prediction, target = prediction.float(), target.float()
    if kind == "l1":
        return F.l1_loss(prediction, target)
    if kind == "l2":
        return F.mse_loss(prediction, target)
    raise ValueError(f"unknown regression loss {kind!r}; choose one of {REGRESSION_LOSSES}")


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - real_logits.float()).mean() + F.relu(1 + fake_logits.float()).mean()


def hinge_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.float().mean()


class PerceptualLoss(nn.Module):
    """A frozen LPIPS or DISTS network; images in [-1, 1]; returns the batch mean."""

    def __init__(self, network: nn.Module, takes_unit_range: bool) -> None:
        super().__init__()
        self.network = network.eval().requires_grad_(False)
        self.takes_unit_range = takes_unit_range

    def train(self, mode: bool = True) -> PerceptualLoss:
        return super().train(False)  # never leaves eval mode

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.takes_unit_range:
            prediction, target = (prediction + 1) / 2, (target + 1) / 2
        return self.network(prediction.float(), target.float()).mean()


def build_perceptual(name: str) -> PerceptualLoss | None:
    """The perceptual loss a recipe names, or ``None`` for "none"; a clear error when it cannot be built."""
    if name == "none":
        return None
    if name not in PERCEPTUAL_LOSSES:
        raise TinySRError(f"unknown perceptual loss {name!r}; choose one of {', '.join(PERCEPTUAL_LOSSES)}")
    from tinysr_cli import iqa

    net = "vgg" if name == "lpips-vgg" else "alex"
    try:
        if name == "dists":
            return PerceptualLoss(iqa.DISTS(), takes_unit_range=True)
        return PerceptualLoss(iqa.LPIPS(net), takes_unit_range=False)
    except TinySRError as exc:
        if name == "dists":
            raise TinySRError(f"perceptual = 'dists' is unavailable: {exc}", hint=exc.hint) from None
        errors = [f"tinysr's offline LPIPS: {exc}"]
    hint = 'run `tinysr metrics fetch` once while online, install `lpips` (with torchvision\'s pretrained weights in $TORCH_HOME) or `pyiqa` with its weights, or set perceptual = "none" in the recipe'
    try:
        import lpips
    except ImportError:
        errors.append("the lpips package is not installed")
    else:
        try:
            return PerceptualLoss(lpips.LPIPS(net=net, verbose=False), takes_unit_range=False)
        except Exception as exc:  # download and file errors come in many types
            errors.append(f"lpips could not load its pretrained {net} weights ({type(exc).__name__}: {exc})")
    try:
        import pyiqa
    except ImportError:
        errors.append("the pyiqa package is not installed")
    else:
        try:
            metric = pyiqa.create_metric("lpips-vgg" if net == "vgg" else "lpips", as_loss=True, device="cpu")
            return PerceptualLoss(metric, takes_unit_range=True)
        except Exception as exc:
            errors.append(f"pyiqa could not load its LPIPS weights ({type(exc).__name__}: {exc})")
    raise TinySRError(f"perceptual = {name!r} is unavailable: {'; '.join(errors)}", hint=hint)
