"""Real-ESRGAN's second-order degradation in torch: HR crops [B, 3, H, W] -> LQ [B, 3, H/s, W/s].

Pipeline (Wang et al. 2021; the diffusion SR papers train on its 512 -> 128 form): optional USM
sharpening of the ground truth, then two stages of blur -> random resize -> Gaussian or Poisson noise
(-> JPEG after stage 1), then a final resize to H/s with a sinc filter and JPEG in one of two orders,
and LQ = round(clamp(x) * 255) / 255. Every range and probability is a field of
``DegradationConfig``; ``REALESRGAN`` holds the published defaults, ``MILD`` the SeeSR/AdcSR variant.

Randomness: each sample draws all of its choices (kernels, resize, noise, qualities, order) from its
own ``torch.Generator`` seeded by a per-sample seed, and its noise from a generator on the tensors'
device seeded from that. So a sample's LQ depends on its HR and its seed only, never on the batch it
is in. The price: Real-ESRGAN shares one resize factor per batch to keep the batch a single tensor;
here each sample has its own, and steps that keep shapes equal (blur, noise, JPEG, everything at the
final size) run batched over the samples that share a shape.

JPEG is computed in torch the way DiffJPEG does (YCbCr, 4:2:0, 8x8 DCT, the standard tables scaled
by the IJG quality rule, rounding, inverse), with hard rounding: the data pipeline needs no gradient.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from tinysr_cli.errors import TinySRError

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic")
ODD_SIZES = (7, 9, 11, 13, 15, 17, 19, 21)
_LUMA = (0.299, 0.587, 0.114)


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class KernelConfig:
    """How one blur kernel is drawn: a sinc with ``sinc_prob``, else one of ``types``."""

    sizes: tuple[int, ...] = ODD_SIZES  # drawn uniformly
    sinc_prob: float = 0.1
    sinc_cutoff_small: tuple[float, float] = (math.pi / 3, math.pi)  # sizes below sinc_small_below
    sinc_cutoff_large: tuple[float, float] = (math.pi / 5, math.pi)
    sinc_small_below: int = 13
    types: tuple[str, ...] = KERNEL_TYPES
    type_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sigma_range: tuple[float, float] = (0.2, 3.0)
    rotation_range: tuple[float, float] = (-math.pi, math.pi)
    # beta: with p 0.5 U(lo, 1), else U(1, hi)
    generalized_beta_range: tuple[float, float] = (0.5, 4.0)
    plateau_beta_range: tuple[float, float] = (1.0, 2.0)

    def check(self, name: str, padded_size: int) -> None:
        _check_sizes(f"{name}.sizes", self.sizes, padded_size)
        _check_prob(f"{name}.sinc_prob", self.sinc_prob)
        _check_choice(f"{name}.types", self.types, self.type_probs, KERNEL_TYPES)
        for label in ("sinc_cutoff_small", "sinc_cutoff_large", "sigma_range", "rotation_range"):
            _check_range(f"{name}.{label}", getattr(self, label), low=-math.pi if label == "rotation_range" else 0.0)
        for label in ("generalized_beta_range", "plateau_beta_range"):
            low, high = _check_range(f"{name}.{label}", getattr(self, label), low=0.0)
            if not low <= 1.0 <= high:
                raise TinySRError(f"degradation {name}.{label} must contain 1, got {(low, high)}")


@dataclass(frozen=True)
class StageConfig:
    """One degradation stage: blur -> resize -> noise."""

    kernel: KernelConfig = field(default_factory=KernelConfig)
    blur_prob: float = 1.0
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)  # up: U(1, hi); down: U(lo, 1)
    resize_modes: tuple[str, ...] = RESIZE_MODES  # drawn uniformly
    gaussian_noise_prob: float = 0.5  # else Poisson
    noise_sigma_range: tuple[float, float] = (1.0, 30.0)  # in 8-bit levels
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4

    def check(self, name: str, padded_size: int) -> None:
        self.kernel.check(f"{name}.kernel", padded_size)
        for label in ("blur_prob", "gaussian_noise_prob", "gray_noise_prob"):
            _check_prob(f"{name}.{label}", getattr(self, label))
        _check_choice(f"{name}.resize", ("up", "down", "keep"), self.resize_probs, ("up", "down", "keep"))
        low, high = _check_range(f"{name}.resize_range", self.resize_range, low=1e-6)
        if not low <= 1.0 <= high:
            raise TinySRError(f"degradation {name}.resize_range must contain 1, got {(low, high)}")
        _check_choice(f"{name}.resize_modes", self.resize_modes, None, RESIZE_MODES)
        _check_range(f"{name}.noise_sigma_range", self.noise_sigma_range, low=0.0)
        _check_range(f"{name}.poisson_scale_range", self.poisson_scale_range, low=0.0)


@dataclass(frozen=True)
class DegradationConfig:
    """Every range and probability of the pipeline; qualities are JPEG quality numbers (1-100)."""

    scale: int = 4
    padded_kernel_size: int = 21  # every kernel is zero-padded to this size
    sharpen: bool = False  # USM-sharpen the ground truth, degrade the sharpened image and return it
    usm_kernel_size: int = 51
    usm_sigma: float = 0.0  # 0: OpenCV's rule from the size (8.0 for 51)
    usm_threshold: float = 10.0  # in 8-bit levels
    usm_weight: float = 0.5
    stage1: StageConfig = field(default_factory=StageConfig)
    jpeg_range1: tuple[float, float] = (30.0, 95.0)
    stage2: StageConfig = field(
        default_factory=lambda: StageConfig(
            kernel=KernelConfig(sigma_range=(0.2, 1.5)),
            blur_prob=0.8,
            resize_probs=(0.3, 0.4, 0.3),
            resize_range=(0.3, 1.2),  # relative to H / scale
            noise_sigma_range=(1.0, 25.0),
            poisson_scale_range=(0.05, 2.5),
        )
    )
    final_sinc_prob: float = 0.8
    final_sinc_sizes: tuple[int, ...] = ODD_SIZES
    final_sinc_cutoff: tuple[float, float] = (math.pi / 3, math.pi)
    final_resize_modes: tuple[str, ...] = RESIZE_MODES
    resize_first_prob: float = 0.5  # final order: resize -> sinc -> JPEG, else JPEG -> resize -> sinc
    jpeg_range2: tuple[float, float] = (30.0, 95.0)

    def __post_init__(self) -> None:
        if self.scale < 1:
            raise TinySRError(f"degradation scale must be at least 1, got {self.scale}")
        if self.padded_kernel_size < 1 or self.padded_kernel_size % 2 == 0:
            raise TinySRError(f"degradation padded_kernel_size must be odd, got {self.padded_kernel_size}")
        if self.usm_kernel_size < 1 or self.usm_kernel_size % 2 == 0:
            raise TinySRError(f"degradation usm_kernel_size must be odd, got {self.usm_kernel_size}")
        if self.usm_sigma < 0 or self.usm_threshold < 0 or self.usm_weight < 0:
            raise TinySRError("degradation usm_sigma, usm_threshold and usm_weight must be >= 0")
        self.stage1.check("stage1", self.padded_kernel_size)
        self.stage2.check("stage2", self.padded_kernel_size)
        for label in ("jpeg_range1", "jpeg_range2"):
            low, high = _check_range(label, getattr(self, label), low=1.0)
            if high > 100:
                raise TinySRError(f"degradation {label} must lie in [1, 100], got {(low, high)}")
        _check_prob("final_sinc_prob", self.final_sinc_prob)
        _check_prob("resize_first_prob", self.resize_first_prob)
        _check_sizes("final_sinc_sizes", self.final_sinc_sizes, self.padded_kernel_size)
        _check_range("final_sinc_cutoff", self.final_sinc_cutoff, low=0.0)
        _check_choice("final_resize_modes", self.final_resize_modes, None, RESIZE_MODES)


def _check_prob(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise TinySRError(f"degradation {name} must be a probability in [0, 1], got {value}")


def _check_range(name: str, value: tuple[float, float], low: float) -> tuple[float, float]:
    if len(value) != 2 or not low <= value[0] <= value[1]:
        raise TinySRError(f"degradation {name} must be (low, high) with {low} <= low <= high, got {value}")
    return value[0], value[1]


def _check_sizes(name: str, sizes: Sequence[int], padded_size: int) -> None:
    if not sizes or any(s < 1 or s % 2 == 0 or s > padded_size for s in sizes):
        raise TinySRError(f"degradation {name} must be odd sizes up to {padded_size}, got {tuple(sizes)}")


def _check_choice(name: str, options: Sequence[str], probs: Sequence[float] | None, known: Sequence[str]) -> None:
    unknown = [o for o in options if o not in known]
    if not options or unknown:
        raise TinySRError(f"degradation {name}: unknown or empty choice {unknown or list(options)}; known: {', '.join(known)}")
    if probs is not None and (len(probs) != len(options) or min(probs) < 0 or not math.isclose(sum(probs), 1.0, abs_tol=1e-6)):
        raise TinySRError(f"degradation {name} probabilities must be {len(options)} numbers >= 0 summing to 1, got {tuple(probs)}")


REALESRGAN = DegradationConfig()
MILD = replace(
    REALESRGAN,
    stage1=replace(REALESRGAN.stage1, resize_range=(0.3, 1.5), noise_sigma_range=(1.0, 15.0), poisson_scale_range=(0.05, 2.0)),
    jpeg_range1=(60.0, 95.0),
    stage2=replace(
        REALESRGAN.stage2, blur_prob=0.5, resize_range=(0.6, 1.2), noise_sigma_range=(1.0, 12.0), poisson_scale_range=(0.05, 1.0)
    ),
    jpeg_range2=(60.0, 100.0),
)
PRESETS = {"realesrgan": REALESRGAN, "mild": MILD}


# ----------------------------------------------------------------------------- kernels


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) float64 coordinates of a size x size kernel, centred: x along columns, y along rows."""
    axis = torch.arange(size, dtype=torch.float64) - size // 2
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return x, y


def bivariate_kernel(
    size: int, sigma_x: float, sigma_y: float, rotation: float, shape: str = "gaussian", beta: float = 1.0
) -> torch.Tensor:
    """A normalised [size, size] kernel of the quadratic form q = xᵀΣ⁻¹x, Σ = R diag(σx², σy²) Rᵀ.

    ``shape``: "gaussian" exp(-q/2), "generalized" exp(-q^β/2), "plateau" 1/(q^β + 1).
    """
    x, y = _grid(size)
    cos, sin = math.cos(rotation), math.sin(rotation)
    u, v = cos * x + sin * y, -sin * x + cos * y  # coordinates in the kernel's principal axes (Rᵀx)
    q = (u / sigma_x) ** 2 + (v / sigma_y) ** 2
    if shape == "gaussian":
        kernel = torch.exp(-0.5 * q)
    elif shape == "generalized":
        kernel = torch.exp(-0.5 * q**beta)
    elif shape == "plateau":
        kernel = 1.0 / (q**beta + 1.0)
    else:
        raise ValueError(f"unknown kernel shape {shape!r}")
    return (kernel / kernel.sum()).float()


def sinc_kernel(size: int, cutoff: float) -> torch.Tensor:
    """A normalised [size, size] circular low-pass kernel: cutoff·J1(cutoff·r) / (2πr), cutoff²/(4π) at r = 0."""
    x, y = _grid(size)
    r = torch.sqrt(x**2 + y**2)
    safe_r = torch.where(r > 0, r, torch.ones_like(r))
    kernel = torch.where(r > 0, cutoff * torch.special.bessel_j1(cutoff * safe_r) / (2 * math.pi * safe_r), cutoff**2 / (4 * math.pi))
    return (kernel / kernel.sum()).float()


def pad_kernel(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad a square odd kernel to [size, size], centred."""
    pad = (size - kernel.shape[-1]) // 2
    return F.pad(kernel, (pad, pad, pad, pad))


class _Draws:
    """Random choices from one CPU ``torch.Generator``."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=self.generator, dtype=torch.float64))

    def chance(self, prob: float) -> bool:
        return float(torch.rand((), generator=self.generator, dtype=torch.float64)) < prob

    def choice(self, options: Sequence, probs: Sequence[float] | None = None):
        weights = torch.tensor(probs if probs is not None else [1.0] * len(options), dtype=torch.float64)
        return options[int(torch.multinomial(weights, 1, generator=self.generator))]

    def seed(self) -> int:
        return int(torch.randint(0, 2**62, (), generator=self.generator))


def _draw_beta(draws: _Draws, beta_range: tuple[float, float]) -> float:
    return draws.uniform(beta_range[0], 1.0) if draws.chance(0.5) else draws.uniform(1.0, beta_range[1])


def random_kernel(config: KernelConfig, padded_size: int, draws: _Draws) -> torch.Tensor:
    """One blur kernel drawn as ``config`` says, padded to [padded_size, padded_size]."""
    size = draws.choice(config.sizes)
    if draws.chance(config.sinc_prob):
        cutoff = draws.uniform(*(config.sinc_cutoff_small if size < config.sinc_small_below else config.sinc_cutoff_large))
        return pad_kernel(sinc_kernel(size, cutoff), padded_size)
    kind = draws.choice(config.types, config.type_probs)
    sigma_x = draws.uniform(*config.sigma_range)
    if kind.split("_")[-1] == "iso":
        sigma_y, rotation = sigma_x, 0.0
    else:
        sigma_y, rotation = draws.uniform(*config.sigma_range), draws.uniform(*config.rotation_range)
    if kind.startswith("generalized"):
        shape, beta = "generalized", _draw_beta(draws, config.generalized_beta_range)
    elif kind.startswith("plateau"):
        shape, beta = "plateau", _draw_beta(draws, config.plateau_beta_range)
    else:
        shape, beta = "gaussian", 1.0
    return pad_kernel(bivariate_kernel(size, sigma_x, sigma_y, rotation, shape, beta), padded_size)


# ----------------------------------------------------------------------------- per-sample plans


@dataclass(frozen=True)
class Resize:
    scale: float
    mode: str


@dataclass(frozen=True)
class Noise:
    gaussian: bool  # else Poisson
    strength: float  # Gaussian sigma in [0, 1] units, or the Poisson scale
    gray: bool


@dataclass(frozen=True)
class DegradationPlan:
    """Every random choice for one sample; kernels are [K, K] CPU tensors (None: step skipped)."""

    kernel1: torch.Tensor
    resize1: Resize
    noise1: Noise
    quality1: int
    kernel2: torch.Tensor | None
    resize2: Resize
    noise2: Noise
    resize_first: bool
    final_mode: str
    sinc: torch.Tensor | None
    quality2: int
    noise_seed: int  # seeds the sample's noise generator on the tensors' device


def _draw_resize(stage: StageConfig, draws: _Draws) -> Resize:
    direction = draws.choice(("up", "down", "keep"), stage.resize_probs)
    if direction == "up":
        scale = draws.uniform(1.0, stage.resize_range[1])
    elif direction == "down":
        scale = draws.uniform(stage.resize_range[0], 1.0)
    else:
        scale = 1.0
    return Resize(scale, draws.choice(stage.resize_modes))


def _draw_noise(stage: StageConfig, draws: _Draws) -> Noise:
    gaussian = draws.chance(stage.gaussian_noise_prob)
    strength = draws.uniform(*stage.noise_sigma_range) / 255.0 if gaussian else draws.uniform(*stage.poisson_scale_range)
    return Noise(gaussian, strength, draws.chance(stage.gray_noise_prob))


def _draw_quality(quality_range: tuple[float, float], draws: _Draws) -> int:
    return int(round(draws.uniform(*quality_range)))


def sample_plan(config: DegradationConfig, seed: int) -> DegradationPlan:
    """All random choices for one sample, a function of ``config`` and ``seed`` only."""
    draws, size = _Draws(seed), config.padded_kernel_size
    kernel1 = random_kernel(config.stage1.kernel, size, draws)
    resize1, noise1 = _draw_resize(config.stage1, draws), _draw_noise(config.stage1, draws)
    quality1 = _draw_quality(config.jpeg_range1, draws)
    kernel2 = random_kernel(config.stage2.kernel, size, draws) if draws.chance(config.stage2.blur_prob) else None
    resize2, noise2 = _draw_resize(config.stage2, draws), _draw_noise(config.stage2, draws)
    resize_first = draws.chance(config.resize_first_prob)
    final_mode = draws.choice(config.final_resize_modes)
    sinc = None
    if draws.chance(config.final_sinc_prob):
        sinc = pad_kernel(sinc_kernel(draws.choice(config.final_sinc_sizes), draws.uniform(*config.final_sinc_cutoff)), size)
    quality2 = _draw_quality(config.jpeg_range2, draws)
    return DegradationPlan(kernel1, resize1, noise1, quality1, kernel2, resize2, noise2, resize_first, final_mode, sinc, quality2, draws.seed())


# ----------------------------------------------------------------------------- operations (batched)


def reflect_pad(image: torch.Tensor, pad: int) -> torch.Tensor:
    """Reflect-pad [B, C, H, W] by ``pad`` on every side, reflecting again where the image is too small."""
    while pad > 0:
        step = min(pad, image.shape[-2] - 1, image.shape[-1] - 1)
        if step < 1:  # a single row or column has nothing to reflect
            return F.pad(image, (pad,) * 4, mode="replicate")
        image = F.pad(image, (step,) * 4, mode="reflect")
        pad -= step
    return image


def filter2d(image: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Filter each sample of [B, C, H, W] with its own kernel [B, K, K] (K odd), reflect padding."""
    batch, channels, height, width = image.shape
    size = kernels.shape[-1]
    padded = reflect_pad(image, size // 2)
    weight = kernels.to(image).repeat_interleave(channels, dim=0).unsqueeze(1)  # [B*C, 1, K, K]
    out = F.conv2d(padded.reshape(1, batch * channels, *padded.shape[-2:]), weight, groups=batch * channels)
    return out.view(batch, channels, height, width)


def resize(image: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize [B, C, H, W] to ``size`` (no antialiasing, as Real-ESRGAN); unchanged if already that size."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image, size=size, mode=mode, align_corners=False if mode in ("bilinear", "bicubic") else None)


def add_gaussian_noise(image: torch.Tensor, sigma: Sequence[float], gray: Sequence[bool], generators: Sequence[torch.Generator]) -> torch.Tensor:
    """image + N(0, sigma²) per sample (one noise plane for all channels where ``gray``), clamped to [0, 1]."""
    noise = []
    for sample, s, g, generator in zip(image, sigma, gray, generators):
        shape = (1, *sample.shape[-2:]) if g else sample.shape
        noise.append(torch.randn(shape, generator=generator, device=image.device, dtype=image.dtype).expand_as(sample) * s)
    return (image + torch.stack(noise)).clamp(0.0, 1.0)


def add_poisson_noise(image: torch.Tensor, scale: Sequence[float], gray: Sequence[bool], generators: Sequence[torch.Generator]) -> torch.Tensor:
    """image + scale·(Poisson(v·n)/n - v) per sample, clamped to [0, 1].

    v is the image quantised to 8 bits (its luma where ``gray``) and n = 2^ceil(log2(number of
    distinct levels in v)), BasicSR's photon count.
    """
    luma = torch.tensor(_LUMA, device=image.device, dtype=image.dtype).view(3, 1, 1)
    noise = []
    for sample, s, g, generator in zip(image, scale, gray, generators):
        source = (sample * luma).sum(0, keepdim=True) if g else sample
        levels = (source * 255.0).round().clamp(0, 255) / 255.0
        count = 2.0 ** math.ceil(math.log2(len(torch.unique(levels))))
        photons = torch.poisson(levels * count, generator=generator) / count
        noise.append(((photons - levels) * s).expand_as(sample))
    return (image + torch.stack(noise)).clamp(0.0, 1.0)


def add_noise(image: torch.Tensor, noises: Sequence[Noise], generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Each sample's planned noise; samples are split by kind and noised in order."""
    out = image.clone()
    for gaussian, add in ((True, add_gaussian_noise), (False, add_poisson_noise)):
        members = [i for i, n in enumerate(noises) if n.gaussian == gaussian]
        if members:
            chosen = [noises[i] for i in members]
            out[members] = add(image[members], [n.strength for n in chosen], [n.gray for n in chosen], [generators[i] for i in members])
    return out


# JPEG (ITU T.81 Annex K) base tables in row-major order.
_LUMA_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61), (12, 12, 14, 19, 26, 58, 60, 55), (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62), (18, 22, 37, 56, 68, 109, 103, 77), (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101), (72, 92, 95, 98, 112, 100, 103, 99),
)
_CHROMA_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99), (18, 21, 26, 66, 99, 99, 99, 99), (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99), *((99,) * 8,) * 4,
)


def quantisation_tables(quality: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(luma, chroma) tables [B, 8, 8] for integer qualities, scaled as libjpeg's jpeg_set_quality."""
    luma, chroma = torch.tensor(_LUMA_TABLE, dtype=torch.float64), torch.tensor(_CHROMA_TABLE, dtype=torch.float64)
    scales = [5000 // q if q < 50 else 200 - 2 * q for q in (min(max(int(q), 1), 100) for q in quality)]

    def scaled(base: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.floor((base * s + 50) / 100).clamp(1, 255) for s in scales]).float()

    return scaled(luma), scaled(chroma)


def _dct_matrix() -> torch.Tensor:
    """Orthonormal 8-point DCT-II matrix D (rows: frequencies); JPEG's 2D FDCT is D X Dᵀ."""
    n = torch.arange(8, dtype=torch.float64)
    matrix = torch.cos((2 * n[None, :] + 1) * n[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    matrix[0] /= math.sqrt(2)
    return matrix.float()


def _quantise_blocks(plane: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """DCT, quantise with ``table`` [B, 8, 8], dequantise and inverse DCT each 8x8 block of [B, h, w]."""
    batch, height, width = plane.shape
    blocks = plane.view(batch, height // 8, 8, width // 8, 8).transpose(2, 3)  # [B, h/8, w/8, 8, 8]
    dct = _dct_matrix().to(plane)
    coefficients = dct @ blocks @ dct.T
    table = table.to(plane)[:, None, None]
    restored = dct.T @ (torch.round(coefficients / table) * table) @ dct
    return restored.transpose(2, 3).reshape(batch, height, width)


def jpeg(image: torch.Tensor, quality: Sequence[int]) -> torch.Tensor:
    """JPEG-compress and decode [B, 3, H, W] in [0, 1] (clamped first) at per-sample integer qualities.

    Baseline JFIF: RGB -> YCbCr, 2x2 chroma averaging (4:2:0), level shift, 8x8 DCT, quantisation
    with the scaled standard tables, inverse; chroma comes back by bilinear (libjpeg's "fancy")
    upsampling. Sizes are padded to multiples of 16 by edge replication and cropped back.
    """
    batch, _, height, width = image.shape
    pad_h, pad_w = -height % 16, -width % 16
    x = F.pad(image.clamp(0.0, 1.0), (0, pad_w, 0, pad_h), mode="replicate") * 255.0
    r, g, b = x.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b
    luma_table, chroma_table = quantisation_tables(quality)
    y = _quantise_blocks(y - 128.0, luma_table) + 128.0
    chroma = F.avg_pool2d(torch.stack([cb, cr], 1), 2)  # [B, 2, H/2, W/2]
    chroma = torch.stack([_quantise_blocks(c, chroma_table) for c in chroma.unbind(1)], 1)
    cb, cr = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False).unbind(1)
    rgb = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], 1)
    return (rgb / 255.0).clamp(0.0, 1.0)[..., :height, :width]


def _gaussian_1d(size: int, sigma: float) -> torch.Tensor:
    """OpenCV's getGaussianKernel: sigma <= 0 means 0.3·((size - 1)/2 - 1) + 0.8."""
    if sigma <= 0:
        sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    x = torch.arange(size, dtype=torch.float64) - size // 2
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    return (kernel / kernel.sum()).float()


def _separable_blur(image: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    channels, size = image.shape[1], kernel.numel()
    padded = reflect_pad(image, size // 2)
    weight = kernel.to(image)
    padded = F.conv2d(padded, weight.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)
    return F.conv2d(padded, weight.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)


def usm_sharpen(image: torch.Tensor, kernel_size: int = 51, sigma: float = 0.0, threshold: float = 10.0, weight: float = 0.5) -> torch.Tensor:
    """Unsharp masking as Real-ESRGAN: sharpen by ``weight``·(image - blur) where |residual| > threshold/255, softly."""
    kernel = _gaussian_1d(kernel_size, sigma)
    residual = image - _separable_blur(image, kernel)
    mask = (residual.abs() * 255.0 > threshold).to(image.dtype)
    soft_mask = _separable_blur(mask, kernel)
    sharp = (image + weight * residual).clamp(0.0, 1.0)
    return soft_mask * sharp + (1.0 - soft_mask) * image


# ----------------------------------------------------------------------------- the pipeline


def _batched(images: list[torch.Tensor], members: Sequence[int], step: Callable[[torch.Tensor, list[int]], torch.Tensor]) -> None:
    """Replace ``images[i]`` ([1, C, h, w] each) for i in ``members`` by ``step``, batched by shape."""
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i in members:
        by_shape[tuple(images[i].shape)].append(i)
    for group in by_shape.values():
        for i, out in zip(group, step(torch.cat([images[i] for i in group]), group).split(1)):
            images[i] = out


def degrade(hr: torch.Tensor, seeds: Sequence[int], config: DegradationConfig = REALESRGAN) -> tuple[torch.Tensor, torch.Tensor]:
    """(target [B, 3, H, W], LQ [B, 3, H/s, W/s]) from HR crops in [0, 1], sample i drawn from ``seeds[i]``.

    The target is ``hr`` itself, or its USM-sharpened version when ``config.sharpen``. LQ values are
    multiples of 1/255 in [0, 1]. Works on any device; computed in float32, returned in ``hr``'s dtype.
    """
    if hr.ndim != 4 or hr.shape[1] != 3 or len(seeds) != hr.shape[0]:
        raise ValueError(f"degrade needs HR [B, 3, H, W] and B seeds, got {tuple(hr.shape)} and {len(seeds)} seeds")
    plans = [sample_plan(config, int(seed)) for seed in seeds]
    target = usm_sharpen(hr, config.usm_kernel_size, config.usm_sigma, config.usm_threshold, config.usm_weight) if config.sharpen else hr
    return target, apply_plans(target.float(), plans, config.scale).to(hr.dtype)


def apply_plans(hr: torch.Tensor, plans: Sequence[DegradationPlan], scale: int) -> torch.Tensor:
    """LQ [B, 3, H/scale, W/scale] from HR [B, 3, H, W] following one plan per sample."""
    height, width = hr.shape[-2:]
    final_size = (height // scale, width // scale)
    generators = [torch.Generator(device=hr.device).manual_seed(plan.noise_seed) for plan in plans]
    images = list(hr.split(1))
    everyone = range(len(plans))

    def stack(name: str, group: list[int]) -> torch.Tensor:
        return torch.stack([getattr(plans[i], name) for i in group])

    def resize_each(size_of: Callable[[DegradationPlan], tuple[int, int]], mode_of: Callable[[DegradationPlan], str]) -> None:
        for i, plan in enumerate(plans):
            images[i] = resize(images[i], size_of(plan), mode_of(plan))

    def noise_step(name: str) -> Callable[[torch.Tensor, list[int]], torch.Tensor]:
        return lambda x, group: add_noise(x, [getattr(plans[i], name) for i in group], [generators[i] for i in group])

    def jpeg_step(name: str) -> Callable[[torch.Tensor, list[int]], torch.Tensor]:
        return lambda x, group: jpeg(x, [getattr(plans[i], name) for i in group])

    # stage 1 at H x W, then each sample at its own size
    _batched(images, everyone, lambda x, group: filter2d(x, stack("kernel1", group)))
    resize_each(lambda p: (max(1, int(height * p.resize1.scale)), max(1, int(width * p.resize1.scale))), lambda p: p.resize1.mode)
    _batched(images, everyone, noise_step("noise1"))
    _batched(images, everyone, jpeg_step("quality1"))
    # stage 2, sizes relative to H / scale
    blurred = [i for i, p in enumerate(plans) if p.kernel2 is not None]
    _batched(images, blurred, lambda x, group: filter2d(x, stack("kernel2", group)))
    resize_each(
        lambda p: (max(1, int(height / scale * p.resize2.scale)), max(1, int(width / scale * p.resize2.scale))), lambda p: p.resize2.mode
    )
    _batched(images, everyone, noise_step("noise2"))
    # final: (resize -> sinc -> JPEG) for resize_first samples, (JPEG -> resize -> sinc) for the others
    _batched(images, [i for i, p in enumerate(plans) if not p.resize_first], jpeg_step("quality2"))
    resize_each(lambda p: final_size, lambda p: p.final_mode)
    _batched(images, [i for i, p in enumerate(plans) if p.sinc is not None], lambda x, group: filter2d(x, stack("sinc", group)))
    _batched(images, [i for i, p in enumerate(plans) if p.resize_first], jpeg_step("quality2"))
    lq = torch.cat(images)
    return (lq.clamp(0.0, 1.0) * 255.0).round() / 255.0
