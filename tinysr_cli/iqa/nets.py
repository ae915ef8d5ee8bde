"""LPIPS (AlexNet, VGG16) and DISTS as differentiable PyTorch modules, with the offline weights.

LPIPS v0.1 (Zhang et al. 2018): images shifted by (-0.030, -0.088, -0.188) and scaled by
(0.458, 0.448, 0.450) from [-1, 1]; five ReLU outputs of the frozen backbone (AlexNet relu1-5, VGG16
relu1_2, 2_2, 3_3, 4_3, 5_3) unit-normalised over channels (eps 1e-10), squared differences weighted
by the 1x1 linear heads, averaged over space and summed over the layers.

DISTS (Ding et al. 2020): torchvision's VGG16 features with every max-pool replaced by an L2 pool
(3x3 Hann window [.5, 1, .5]^2 / 4, stride 2, padding 1, sqrt(conv(x^2) + 1e-12)); images in [0, 1]
normalised by ImageNet's mean and std; stages at the input and relu1_2 ... relu5_3; per channel a
luminance term (2 mu_x mu_y + c) / (mu_x^2 + mu_y^2 + c) and a structure term
(2 cov + c) / (var_x + var_y + c), c = 1e-6, weighted by alpha and beta normalised to sum to 1;
DISTS = 1 - the weighted sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tinysr_cli.iqa import files

_ALEX_LAYERS = [(3, 64, 11, 4, 2), "R", "M3", (64, 192, 5, 1, 2), "R", "M3", (192, 384, 3, 1, 1), "R",
                (384, 256, 3, 1, 1), "R", (256, 256, 3, 1, 1), "R"]
_ALEX_TAPS = (1, 4, 7, 9, 11)
_VGG_CHANNELS = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_VGG_TAPS = (3, 8, 15, 22, 29)
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def alexnet_features() -> nn.Sequential:
    """torchvision's ``alexnet().features`` up to relu5 (indices 0-11), untrained."""
    layers: list[nn.Module] = []
    for spec in _ALEX_LAYERS:
        if spec == "R":
            layers.append(nn.ReLU(inplace=False))
        elif spec == "M3":
            layers.append(nn.MaxPool2d(3, 2))
        else:
            c_in, c_out, k, stride, pad = spec
            layers.append(nn.Conv2d(c_in, c_out, k, stride, pad))
    return nn.Sequential(*layers)


def vgg16_features(l2_pool: bool = False) -> nn.Sequential:
    """torchvision's ``vgg16().features`` up to relu5_3 (indices 0-29), untrained; DISTS's L2 pools
    in place of the max-pools with ``l2_pool``."""
    layers: list[nn.Module] = []
    channels = 3
    for spec in _VGG_CHANNELS:
        if spec == "M":
            layers.append(L2Pool(channels) if l2_pool else nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, spec, 3, padding=1), nn.ReLU(inplace=False)]
            channels = spec
    return nn.Sequential(*layers)


class L2Pool(nn.Module):
    """DISTS's L2 pooling: sqrt of a 3x3 Hann-weighted sum of squares, stride 2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hann = torch.tensor([0.5, 1.0, 0.5])
        window = hann[:, None] * hann[None, :]
        self.register_buffer("window", (window / window.sum()).expand(channels, 1, 3, 3).clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.conv2d(x * x, self.window, stride=2, padding=1, groups=x.shape[1]) + 1e-12).sqrt()


def _taps(features: nn.Sequential, x: torch.Tensor, taps: tuple[int, ...]) -> list[torch.Tensor]:
    out = []
    for index, layer in enumerate(features[: taps[-1] + 1]):
        x = layer(x)
        if index in taps:
            out.append(x)
    return out


class _Frozen(nn.Module):
    """A metric network: no trainable parameters, always in eval mode."""

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> _Frozen:
        return super().train(False)


class LPIPS(_Frozen):
    """LPIPS v0.1 distance, differentiable in its inputs; ``forward`` returns one value per image [N].

    ``net`` is "alex" (as pyiqa's ``lpips``) or "vgg" (``lpips-vgg``). Inputs are [N, 3, H, W] RGB in
    [-1, 1] (as the ``lpips`` package), or in [0, 1] with ``unit_range=True`` (as pyiqa's metric).
    """

    def __init__(self, net: str = "alex", *, unit_range: bool = False, pretrained: bool = True) -> None:
        super().__init__()
        if net not in ("alex", "vgg"):
            raise ValueError(f"net must be 'alex' or 'vgg', not {net!r}")
        self.net, self.unit_range = net, unit_range
        self.features = alexnet_features() if net == "alex" else vgg16_features()
        self.taps = _ALEX_TAPS if net == "alex" else _VGG_TAPS
        widths = (64, 192, 384, 256, 256) if net == "alex" else (64, 128, 256, 512, 512)
        for k, width in enumerate(widths):
            self.add_module(f"lin{k}", nn.Conv2d(width, 1, 1, bias=False))
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        if pretrained:
            self.load_state_dict(files.load_cached(f"lpips-{net}.safetensors"))
        self._freeze()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.unit_range:
            x, y = x * 2 - 1, y * 2 - 1
        fx = _taps(self.features, (x - self.shift) / self.scale, self.taps)
        fy = _taps(self.features, (y - self.shift) / self.scale, self.taps)
        total = 0
        for k, (a, b) in enumerate(zip(fx, fy)):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{k}")((a - b) ** 2).mean((2, 3))
        return total[:, 0]


class DISTS(_Frozen):
    """DISTS, differentiable in its inputs: [N, 3, H, W] RGB in [0, 1] -> [N] (0 for identical images)."""

    CHANNELS = (3, 64, 128, 256, 512, 512)

    def __init__(self, *, pretrained: bool = True) -> None:
        super().__init__()
        self.features = vgg16_features(l2_pool=True)
        self.alpha = nn.Parameter(torch.full((1, sum(self.CHANNELS), 1, 1), 0.1))
        self.beta = nn.Parameter(torch.full((1, sum(self.CHANNELS), 1, 1), 0.1))
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if pretrained:
            vgg = files.load_cached("lpips-vgg.safetensors")
            state = {k: v for k, v in vgg.items() if k.startswith("features.")}
            state.update(files.load_cached("dists.safetensors"))
            self.load_state_dict(state)
        self._freeze()

    def _stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x, *_taps(self.features, (x - self.mean) / self.std, _VGG_TAPS)]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        weight_sum = self.alpha.sum() + self.beta.sum()
        alphas = torch.split(self.alpha / weight_sum, self.CHANNELS, dim=1)
        betas = torch.split(self.beta / weight_sum, self.CHANNELS, dim=1)
        c = 1e-6
        similarity = 0
        for a, b, alpha, beta in zip(self._stages(x), self._stages(y), alphas, betas):
            mu_a, mu_b = a.mean((2, 3), keepdim=True), b.mean((2, 3), keepdim=True)
            var_a = ((a - mu_a) ** 2).mean((2, 3), keepdim=True)
            var_b = ((b - mu_b) ** 2).mean((2, 3), keepdim=True)
            cov = (a * b).mean((2, 3), keepdim=True) - mu_a * mu_b
            luminance = (2 * mu_a * mu_b + c) / (mu_a**2 + mu_b**2 + c)
            structure = (2 * cov + c) / (var_a + var_b + c)
            similarity = similarity + (alpha * luminance).sum(1) + (beta * structure).sum(1)
        return 1 - similarity.flatten(1)[:, 0]
