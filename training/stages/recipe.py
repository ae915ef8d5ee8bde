"""Recipes of every training stage: the one reader (TOML read with tomllib).

Tables: ``[run]`` (output folder, seed, precision, checkpoints, logs), ``[teacher]``, ``[data]``
(handed to ``training.data``; for prune, its batch source), ``[cache]``, ``[student.vae]``
(``VAEConfig`` fields), ``[vae]``, ``[restore]`` + ``[restore.lora]``, ``[discriminator]``,
``[export]``, ``[distill]`` (read by ``training.stages.distill``), and for ``stage = "prune"`` the
top-level ``method`` with ``[space]``, ``[search]``, ``[loss]``, ``[baselines]``
(``training.prune.recipe``). A top-level ``stage`` names the stage the recipe is for. Unknown keys are errors (a typo must not silently become a default);
relative paths are resolved against the recipe's folder.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.recipe_io import RecipeError, Table, positive, read_toml
from tinysr_cli.models.vae import VAEConfig
from tinysr_cli.weights.format import COLOR_FIXES
from training.discriminator import DISCRIMINATORS, DiscriminatorSpec
from training.latent_cache import CacheSpec
from training.losses import PERCEPTUAL_LOSSES, REGRESSION_LOSSES
from training.prune.recipe import PruneSpec, parse_prune
from training.student import DEFAULT_LORA_TARGETS, LoraSpec
from training.teacher import TEACHER_DTYPES, TEACHER_KINDS, TeacherSpec, TinyTeacherSpec


STAGES = ("prune", "cache", "vae", "restore", "export", "distill")
PRECISIONS = ("fp16", "bf16", "no")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear")
# [run] keys that may change between a run and its resumption.
OPERATIONAL_RUN_KEYS = ("output_dir", "checkpoint_every", "keep_checkpoints", "log_every", "num_workers")


@dataclass(frozen=True)
class RunSpec:
    output_dir: Path
    seed: int = 80
    mixed_precision: str = "fp16"  # fp16 falls back to "no" where there is no GPU
    gradient_checkpointing: bool = False
    checkpoint_every: int = 5000
    keep_checkpoints: int = 2
    log_every: int = 100
    num_workers: int = 4
    max_grad_norm: float = 1.0


@dataclass(frozen=True)
class OptimSpec:
    """How one set of parameters is optimised (AdamW)."""

    lr: float
    weight_decay: float = 0.01
    lr_scheduler: str = "constant"
    warmup_steps: int = 0


@dataclass(frozen=True)
class VaeStageSpec:
    batch_size: int = 64
    encoder_steps: int = 100_000
    encoder_lr: float = 3e-4
    decoder_steps: int = 200_000
    decoder_lr: float = 5e-4
    weight_decay: float = 0.01
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    encoder_loss: str = "l2"
    pixel_loss: str = "l1"
    pixel_weight: float = 1.0
    perceptual: str = "lpips"
    perceptual_weight: float = 3.0
    gan_weight: float = 1.0
    gan_start_step: int = 0
    discriminator_lr: float = 1e-5

    @property
    def steps(self) -> int:
        return max(self.encoder_steps, self.decoder_steps)

    def encoder_optim(self) -> OptimSpec:
        return OptimSpec(self.encoder_lr, self.weight_decay, self.lr_scheduler, self.warmup_steps)

    def decoder_optim(self) -> OptimSpec:
        return OptimSpec(self.decoder_lr, self.weight_decay, self.lr_scheduler, self.warmup_steps)

    def discriminator_optim(self) -> OptimSpec:
        return OptimSpec(self.discriminator_lr, self.weight_decay, self.lr_scheduler, self.warmup_steps)


@dataclass(frozen=True)
class RestoreStageSpec:
    phase: int = 1  # 1: latent distillation only; 2: adds pixel-space perceptual and GAN losses
    kept_layers: tuple[int, ...] | Path | None = None  # phase 1 from scratch: indices or a decision file
    init: Path | None = None  # a student file to start from (phase 2: the phase-1 result)
    vae: Path | None = None  # phase 2: the VAE stage's result, whose decoder renders pixels
    pos_grid: int = 32
    batch_size: int = 128
    steps: int = 150_000
    lr: float = 1e-4
    weight_decay: float = 0.01
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    latent_loss: str = "l2"
    latent_weight: float = 1.0
    hidden_loss: str = "l2"
    hidden_weight: float = 0.0  # > 0 runs the teacher transformer online for its block outputs
    perceptual: str = "none"
    perceptual_weight: float = 0.0
    gan_weight: float = 0.0
    gan_start_step: int = 0
    discriminator_lr: float = 5e-6
    train_modulation: bool = True
    lora: LoraSpec = field(default_factory=LoraSpec)

    def student_optim(self) -> OptimSpec:
        return OptimSpec(self.lr, self.weight_decay, self.lr_scheduler, self.warmup_steps)

    def discriminator_optim(self) -> OptimSpec:
        return OptimSpec(self.discriminator_lr, self.weight_decay, self.lr_scheduler, self.warmup_steps)


@dataclass(frozen=True)
class ExportSpec:
    student: Path
    vae: Path
    output: Path
    dtype: str = "fp16"
    color_fix: str = "adain"


@dataclass(frozen=True)
class Recipe:
    path: Path
    stage: str | None
    raw: dict[str, Any]  # the parsed TOML, stored with checkpoints and outputs
    run: RunSpec | None = None
    teacher: TeacherSpec | None = None
    data: dict[str, Any] | None = None
    cache: CacheSpec | None = None
    student_vae: VAEConfig | None = None
    vae: VaeStageSpec | None = None
    restore: RestoreStageSpec | None = None
    discriminator: DiscriminatorSpec | None = None
    export: ExportSpec | None = None
    prune: PruneSpec | None = None

    def require(self, *names: str) -> None:
        missing = [name for name in names if getattr(self, name) is None]
        if missing:
            tables = ", ".join(f"[{'student.vae' if n == 'student_vae' else n}]" for n in missing)
            raise RecipeError(f"{self.path.name} lacks {tables}, which this stage needs")



def resumable_view(raw: dict[str, Any]) -> str:
    """A parsed recipe minus the keys that may change between a run and its resumption, as JSON."""
    raw = json.loads(json.dumps(raw))
    for key in OPERATIONAL_RUN_KEYS:
        raw.get("run", {}).pop(key, None)
    return json.dumps(raw, sort_keys=True)


# ----------------------------------------------------------------------------- parsing helpers


def _run(table: Table, stage: str | None) -> RunSpec:
    output = table.path("output_dir", required=True)
    values = table.fields(RunSpec, skip=("output_dir",))
    if stage == "prune":  # the search trains fp32 gates and LoRA around a teacher in teacher.dtype
        if values.setdefault("mixed_precision", "no") != "no":
            raise RecipeError('run.mixed_precision must be "no" for the prune stage: the teacher runs in teacher.dtype')
    spec = RunSpec(output_dir=output, **values)
    if spec.mixed_precision not in PRECISIONS:
        raise RecipeError(f"run.mixed_precision is {spec.mixed_precision!r}; choose one of {', '.join(PRECISIONS)}")
    positive("run", checkpoint_every=spec.checkpoint_every, keep_checkpoints=spec.keep_checkpoints, log_every=spec.log_every)
    if spec.num_workers < 0:
        raise RecipeError("run.num_workers must be 0 or more")
    table.done()
    return spec


def _teacher(table: Table) -> TeacherSpec | TinyTeacherSpec:
    """The one ``[teacher]`` table: TSD-SR's files (``kind = "sd3"``), or a tiny random SD3 for prune tests."""
    kind = table.choice("kind", "sd3", TEACHER_KINDS)
    if kind == "tiny_sd3":
        config = table.value("config", None, dict)
        if not config:
            raise RecipeError("a tiny_sd3 teacher needs a [teacher.config] table of SD3Transformer2DModel arguments")
        spec = TinyTeacherSpec(
            config=config,
            prompt_tokens=table.value("prompt_tokens", 8),
            timestep=table.value("timestep", 1000.0),
            dtype=table.choice("dtype", "fp32", TEACHER_DTYPES),
        )
    else:
        spec = TeacherSpec(
            sd3=table.path("sd3", required=True),
            prompt_embeds=table.path("prompt_embeds", required=True),
            pooled_embeds=table.path("pooled_embeds", required=True),
            transformer_lora=table.path("transformer_lora"),
            vae_lora=table.path("vae_lora"),
            lora_alpha=table.value("lora_alpha", None, float),
            latent_scale=table.value("latent_scale", 1.5305),
            timestep=table.value("timestep", 1000.0),
            dtype=table.choice("dtype", "fp16", TEACHER_DTYPES),
        )
    table.done()
    return spec


def _cache(table: Table) -> CacheSpec:
    folder = table.path("dir", required=True)
    spec = CacheSpec(dir=folder, samples=table.required("samples", int), **table.fields(CacheSpec, skip=("dir", "samples")))
    table.done()
    return spec


def _student_vae(table: Table) -> VAEConfig:
    values = {}
    for item in dataclasses.fields(VAEConfig):
        if item.name in table.data:
            default = item.default
            values[item.name] = table.value(item.name, default, (list, tuple) if isinstance(default, tuple) else type(default))
    table.done()
    try:
        config = VAEConfig(**values)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"[student.vae]: {exc}") from None
    if config.downscale != 8:
        raise RecipeError("[student.vae] must downscale by 8 (four encoder stages), as the teacher's VAE does")
    return config


def _check_losses(name: str, regression: dict[str, str], perceptual: str | None = None) -> None:
    for key, value in regression.items():
        if value not in REGRESSION_LOSSES:
            raise RecipeError(f"{name}.{key} is {value!r}; choose one of {', '.join(REGRESSION_LOSSES)}")
    if perceptual is not None and perceptual not in PERCEPTUAL_LOSSES:
        raise RecipeError(f"{name}.perceptual is {perceptual!r}; choose one of {', '.join(PERCEPTUAL_LOSSES)}")


def _check_scheduler(name: str, scheduler: str) -> None:
    if scheduler not in LR_SCHEDULERS:
        raise RecipeError(f"{name}.lr_scheduler is {scheduler!r}; choose one of {', '.join(LR_SCHEDULERS)}")


def _vae(table: Table) -> VaeStageSpec:
    spec = VaeStageSpec(**table.fields(VaeStageSpec))
    table.done()
    _check_losses("vae", {"encoder_loss": spec.encoder_loss, "pixel_loss": spec.pixel_loss}, spec.perceptual)
    _check_scheduler("vae", spec.lr_scheduler)
    positive("vae", batch_size=spec.batch_size, encoder_lr=spec.encoder_lr, decoder_lr=spec.decoder_lr, discriminator_lr=spec.discriminator_lr)
    if spec.encoder_steps < 0 or spec.decoder_steps < 0 or spec.steps == 0:
        raise RecipeError("vae.encoder_steps and vae.decoder_steps must be 0 or more, and not both 0")
    return spec


def _lora(table: Table | None) -> LoraSpec:
    if table is None:
        return LoraSpec()
    targets = table.value("targets", list(DEFAULT_LORA_TARGETS), list)
    spec = LoraSpec(rank=table.value("rank", 64), alpha=table.value("alpha", 64.0), targets=tuple(targets))
    table.done()
    if spec.rank < 1 or not spec.targets or not all(isinstance(t, str) for t in spec.targets):
        raise RecipeError("restore.lora needs rank >= 1 and a non-empty list of target module names")
    return spec


def _restore(table: Table) -> RestoreStageSpec:
    lora = _lora(table.sub("lora"))
    kept: tuple[int, ...] | None = None
    if "kept_layers" in table.data:
        value = table.data["kept_layers"]
        kept = table.path("kept_layers", required=True) if isinstance(value, str) else table.int_list("kept_layers", None)
    init, vae = table.path("init"), table.path("vae")
    spec = RestoreStageSpec(kept_layers=kept, init=init, vae=vae, lora=lora, **table.fields(RestoreStageSpec, skip=("kept_layers", "init", "vae", "lora")))
    table.done()
    _check_losses("restore", {"latent_loss": spec.latent_loss, "hidden_loss": spec.hidden_loss}, spec.perceptual)
    _check_scheduler("restore", spec.lr_scheduler)
    positive("restore", batch_size=spec.batch_size, steps=spec.steps, lr=spec.lr, discriminator_lr=spec.discriminator_lr, pos_grid=spec.pos_grid)
    if spec.phase not in (1, 2):
        raise RecipeError(f"restore.phase must be 1 or 2, not {spec.phase}")
    if spec.init is None and spec.kept_layers is None:
        raise RecipeError("[restore] needs kept_layers (a list, or the pruning stage's decision file) or init (a student file)")
    if spec.phase == 2 and spec.vae is None:
        raise RecipeError("restore.vae (the VAE stage's vae.safetensors) is required in phase 2: its decoder renders the pixels")
    if spec.phase == 1 and (spec.perceptual_weight or spec.gan_weight):
        raise RecipeError("phase 1 trains in latent space only; set perceptual_weight and gan_weight to 0, or phase = 2")
    return spec


def _discriminator(table: Table) -> DiscriminatorSpec:
    kind = table.choice("type", "patch", DISCRIMINATORS)
    weights = table.path("weights")
    blocks = table.int_list("blocks", (2, 5, 8, 11))
    spec = DiscriminatorSpec(type=kind, weights=weights, blocks=blocks, **table.fields(DiscriminatorSpec, skip=("type", "weights", "blocks")))
    table.done()
    return spec


def _export(table: Table) -> ExportSpec:
    spec = ExportSpec(
        student=table.path("student", required=True),
        vae=table.path("vae", required=True),
        output=table.path("output", required=True),
        dtype=table.choice("dtype", "fp16", ("fp16", "bf16", "fp32")),
        color_fix=table.choice("color_fix", "adain", COLOR_FIXES),
    )
    table.done()
    return spec


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    raw = read_toml(path)
    top = Table(raw, path.name, path.resolve().parent, file=True)
    stage = top.value("stage", None, str)
    if stage is not None and stage not in STAGES:
        raise RecipeError(f"stage = {stage!r} is not one of {', '.join(STAGES)}")
    parsers = {
        "run": lambda table: _run(table, stage),
        "teacher": _teacher,
        "cache": _cache,
        "vae": _vae,
        "restore": _restore,
        "discriminator": _discriminator,
        "export": _export,
    }
    values: dict[str, Any] = {}
    for name, parse in parsers.items():
        table = top.sub(name)
        if table is not None:
            values[name] = parse(table)
    data = top.value("data", None, dict)
    if stage == "prune":
        values["prune"] = parse_prune(top, None if data is None else Table(data, "data", top.base))
    elif isinstance(values.get("teacher"), TinyTeacherSpec):
        raise RecipeError("teacher.kind = 'tiny_sd3' (a transformer without files) is for the prune stage only")
    top.value("distill", None, dict)  # read by training.stages.distill.parse_distill
    student = top.sub("student")
    if student is not None:
        vae_table = student.sub("vae")
        student.done()
        if vae_table is not None:
            values["student_vae"] = _student_vae(vae_table)
    top.done()
    return Recipe(path=path.resolve(), stage=stage, raw=raw, data=data, **values)
