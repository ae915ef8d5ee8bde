"""Options that `tinysr eval` and `tinysr compare` share, defined once as ``Annotated`` aliases.

Their checks live in the library (``tinysr_cli.evaluation``); :func:`metric_names` and
:func:`convention` turn its errors into usage errors naming the flag (exit code 2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Optional, TypeVar

import click
import typer

SCORING = "Scoring"

Metrics = Annotated[Optional[list[str]], typer.Option(
    "--metrics", "-m",
    help="psnr, ssim (the default), lpips, lpips-vgg, dists, fid, niqe, musiq, maniqa, clipiqa, topiq, qalign or "
    "all; comma-separated or repeated. lpips, lpips-vgg, dists and niqe work offline once `tinysr metrics fetch` "
    'has run; the others need pyiqa (pip install "tinysr\\[metrics]").',
    rich_help_panel=SCORING,
)]
Convention = Annotated[str, typer.Option(
    help="PSNR/SSIM as BasicSR computes them (basicsr) or as pyiqa does (pyiqa).", rich_help_panel=SCORING,
)]
CropBorder = Annotated[Optional[int], typer.Option(
    "--crop-border", min=0,
    help="Pixels trimmed from each edge before PSNR/SSIM (default: the scale for basicsr, 4 in eval, --scale in compare; "
    "0 for pyiqa).",
    rich_help_panel=SCORING,
)]
Device = Annotated[str, typer.Option(
    help="auto, cpu, cuda, cuda:N or mps: for the learned metrics (and --model where there is one).",
    rich_help_panel=SCORING,
)]

T = TypeVar("T")


def _as_usage_error(check: Callable[[], T]) -> T:
    """The library's check, its TinySRError about an option turned into a usage error naming the flag."""
    from tinysr_cli.errors import TinySRError, flag

    try:
        return check()
    except TinySRError as exc:
        if exc.option is None:
            raise
        raise click.BadParameter(exc.cli_message(), param_hint=flag(exc.option)) from None


def metric_names(values: list[str] | None) -> list[str]:
    """--metrics as a list of names (see ``evaluation.parse_metrics``)."""
    from tinysr_cli import evaluation

    return _as_usage_error(lambda: evaluation.parse_metrics(values))


def convention(value: str) -> str:
    """--convention checked (see ``evaluation.check_convention``)."""
    from tinysr_cli import evaluation

    return _as_usage_error(lambda: evaluation.check_convention(value))
