"""``--stage restore``: distil the teacher into the pruned student (LoRA + trainable modulation).

Phase 1 trains in latent space: ``z_lq - v_student(z_lq)`` against the teacher's restored latent
(L2), optionally plus the image tokens after each student block against those after the matching
kept teacher block (the teacher transformer then runs online). Phase 2 starts from the phase-1
student and adds pixel-space losses on the tiny decoder's rendering of the student's latent: LPIPS
to the HQ image and a hinge GAN (the paper's weights: latent 5, LPIPS 1, GAN 0.3).

A fresh phase-1 run builds the student from the teacher and the kept layers and saves it as
``student-init.safetensors`` so that a resumption never needs the teacher. The result is
``student.safetensors`` (LoRA unmerged), the input of ``--stage export`` or of phase 2.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tinysr_cli.errors import TinySRError
from training.data import derive_seed
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
    set_trainable,
)
from training.stages.recipe import Recipe, RestoreStageSpec
from training.stages.vae import load_vae
from training.student import DistillationStudent, attach_lora, build_student, load_student, save_student
from training.teacher import load_prompt_embeddings, load_teacher, load_transformer

STUDENT_FILE = "student.safetensors"
INIT_FILE = "student-init.safetensors"


def _kept_layers(value: tuple[int, ...] | Path, num_blocks: int) -> tuple[int, ...]:
    """Kept layer indices as listed in the recipe, or from the pruning stage's decision file."""
    if not isinstance(value, Path):
        return tuple(value)
    from training.prune.decision import read_decision

    decision = read_decision(value)
    if decision.num_layers != num_blocks:
        raise TinySRError(f"{value} prunes a {decision.num_layers}-block model; the teacher has {num_blocks} blocks")
    return tuple(decision.kept_layers)


def _initial_student(recipe: Recipe, run: Run, reporter: Reporter):
    """(model with LoRA attached, kept layers, LoRA spec).

    The main process makes ``student-init.safetensors`` in the run folder (from ``init`` or from the
    teacher and the kept layers); every process then loads that file, so only one process reads the
    teacher and a resumption never needs it.
    """
    spec: RestoreStageSpec = recipe.restore
    init_file = run.output_dir / INIT_FILE
    if run.is_main and not run.resuming:
        if spec.init is not None:
            model, info = load_student(spec.init)
            lora = info.lora
            if lora is None:
                lora = spec.lora
                attach_lora(model, lora)
            elif lora != spec.lora:
                reporter.note(f"continuing the LoRA of {spec.init.name} (rank {lora.rank}); [restore.lora] is not used")
            kept, source = info.kept_layers, {"init": str(spec.init), "init_provenance": info.provenance}
        else:
            transformer = load_transformer(recipe.teacher)
            kept = _kept_layers(spec.kept_layers, len(transformer.transformer_blocks))
            reporter.note(f"building the student from teacher layers {list(kept)}")
            _, pooled = load_prompt_embeddings(recipe.teacher)
            model = build_student(transformer, kept, pooled, recipe.teacher.timestep, spec.pos_grid)
            del transformer
            lora, source = spec.lora, {"teacher": str(recipe.teacher.sd3)}
            attach_lora(model, lora)
        save_student(init_file, model, kept, lora, {"stage": "restore-init", **source})
    run.accelerator.wait_for_everyone()
    model, info = load_student(init_file)
    return model, info.kept_layers, info.lora


def run_restore_stage(recipe: Recipe, output_dir: Path, resume: bool, reporter: Reporter, stop_at_step: int | None = None) -> StageResult:
    recipe.require("run", "teacher", "cache", "restore")
    spec = recipe.restore
    run = Run(recipe, output_dir, resume, reporter)
    accelerator = run.accelerator
    pixel_space = spec.phase == 2
    cache = ensure_cache(accelerator, recipe, reporter, fields=("z_lq", "z_teacher", "hq") if pixel_space else ("z_lq", "z_teacher"))

    torch.manual_seed(derive_seed(run.spec.seed, "init"))  # the seed alone, whatever building the cache consumed
    model, kept, lora = _initial_student(recipe, run, reporter)
    trainable = [p for n, p in model.named_parameters() if "lora_" in n or (spec.train_modulation and n in ("modulation", "final_modulation"))]
    model.requires_grad_(False)
    set_trainable(trainable, True)
    use_hidden = spec.hidden_weight > 0
    student = DistillationStudent(model, capture=range(len(kept)) if use_hidden else (), checkpointing=run.spec.gradient_checkpointing)
    optimizer, scheduler = make_optimizer(trainable, spec.student_optim(), spec.steps)

    teacher = load_teacher(recipe.teacher, accelerator.device, with_vae=False) if use_hidden else None
    decoder = perceptual = None
    if pixel_space:
        vae, _ = load_vae(spec.vae)
        if vae.config.latent_channels != model.config.latent_channels:
            raise TinySRError(f"{spec.vae}: the VAE's latent channels differ from the student's")
        decoder, scale = vae.decoder.to(accelerator.device), vae.config.scaling_factor
        if spec.perceptual_weight > 0:
            perceptual = build_perceptual(spec.perceptual)
            if perceptual is None:
                raise TinySRError('restore.perceptual_weight > 0 needs a perceptual loss; set perceptual = "lpips" or the weight to 0')
            perceptual.to(accelerator.device)
    student, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    gan_weight = spec.gan_weight if pixel_space else 0.0
    adversary = make_adversary(run, recipe, spec.discriminator_optim(), gan_weight, spec.steps, spec.gan_start_step)
    run.restore_checkpoint()

    batches = StepBatches(len(cache), spec.batch_size, run.spec.seed, run.step, accelerator.process_index, accelerator.num_processes)

    def step(batch: dict[str, torch.Tensor], index: int) -> dict[str, float]:
        metrics = {}
        z_lq = batch["z_lq"]
        if use_hidden:
            with torch.no_grad(), teacher.capture_hidden(kept) as captured:
                teacher.velocity(z_lq)
        gan_now = adversary is not None and adversary.active(index)
        with accelerator.autocast():
            restored, hidden = student(z_lq)
            latent = regression_loss(spec.latent_loss, restored, batch["z_teacher"])
            loss = spec.latent_weight * latent
            metrics["latent_loss"] = latent.item()
            if use_hidden:
                term = sum(regression_loss(spec.hidden_loss, h, captured[k]) for h, k in zip(hidden, kept)) / len(kept)
                loss = loss + spec.hidden_weight * term
                metrics["hidden_loss"] = term.item()
            if pixel_space:
                hq = batch["hq"].float() / 255 * 2 - 1
                image = decoder(restored / scale)
                loss = loss + image_terms(
                    image, hq, metrics, perceptual=perceptual, perceptual_weight=spec.perceptual_weight,
                    adversary=adversary if gan_now else None, gan_weight=spec.gan_weight,
                )
        accelerator.backward(loss)
        metrics["grad_norm"] = optimizer_step(run, optimizer, scheduler, trainable)
        metrics["loss"] = finite_or_raise(loss.item(), "loss", index)
        if gan_now:
            metrics["discriminator_loss"] = adversary.step(hq, image)
        return metrics

    loader = data_loader(cache, batches, run.spec.num_workers)
    finished = run.train(spec.steps, loader, step, stop_at_step, task=f"restore (phase {spec.phase})")
    output = run.output_dir / STUDENT_FILE
    if finished and run.is_main:
        provenance = {"stage": "restore", "phase": spec.phase, "step": run.step, "recipe": recipe.raw, "cache": cache.folder.name}
        save_student(output, model, kept, lora, provenance)
        reporter.note(f"wrote {output}")
    accelerator.wait_for_everyone()
    return StageResult(output, run.step, finished)
