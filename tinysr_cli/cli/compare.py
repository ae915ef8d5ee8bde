"""`tinysr compare`: one HTML page with aligned crops of several methods and their scores.

The work is done by ``tinysr_cli.report``; this module parses options, loads the learned metrics,
writes the page and sets the exit code (1 when any image could not be compared).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from tinysr_cli.cli import console, options

if TYPE_CHECKING:
    from rich.table import Table

    from tinysr_cli import report

_INPUTS = "Inputs"
_CROPS = "Crops"


def compare_command(
    pred: Annotated[list[str], typer.Option(
        "--pred", metavar="NAME=DIR",
        help="A method's predictions: NAME=DIR (a folder, or one image); repeat for each method, in column order.",
        rich_help_panel=_INPUTS,
    )],
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="The HTML page to write (self-contained: images embedded).", rich_help_panel=_INPUTS,
    )],
    gt: Annotated[Optional[Path], typer.Option(
        "--gt", help="Ground truth: a folder or one image; crops follow its detail, and PSNR/SSIM need it.",
        rich_help_panel=_INPUTS,
    )] = None,
    lr: Annotated[Optional[Path], typer.Option(
        "--lr", help="The low-resolution inputs: a folder or one image, shown enlarged with nearest neighbour.",
        rich_help_panel=_INPUTS,
    )] = None,
    scale: Annotated[int, typer.Option(help="HR size / LR size.", min=1, rich_help_panel=_INPUTS)] = 4,
    crops: Annotated[int, typer.Option(help="Crops per image: the most detailed windows.", min=0, rich_help_panel=_CROPS)] = 2,
    crop_size: Annotated[int, typer.Option(
        "--crop-size", help="Side of a crop in HR pixels (a multiple of --scale with --lr).", min=8, rich_help_panel=_CROPS,
    )] = 128,
    metrics: options.Metrics = None,
    convention: options.Convention = "basicsr",
    crop_border: options.CropBorder = None,
    device: options.Device = "auto",
    title: Annotated[str, typer.Option(help="The page's title.")] = "tinysr compare",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No notes or table; warnings and errors only.")] = False,
) -> None:
    """Write one HTML page comparing methods: aligned crops (LR, each method, ground truth) and a metric table.

    Metrics that cannot be computed here are noted on the page.
    """
    from tinysr_cli import metrics as m
    from tinysr_cli import report
    from tinysr_cli.errors import TinySRError
    from tinysr_cli.evaluation import load_learned

    methods = parse_methods(pred, reserved=[label for label, path in ((report.LR_LABEL, lr), (report.GT_LABEL, gt)) if path])
    names = options.metric_names(metrics)
    options.convention(convention)
    if lr is not None and crop_size % scale:
        raise typer.BadParameter(f"{crop_size} is not a multiple of --scale {scale}", param_hint="--crop-size")
    for path, option in (*((path, f"--pred {name}") for name, path in methods), (gt, "--gt"), (lr, "--lr")):
        if path is not None and not path.exists():
            raise TinySRError(f"{path}: no such file or folder ({option})")

    wanted = [name for name in names if gt is not None or name not in m.FULL_REFERENCE]
    learned, unavailable = load_learned([n for n in wanted if n not in m.FOLDER_METRICS], device)
    for name, why in unavailable.items():
        console.warn(f"{name}: not computed: {why}")
    if not quiet:
        for name, metric in learned.items():
            console.note(f"{name}: {metric.implementation}")
    comparison = report.build_comparison(
        methods, gt=gt, lr=lr, scale=scale, crops=crops, crop_size=crop_size, metrics=names, convention=convention,
        crop_border=crop_border, learned=learned, on_error=console.error,
    )
    comparison.unavailable.update(unavailable)
    for line in comparison.left_out:
        console.warn(f"{line}; left out")
    if not comparison.images and not comparison.failed:
        raise TinySRError("no image name is found in every folder", hint="files pair by name without the extension")

    _write(output, report.render_html(comparison, title))
    if not quiet:
        if comparison.metrics and comparison.images:
            console.stdout.print(_table(comparison))
        console.note(
            f"wrote {output}: {len(comparison.images)} image(s) compared, {len(comparison.failed)} failed, "
            f"{len(comparison.left_out)} file(s) left out"
        )
    if comparison.failed:
        raise typer.Exit(1)


def parse_methods(values: list[str], reserved: Sequence[str] = ()) -> list[tuple[str, Path]]:
    """``NAME=DIR`` options -> [(name, path)]; a usage error naming --pred for anything else."""
    methods: list[tuple[str, Path]] = []
    for value in values:
        name, sep, folder = value.partition("=")
        name, folder = name.strip(), folder.strip()
        if not sep or not name or not folder:
            raise typer.BadParameter(f"{value!r} is not NAME=DIR (e.g. ours=out/ours)", param_hint="--pred")
        if name in reserved or name in (n for n, _ in methods):
            raise typer.BadParameter(f"the name {name!r} is used twice (LR and GT name the inputs)", param_hint="--pred")
        methods.append((name, Path(folder)))
    return methods


def _write(path: Path, text: str) -> None:
    from tinysr_cli.atomic import atomic_path
    from tinysr_cli.errors import TinySRError

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise TinySRError(f"{path}: cannot write ({exc.strerror or exc})") from None


def _table(comparison: report.Comparison) -> Table:
    from tinysr_cli import metrics as m
    from tinysr_cli.report import format_score

    from rich.table import Table

    table = Table(title=f"mean over {len(comparison.images)} image(s); {comparison.description}")
    table.add_column("method")
    for name in comparison.metrics:
        table.add_column(f"{name.upper()} {'↓' if name in m.LOWER_IS_BETTER else '↑'}", justify="right")
    mean = comparison.mean
    for method in comparison.methods:
        table.add_row(method, *(format_score(mean[method][n]) if n in mean[method] else "-" for n in comparison.metrics))
    return table
