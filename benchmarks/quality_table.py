"""The quality table of BENCHMARKS.md: models x test sets x PSNR-Y / SSIM-Y / LPIPS / DISTS / NIQE.

Test sets (evaluation only, never training data):
- ``set5``, ``set14``: ../shared/data/sr-benchmarks (MATLAB-bicubic LR, the field's convention);
- ``real``: held-out photos of scikit-image (astronaut, chelsea, coffee, rocket), each cropped to a
  multiple of 4 and degraded once with the project's Real-ESRGAN pipeline
  (``training.degradations``, preset "realesrgan", seed 2026 + index); the ground truth is the
  unsharpened photo.

Every model runs through the product (`tinysr upscale --model NAME`) and is scored by the product
(`tinysr eval --json`), so the table measures what a user gets::

    python benchmarks/quality_table.py --out runs/quality \\
        --models bicubic,span-x4,realesrgan-x4plus,tinysr-small-x4

Prints the markdown table and writes it with the raw JSON reports under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "sr-benchmarks"
REAL_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
REAL_SEED = 2026
METRICS = ("psnr", "ssim", "lpips", "dists", "niqe")


def prepare_benchmark(name: str, folder: Path) -> None:
    """Set5/Set14 as LR/ and HR/ with equal file names."""
    source = SHARED / name
    for kind in ("LR", "HR"):
        (folder / kind).mkdir(parents=True, exist_ok=True)
        for path in sorted(source.glob(f"*_SRF_4_{kind}.png")):
            shutil.copyfile(path, folder / kind / path.name.replace(f"_SRF_4_{kind}", ""))


def prepare_real(folder: Path) -> None:
    """scikit-image photos degraded with the training pipeline (fixed seeds), ground truth unsharpened."""
    from skimage import data

    from training.degradations import PRESETS, apply_plans, sample_plan

    config = PRESETS["realesrgan"]
    for kind in ("LR", "HR"):
        (folder / kind).mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(REAL_PHOTOS):
        photo = getattr(data, name)()
        height, width = (photo.shape[0] // 4) * 4, (photo.shape[1] // 4) * 4
        hr = torch.from_numpy(photo[:height, :width]).permute(2, 0, 1).float()[None] / 255
        lq = apply_plans(hr, [sample_plan(config, REAL_SEED + index)], 4)
        Image.fromarray(photo[:height, :width]).save(folder / "HR" / f"{name}.png")
        lq8 = (lq[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(np.ascontiguousarray(lq8)).save(folder / "LR" / f"{name}.png")


def tinysr(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "tinysr_cli", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", default="bicubic,span-x4,realesrgan-x4plus,tinysr-small-x4")
    parser.add_argument("--sets", default="set5,set14,real")
    parser.add_argument("--metrics", default=",".join(METRICS))
    args = parser.parse_args()
    models, sets = args.models.split(","), args.sets.split(",")
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for set_name in sets:
        folder = args.out / "data" / set_name
        if not (folder / "HR").is_dir():
            prepare_real(folder) if set_name == "real" else prepare_benchmark(set_name.capitalize(), folder)
        for model in models:
            pred = args.out / "pred" / model / set_name
            tinysr("upscale", str(folder / "LR"), "-o", str(pred), "--model", model, "--format", "png", "--quiet")
            report = args.out / "reports" / f"{model}-{set_name}.json"
            report.parent.mkdir(parents=True, exist_ok=True)
            tinysr("eval", "--pred", str(pred), "--gt", str(folder / "HR"), "--metrics", args.metrics, "--json", str(report), "--quiet")
            rows[(model, set_name)] = json.loads(report.read_text())["mean"]
    metrics = args.metrics.split(",")
    header = "| model | set | " + " | ".join(
        f"{m.upper()}{'-Y' if m in ('psnr', 'ssim') else ''} {'↓' if m in ('lpips', 'dists', 'niqe') else '↑'}" for m in metrics
    ) + " |"
    lines = [header, "|" + "---|" * (len(metrics) + 2)]
    for set_name in sets:
        for model in models:
            mean = rows[(model, set_name)]
            cells = [f"{mean[m]:.4f}" if m in ("ssim", "lpips", "dists") else f"{mean[m]:.2f}" if m in mean else "n/a" for m in metrics]
            lines.append(f"| {model} | {set_name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (args.out / "quality.md").write_text(table + "\n", encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
