"""A teacher seen as ``embed -> ordered residual blocks -> head``, so that blocks can be masked.

Every search and baseline works on a ``ResidualStack``: ``embed`` turns a batch into streams (a
tuple of tensors whose first member is the image-token stream) plus a context the blocks share,
``block`` runs one block on the streams, ``head`` maps the final streams to the output, which for
this project is the one-step restored latent ``z - v``. Adapters: diffusers' SD3 transformer (two
streams; the last block has ``context_pre_only`` and returns no text stream) and our
``ModulatedTransformer`` (one stream, ``Block(h, modulation)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from tinysr_cli.models.transformer import ModulatedTransformer, _layer_norm

Batch = Mapping[str, torch.Tensor]
Streams = tuple[torch.Tensor, ...]


class ResidualStack(nn.Module):
    """Base of the adapters."""

    @property
    def blocks(self) -> nn.ModuleList:
        """The teacher's ordered blocks (owned by the wrapped model)."""
        raise NotImplementedError

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def latent_channels(self) -> int:
        """Channels of the ``latent`` a batch must carry."""
        raise NotImplementedError

    def embed(self, batch: Batch) -> tuple[Streams, Any]:
        raise NotImplementedError

    def block(self, index: int, streams: Streams, context: Any) -> Streams:
        raise NotImplementedError

    def head(self, streams: Streams, context: Any, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def block_cost(self, index: int) -> int:
        """Parameter count of a block: the cost a removal saves (blocks differ, e.g. SD3's last)."""
        return sum(p.numel() for p in self.blocks[index].parameters())


def _per_sample(weight: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [B] (or scalar) weight shaped to broadcast over ``like`` [B, ...], in its dtype."""
    return weight.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def forward_masked(stack: ResidualStack, batch: Batch, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Run every block and mix ``block(h) * m + h * (1 - m)`` per stream; ``mask`` is [L] or [B, L].

    Every block is computed even where m = 0, since the gradient of m needs ``block(h) - h``.
    """
    streams, context = stack.embed(batch)
    for index in range(stack.num_blocks):
        out = stack.block(index, streams, context)
        if mask is None:
            streams = out
            continue
        m = mask[..., index]
        streams = tuple(_per_sample(m, new) * new + _per_sample(1 - m, old) * old for new, old in zip(out, streams))
    return stack.head(streams, context, batch)


def forward_kept(stack: ResidualStack, batch: Batch, kept: Sequence[int]) -> torch.Tensor:
    """Run only the ``kept`` blocks (in depth order): the pruned model, without mixing."""
    keep = set(kept)
    streams, context = stack.embed(batch)
    for index in range(stack.num_blocks):
        if index in keep:
            streams = stack.block(index, streams, context)
    return stack.head(streams, context, batch)


def trace_image_stream(stack: ResidualStack, batch: Batch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of the image-token stream around every block of the full teacher."""
    streams, context = stack.embed(batch)
    pairs = []
    for index in range(stack.num_blocks):
        out = stack.block(index, streams, context)
        pairs.append((streams[0], out[0]))
        streams = out
    return pairs


def _restored(latent: torch.Tensor, tokens: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """Unpatchify [B, N, p*p*C] velocity tokens; the one-step restored latent ``z - v`` in ``latent``'s dtype."""
    batch, _, height, width = latent.shape
    rows, cols = height // patch, width // patch
    v = tokens.to(latent.dtype).reshape(batch, rows, cols, patch, patch, channels)
    v = torch.einsum("nhwpqc->nchpwq", v).reshape(batch, channels, height, width)
    return latent - v


class SD3Stack(ResidualStack):
    """diffusers ``SD3Transformer2DModel`` at a fixed timestep and fixed (default-prompt) conditioning.

    Batch: ``latent`` [B, C, H, W] (any float dtype; the model runs in its own, the output is returned
    in the latent's). ``prompt_embeds`` [1, S, joint_dim] and ``pooled_embeds``
    [1, pooled_dim] are expanded to the batch. Streams: (image tokens, text tokens).
    """

    def __init__(
        self, model: nn.Module, prompt_embeds: torch.Tensor, pooled_embeds: torch.Tensor, timestep: float = 1000.0
    ) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("prompt_embeds", prompt_embeds, persistent=False)
        self.register_buffer("pooled_embeds", pooled_embeds, persistent=False)
        self.timestep = timestep

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.transformer_blocks

    @property
    def latent_channels(self) -> int:
        return self.model.config.in_channels

    def embed(self, batch: Batch) -> tuple[Streams, torch.Tensor]:
        dtype = self.model.dtype
        latent = batch["latent"].to(dtype)
        size = latent.shape[0]
        image = self.model.pos_embed(latent).contiguous()
        timestep = torch.full((size,), self.timestep, device=latent.device, dtype=dtype)
        temb = self.model.time_text_embed(timestep, self.pooled_embeds.expand(size, -1).to(dtype))
        text = self.model.context_embedder(self.prompt_embeds.expand(size, -1, -1).to(dtype))
        return (image, text), temb

    def block(self, index: int, streams: Streams, context: torch.Tensor) -> Streams:
        image, text = streams
        new_text, new_image = self.blocks[index](hidden_states=image, encoder_hidden_states=text, temb=context)
        # The last block (context_pre_only) returns no text stream; nothing downstream reads it.
        return new_image, text if new_text is None else new_text

    def head(self, streams: Streams, context: torch.Tensor, batch: Batch) -> torch.Tensor:
        tokens = self.model.proj_out(self.model.norm_out(streams[0], context))
        return _restored(batch["latent"], tokens, self.model.config.patch_size, self.model.out_channels)


class ModulatedStack(ResidualStack):
    """Our ``ModulatedTransformer``: one image stream, block i runs with ``modulation[i]``."""

    def __init__(self, model: ModulatedTransformer) -> None:
        super().__init__()
        self.model = model

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.blocks

    @property
    def latent_channels(self) -> int:
        return self.model.config.latent_channels

    def embed(self, batch: Batch) -> tuple[Streams, None]:
        return (self.model._embed(batch["latent"]),), None

    def block(self, index: int, streams: Streams, context: None) -> Streams:
        return (self.blocks[index](streams[0], self.model.modulation[index]),)

    def head(self, streams: Streams, context: None, batch: Batch) -> torch.Tensor:
        scale, shift = self.model.final_modulation
        tokens = self.model.proj_out(_layer_norm(streams[0]) * (1 + scale) + shift)
        config = self.model.config
        return _restored(batch["latent"], tokens, config.patch_size, config.latent_channels)
