"""`tinysr eval`: score predictions against ground truth, per image and on average.

The work is done by ``tinysr_cli.evaluation`` (pairing, scoring, the report's schema); this module
parses options, upscales the --dataset LR images first when given --model, shows progress, writes
the reports, renders the table and sets the exit code: 1 when any pair could not be scored. Files
without a partner and metrics that cannot be had are reported and leave the exit code alone as long
as something was scored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import click
import typer

from tinysr_cli.cli import console, options

if TYPE_CHECKING:
    from rich.table import Table

    from tinysr_cli.evaluation import Evaluator, Report

_INPUTS = "Inputs"
_REPORTS = "Reports"
_MODEL = "Upscaling first (--dataset with --model)"


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
    metrics: options.Metrics = None,
    convention: options.Convention = "basicsr",
    crop_border: options.CropBorder = None,
    device: options.Device = "auto",
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

    from tinysr_cli import evaluation
    from tinysr_cli.errors import TinySRError

    names = options.metric_names(metrics)
    options.convention(convention)
    if str(json_file) == "-" and str(csv_file) == "-":
        raise click.UsageError("only one of --json and --csv can write to stdout")
    if (gt is None) == (dataset is None):
        raise click.UsageError("give the ground truth with --gt or --dataset (one of them)")
    if model is not None and dataset is None:
        raise click.UsageError("--model needs --dataset: its LR images are what gets upscaled")
    if model is None and pred is None:
        raise click.UsageError("give the predictions with --pred (or --dataset with --model to make them)")

    lr_folder = None
    if dataset is not None:
        lr_folder, gt = evaluation.dataset_folders(dataset)
    for path, option in ((gt, "--gt"), (None if model else pred, "--pred")):
        if path is not None and not path.exists():
            raise TinySRError(f"{path}: no such file or folder ({option})")
    if model is not None and pred is not None and pred.exists() and not pred.is_dir():
        raise TinySRError(f"{pred}: with --model, --pred must be a folder for the upscaled images")

    evaluator = _load_evaluator(names, convention, crop_border, device, quiet)
    with contextlib.ExitStack() as stack:
        kept = pred is not None
        upscale_failures: dict[str, str] = {}
        if model is not None:
            if pred is None:
                pred = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tinysr-eval-")))
            upscale_failures = _upscale_folder(lr_folder, pred, model, device, precision, overwrite, quiet)
        with _progress_bar(quiet) as progress:
            report = evaluator.evaluate(
                pred, gt, pred_suffix=pred_suffix, model=model, record_pred=kept, upscale_failures=upscale_failures,
                progress=progress, on_error=console.error,
            )
    _show_left_out(report, evaluator, quiet)
    if not report.images and len(report.failed) == len(upscale_failures):  # nothing paired, so nothing was scored
        if upscale_failures:
            raise TinySRError(f"none of the LR images of {dataset} could be upscaled")
        hint = "files pair by name without the extension"
        if not pred_suffix:
            hint += "; predictions named like x_x4.png pair with --pred-suffix _x4"
        raise TinySRError(f"no image of {pred} has a partner of the same name in {gt}", hint=hint)

    _write_reports(report, json_file, csv_file)
    if "-" not in (str(json_file), str(csv_file)):
        console.stdout.print(_table(report))
    if not quiet or report.failed:
        console.note(
            f"{len(report.images)} pair(s) scored, {len(report.failed)} failed, "
            f"{len(report.pred_only) + len(report.gt_only)} without a partner"
        )
    if report.failed:
        raise typer.Exit(1)


def _load_evaluator(names: list[str], convention: str, crop_border: int | None, device: str, quiet: bool) -> Evaluator:
    """The metrics loaded: one warning per metric that cannot be had, a note on who computes the others."""
    from tinysr_cli.evaluation import Evaluator, NothingToScore

    try:
        evaluator = Evaluator(names, convention=convention, crop_border=crop_border, device=device)
    except NothingToScore as exc:
        for name, why in exc.unavailable.items():
            console.warn(f"{name}: not computed: {why}")
        raise
    for name, why in evaluator.unavailable.items():
        console.warn(f"{name}: not computed: {why}")
    if not quiet:
        for name, implementation in evaluator.implementations.items():
            console.note(f"{name}: {implementation}")
    return evaluator


def _show_left_out(report: Report, evaluator: Evaluator, quiet: bool) -> None:
    """One line per file left out and per metric that turned out not computable while scoring."""
    for name, why in report.unavailable.items():
        if name not in evaluator.unavailable:
            console.warn(f"{name}: not computed: {why}")
    if not quiet:
        for path in report.not_images:
            console.note(f"skipped {path}: not an image")
    for path in report.pred_only:
        console.warn(f"{path}: no ground truth of the same name; left out")
    for path in report.gt_only:
        console.warn(f"{path}: no prediction of the same name; left out")


@contextlib.contextmanager
def _progress_bar(quiet: bool) -> Iterator[Callable[[str, int, int], None]]:
    """A scoring bar on a terminal; yields the callback that moves it."""
    with console.progress_bar(disable=quiet or not console.stderr.is_terminal) as bar:
        task = bar.add_task("scoring", total=None)

        def update(name: str, done: int, total: int) -> None:
            bar.update(task, description=f"scoring {name}" if name else "scoring", completed=done, total=total)

        yield update


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
    batch = BatchOptions(model=model, device=device, precision=precision, overwrite=True, quiet=quiet, strip_metadata=True)
    upscaler = load_upscaler(batch, warn=console.warn)
    failures: dict[str, str] = {}
    with console.progress_bar(disable=quiet or not console.stderr.is_terminal) as bar:
        files = bar.add_task("upscaling", total=len(pending))
        tiles = bar.add_task("tiles", total=None)
        for job in pending:
            bar.update(files, description=f"upscaling {job.source.name}")
            result = upscale_job(
                upscaler, job, batch, progress=lambda _stage, done, total: bar.update(tiles, completed=done, total=total)
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


def _write_reports(report: Report, json_file: Path | None, csv_file: Path | None) -> None:
    from tinysr_cli.atomic import atomic_path
    from tinysr_cli.errors import TinySRError

    for path, text in ((json_file, report.to_json), (csv_file, report.to_csv)):
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


def _table(report: Report) -> Table:
    from rich.table import Table

    from tinysr_cli import metrics as m
    from tinysr_cli.evaluation import format_number

    names, mean = report.metrics, report.mean
    table = Table(title=f"{len(report.images)} image pair(s); PSNR/SSIM: {report.settings.description}")
    table.add_column("image")
    for name in names:
        arrow = "↓" if name in m.LOWER_IS_BETTER else "↑"
        table.add_column(f"{name.upper()} {arrow}", justify="right")
    for row in report.images:
        table.add_row(row["name"], *(format_number(row[n], 4) if n in row else "-" for n in names))
    table.add_section()
    table.add_row("mean", *(format_number(mean[n], 4) if n in mean else "-" for n in names), style="bold")
    return table
