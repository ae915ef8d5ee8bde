"""`tinysr eval`: score predictions against ground truth, per image and on average.

Files pair by name (the stem; any image extension on either side). A pair that cannot be scored
(unreadable, sizes differ, two files with one name) is an error for that pair: the others are still
scored and the exit code is 1. Files without a partner are reported and left out, and learned
metrics that cannot be had (pyiqa missing, weights not cached and no internet) are reported and
skipped; neither changes the exit code as long as something was scored. Without pyiqa, lpips,
lpips-vgg, dists and niqe come from tinysr's offline implementations (``tinysr_cli.iqa``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Optional

import click
import typer

from tinysr_cli.cli import console

_INPUTS = "Inputs"
_SCORING = "Scoring"
_REPORTS = "Reports"
_MODEL = "Upscaling first (--dataset with --model)"
DATASET_LAYOUTS = (("test_LR", "test_HR"), ("LR", "HR"))  # StableSR's test sets use both


def eval_command(
    pred: Annotated[Optional[Path], typer.Option(
        "--pred",
        help="Predictions: a folder (paired by file name, any image extension) or one image. With --model: the "
        "folder that keeps the upscaled images (default: a temporary folder).",
        rich_help_panel=_INPUTS,
    )] = None,
    gt: Annotated[Optional[Path], typer.Option(
        "--gt", help="Ground truth: a folder or one image.", rich_help_panel=_INPUTS,
    )] = None,
    dataset: Annotated[Optional[Path], typer.Option(
        "--dataset",
        help="A paired test set holding test_LR/ and test_HR/ (or LR/ and HR/), as StableSR's; its HR images are the "
        "ground truth.",
        rich_help_panel=_INPUTS,
    )] = None,
    pred_suffix: Annotated[str, typer.Option(
        "--pred-suffix", help="An ending of prediction names to ignore when pairing, e.g. _x4.", rich_help_panel=_INPUTS,
    )] = "",
    metrics: Annotated[Optional[list[str]], typer.Option(
        "--metrics", "-m",
        help="psnr, ssim (the default), lpips, lpips-vgg, dists, fid, niqe, musiq, maniqa, clipiqa, topiq, qalign or "
        "all; comma-separated or repeated. lpips, lpips-vgg, dists and niqe work offline once `tinysr metrics fetch` "
        'has run; the others need pyiqa (pip install "tinysr\\[metrics]").',
        rich_help_panel=_SCORING,
    )] = None,
    convention: Annotated[str, typer.Option(
        help="PSNR/SSIM as BasicSR computes them (basicsr) or as pyiqa does (pyiqa).", rich_help_panel=_SCORING,
    )] = "basicsr",
    crop_border: Annotated[Optional[int], typer.Option(
        "--crop-border", min=0,
        help="Pixels trimmed from each edge before PSNR/SSIM (default: 4, the scale, for basicsr; 0 for pyiqa).",
        rich_help_panel=_SCORING,
    )] = None,
    device: Annotated[str, typer.Option(
        help="auto, cpu, cuda, cuda:N or mps: for --model and the learned metrics.", rich_help_panel=_SCORING,
    )] = "auto",
    json_file: Annotated[Optional[Path], typer.Option(
        "--json", help="Write the per-image and mean scores as JSON to this file ('-': stdout, instead of the table).",
        rich_help_panel=_REPORTS,
    )] = None,
    csv_file: Annotated[Optional[Path], typer.Option(
        "--csv", help="Write them as CSV, the mean as a last row ('-': stdout, instead of the table).",
        rich_help_panel=_REPORTS,
    )] = None,
    model: Annotated[Optional[str], typer.Option(
        help="Upscale the --dataset LR images with these weights, then score them (registry name, Hub id or local "
        ".safetensors).",
        rich_help_panel=_MODEL,
    )] = None,
    precision: Annotated[str, typer.Option(help="auto, fp32, fp16 or bf16.", rich_help_panel=_MODEL)] = "auto",
    overwrite: Annotated[bool, typer.Option(
        help="Upscale again images already in the --pred folder (default: reuse them).", rich_help_panel=_MODEL,
    )] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or notes; warnings and errors only.")] = False,
) -> None:
    """Score upscaled images against ground truth: PSNR/SSIM as the SR papers compute them, LPIPS, DISTS, NIQE and pyiqa's metrics."""
    import tempfile

    from tinysr_cli import metrics as m
    from tinysr_cli.errors import TinySRError

    names = _parse_metrics(metrics)
    if convention not in m.CONVENTIONS:
        raise click.BadParameter(f"{convention!r} is not one of {', '.join(m.CONVENTIONS)}", param_hint="--convention")
    if str(json_file) == "-" and str(csv_file) == "-":
        raise click.UsageError("only one of --json and --csv can write to stdout")
    if (gt is None) == (dataset is None):
        raise click.UsageError("give the ground truth with --gt or --dataset (one of them)")
    if model is not None and dataset is None:
        raise click.UsageError("--model needs --dataset: its LR images are what gets upscaled")
    if model is None and pred is None:
        raise click.UsageError("give the predictions with --pred (or --dataset with --model to make them)")
    settings = _Settings(names, convention, m.DEFAULT_CROP_BORDER[convention] if crop_border is None else crop_border)

    lr_folder = None
    if dataset is not None:
        lr_folder, gt = _dataset_folders(dataset)
    for path, option in ((gt, "--gt"), (None if model else pred, "--pred")):
        if path is not None and not path.exists():
            raise TinySRError(f"{path}: no such file or folder ({option})")

    if model is not None and pred is not None and pred.exists() and not pred.is_dir():
        raise TinySRError(f"{pred}: with --model, --pred must be a folder for the upscaled images")
    learned, unavailable = _load_learned(names, device, quiet)
    if not any(name in m.CORE_METRICS or name in learned for name in names):
        raise TinySRError(
            "none of the requested metrics can be computed here",
            hint="psnr and ssim always can; lpips, lpips-vgg, dists and niqe once `tinysr metrics fetch` has run; "
            "the others need pyiqa and its weights, downloaded on first use",
        )

    with contextlib.ExitStack() as stack:
        kept = pred is not None
        upscale_failures: dict[str, str] = {}
        if model is not None:
            if pred is None:
                pred = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tinysr-eval-")))
            upscale_failures = _upscale_folder(lr_folder, pred, model, device, precision, overwrite, quiet)
        pairing = _pair(pred, gt, pred_suffix)
        pairing.report(upscale_failures, quiet)
        if not pairing.pairs and upscale_failures:
            raise TinySRError(f"none of the LR images of {dataset} could be upscaled")
        if not pairing.pairs:
            hint = "files pair by name without the extension"
            if not pred_suffix:
                hint += "; predictions named like x_x4.png pair with --pred-suffix _x4"
            raise TinySRError(f"no image of {pred} has a partner of the same name in {gt}", hint=hint)
        results = _score(pairing, settings, learned, quiet)
        results.unavailable = unavailable
        results.implementations = {name: metric.implementation for name, metric in learned.items()}
        results.failed = [*({"name": n, "error": e} for n, e in upscale_failures.items()), *results.failed]
        _add_folder_metrics(results, learned, pred, gt, settings)
        report = results.to_report(settings, pred if kept else None, gt, model)

    _write_reports(report, json_file, csv_file)
    if "-" not in (str(json_file), str(csv_file)):
        console.stdout.print(_table(report))
    if not quiet or results.failed:
        console.note(
            f"{len(report['images'])} pair(s) scored, {len(results.failed)} failed, "
            f"{len(report['unmatched']['pred_only']) + len(report['unmatched']['gt_only'])} without a partner"
        )
    if results.failed:
        raise typer.Exit(1)


# --- options -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    metrics: list[str]
    convention: str
    crop_border: int


def _parse_metrics(values: list[str] | None) -> list[str]:
    """Comma-separated or repeated names, ``all`` for every metric; order kept, duplicates dropped."""
    from tinysr_cli import metrics as m

    names: list[str] = []
    for value in values or ["psnr,ssim"]:
        for name in (part.strip().lower() for part in value.split(",")):
            if not name:
                continue
            if name != "all" and name not in m.ALL_METRICS:
                raise click.BadParameter(f"unknown metric {name!r}; choose from {', '.join(m.ALL_METRICS)} or all", param_hint="--metrics")
            names.extend(n for n in (m.ALL_METRICS if name == "all" else [name]) if n not in names)
    return names


def _dataset_folders(root: Path) -> tuple[Path, Path]:
    """(LR folder, HR folder) of a paired test set."""
    from tinysr_cli.errors import TinySRError

    if not root.is_dir():
        raise TinySRError(f"{root}: no such folder (--dataset)")
    for lr, hr in DATASET_LAYOUTS:
        if (root / hr).is_dir():
            return root / lr, root / hr
    layouts = " or ".join(f"{lr}/ and {hr}/" for lr, hr in DATASET_LAYOUTS)
    raise TinySRError(f"{root}: no HR folder found", hint=f"a paired test set holds {layouts}")


# --- pairing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pair:
    name: str
    pred: Path
    gt: Path


@dataclass
class _Pairing:
    pairs: list[_Pair] = field(default_factory=list)
    pred_only: list[Path] = field(default_factory=list)
    gt_only: list[Path] = field(default_factory=list)
    ambiguous: dict[str, list[Path]] = field(default_factory=dict)  # name -> files sharing it
    not_images: list[Path] = field(default_factory=list)

    def report(self, upscale_failures: dict[str, str], quiet: bool) -> None:
        """One line per file left out; HR images whose LR failed to upscale were reported already."""
        self.gt_only = [path for path in self.gt_only if path.stem not in upscale_failures]
        if not quiet:
            for path in self.not_images:
                console.note(f"skipped {path}: not an image")
        for path in self.pred_only:
            console.warn(f"{path}: no ground truth of the same name; left out")
        for path in self.gt_only:
            console.warn(f"{path}: no prediction of the same name; left out")


def _images_by_name(path: Path, suffix: str, pairing: _Pairing) -> dict[str, list[Path]]:
    """Image files of a folder (or the one file) by stem, ``suffix`` removed from the end."""
    from tinysr_cli.io.images import is_image_path

    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    found: dict[str, list[Path]] = {}
    for file in files:
        if not is_image_path(file):
            pairing.not_images.append(file)
            continue
        stem = file.stem
        if suffix and stem.endswith(suffix) and stem != suffix:
            stem = stem[: -len(suffix)]
        found.setdefault(stem, []).append(file)
    return found


def _pair(pred: Path, gt: Path, pred_suffix: str) -> _Pairing:
    """Pairs by name; two single files always pair."""
    pairing = _Pairing()
    if pred.is_file() and gt.is_file():
        pairing.pairs.append(_Pair(pred.stem, pred, gt))
        return pairing
    preds = _images_by_name(pred, pred_suffix, pairing)
    gts = _images_by_name(gt, "", pairing)
    for name in sorted(preds.keys() | gts.keys()):
        pred_files, gt_files = preds.get(name, []), gts.get(name, [])
        if len(pred_files) > 1 or len(gt_files) > 1:
            pairing.ambiguous[name] = [*pred_files, *gt_files]
        elif not gt_files:
            pairing.pred_only.extend(pred_files)
        elif not pred_files:
            pairing.gt_only.extend(gt_files)
        else:
            pairing.pairs.append(_Pair(name, pred_files[0], gt_files[0]))
    return pairing


# --- scoring -----------------------------------------------------------------------------------


def _progress(quiet: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    return Progress(*columns, console=console.stderr, disable=quiet or not console.stderr.is_terminal, transient=True)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """pyiqa prints download notices to stdout, which carries our results."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _load_learned(names: list[str], device: str, quiet: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """The requested pyiqa metrics that can be had, and why the others cannot (one warning line each)."""
    from tinysr_cli import metrics as m

    wanted = [name for name in names if name in m.LEARNED_METRICS]
    if not wanted:
        return {}, {}
    from tinysr_cli.engine.device import resolve_device

    target = resolve_device(device)
    loaded, unavailable = {}, {}
    for name in wanted:
        try:
            with _stdout_to_stderr():
                loaded[name] = m.load_metric(name, target)
        except m.MetricUnavailable as exc:
            unavailable[name] = str(exc)
            console.warn(f"{name}: not computed: {exc}")
        else:
            if not quiet:
                console.note(f"{name}: {loaded[name].implementation}")
    return loaded, unavailable


@dataclass
class _Results:
    rows: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    folder_scores: dict[str, float] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    implementations: dict[str, str] = field(default_factory=dict)  # learned metric -> who computed it
    pairing: _Pairing = field(default_factory=_Pairing)

    def to_report(self, settings: _Settings, pred: Path | None, gt: Path, model: str | None) -> dict[str, Any]:
        from tinysr_cli import __version__

        scored = [name for name in settings.metrics if any(name in row for row in self.rows) or name in self.folder_scores]
        mean = {name: _mean([row[name] for row in self.rows if name in row]) for name in scored if name not in self.folder_scores}
        mean.update(self.folder_scores)
        return {
            "tinysr": __version__,
            "convention": settings.convention,
            "psnr_ssim": _describe(settings),
            "crop_border": settings.crop_border,
            "pred": None if pred is None else str(pred),
            "gt": str(gt),
            "model": model,
            "metrics": scored,
            "images": self.rows,
            "mean": mean,
            "implementations": self.implementations,
            "unavailable": self.unavailable,
            "failed": self.failed,
            "unmatched": {
                "pred_only": [str(p) for p in self.pairing.pred_only],
                "gt_only": [str(p) for p in self.pairing.gt_only],
            },
        }


def _describe(settings: _Settings) -> str:
    source = "BasicSR" if settings.convention == "basicsr" else "pyiqa"
    return f"{source}'s convention: Y of BT.601 YCbCr, crop border {settings.crop_border}"


def _mean(values: list[float]) -> float:
    import math

    return math.fsum(values) / len(values) if not any(math.isinf(v) for v in values) else math.inf


def _score(pairing: _Pairing, settings: _Settings, learned: dict[str, Any], quiet: bool) -> _Results:
    from tinysr_cli.errors import TinySRError

    results = _Results(pairing=pairing)
    for name, files in pairing.ambiguous.items():
        message = f"{name}: several files share this name: {', '.join(str(f) for f in files)}"
        results.failed.append({"name": name, "error": message})
        console.error(message)
    with _progress(quiet) as bar:
        task = bar.add_task("scoring", total=len(pairing.pairs))
        for pair in pairing.pairs:
            bar.update(task, description=f"scoring {pair.name}")
            try:
                scores = _score_pair(pair, settings, learned)
            except (TinySRError, ValueError, OSError, RuntimeError, MemoryError) as exc:
                message = f"{pair.name}: {exc}" if isinstance(exc, ValueError) else str(exc)
                results.failed.append({"name": pair.name, "error": message})
                console.error(message)
            else:
                results.rows.append({"name": pair.name, "pred": pair.pred.name, "gt": pair.gt.name, **scores})
            bar.advance(task)
    return results


def _score_pair(pair: _Pair, settings: _Settings, learned: dict[str, Any]) -> dict[str, float]:
    """Every per-image metric of one pair; sizes must match exactly."""
    from tinysr_cli import metrics as m
    from tinysr_cli.io.images import load_image, to_uint8

    pred, gt = load_image(pair.pred), load_image(pair.gt)
    if pred.size != gt.size:
        (ph, pw), (gh, gw) = pred.size, gt.size
        raise ValueError(f"sizes differ: {pair.pred.name} is {pw}x{ph}, {pair.gt.name} is {gw}x{gh}")
    pred_u8, gt_u8 = to_uint8(pred.rgb), to_uint8(gt.rgb)  # 8-bit, as both conventions read files
    scores: dict[str, float] = {}
    for name in settings.metrics:
        if name == "psnr":
            scores[name] = m.psnr(pred_u8, gt_u8, crop_border=settings.crop_border, convention=settings.convention)
        elif name == "ssim":
            scores[name] = m.ssim(pred_u8, gt_u8, crop_border=settings.crop_border, convention=settings.convention)
        elif name in learned and name not in m.FOLDER_METRICS:
            with _stdout_to_stderr():
                scores[name] = learned[name].score(pred.rgb, gt.rgb)
    return scores


def _add_folder_metrics(results: _Results, learned: dict[str, Any], pred: Path, gt: Path, settings: _Settings) -> None:
    """FID compares the two folders as wholes."""
    from tinysr_cli import metrics as m

    for name in settings.metrics:
        if name not in m.FOLDER_METRICS or name not in learned:
            continue
        if not (pred.is_dir() and gt.is_dir()):
            console.warn(f"{name}: not computed: it compares two folders, not two images")
            results.unavailable[name] = "it compares two folders, not two images"
            continue
        try:
            with _stdout_to_stderr():
                results.folder_scores[name] = learned[name].score_folders(pred, gt)
        except (OSError, ValueError, RuntimeError) as exc:
            console.warn(f"{name}: not computed: {exc}")
            results.unavailable[name] = str(exc)


# --- upscaling first ---------------------------------------------------------------------------


def _upscale_folder(
    lr_folder: Path, out: Path, model: str, device: str, precision: str, overwrite: bool, quiet: bool
) -> dict[str, str]:
    """Upscale every LR image into ``out`` as PNG; returns failures by name. Existing results are reused."""
    from tinysr_cli.errors import TinySRError, cli_text
    from tinysr_cli.io.paths import plan_jobs
    from tinysr_cli.pipeline import BatchOptions, load_upscaler, upscale_job

    if not lr_folder.is_dir():
        raise TinySRError(f"{lr_folder}: no such folder (the LR images of --dataset)")
    plan = plan_jobs([str(lr_folder)], out, suffix="", output_format="png")
    pending = [job for job in plan.jobs if overwrite or not job.output.exists()]
    if not quiet:
        for path, reason in plan.skipped:
            console.note(f"skipped {path}: {reason}")
        if len(pending) < len(plan.jobs):
            console.note(f"reusing {len(plan.jobs) - len(pending)} upscaled image(s) already in {out} (--overwrite redoes them)")
    if not pending:
        return {}
    options = BatchOptions(model=model, device=device, precision=precision, overwrite=True, quiet=quiet, strip_metadata=True)
    upscaler = load_upscaler(options, warn=console.warn)
    failures: dict[str, str] = {}
    with _progress(quiet) as bar:
        files = bar.add_task("upscaling", total=len(pending))
        tiles = bar.add_task("tiles", total=None)
        for job in pending:
            bar.update(files, description=f"upscaling {job.source.name}")
            result = upscale_job(
                upscaler, job, options, progress=lambda _stage, done, total: bar.update(tiles, completed=done, total=total)
            )
            if not quiet:
                for warning in result.warnings:
                    console.warn(warning)
            if result.status == "failed":
                failures[job.source.stem] = cli_text(result.message_template)
                console.error(failures[job.source.stem])
            bar.advance(files)
    return failures


# --- reports -----------------------------------------------------------------------------------


def _number(value: float, digits: int | None = None) -> str:
    import math

    if math.isinf(value):
        return "inf"
    return repr(value) if digits is None else f"{value:.{digits}f}"


def _json_safe(report: dict[str, Any]) -> dict[str, Any]:
    """Infinite PSNR (identical images, BasicSR) becomes the string "inf": JSON has no infinity."""
    import math

    def fix(value: Any) -> Any:
        if isinstance(value, float) and math.isinf(value):
            return "inf"
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fix(v) for v in value]
        return value

    return fix(report)


def _csv_text(report: dict[str, Any]) -> str:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["name", "pred", "gt", *report["metrics"]])
    for row in report["images"]:
        writer.writerow([row["name"], row["pred"], row["gt"], *(_number(row[n]) if n in row else "" for n in report["metrics"])])
    writer.writerow(["mean", "", "", *(_number(report["mean"][n]) if n in report["mean"] else "" for n in report["metrics"])])
    return buffer.getvalue()


def _write_reports(report: dict[str, Any], json_file: Path | None, csv_file: Path | None) -> None:
    import json

    from tinysr_cli.atomic import atomic_path
    from tinysr_cli.errors import TinySRError

    for path, text in (
        (json_file, lambda: json.dumps(_json_safe(report), indent=2) + "\n"),
        (csv_file, lambda: _csv_text(report)),
    ):
        if path is None:
            continue
        if str(path) == "-":
            console.stdout.print(text(), markup=False, end="")
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                tmp.write_text(text())
        except OSError as exc:
            raise TinySRError(f"{path}: cannot write ({exc.strerror or exc})") from None


def _table(report: dict[str, Any]):
    from rich.table import Table

    from tinysr_cli import metrics as m

    names = report["metrics"]
    table = Table(title=f"{len(report['images'])} image pair(s); PSNR/SSIM: {report['psnr_ssim']}")
    table.add_column("image")
    for name in names:
        arrow = "↓" if name in m.LOWER_IS_BETTER else "↑"
        table.add_column(f"{name.upper()} {arrow}", justify="right")
    for row in report["images"]:
        table.add_row(row["name"], *(_number(row[n], 4) if n in row else "-" for n in names))
    table.add_section()
    table.add_row("mean", *(_number(report["mean"][n], 4) if n in report["mean"] else "-" for n in names), style="bold")
    return table
