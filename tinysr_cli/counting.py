"""Parameters and multiply-accumulates per component, counted by an instrumented forward pass.

Models are built on the meta device (shapes only: no memory, no weights) and run once through the
pipeline the engine uses - encode the bicubic image, the backbone on its latent tiles, decode -
under ``torch.utils.flop_counter.FlopCounterMode``; MACs = FLOPs / 2. The counter sees matrix
products and convolutions, including attention's two matmuls (on the meta device attention runs
through the math path, which the counter understands); element-wise work (norms, activations,
softmax, resampling, the colour fix) is not counted, as in the usual MAC tallies. Attention
matmuls are reported apart, because per-module counters such as thop (which the paper's figures
come from) do not see them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tinysr_cli.engine.tiling import plan_tiles
from tinysr_cli.errors import TinySRError
from tinysr_cli.models.tinysr import TinySR, TinySRConfig

# Ops that nn.Conv2d / nn.Linear dispatch to; every other counted op is an attention matmul.
_MODULE_OPS = {"aten.convolution", "aten.addmm", "aten.mm"}
TILE, TILE_OVERLAP = 64, 8

# TSD-SR's teacher: SD3-medium's transformer and VAE (diffusers configs).
SD3_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192,
)
SD3_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, act_fn="silu", norm_num_groups=32,
    sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
)
TSD_SR_PROMPT_TOKENS = 333  # CLIP-L 77 + CLIP-G 77 + T5 256 - the default prompt embedding's length
SD3_POOLED_DIM = 2048


@dataclass(frozen=True)
class Component:
    name: str
    params: int
    macs: int
    attention_macs: int = 0  # the part of ``macs`` spent in attention matmuls


@dataclass(frozen=True)
class Count:
    model: str
    height: int  # output pixels counted (after padding to the model's multiple)
    width: int
    tiles: int  # backbone tiles per image
    components: tuple[Component, ...]

    @property
    def params(self) -> int:
        return sum(c.params for c in self.components)

    @property
    def macs(self) -> int:
        return sum(c.macs for c in self.components)

    @property
    def attention_macs(self) -> int:
        return sum(c.attention_macs for c in self.components)

    def to_dict(self) -> dict:
        return asdict(self) | {"params": self.params, "macs": self.macs, "attention_macs": self.attention_macs}


class _Stage:
    """One instrumented call: MACs per module name, split into module ops and attention matmuls."""

    def __init__(self, module: nn.Module, call: Callable[[], object]) -> None:
        with FlopCounterMode(display=False) as counter:
            call()
        self.root = type(module).__name__
        self._counts = counter.get_flop_counts()

    def macs(self, path: str = "") -> tuple[int, int]:
        """(module-op MACs, attention MACs) of the submodule at ``path`` ('' = everything)."""
        key = f"{self.root}.{path}" if path else "Global"
        if path and key not in self._counts:
            raise RuntimeError(f"FlopCounterMode recorded nothing for {key!r}; its naming may have changed")
        ops = self._counts.get(key, {})
        module_ops = sum(flops for op, flops in ops.items() if str(op) in _MODULE_OPS)
        attention = sum(flops for op, flops in ops.items() if str(op) not in _MODULE_OPS)
        return module_ops // 2, attention // 2

    def blocks(self, path: str, blocks: nn.ModuleList) -> tuple[int, int]:
        """``macs`` summed over the blocks of a ModuleList (the list itself is never called)."""
        per_block = [self.macs(f"{path}.{i}") for i in range(len(blocks))]
        return sum(m for m, _ in per_block), sum(a for _, a in per_block)


def _params(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def _whole(name: str, stage: _Stage, *modules: nn.Module) -> Component:
    module_macs, attention = stage.macs()
    return Component(name, _params(*modules), module_macs + attention, attention)


def _tiles(latent_h: int, latent_w: int) -> tuple[int, int, int]:
    tiles = plan_tiles(latent_h, latent_w, TILE, TILE_OVERLAP)
    return len(tiles), tiles[0].y1 - tiles[0].y0, tiles[0].x1 - tiles[0].x0


def count_tinysr(config: TinySRConfig, height: int = 512, width: int = 512, name: str = "TinySR") -> Count:
    """Count one ``height`` x ``width`` output, tiled as the engine tiles it."""
    multiple = config.vae.downscale * config.transformer.patch_size
    height, width = -(-height // multiple) * multiple, -(-width // multiple) * multiple
    with torch.device("meta"):
        model = TinySR(config)
        image = torch.empty(1, config.vae.image_channels, height, width)
    latent_h, latent_w = height // config.vae.downscale, width // config.vae.downscale
    count, tile_h, tile_w = _tiles(latent_h, latent_w)
    crops = torch.empty(count, config.vae.latent_channels, tile_h, tile_w, device="meta")
    latent = torch.empty(1, config.vae.latent_channels, latent_h, latent_w, device="meta")

    backbone = model.transformer
    encode = _Stage(model.vae.encoder, lambda: model.vae.encode(image))
    run = _Stage(backbone, lambda: backbone(crops))
    decode = _Stage(model.vae.decoder, lambda: model.vae.decode(latent))
    block_linear, block_attention = run.blocks("blocks", backbone.blocks)
    components = (
        Component("backbone: patch embed", _params(backbone.patch_embed), sum(run.macs("patch_embed"))),
        Component("backbone: blocks, linear layers", _params(backbone.blocks), block_linear),
        Component("backbone: blocks, attention matmuls", 0, block_attention, block_attention),
        Component("backbone: final layer", _params(backbone.proj_out), sum(run.macs("proj_out"))),
        _whole("VAE encoder", encode, model.vae.encoder),
        _whole("VAE decoder", decode, model.vae.decoder),
    )
    return Count(name, height, width, count, components)


def count_teacher(height: int = 512, width: int = 512) -> Count:
    """TSD-SR's teacher (SD3-medium transformer + SD3 VAE, without its LoRA) for one output."""
    try:
        from diffusers import AutoencoderKL, SD3Transformer2DModel
    except ModuleNotFoundError as exc:
        raise TinySRError(
            f"counting the teacher needs the {exc.name} package, which is not installed", hint='pip install "tinysr[bench]"'
        ) from None

    height, width = -(-height // 16) * 16, -(-width // 16) * 16
    with torch.device("meta"):
        backbone = SD3Transformer2DModel(**SD3_MEDIUM_TRANSFORMER)
        vae = AutoencoderKL(**SD3_VAE)
        image = torch.empty(1, 3, height, width)
        latent = torch.empty(1, 16, height // 8, width // 8)
        prompt = torch.empty(1, TSD_SR_PROMPT_TOKENS, SD3_MEDIUM_TRANSFORMER["joint_attention_dim"])
        pooled = torch.empty(1, SD3_POOLED_DIM)
        timestep = torch.empty(1)
    count, tile_h, tile_w = _tiles(height // 8, width // 8)
    crops = torch.empty(count, 16, tile_h, tile_w, device="meta")

    def run_backbone() -> None:
        backbone(
            hidden_states=crops, encoder_hidden_states=prompt.expand(count, -1, -1),
            pooled_projections=pooled.expand(count, -1), timestep=timestep.expand(count),
        )

    encode = _Stage(vae.encoder, lambda: vae.encode(image).latent_dist.mode())
    run = _Stage(backbone, run_backbone)
    decode = _Stage(vae.decoder, lambda: vae.decode(latent))
    block_linear, block_attention = run.blocks("transformer_blocks", backbone.transformer_blocks)
    embedders = (backbone.pos_embed, backbone.time_text_embed, backbone.context_embedder)
    components = (
        Component(
            "backbone: patch, time, text embedders", _params(*embedders),
            sum(sum(run.macs(name)) for name in ("pos_embed", "time_text_embed", "context_embedder")),
        ),
        Component("backbone: blocks, linear layers", _params(backbone.transformer_blocks), block_linear),
        Component("backbone: blocks, attention matmuls", 0, block_attention, block_attention),
        Component(
            "backbone: final layer", _params(backbone.norm_out, backbone.proj_out),
            sum(run.macs("norm_out")) + sum(run.macs("proj_out")),
        ),
        _whole("VAE encoder", encode, vae.encoder),
        _whole("VAE decoder", decode, vae.decoder),
    )
    return Count("TSD-SR teacher (SD3-medium)", height, width, count, components)
