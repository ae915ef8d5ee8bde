"""``--stage vae``: the tiny encoder learns the teacher's latents, the tiny decoder learns to render them.

Encoder: ``E(bicubic(LQ))`` against the teacher's ``z_lq`` (L2). Decoder: ``D(z_hq)`` against the HQ
image with an L1/L2 pixel loss + LPIPS + hinge GAN (weights from the recipe; the paper uses 1, 3, 1).
Both train in the same loop on the same batches, each for its own number of steps; the result is
``vae.safetensors`` in the run folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from tinysr_cli.atomic import atomic_path
from tinysr_cli.errors import TinySRError
from tinysr_cli.models.vae import TinyVAE, VAEConfig
from training.data import derive_seed
from training.latent_cache import bicubic_input
from training.losses import build_perceptual, regression_loss
from training.stages.cache import ensure_cache
from training.stages.common import (
    Reporter,
    Run,
    StageResult,
    StepBatches,
    data_loader,
    finite_or_raise,
    image_terms,
    make_adversary,
    make_optimizer,
    optimizer_step,
)
from training.stages.recipe import Recipe

VAE_FILE = "vae.safetensors"
VAE_FORMAT = "tinysr-vae"


def save_vae(path: str | os.PathLike, vae: TinyVAE, provenance: dict) -> Path:
    from safetensors.torch import save_file

    tensors = {name: t.detach().to("cpu").contiguous() for name, t in vae.state_dict().items()}
    metadata = {"format": VAE_FORMAT, "config": json.dumps(vae.config.to_dict()), "provenance": json.dumps(provenance)}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return path


def load_vae(path: str | os.PathLike) -> tuple[TinyVAE, dict]:
    """A float32 ``TinyVAE`` and its provenance from a file written by ``save_vae``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise TinySRError(f"{path}: no such VAE file", hint="it is written by `tinysr train --stage vae`")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key).float() for key in handle.keys()}
    except Exception as exc:  # safetensors raises several unrelated types for a bad header
        raise TinySRError(f"{path}: not a readable safetensors file ({exc})") from None
    if metadata.get("format") != VAE_FORMAT:
        raise TinySRError(f"{path}: not a tinysr VAE file (format {metadata.get('format')!r})")
    vae = TinyVAE(VAEConfig(**json.loads(metadata["config"])))
    try:
        vae.load_state_dict(state)
    except RuntimeError as exc:
        raise TinySRError(f"{path}: tensors do not match its config ({exc})") from None
    return vae.eval().requires_grad_(False), json.loads(metadata.get("provenance", "{}"))


def run_vae_stage(recipe: Recipe, output_dir: Path, resume: bool, reporter: Reporter, stop_at_step: int | None = None) -> StageResult:
    recipe.require("run", "teacher", "cache", "student_vae", "vae")
    spec, config = recipe.vae, recipe.student_vae
    run = Run(recipe, output_dir, resume, reporter)
    accelerator = run.accelerator
    cache = ensure_cache(accelerator, recipe, reporter, fields=("lq", "hq", "z_lq", "z_hq"))
    channels = cache[0]["z_lq"].shape[0]
    if channels != config.latent_channels:
        raise TinySRError(f"[student.vae] latent_channels is {config.latent_channels}, the teacher's latents have {channels}")

    # Initial weights from the seed alone, whatever building the cache consumed before.
    torch.manual_seed(derive_seed(run.spec.seed, "init"))
    vae = TinyVAE(config)
    perceptual = None
    if spec.perceptual_weight > 0:
        perceptual = build_perceptual(spec.perceptual)
        if perceptual is None:
            raise TinySRError('vae.perceptual_weight > 0 needs a perceptual loss; set perceptual = "lpips" or the weight to 0')

    enc_params = list(vae.encoder.parameters())
    dec_params = list(vae.decoder.parameters())
    enc_opt, enc_sched = make_optimizer(enc_params, spec.encoder_optim(), spec.encoder_steps)
    dec_opt, dec_sched = make_optimizer(dec_params, spec.decoder_optim(), spec.decoder_steps)
    encoder, decoder, enc_opt, dec_opt, enc_sched, dec_sched = accelerator.prepare(
        vae.encoder, vae.decoder, enc_opt, dec_opt, enc_sched, dec_sched
    )
    adversary = make_adversary(run, recipe, spec.discriminator_optim(), spec.gan_weight, spec.decoder_steps, spec.gan_start_step)
    if perceptual is not None:
        perceptual.to(accelerator.device)
    run.restore_checkpoint()

    scale = config.scaling_factor
    batches = StepBatches(len(cache), spec.batch_size, run.spec.seed, run.step, accelerator.process_index, accelerator.num_processes)

    def step(batch: dict[str, torch.Tensor], index: int) -> dict[str, float]:
        metrics = {}
        hq = batch["hq"].float() / 255 * 2 - 1
        if index < spec.encoder_steps:
            with accelerator.autocast():
                predicted = encoder(bicubic_input(batch["lq"].float() / 255, tuple(hq.shape[-2:]))) * scale
                loss = regression_loss(spec.encoder_loss, predicted, batch["z_lq"])
            accelerator.backward(loss)
            metrics["encoder_grad_norm"] = optimizer_step(run, enc_opt, enc_sched, enc_params)
            metrics["encoder_loss"] = finite_or_raise(loss.item(), "encoder loss", index)
        if index < spec.decoder_steps:
            gan_now = adversary is not None and adversary.active(index)
            with accelerator.autocast():
                image = decoder(batch["z_hq"] / scale)
                pixel = regression_loss(spec.pixel_loss, image, hq)
                loss = spec.pixel_weight * pixel
                metrics["pixel_loss"] = pixel.item()
                loss = loss + image_terms(
                    image, hq, metrics, perceptual=perceptual, perceptual_weight=spec.perceptual_weight,
                    adversary=adversary if gan_now else None, gan_weight=spec.gan_weight,
                )
            accelerator.backward(loss)
            metrics["decoder_grad_norm"] = optimizer_step(run, dec_opt, dec_sched, dec_params)
            metrics["decoder_loss"] = finite_or_raise(loss.item(), "decoder loss", index)
            if gan_now:
                metrics["discriminator_loss"] = adversary.step(hq, image)
        return metrics

    loader = data_loader(cache, batches, run.spec.num_workers)
    finished = run.train(spec.steps, loader, step, stop_at_step, task="vae")
    output = run.output_dir / VAE_FILE
    if finished and run.is_main:
        provenance = {"stage": "vae", "step": run.step, "recipe": recipe.raw, "cache": cache.folder.name}
        save_vae(output, vae, provenance)
        reporter.note(f"wrote {output}")
    accelerator.wait_for_everyone()
    return StageResult(output, run.step, finished)
