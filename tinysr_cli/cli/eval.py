"""`tinysr eval`: full-reference metrics between a folder of results and a folder of ground truth."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tinysr_cli.cli import console

DATASET_LAYOUTS = (("test_LR", "test_HR"), ("LR", "HR"))


def eval_command(
    pred: Annotated[Optional[Path], typer.Option(help="Folder of results (upscaled images).")] = None,
    gt: Annotated[Optional[Path], typer.Option(help="Folder of ground-truth images (paired by file name).")] = None,
    dataset: Annotated[
        Optional[Path], typer.Option(help="A StableSR-style test set (test_LR/test_HR or LR/HR); its HR folder is the ground truth.")
    ] = None,
    model: Annotated[
        Optional[str], typer.Option(help="With --dataset: upscale its LR images with this model first (into --pred, or a temporary folder).")
    ] = None,
    metrics: Annotated[str, typer.Option(help="Comma-separated: psnr, ssim, lpips, dists, fid, niqe, musiq, maniqa, clipiqa, topiq, qalign.")] = "psnr,ssim",
    crop_border: Annotated[int, typer.Option(min=0, help="Pixels trimmed from each side before PSNR/SSIM (the scale, by convention).")] = 4,
    convention: Annotated[str, typer.Option(help="basicsr (default, as the papers' tables) or pyiqa.")] = "basicsr",
    device: Annotated[str, typer.Option(help="Device for --model and learned metrics.")] = "auto",
    json_file: Annotated[Optional[Path], typer.Option("--json", help="Also write per-image and mean scores as JSON.")] = None,
    csv_file: Annotated[Optional[Path], typer.Option("--csv", help="Also write per-image scores as CSV.")] = None,
) -> None:
    """Score results against ground truth, per image and on average."""
    import csv
    import json
    import tempfile

    import numpy as np
    from PIL import Image
    from rich.table import Table

    from tinysr_cli import metrics as m
    from tinysr_cli.errors import TinySRError
    from tinysr_cli.io.images import IMAGE_SUFFIXES

    names = [name.strip().lower() for name in metrics.split(",") if name.strip()]
    unknown = [n for n in names if n not in m.CORE_METRICS and n not in m.LEARNED_METRICS]
    if unknown:
        raise TinySRError(f"unknown metric {unknown[0]!r}", hint=f"choose from {', '.join((*m.CORE_METRICS, *m.LEARNED_METRICS))}")
    if convention not in m.CONVENTIONS:
        raise TinySRError(f"unknown convention {convention!r}", hint="basicsr or pyiqa")
    if dataset is not None:
        lr_dir, gt = _dataset_folders(dataset)
        if model is not None:
            pred = pred or Path(tempfile.mkdtemp(prefix="tinysr-eval-"))
            _upscale_folder(lr_dir, pred, model, device)
    elif model is not None:
        raise TinySRError("--model needs --dataset (the LR images to upscale)")
    if pred is None or gt is None:
        raise TinySRError("give --pred and --gt, or --dataset (with --pred or --model)")

    pairs, unmatched = _pair_by_name(pred, gt, IMAGE_SUFFIXES)
    for path in unmatched:
        console.warn(f"{path}: no file with the same name on the other side; left out")
    if not pairs:
        raise TinySRError(f"no images pair up by name between {pred} and {gt}")

    learned = m.LearnedMetrics([n for n in names if n in m.LEARNED_METRICS], device="cpu" if device == "auto" else device)
    for name, reason in learned.unavailable.items():
        console.warn(f"{name}: not computed: {reason}")
    rows, failures = [], 0

    def pixels(path: Path) -> np.ndarray:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))

    for pred_path, gt_path in pairs:
        row: dict[str, float | str] = {"image": pred_path.stem}
        try:
            a, b = pixels(pred_path), pixels(gt_path)
            if "psnr" in names:
                row["psnr"] = m.psnr(a, b, crop_border, convention)
            if "ssim" in names:
                row["ssim"] = m.ssim(a, b, crop_border, convention)
            row.update(learned.image_scores(pred_path, gt_path))
        except (OSError, ValueError) as exc:
            failures += 1
            console.error(f"{pred_path.name}: {exc}")
            continue
        rows.append(row)

    columns = [n for n in names if any(n in row for row in rows)]
    means = {n: float(np.mean([row[n] for row in rows])) for n in columns if rows}
    means.update(learned.folder_scores(pred, gt))
    report = {
        "pred": str(pred), "gt": str(gt), "convention": convention, "crop_border": crop_border,
        "images": rows, "mean": means, "unavailable": learned.unavailable, "failed": failures,
    }
    if json_file:
        json_file.write_text(json.dumps(report, indent=2))
    if csv_file:
        with open(csv_file, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["image", *columns])
            writer.writeheader()
            writer.writerows(rows)
    table = Table(title=f"{len(rows)} image pairs, {convention} convention, crop border {crop_border}, Y channel")
    for column in ["image", *columns]:
        table.add_column(column, justify="left" if column == "image" else "right")
    for row in rows:
        table.add_row(str(row["image"]), *(f"{row[c]:.4f}" for c in columns))
    table.add_row("[bold]mean[/]", *(f"[bold]{means[c]:.4f}[/]" for c in columns))
    console.stdout.print(table)
    for name, value in means.items():
        if name not in columns:
            console.stdout.print(f"{name}: {value:.4f}")
    if failures:
        raise typer.Exit(1)


def _dataset_folders(root: Path) -> tuple[Path, Path]:
    from tinysr_cli.errors import TinySRError

    for lr, hr in DATASET_LAYOUTS:
        if (root / lr).is_dir() and (root / hr).is_dir():
            return root / lr, root / hr
    raise TinySRError(f"{root}: expected sub-folders test_LR/test_HR or LR/HR")


def _pair_by_name(pred: Path, gt: Path, suffixes: set[str]) -> tuple[list[tuple[Path, Path]], list[Path]]:
    from tinysr_cli.errors import TinySRError

    for folder in (pred, gt):
        if not folder.is_dir():
            raise TinySRError(f"{folder}: no such folder")

    def index(folder: Path) -> dict[str, Path]:
        return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in suffixes}

    pred_files, gt_files = index(pred), index(gt)
    pairs = [(pred_files[s], gt_files[s]) for s in sorted(pred_files.keys() & gt_files.keys())]
    unmatched = [pred_files[s] for s in sorted(pred_files.keys() - gt_files.keys())]
    unmatched += [gt_files[s] for s in sorted(gt_files.keys() - pred_files.keys())]
    return pairs, unmatched


def _upscale_folder(lr_dir: Path, out_dir: Path, model: str, device: str) -> None:
    """Upscale every LR image into ``out_dir`` as PNG (existing results are kept)."""
    from tinysr_cli.engine.device import resolve_device, resolve_precision
    from tinysr_cli.engine.upscaler import Upscaler
    from tinysr_cli.io.images import IMAGE_SUFFIXES, load_image, save_image
    from tinysr_cli.weights.format import load_weights
    from tinysr_cli.weights.hub import resolve_model

    target = resolve_device(device)
    weights, info = load_weights(resolve_model(model))
    upscaler = Upscaler(weights, device=target, dtype=resolve_precision("auto", target), default_color_fix=info.color_fix)
    sources = [p for p in sorted(lr_dir.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    for index, source in enumerate(sources, 1):
        output = out_dir / f"{source.stem}.png"
        if output.exists():
            continue
        image = load_image(source)
        save_image(output, upscaler.upscale(image.rgb))
        console.note(f"[{index}/{len(sources)}] {source.name} -> {output}")
