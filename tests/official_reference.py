"""An independent re-implementation of the authors' TinySR inference path, and a synthetic release.

Nothing here imports tinysr_cli. The backbone is assembled from diffusers' own building blocks in
the official module layout (``pos_embed`` = SD3 ``PatchEmbed`` with its run-time centre crop,
``time_text_embed``, ``transformer_blocks.N.{norm1, attn, norm2, ff}``, ``norm_out``,
``proj_out``); the adaLN-Zero modulation is computed at run time from t = 1000 and the pooled
embedding; the LoRA is injected by PEFT (``add_adapter`` with the official target modules) and
stays unmerged; the VAE is diffusers' ``AutoencoderTiny`` with each Conv2d swapped for a
depthwise-separable pair. The pipeline follows the official test script step by step: bicubic x4
with torch, encode, 64x64 latent tiles (overlap 8) blended with the official Gaussian window,
``z - v``, decode, clamp, 8-bit, colour fix against the LR image.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderTiny
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings, PatchEmbed
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "proj", "linear", "linear_1", "linear_2", "net.2"]
TIMESTEP = 1000.0
TILE, OVERLAP = 64, 8

TRANSFORMER_DIR = "tinybackbone/prune-12-merge-tinysr/transformer"
LORA_FILE = "tinysr/transformer.safetensors"
VAE_DIR = "vae/separable"
POOLED_FILE = "default/pool_embeds.pt"


# --------------------------------------------------------------------------------- backbone


class ImageStreamBlock(nn.Module):
    """SD3's joint block with the text stream removed: adaLN-Zero, attention over image tokens, FF."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim)
        self.attn = Attention(
            query_dim=dim, dim_head=dim // heads, heads=heads, out_dim=dim, bias=True, processor=JointAttnProcessor2_0()
        )
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")

    def forward(self, hidden: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden, emb=temb)
        hidden = hidden + gate_msa[:, None] * self.attn(hidden_states=normed)
        normed = self.norm2(hidden) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return hidden + gate_mlp[:, None] * self.ff(normed)


class TinySD3Transformer2DModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """The released backbone's layout and config signature (SD3 names), conditioning at run time."""

    @register_to_config
    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        num_layers: int = 12,
        attention_head_dim: int = 64,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        caption_projection_dim: int = 1536,
        pooled_projection_dim: int = 2048,
        out_channels: int = 16,
        pos_embed_max_size: int = 192,
    ) -> None:
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        self.pos_embed = PatchEmbed(
            height=sample_size, width=sample_size, patch_size=patch_size, in_channels=in_channels,
            embed_dim=dim, pos_embed_max_size=pos_embed_max_size,
        )
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(embedding_dim=dim, pooled_projection_dim=pooled_projection_dim)
        self.transformer_blocks = nn.ModuleList(ImageStreamBlock(dim, num_attention_heads) for _ in range(num_layers))
        self.norm_out = AdaLayerNormContinuous(dim, dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, pooled_projections: torch.Tensor) -> torch.Tensor:
        height, width = hidden_states.shape[-2:]
        p, c = self.config.patch_size, self.config.out_channels
        hidden = self.pos_embed(hidden_states)
        temb = self.time_text_embed(timestep, pooled_projections)
        for block in self.transformer_blocks:
            hidden = block(hidden, temb)
        hidden = self.proj_out(self.norm_out(hidden, temb))
        hidden = hidden.reshape(hidden.shape[0], height // p, width // p, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", hidden).reshape(hidden.shape[0], c, height, width)


def add_official_lora(model: TinySD3Transformer2DModel, rank: int, alpha: float) -> None:
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=LORA_TARGETS))


def load_official_lora(model: TinySD3Transformer2DModel, path: Path) -> None:
    """Fill the (unmerged) PEFT adapter from a ``transformer.<module>.lora_X.weight`` file."""
    state = load_file(path)
    for name, param in model.named_parameters():
        if ".default" in name:
            key = "transformer." + name.replace(".default", "")
            param.data.copy_(state.pop(key))
    assert not state, f"LoRA keys left over: {sorted(state)[:3]}"


# ------------------------------------------------------------------------------------- VAE


class SeparableConv(nn.Module):
    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(
            conv.in_channels, conv.in_channels, conv.kernel_size, conv.stride, conv.padding, groups=conv.in_channels, bias=False
        )
        self.pointwise = nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=conv.bias is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


def _swap_convs(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d):
            setattr(module, name, SeparableConv(child))
        else:
            _swap_convs(child)


def separable_autoencoder_tiny(config: dict, encoder: bool, decoder: bool) -> AutoencoderTiny:
    vae = AutoencoderTiny.from_config(config)
    if encoder:
        _swap_convs(vae.encoder)
    if decoder:
        _swap_convs(vae.decoder)
    return vae


# ------------------------------------------------------------------------- synthetic release


@dataclass(frozen=True)
class ReleaseSpec:
    transformer: dict  # TinySD3Transformer2DModel kwargs
    vae: dict  # AutoencoderTiny kwargs
    encoder_separable: bool = True
    decoder_separable: bool = True
    lora_rank: int = 4
    lora_alpha: float = 4.0
    write_adapter_config: bool = False  # PEFT's adapter_config.json beside the LoRA file
    base_dtype: torch.dtype = torch.float16  # the release's backbone is stored in fp16
    seed: int = 0


SMALL_SPEC = ReleaseSpec(
    transformer=dict(
        num_layers=2, attention_head_dim=16, num_attention_heads=4, pooled_projection_dim=40,
        sample_size=64, pos_embed_max_size=40, caption_projection_dim=64, joint_attention_dim=32,
    ),
    vae=dict(
        latent_channels=16, encoder_block_out_channels=(16, 16, 16, 16), decoder_block_out_channels=(16, 16, 16, 16),
        num_encoder_blocks=(1, 2, 1, 1), num_decoder_blocks=(1, 1, 2, 1), scaling_factor=1.5,
    ),
)

FULL_SPEC = ReleaseSpec(
    transformer=dict(num_layers=12),
    vae=dict(latent_channels=16, scaling_factor=1.0),
    lora_rank=64,
    lora_alpha=64.0,
)


def _randomise_vae(vae: AutoencoderTiny, generator: torch.Generator) -> None:
    """Random convs (std 1/sqrt(fan_in)); the last conv of each side is then rescaled on a probe
    image so that latents have std 1 and decoded pixels std 0.35 around mid-grey. PyTorch's default
    init shrinks the signal layer by layer and He init blows it up through the residual blocks."""
    for module in vae.modules():
        if isinstance(module, nn.Conv2d):
            fan_in = module.weight[0].numel()
            module.weight.data = torch.randn(module.weight.shape, generator=generator) / math.sqrt(fan_in)
            if module.bias is not None:
                module.bias.data = torch.randn(module.bias.shape, generator=generator) * 0.05
    probe = torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1
    with torch.no_grad():
        last = [m for m in vae.encoder.modules() if isinstance(m, nn.Conv2d)][-1]
        last.weight.data /= vae.encode(probe).latents.std()
        last = [m for m in vae.decoder.modules() if isinstance(m, nn.Conv2d)][-1]
        last.bias.data.fill_(0.5)
        pixels = vae.decode(vae.encode(probe).latents).sample
        last.weight.data *= 0.35 / pixels.std()


def build_release(root: Path, spec: ReleaseSpec) -> Path:
    """Write a random-weight release in the official folder layout; returns ``root``."""
    generator = torch.Generator().manual_seed(spec.seed)
    torch.manual_seed(spec.seed)
    transformer = TinySD3Transformer2DModel(**spec.transformer).eval()
    transformer.to(spec.base_dtype).save_pretrained(root / TRANSFORMER_DIR)
    transformer.float()

    add_official_lora(transformer, spec.lora_rank, spec.lora_alpha)
    from peft.utils import get_peft_model_state_dict

    for name, param in transformer.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; a trained LoRA is not
            param.data = torch.randn(param.shape, generator=generator) * (0.3 / math.sqrt(spec.lora_rank))
    lora = {f"transformer.{k}": v.float().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}
    (root / LORA_FILE).parent.mkdir(parents=True, exist_ok=True)
    save_file(lora, root / LORA_FILE)
    if spec.write_adapter_config:
        config = {"peft_type": "LORA", "r": spec.lora_rank, "lora_alpha": spec.lora_alpha, "target_modules": LORA_TARGETS}
        (root / LORA_FILE).with_name("adapter_config.json").write_text(json.dumps(config))

    vae = separable_autoencoder_tiny(AutoencoderTiny(**spec.vae).config, spec.encoder_separable, spec.decoder_separable)
    _randomise_vae(vae, generator)
    vae.save_pretrained(root / VAE_DIR)

    (root / POOLED_FILE).parent.mkdir(parents=True, exist_ok=True)
    pooled_dim = transformer.config.pooled_projection_dim
    torch.save(torch.randn(1, pooled_dim, generator=generator).to(torch.float16), root / POOLED_FILE)
    return root


@dataclass
class ReferenceModels:
    transformer: TinySD3Transformer2DModel
    vae: AutoencoderTiny
    pooled: torch.Tensor


def load_reference(root: Path, spec: ReleaseSpec) -> ReferenceModels:
    """Load the release the way the official script does, in float32, LoRA unmerged."""
    transformer = TinySD3Transformer2DModel.from_pretrained(root / TRANSFORMER_DIR, torch_dtype=torch.float32)
    add_official_lora(transformer, spec.lora_rank, spec.lora_alpha)
    load_official_lora(transformer, root / LORA_FILE)
    config = json.loads((root / VAE_DIR / "config.json").read_text())
    vae = separable_autoencoder_tiny(config, spec.encoder_separable, spec.decoder_separable)
    vae.load_state_dict(load_file(root / VAE_DIR / "diffusion_pytorch_model.safetensors"))
    pooled = torch.load(root / POOLED_FILE, weights_only=True).float()
    return ReferenceModels(transformer.eval().requires_grad_(False), vae.float().eval().requires_grad_(False), pooled)


# -------------------------------------------------------------------------------- pipeline


def official_gaussian(tile_h: int, tile_w: int) -> np.ndarray:
    """The official blending window: midpoint (W-1)/2 across, H/2 down; var 0.01."""
    var = 0.01

    def probs(length: int, midpoint: float) -> np.ndarray:
        t = np.arange(length, dtype=np.float64)
        return np.exp(-((t - midpoint) ** 2) / (length * length) / (2 * var)) / np.sqrt(2 * np.pi * var)

    return np.outer(probs(tile_h, tile_h / 2), probs(tile_w, (tile_w - 1) / 2))


def official_tiled_velocity(latent: torch.Tensor, run) -> torch.Tensor:
    """The official latent tiling: one tile at a time, float32 canvas, float64 window."""
    _, _, h, w = latent.shape
    if h * w <= TILE * TILE:
        return run(latent)
    tile = min(TILE, h, w)
    window = torch.from_numpy(official_gaussian(tile, tile))

    def count(length: int) -> int:
        n, end = 0, 0
        while end < length:
            end = max(n * tile - OVERLAP * n, 0) + tile
            n += 1
        return n

    across, down = count(w), count(h)
    velocity = torch.zeros(latent.shape)
    contributors = torch.zeros(latent.shape)
    for ix in range(across):
        for iy in range(down):
            x0 = w - tile if ix == across - 1 else ix * (tile - OVERLAP)
            y0 = h - tile if iy == down - 1 else iy * (tile - OVERLAP)
            out = run(latent[:, :, y0 : y0 + tile, x0 : x0 + tile])
            velocity[:, :, y0 : y0 + tile, x0 : x0 + tile] += out * window
            contributors[:, :, y0 : y0 + tile, x0 : x0 + tile] += window
    return velocity / contributors


def _adain(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """StableSR's adaptive instance normalisation (unbiased variance + 1e-5), [1, 3, H, W]."""

    def mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.reshape(*x.shape[:2], -1)
        return flat.mean(dim=2)[..., None, None], (flat.var(dim=2) + 1e-5).sqrt()[..., None, None]

    t_mean, t_std = mean_std(target)
    s_mean, s_std = mean_std(source)
    return (target - t_mean) / t_std * s_std + s_mean


def _wavelet(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """StableSR's wavelet colour fix: target's 5-level a-trous detail + source's residual low-pass."""

    def decompose(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kernel = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=image.dtype)[None, None].repeat(3, 1, 1, 1) / 16
        high = torch.zeros_like(image)
        for i in range(5):
            radius = 2**i
            low = F.conv2d(F.pad(image, (radius,) * 4, mode="replicate"), kernel, groups=3, dilation=radius)
            high = high + (image - low)
            image = low
        return high, image

    return decompose(target)[0] + decompose(source)[1]


def _to_pil_levels(x: torch.Tensor) -> torch.Tensor:
    """torchvision's ToPILImage on a float tensor: ``mul(255).byte()``, i.e. truncation."""
    return x.mul(255).to(torch.uint8)


@torch.no_grad()
def official_restore(models: ReferenceModels, lr: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """LR uint8 HxWx3 -> (decoded SR in [0, 1], [1, 3, 4H, 4W]; restored latent / scaling factor)."""
    height, width = lr.shape[:2]
    if min(height, width) < 128 or (4 * height) % 8 or (4 * width) % 8:
        raise ValueError("the official script resizes this input; use a short side >= 128 and even sides")
    pixels = torch.from_numpy(lr).permute(2, 0, 1)[None].float() / 255  # ToTensor
    upscaled = F.interpolate(pixels, size=(4 * height, 4 * width), mode="bicubic", align_corners=False) * 2 - 1
    sf = models.vae.config.scaling_factor
    latent = models.vae.encode(upscaled).latents * sf
    timestep = torch.tensor([TIMESTEP])
    velocity = official_tiled_velocity(
        latent, lambda tile: models.transformer(hidden_states=tile, timestep=timestep, pooled_projections=models.pooled)
    )
    restored = latent - velocity
    image = models.vae.decode(restored / sf).sample.clamp(-1, 1)
    return image / 2 + 0.5, restored / sf


def official_finish(sr: torch.Tensor, lr: np.ndarray, color_fix: str, official_quantisation: bool) -> np.ndarray:
    """Colour fix and 8-bit output: SR [1, 3, 4H, 4W] in [0, 1] -> uint8 4Hx4Wx3.

    With ``official_quantisation`` the 8-bit steps are the official ones: the decoded image is
    truncated to 8 bits before the colour fix (ToPILImage), the fix is computed on that and
    truncated again, and the wavelet fix takes PIL's bicubic x4 of the LR (``lr.resize``). Without
    it the chain stays in float and is rounded once, and the wavelet fix takes torch's bicubic x4 of
    the LR: the form tinysr implements on purpose.
    """
    height, width = lr.shape[:2]
    pixels = torch.from_numpy(lr).permute(2, 0, 1)[None].float() / 255
    if official_quantisation:
        sr = _to_pil_levels(sr).float() / 255
    if color_fix == "adain":
        sr = _adain(sr, pixels)
    elif color_fix == "wavelet":
        if official_quantisation:
            upscaled_lr = np.array(Image.fromarray(lr).resize((4 * width, 4 * height), Image.Resampling.BICUBIC))
            source = torch.from_numpy(upscaled_lr).permute(2, 0, 1)[None].float() / 255
        else:
            source = F.interpolate(pixels, size=(4 * height, 4 * width), mode="bicubic", align_corners=False)
        sr = _wavelet(sr, source)
    sr = sr.clamp(0, 1)
    levels = _to_pil_levels(sr) if official_quantisation else sr.mul(255).round().to(torch.uint8)
    return levels[0].permute(1, 2, 0).numpy()
