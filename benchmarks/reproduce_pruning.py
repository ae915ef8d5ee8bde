"""Miniature reproduction of the pruning comparison (issue 9): every method, one budget, held-out photos.

A small SD3-style teacher (diffusers ``SD3Transformer2DModel``) is trained to restore degraded
scikit-image photos in a lossless pixel-unshuffle latent; every pruning method of ``training.prune``
halves its depth (2 of every 4 blocks kept); every pruned student (``training.student``) is
recovered with the same LoRA budget; all are scored by PSNR/SSIM on held-out photos.

Usage:
    python benchmarks/reproduce_pruning.py --out /tmp/tinysr-repro                # ~20 min on 2 busy CPU threads
    python benchmarks/reproduce_pruning.py --preset smoke --out /tmp/repro-smoke  # a minute, plumbing only
    python benchmarks/reproduce_pruning.py --preset gpu --device cuda --out runs/repro

Steps already done in ``--out`` (teacher, cache, decisions) are reused when the settings match.
Results: ``<out>/results.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.data import HRCrops, SyntheticPairs, derive_seed  # noqa: E402
from training.degradations import MILD, degrade  # noqa: E402
from training.latent_cache import (  # noqa: E402
    CacheSpec,
    LatentCache,
    bicubic_input,
    build_shards,
    cache_folder,
    cache_identity,
    to_uint8,
    write_index,
)
from training.prune import read_decision, run_prune_stage  # noqa: E402
from training.prune.recipe import METHODS  # noqa: E402
from training.prune.sources import CachedLatents  # noqa: E402
from training.student import LoraSpec, attach_lora, build_student  # noqa: E402
from training.teacher import Teacher, TeacherSpec, load_prompt_embeddings, load_transformer  # noqa: E402

# Real photos bundled with scikit-image (no download). Training and held-out sets share no image.
TRAIN_PHOTOS = (
    "astronaut", "chelsea", "immunohistochemistry", "hubble_deep_field", "camera", "page", "brick",
    "grass", "gravel", "moon", "clock", "cell", "retina", "colorwheel", "text",
)  # fmt: skip
EVAL_PHOTOS = ("coffee", "rocket", "coins")
NUM_BLOCKS = 8
KEEP, GROUP = 2, 4  # 2 of every 4 blocks: 8 -> 4


@dataclass(frozen=True)
class Size:
    """Everything that sets the cost of a run."""

    width: int  # transformer hidden size (heads of 32)
    crop: int  # HR training crop = evaluation tile, pixels
    unshuffle: int  # pixel-unshuffle factor of the latent
    samples: int  # training pairs (and latent-cache samples)
    batch: int
    teacher_steps: int
    search_steps: int  # tinysr / tinyfusion mask search
    recover_steps: int  # the same for every student
    lora_rank: int
    eval_batches: int  # batches every heuristic baseline scores on
    candidates: int  # random_min masks


PRESETS = {
    "smoke": Size(32, 32, 4, 32, 8, 4, 3, 3, 4, 1, 4),
    "cpu": Size(64, 64, 4, 256, 8, 150, 40, 60, 16, 4, 50),
    "gpu": Size(384, 128, 4, 16384, 32, 6000, 3000, 3000, 64, 16, 100),
}


class PixelUnshuffleTeacher(Teacher):
    """The teacher with a lossless latent: ``pixel_unshuffle`` of the [-1, 1] image (no VAE)."""

    def __init__(self, transformer: torch.nn.Module, prompt: torch.Tensor, pooled: torch.Tensor, factor: int) -> None:
        super().__init__(transformer, None, prompt, pooled, latent_scale=1.0)
        self.factor = factor

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(image, self.factor)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latent, self.factor)


def log(message: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------- photos


def write_photos(folder: Path, names: tuple[str, ...]) -> list[Path]:
    """Save scikit-image photos as RGB PNGs (grayscale replicated) under ``folder``."""
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = folder / f"{name}.png"
        if not path.exists():
            image = np.asarray(getattr(skimage.data, name)())
            if image.ndim == 2:
                image = np.repeat(image[..., None], 3, axis=2)
            Image.fromarray(image[..., :3].astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def load_rgb(path: Path) -> torch.Tensor:
    from PIL import Image

    array = np.asarray(Image.open(path).convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


def save_rgb(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    Image.fromarray(to_uint8(image).permute(1, 2, 0).numpy()).save(path)


# ----------------------------------------------------------------------------- teacher


def teacher_config(size: Size) -> dict:
    latent = size.crop // size.unshuffle
    channels = 3 * size.unshuffle**2
    return dict(
        sample_size=latent,
        patch_size=2,
        in_channels=channels,
        out_channels=channels,
        num_layers=NUM_BLOCKS,
        attention_head_dim=32,
        num_attention_heads=size.width // 32,
        joint_attention_dim=32,
        caption_projection_dim=size.width,
        pooled_projection_dim=32,
        pos_embed_max_size=latent // 2,
    )


def encoded_pool(source: SyntheticPairs, teacher: PixelUnshuffleTeacher, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_lq, z_hq) of pairs 0..count-1, prepared exactly as ``encode_pairs`` prepares cache samples."""
    lqs, hqs = [], []
    for start in range(0, count, 64):
        hq, lq = source.pairs(range(start, min(count, start + 64)), torch.device("cpu"))
        hq8, lq8 = to_uint8(hq), to_uint8(lq)
        hqs.append(teacher.encode(hq8.float() / 255 * 2 - 1))
        lqs.append(teacher.encode(bicubic_input(lq8.float() / 255, tuple(hq8.shape[-2:]))))
    return torch.cat(lqs), torch.cat(hqs)


def train_teacher(
    size: Size, source: SyntheticPairs, folder: Path, seed: int, lr: float, device: torch.device
) -> TeacherSpec:
    """Train the SD3-style teacher (z_lq -> z_hq, one step at t = 1000) and save it in TSD-SR's layout."""
    spec = TeacherSpec(
        sd3=folder / "sd3", prompt_embeds=folder / "prompt_embeds.pt", pooled_embeds=folder / "pool_embeds.pt", dtype="fp32"
    )
    if (folder / "done.json").exists():
        return spec
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    config = teacher_config(size)
    transformer = SD3Transformer2DModel(**config)
    # A zero output projection starts the teacher at v = 0, the identity on its input (as DiT does).
    torch.nn.init.zeros_(transformer.proj_out.weight)
    torch.nn.init.zeros_(transformer.proj_out.bias)
    prompt = torch.randn(1, 8, config["joint_attention_dim"])
    pooled = torch.randn(1, config["pooled_projection_dim"])
    teacher = PixelUnshuffleTeacher(transformer, prompt, pooled, size.unshuffle).to(device)
    z_lq, z_hq = encoded_pool(source, teacher, size.samples)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=size.teacher_steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(derive_seed(seed, "teacher-batches"))
    transformer.train()
    start = time.perf_counter()
    for step in range(size.teacher_steps):
        picks = torch.randint(size.samples, (size.batch,), generator=generator)
        loss = F.mse_loss(teacher.restore(z_lq[picks].to(device)), z_hq[picks].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == size.teacher_steps - 1:
            log(f"teacher step {step + 1}/{size.teacher_steps} loss {loss.item():.5f}")
    transformer.eval()
    transformer.to("cpu").save_pretrained(spec.sd3 / "transformer")
    torch.save(prompt, spec.prompt_embeds)
    torch.save(pooled, spec.pooled_embeds)
    (folder / "done.json").write_text(json.dumps({"seconds": round(time.perf_counter() - start, 1), "config": config}))
    return spec


def load_pixel_teacher(spec: TeacherSpec, factor: int, device: torch.device) -> PixelUnshuffleTeacher:
    prompt, pooled = load_prompt_embeddings(spec)
    return PixelUnshuffleTeacher(load_transformer(spec), prompt, pooled, factor).to(device)


def build_cache(size: Size, spec: TeacherSpec, source: SyntheticPairs, root: Path, device: torch.device) -> Path:
    """The shared latent cache (z_lq, z_hq, z_teacher) through ``training.latent_cache``."""
    cache = CacheSpec(dir=root, samples=size.samples, shard_size=size.samples, batch_size=64, dtype="fp32")
    identity = cache_identity(cache, spec, source)
    folder = cache_folder(cache, identity)
    if not (folder / "index.json").exists():
        build_shards(folder, cache, identity, range(cache.num_shards), lambda: load_pixel_teacher(spec, size.unshuffle, device), source, device)
        write_index(folder, cache, identity)
    return folder


# ----------------------------------------------------------------------------- pruning


def prune_recipe(method: str, size: Size, spec: TeacherSpec, cache: Path, seed: int, device: str) -> str:
    return f"""\
stage = "prune"
method = "{method}"
seed = {seed}
device = "{device}"

[teacher]
sd3 = "{spec.sd3}"
prompt_embeds = "{spec.prompt_embeds}"
pooled_embeds = "{spec.pooled_embeds}"
dtype = "fp32"

[space]
keep = {KEEP}
group_size = {GROUP}

[search]
steps = {size.search_steps}
tau_start = 4.0
tau_end = 0.1
logit_scale = 100.0
gate_lr = 1e-3
lora_lr = 1e-3
lora_rank = {size.lora_rank}
lora_alpha = {float(size.lora_rank)}
checkpoint_every = {max(1, size.search_steps)}

[loss]
task_weight = 1.0
distill_weight = 1.0
task_loss = "mse"
distill_loss = "l1"

[data]
kind = "cache"
path = "{cache}"
batch_size = {size.batch}

[baselines]
eval_batches = {size.eval_batches}
candidates = {size.candidates}
"""


def prune(method: str, size: Size, spec: TeacherSpec, cache: Path, root: Path, seed: int, device: str) -> tuple[tuple[int, ...], float]:
    """(kept layers, seconds) of one method through ``run_prune_stage`` (reused when already decided)."""
    folder = root / method
    folder.mkdir(parents=True, exist_ok=True)
    recipe = folder / "recipe.toml"
    recipe.write_text(prune_recipe(method, size, spec, cache, seed, device))
    start = time.perf_counter()

    def progress(report) -> None:
        if report.step % 50 == 0:
            log(f"  {method} search step {report.step}")

    decision = run_prune_stage(recipe, folder / "run", resume=True, on_progress=progress)
    return tuple(read_decision(decision).kept_layers), time.perf_counter() - start


# ----------------------------------------------------------------------------- recovery


def recover(
    spec: TeacherSpec, kept: tuple[int, ...], size: Size, cache: Path, seed: int, device: torch.device
) -> tuple[torch.nn.Module, torch.nn.Module, float]:
    """(student as pruned, student after ``recover_steps`` of LoRA distillation, seconds).

    The restore stage's phase 1 in miniature: ``z_lq - v(z_lq)`` against the teacher's restored
    latent (L2), LoRA on every linear plus trainable modulation; every student sees the same batches.
    """
    import copy

    transformer = load_transformer(spec)
    _, pooled = load_prompt_embeddings(spec)
    grid = size.crop // size.unshuffle // 2
    initial = build_student(transformer, kept, pooled, pos_grid=grid).to(device)
    student = copy.deepcopy(initial)
    torch.manual_seed(derive_seed(seed, "lora"))
    params = attach_lora(student, LoraSpec(rank=size.lora_rank, alpha=float(size.lora_rank)))
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=size.recover_steps)
    batches = CachedLatents(cache, size.batch, seed + 1, device)  # its seeds must stay small
    student.train()
    start = time.perf_counter()
    for step in range(size.recover_steps):
        batch = batches(step)
        loss = F.mse_loss(batch["latent"] - student(batch["latent"]), batch["teacher"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
    student.eval()
    return initial.eval(), student, time.perf_counter() - start


# ----------------------------------------------------------------------------- evaluation


def eval_set(folder: Path, photos: list[Path], crop: int, seed: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, GT HR, LQ) per held-out photo: HR centre-cropped to whole tiles, LQ by the MILD degradation.

    The GT is the unsharpened HR; the LQ files are written to ``folder/lq``.
    """
    (folder / "gt").mkdir(parents=True, exist_ok=True)
    (folder / "lq").mkdir(parents=True, exist_ok=True)
    items = []
    for index, path in enumerate(photos):
        image = load_rgb(path)
        height, width = (s // crop * crop for s in image.shape[-2:])
        top, left = (image.shape[-2] - height) // 2, (image.shape[-1] - width) // 2
        hr = image[:, top : top + height, left : left + width]
        _, lq = degrade(hr[None], [derive_seed(seed, "eval", index)], MILD)
        lq = to_uint8(lq[0]).float() / 255
        save_rgb(hr, folder / "gt" / path.name)
        save_rgb(lq, folder / "lq" / path.name)
        items.append((path.stem, to_uint8(hr).float() / 255, lq))
    return items


def to_tiles(latent: torch.Tensor, tile: int) -> torch.Tensor:
    c, h, w = latent.shape
    return latent.reshape(c, h // tile, tile, w // tile, tile).permute(1, 3, 0, 2, 4).reshape(-1, c, tile, tile)


def from_tiles(tiles: torch.Tensor, h: int, w: int) -> torch.Tensor:
    c, tile = tiles.shape[1], tiles.shape[-1]
    return tiles.reshape(h // tile, w // tile, c, tile, tile).permute(2, 0, 3, 1, 4).reshape(c, h, w)


@torch.no_grad()
def restore_images(restore, items, factor: int, crop: int, folder: Path, device: torch.device) -> None:
    """Run ``restore`` (latent tiles -> restored latent tiles) over every item; PNGs into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, hr, lq in items:
        latent = F.pixel_unshuffle(bicubic_input(lq[None], tuple(hr.shape[-2:])), factor)[0]
        tiles = to_tiles(latent, crop // factor).to(device)
        out = torch.cat([restore(chunk) for chunk in tiles.split(64)]).cpu()
        image = F.pixel_shuffle(from_tiles(out, *latent.shape[-2:])[None], factor)[0]
        save_rgb((image + 1) / 2, folder / f"{name}.png")


def score(pred: Path, gt: Path) -> dict[str, float]:
    """Mean RGB PSNR / SSIM (scikit-image, 8-bit, full image) over the images of ``gt``."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    psnrs, ssims = [], []
    for path in sorted(gt.glob("*.png")):
        a = (load_rgb(path) * 255).round().permute(1, 2, 0).numpy().astype(np.uint8)
        b = (load_rgb(pred / path.name) * 255).round().permute(1, 2, 0).numpy().astype(np.uint8)
        psnrs.append(peak_signal_noise_ratio(a, b, data_range=255))
        ssims.append(structural_similarity(a, b, channel_axis=2, data_range=255))
    return {"psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims))}


def tinysr_eval(pred: Path, gt: Path, out: Path) -> dict | None:
    """``tinysr eval``'s JSON when the command exists in this checkout, else None."""
    if not (ROOT / "tinysr_cli" / "metrics.py").exists():
        return None
    result = subprocess.run(
        [sys.executable, "-m", "tinysr_cli", "eval", "--pred", str(pred), "--gt", str(gt), "--json", str(out)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    if result.returncode != 0 or not out.exists():
        log(f"tinysr eval failed: {result.stderr.strip()[-300:]}")
        return None
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/tinysr-repro"))
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--teacher-lr", type=float, default=5e-4, help="peak learning rate of the teacher (one-cycle)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    for field in dataclasses.fields(Size):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=int, help=f"override the preset's {field.name}")
    args = parser.parse_args()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Size) if getattr(args, f.name) is not None}
    size = dataclasses.replace(PRESETS[args.preset], **overrides)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = args.out.resolve()
    started = time.perf_counter()
    log(f"size {size}, seed {args.seed}, device {device}")

    train = write_photos(out / "photos" / "train", TRAIN_PHOTOS)
    held_out = write_photos(out / "photos" / "eval", EVAL_PHOTOS)
    source = SyntheticPairs(HRCrops([out / "photos" / "train"], size.crop, args.seed), MILD)
    log(f"{len(train)} training photos, {len(held_out)} held out")

    spec = train_teacher(size, source, out / "teacher", args.seed, args.teacher_lr, device)
    log("teacher ready")
    cache = build_cache(size, spec, source, out / "cache", device)
    log(f"latent cache ready: {cache} ({len(LatentCache(cache, ('z_lq',)))} samples)")

    items = eval_set(out / "eval", held_out, size.crop, args.seed)
    gt = out / "eval" / "gt"
    rows: list[dict] = []

    def evaluate(label: str, restore) -> dict:
        folder = out / "eval" / "pred" / label
        restore_images(restore, items, size.unshuffle, size.crop, folder, device)
        metrics = score(folder, gt)
        official = tinysr_eval(folder, gt, out / "eval" / f"{label}.json")
        return {**metrics, "tinysr_eval": official}

    teacher = load_pixel_teacher(spec, size.unshuffle, device).eval()
    rows.append({"method": "bicubic (input)", "kept": None, **evaluate("bicubic", lambda z: z)})
    rows.append({"method": "teacher (8 blocks, SD3 joint)", "kept": list(range(NUM_BLOCKS)), **evaluate("teacher", teacher.restore)})
    log(f"reference rows: {rows}")

    runs = [("unpruned student", tuple(range(NUM_BLOCKS)), 0.0)]
    for method in args.methods:
        kept, seconds = prune(method, size, spec, cache, out / "prune", args.seed, args.device)
        log(f"{method}: keeps {kept} ({seconds:.0f} s)")
        runs.append((method, kept, seconds))
    for label, kept, prune_seconds in runs:
        initial, student, seconds = recover(spec, kept, size, cache, args.seed, device)
        before = evaluate(f"{label}-pruned", lambda z: z - initial(z))
        after = evaluate(label, lambda z: z - student(z))
        row = {
            "method": label,
            "kept": list(kept),
            **after,
            "psnr_before": before["psnr"],
            "ssim_before": before["ssim"],
            "prune_seconds": round(prune_seconds, 1),
            "recover_seconds": round(seconds, 1),
        }
        rows.append(row)
        log(f"{label}: {json.dumps({k: v for k, v in row.items() if k != 'tinysr_eval'})}")
        write_results(out, args, size, rows, time.perf_counter() - started)

    total = time.perf_counter() - started
    write_results(out, args, size, rows, total)
    print(markdown_table(rows))
    log(f"done in {total / 60:.1f} min")


def write_results(out: Path, args: argparse.Namespace, size: Size, rows: list[dict], seconds: float) -> None:
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "seed": args.seed,
        "size": dataclasses.asdict(size),
        "device": args.device,
        "threads": args.threads,
        "teacher_lr": args.teacher_lr,
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs".strip(),
        "torch": torch.__version__,
        "train_photos": list(TRAIN_PHOTOS),
        "eval_photos": list(EVAL_PHOTOS),
        "wall_seconds": round(seconds, 1),
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| method | kept blocks | PSNR before recovery | SSIM before | PSNR | SSIM |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        kept = "-" if row["kept"] is None else " ".join(map(str, row["kept"]))
        before = (f"{row['psnr_before']:.2f}", f"{row['ssim_before']:.4f}") if "psnr_before" in row else ("-", "-")
        lines.append(f"| {row['method']} | {kept} | {before[0]} | {before[1]} | {row['psnr']:.2f} | {row['ssim']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
