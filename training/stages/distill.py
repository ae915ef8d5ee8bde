"""``--stage distill``: train a small TinySR-family model from a pixel-space teacher, end to end.

No SD3 or TSD-SR weights are needed. One command runs everything, each part resumable:

1. photos: the recipe's photo manifest is prepared (``training.photos``), unless already there;
2. pairs: HR crops of the training photos are degraded with the project's Real-ESRGAN pipeline and
   the teacher's 4x output of each LQ crop is computed once and cached (the paper's pre-caching),
   in shards keyed by everything that shapes them, so a fresh run reuses them and they never touch
   the random state of training;
3. training in three phases over one step counter (checkpointed with the step, the EMA and the
   optimiser): ``autoencoder`` (the tiny VAE reconstructs targets: L1), ``latent`` (restoration
   stage 1: the backbone maps ``E(bicubic(LQ))`` to ``E(target)``, VAE frozen, L2) and ``pixel``
   (restoration stage 2: everything trained on the decoded image: L1 + perceptual + optional GAN);
   validation on held-out photos every ``validate_every`` steps, with a few crops saved;
4. export: the EMA weights as one tinysr weights file with provenance (recipe, data manifest
   digest, teacher, licences).

The teacher is ``"hr"`` (the ground truth itself) or a pixel-space model name that
``tinysr_cli.weights.peers.load_peer_model`` knows (``realesrgan-x4plus``, ``span-x4``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tinysr_cli.errors import TinySRError
from tinysr_cli.models.tinysr import UPSCALE, TinySR, TinySRConfig
from tinysr_cli.models.transformer import TransformerConfig
from tinysr_cli.models.vae import VAEConfig
from tinysr_cli.weights.format import COLOR_FIXES, DTYPES_BY_NAME, save_weights
from training.data import HRCrops, SyntheticPairs, derive_seed
from training.degradations import PRESETS
from training.latent_cache import bicubic_input, to_uint8
from training.losses import PerceptualLoss, build_perceptual, regression_loss
from training.photos import PhotoManifest, prepare_photos, read_manifest
from training.recipe_io import RecipeError
from training.stages.common import Reporter, Run, StageResult, StepBatches, data_loader, finite_or_raise, make_optimizer, optimizer_step
from training.stages.recipe import OptimSpec, Recipe

MODEL_FILE = "model.safetensors"
PAIRS_DIR = "pairs"
VALIDATION_DIR = "validation"
DATA_KEYS = ("manifest", "photos_dir", "debs_dir", "hr_size", "seed", "degradation")


@dataclass(frozen=True)
class DistillSpec:
    teacher: str = "realesrgan-x4plus"
    samples: int = 512  # cached training pairs
    validation_samples: int = 8
    batch_size: int = 4
    autoencoder_steps: int = 300
    latent_steps: int = 300
    pixel_steps: int = 1400
    lr: float = 4e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    lr_scheduler: str = "cosine"
    pixel_loss: str = "l1"
    perceptual: str = "lpips"
    perceptual_weight: float = 1.0
    ema_decay: float = 0.998
    validate_every: int = 200
    color_fix: str = "none"
    export_dtype: str = "fp16"
    license: str = "GPL-2+ (training photos); teacher BSD-3-Clause"
    transformer: TransformerConfig = dataclasses.field(default_factory=TransformerConfig)
    vae: VAEConfig = dataclasses.field(default_factory=VAEConfig)

    @property
    def steps(self) -> int:
        return self.autoencoder_steps + self.latent_steps + self.pixel_steps

    def phase(self, step: int) -> str:
        if step < self.autoencoder_steps:
            return "autoencoder"
        return "latent" if step < self.autoencoder_steps + self.latent_steps else "pixel"

    @property
    def config(self) -> TinySRConfig:
        return TinySRConfig(self.transformer, self.vae)


@dataclass(frozen=True)
class DistillData:
    manifest: PhotoManifest
    photos_dir: Path
    debs_dir: Path | None
    hr_size: int
    seed: int
    degradation: str


def parse_distill(recipe: Recipe) -> tuple[DistillSpec, DistillData]:
    """The ``[distill]`` (with ``.transformer``/``.vae``) and ``[data]`` tables of a distill recipe."""
    raw = recipe.raw.get("distill")
    if not isinstance(raw, dict):
        raise RecipeError(f"{recipe.path.name} lacks [distill], which this stage needs")
    base = recipe.path.parent
    known = {f.name: f for f in dataclasses.fields(DistillSpec)}
    unknown = set(raw) - set(known)
    if unknown:
        raise RecipeError(f"unknown key(s) in [distill]: {', '.join(sorted(unknown))}")
    try:
        transformer = TransformerConfig(**raw.get("transformer", {}))
        vae = VAEConfig(**raw.get("vae", {}))
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"[distill.transformer] / [distill.vae]: {exc}") from None
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if name in ("transformer", "vae"):
            continue
        default = known[name].default
        if type(value) is not type(default) and not (isinstance(default, float) and type(value) is int):
            raise RecipeError(f"distill.{name} must be a {type(default).__name__}, got {value!r}")
        values[name] = type(default)(value)
    spec = DistillSpec(**values, transformer=transformer, vae=vae)
    for name in ("samples", "batch_size", "lr", "validate_every"):
        if getattr(spec, name) <= 0:
            raise RecipeError(f"distill.{name} must be positive")
    if min(spec.autoencoder_steps, spec.latent_steps, spec.pixel_steps, spec.validation_samples) < 0:
        raise RecipeError("distill step counts and validation_samples must be 0 or more")
    if spec.color_fix not in COLOR_FIXES or spec.export_dtype not in DTYPES_BY_NAME:
        raise RecipeError(f"distill.color_fix must be one of {COLOR_FIXES}; export_dtype one of {tuple(DTYPES_BY_NAME)}")
    if spec.transformer.latent_channels != spec.vae.latent_channels:
        raise RecipeError("[distill.transformer] latent_channels must equal [distill.vae] latent_channels")

    data = recipe.raw.get("data", {})
    unknown = set(data) - set(DATA_KEYS)
    if unknown:
        raise RecipeError(f"unknown key(s) in [data]: {', '.join(sorted(unknown))}")
    if "manifest" not in data:
        raise RecipeError("[data] manifest (the photo manifest, a TOML file) is required")
    hr_size = data.get("hr_size", 256)
    tile = spec.config.transformer.max_latent_size * spec.vae.downscale
    if not isinstance(hr_size, int) or hr_size % (spec.vae.downscale * spec.transformer.patch_size * UPSCALE) or hr_size > tile:
        raise RecipeError(f"[data] hr_size {hr_size} must be a multiple of {spec.vae.downscale * spec.transformer.patch_size * UPSCALE} and at most the model's tile, {tile} px")
    degradation = data.get("degradation", "realesrgan")
    if degradation not in PRESETS:
        raise RecipeError(f"[data] degradation is {degradation!r}; choose one of {', '.join(PRESETS)}")
    debs = data.get("debs_dir")
    return spec, DistillData(
        manifest=read_manifest(base / data["manifest"]),
        photos_dir=(base / data.get("photos_dir", "photos")).resolve(),
        debs_dir=(base / debs).resolve() if debs else None,
        hr_size=hr_size,
        seed=int(data.get("seed", 80)),
        degradation=degradation,
    )


# ----------------------------------------------------------------------------- the teacher and the pairs


class Teacher:
    """LQ [B, 3, h, w] in [0, 1] -> target [B, 3, 4h, 4w] in [0, 1]; ``"hr"`` returns the HR crop."""

    def __init__(self, name: str) -> None:
        self.name, self.model = name, None
        if name != "hr":
            from tinysr_cli.weights.peers import load_peer_model

            self.model = load_peer_model(name).float().eval().requires_grad_(False)

    @property
    def identity(self) -> str:
        if self.model is None:
            return "hr"
        digest = hashlib.sha256()
        for key, tensor in sorted(self.model.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().float().contiguous().numpy().tobytes())
        return f"{self.name}:{digest.hexdigest()}"

    @torch.inference_mode()
    def __call__(self, lq: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        if self.model is None:
            return hr
        return torch.cat([self.model(one[None]).clamp(0, 1) for one in lq])


class PairsCache(torch.utils.data.Dataset):
    """uint8 ``lq``, ``target`` (the teacher's) and ``hq`` (ground truth) of every cached pair."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return self.tensors["lq"].shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: tensor[index] for name, tensor in self.tensors.items()}


SHARD = 16


def build_pairs(folder: Path, files: list[Path], teacher: Teacher, count: int, data: DistillData, identity_extra: dict, reporter: Reporter, label: str) -> PairsCache:
    """Compute (or reuse) ``count`` pairs of ``files`` in shards under ``folder/KEY``."""
    from safetensors.torch import load_file, save_file

    from tinysr_cli.atomic import atomic_path

    crops = _crops_of(files, data)
    source = SyntheticPairs(crops, dataclasses.replace(PRESETS[data.degradation], scale=UPSCALE))
    # Pair g depends on the seed and g only, so shards are shared by recipes that differ in ``count``.
    identity = {"source": source.identity(), "teacher": teacher.identity, "shard": SHARD, **identity_extra}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    shard_dir = folder / key
    shard_dir.mkdir(parents=True, exist_ok=True)
    (shard_dir / "identity.json").write_text(json.dumps(identity, indent=1, sort_keys=True, default=str), encoding="utf-8")
    parts = []
    for first in range(0, count, SHARD):
        path = shard_dir / f"shard-{first // SHARD:05d}.safetensors"
        if not path.is_file():
            indices = list(range(first, min(first + SHARD, count)))
            hq, lq = source.pairs(indices, torch.device("cpu"))
            lq8, hq8 = to_uint8(lq), to_uint8(hq)
            target = teacher(lq8.float() / 255, hq8.float() / 255)
            with atomic_path(path) as tmp:
                save_file({"lq": lq8, "target": to_uint8(target), "hq": hq8}, tmp)
        parts.append(load_file(path))
        reporter.progress(f"{label} pairs ({teacher.name})", min(first + SHARD, count), count, {})
    return PairsCache({name: torch.cat([p[name] for p in parts]) for name in ("lq", "target", "hq")})


def _crops_of(files: list[Path], data: DistillData) -> HRCrops:
    crops = HRCrops([files[0].parent], data.hr_size, data.seed)
    crops.files = sorted(files)  # exactly this split's files, wherever they are
    return crops


# ----------------------------------------------------------------------------- the model's forward paths


def _unit_to_signed(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255 * 2 - 1


def _augment(batch: dict[str, torch.Tensor], seed: int, step: int) -> dict[str, torch.Tensor]:
    """The same random rotation by 90 degrees and flip for every image of a pair (seeded by step)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "augment", step))
    turns = torch.randint(4, (batch["lq"].shape[0],), generator=generator).tolist()
    flips = torch.randint(2, (batch["lq"].shape[0],), generator=generator).tolist()

    def apply(images: torch.Tensor) -> torch.Tensor:
        out = [img.rot90(k, (-2, -1)) for img, k in zip(images, turns)]
        return torch.stack([img.flip(-1) if f else img for img, f in zip(out, flips)])

    return {name: apply(value) for name, value in batch.items()}


def restore(model: TinySR, lq: torch.Tensor) -> torch.Tensor:
    """uint8 LQ -> the model's [-1, 1] output, as the engine computes it on one tile (no colour fix)."""
    height, width = lq.shape[-2:]
    bicubic = bicubic_input(lq.float() / 255, (height * UPSCALE, width * UPSCALE))
    latent = model.vae.encode(bicubic)
    return model.vae.decode(model.restore_latent(latent))


# ----------------------------------------------------------------------------- validation


def validate(model: TinySR, pairs: PairsCache, perceptual: PerceptualLoss | None, folder: Path | None) -> dict[str, float]:
    """PSNR-Y / SSIM-Y (BasicSR) and the perceptual distance to the ground truth on held-out pairs."""
    from PIL import Image

    from tinysr_cli.metrics import psnr, ssim

    was_training = model.training
    model.eval()
    totals = {"val_psnr": 0.0, "val_ssim": 0.0, "val_lpips": 0.0}
    with torch.no_grad():
        for index in range(len(pairs)):
            item = pairs[index]
            out = restore(model, item["lq"][None]).clamp(-1, 1)
            pred = ((out[0] + 1) / 2 * 255).round().to(torch.uint8)
            pred_np, gt_np = pred.permute(1, 2, 0).numpy(), item["hq"].permute(1, 2, 0).numpy()
            totals["val_psnr"] += psnr(pred_np, gt_np) / len(pairs)
            totals["val_ssim"] += ssim(pred_np, gt_np) / len(pairs)
            if perceptual is not None:
                totals["val_lpips"] += float(perceptual(out, _unit_to_signed(item["hq"][None]))) / len(pairs)
            if folder is not None and index < 4:
                folder.mkdir(parents=True, exist_ok=True)
                lq_up = F.interpolate(item["lq"][None].float(), scale_factor=UPSCALE, mode="nearest")[0].to(torch.uint8)
                row = torch.cat([lq_up, pred, item["target"], item["hq"]], dim=-1)
                Image.fromarray(np.ascontiguousarray(row.permute(1, 2, 0).numpy())).save(folder / f"{index}.png")
    model.train(was_training)
    if perceptual is None:
        totals.pop("val_lpips")
    return totals


# ----------------------------------------------------------------------------- the stage


def _own_photos(folder: Path) -> dict[str, list[Path]]:
    """A user's folder: every image trains; a sub-folder named ``validation`` (optional) validates."""
    from training.data import list_images

    validation = folder / "validation"
    files = [p for p in list_images([folder]) if validation not in p.parents]
    return {"train": files, "validation": list_images([validation]) if validation.is_dir() else []}


def run_distill_stage(
    recipe: Recipe, output_dir: Path, resume: bool, reporter: Reporter, stop_at_step: int | None = None, own_photos: Path | None = None
) -> StageResult:
    recipe.require("run")
    spec, data = parse_distill(recipe)
    started = time.monotonic()
    run = Run(recipe, output_dir, resume, reporter)
    accelerator = run.accelerator
    if accelerator.num_processes > 1:
        raise TinySRError("the distill stage runs in one process", hint="launch it without `accelerate launch --num_processes`")

    if own_photos is not None:
        photos = _own_photos(Path(own_photos).resolve())
        pairs_dir = run.output_dir / PAIRS_DIR
        extra = {"hr_size": data.hr_size, "photos": str(Path(own_photos).resolve())}
    else:
        photos = prepare_photos(data.manifest, data.photos_dir, data.debs_dir)
        pairs_dir = data.photos_dir.parent / PAIRS_DIR
        extra = {"hr_size": data.hr_size, "manifest": data.manifest.digest}
    teacher = Teacher(spec.teacher)
    train_pairs = build_pairs(pairs_dir, photos["train"], teacher, spec.samples, data, {**extra, "split": "train"}, reporter, "train")
    val_pairs = (
        build_pairs(pairs_dir, photos["validation"], teacher, spec.validation_samples, data, {**extra, "split": "validation"}, reporter, "validation")
        if spec.validation_samples and photos["validation"]
        else None
    )
    del teacher

    # The initial weights depend on the seed alone, whatever ran before (cache building included).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(run.spec.seed, "init"))
        model = TinySR(spec.config)
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(spec.ema_decay), use_buffers=True)
    optim = OptimSpec(lr=spec.lr, weight_decay=spec.weight_decay, lr_scheduler=spec.lr_scheduler, warmup_steps=spec.warmup_steps)
    params = list(model.parameters())
    optimizer, scheduler = make_optimizer(params, optim, spec.steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    accelerator.register_for_checkpointing(ema)
    run.restore_checkpoint()
    plain = accelerator.unwrap_model(model)
    plain.train()

    perceptual: dict[str, Any] = {}

    def perceptual_loss():
        if "loss" not in perceptual:
            perceptual["loss"] = build_perceptual(spec.perceptual)
        return perceptual["loss"]

    def select(phase: str) -> None:
        for name, param in plain.named_parameters():
            param.requires_grad_(phase == "pixel" or (phase == "autoencoder") == name.startswith("vae."))

    def step(batch: dict[str, torch.Tensor], index: int) -> dict[str, float]:
        batch = _augment({k: v.cpu() for k, v in batch.items()}, run.spec.seed, index)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        phase = spec.phase(index)
        select(phase)
        target = _unit_to_signed(batch["target"])
        metrics: dict[str, float] = {}
        with accelerator.autocast():
            if phase == "autoencoder":
                image = plain.vae.decode(plain.vae.encode(target))
                loss = regression_loss(spec.pixel_loss, image, target)
                metrics["autoencoder_loss"] = loss.item()
            elif phase == "latent":
                with torch.no_grad():
                    goal = plain.vae.encode(target)
                    latent = plain.vae.encode(bicubic_input(batch["lq"].float() / 255, tuple(target.shape[-2:])))
                loss = regression_loss("l2", plain.restore_latent(latent), goal)
                metrics["latent_loss"] = loss.item()
            else:
                image = restore(plain, batch["lq"])
                pixel = regression_loss(spec.pixel_loss, image, target)
                loss = pixel
                metrics["pixel_loss"] = pixel.item()
                loss_fn = perceptual_loss() if spec.perceptual_weight > 0 else None
                if loss_fn is not None:
                    term = loss_fn(image, target)
                    loss = loss + spec.perceptual_weight * term
                    metrics["perceptual_loss"] = term.item()
        accelerator.backward(loss)
        metrics["grad_norm"] = optimizer_step(run, optimizer, scheduler, [p for p in params if p.requires_grad])
        metrics["loss"] = finite_or_raise(loss.item(), "loss", index)
        ema.update_parameters(plain)
        done = index + 1
        if val_pairs is not None and (done % spec.validate_every == 0 or done == spec.steps):
            folder = run.output_dir / VALIDATION_DIR / f"step-{done:06d}"
            metrics.update(validate(ema.module, val_pairs, _validation_perceptual(spec, perceptual_loss), folder))
        return metrics

    batches = StepBatches(len(train_pairs), spec.batch_size, run.spec.seed, run.step, accelerator.process_index, accelerator.num_processes)
    loader = data_loader(train_pairs, batches, run.spec.num_workers)
    finished = run.train(spec.steps, loader, step, stop_at_step, task="distill")
    output = run.output_dir / MODEL_FILE
    if finished and run.is_main:
        provenance = {
            "source": "trained",
            "stage": "distill",
            "recipe": recipe.path.name,
            "recipe_toml": recipe.raw,
            **({"data_manifest": data.manifest.path.name, "data_manifest_sha256": data.manifest.digest} if own_photos is None
               else {"data": str(Path(own_photos).resolve()), "data_files": len(photos["train"])}),
            "teacher": spec.teacher,
            "license": spec.license,
            "steps": run.step,
            "weights": "exponential moving average",
        }
        save_weights(ema.module, output, dtype=DTYPES_BY_NAME[spec.export_dtype], color_fix=spec.color_fix, provenance=provenance)
        reporter.note(f"wrote {output} ({time.monotonic() - started:.0f} s in this process)")
    accelerator.wait_for_everyone()
    return StageResult(output, run.step, finished)


def _validation_perceptual(spec: DistillSpec, perceptual_loss):
    """The perceptual distance for validation, when the recipe trains with one."""
    if spec.perceptual == "none":
        return None
    return perceptual_loss()
