"""`tinysr train`: run one stage of a training recipe (needs the ``train`` extra).

The ``training`` package (and accelerate/peft with it) is imported inside the command, so the
inference CLI never loads it. Several processes: ``accelerate launch --multi_gpu --num_processes N -m
tinysr_cli train ...`` (on CPUs with ``ACCELERATE_USE_CPU=1``); launches that would not form one
data-parallel group are refused.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from tinysr_cli.cli import console

STAGES = ("prune", "cache", "vae", "restore", "export", "distill")


class _RichReporter:
    """Progress bars and notes on stderr, on the main process only."""

    def __init__(self, progress) -> None:
        self.bar = progress
        self.tasks: dict[str, int] = {}

    def note(self, message: str) -> None:
        self.bar.console.print(message, markup=False, highlight=False)

    def progress(self, task: str, completed: int, total: int, metrics: dict[str, float]) -> None:
        if task not in self.tasks:
            self.tasks[task] = self.bar.add_task(task, total=total, completed=completed, metrics="")
        shown = "  ".join(f"{name} {value:.4g}" for name, value in sorted(metrics.items()))
        self.bar.update(self.tasks[task], completed=completed, total=total, **({"metrics": shown} if shown else {}))


def train_command(
    stage: Annotated[str, typer.Option(help="prune, cache, vae, restore, export, or distill (a small model from a pixel-space teacher, data to weights file).", show_default=False)],
    config: Annotated[Path, typer.Option("--config", "-c", help="The recipe (TOML), e.g. training/recipes/vae.toml.", show_default=False)],
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in the output folder from its newest checkpoint.")] = False,
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Run folder (default: the recipe's run.output_dir); for export, the weights file.")
    ] = None,
    stop_at_step: Annotated[
        Optional[int], typer.Option(min=1, help="Checkpoint and exit after this step (for time-limited jobs); continue with --resume.")
    ] = None,
    data: Annotated[
        Optional[Path], typer.Option("--data", help="distill: train on your own photos (a folder, searched recursively) instead of the recipe's photo manifest.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or notes; errors only.")] = False,
) -> None:
    """Train TinySR: run one stage of a recipe (needs `pip install "tinysr\\[train]"`)."""
    from rich.progress import TextColumn

    from tinysr_cli.errors import TinySRError

    if stage not in STAGES:
        raise TinySRError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    if data is not None and stage != "distill":
        raise TinySRError("--data is for --stage distill; the other stages read [data] from their recipe")
    missing = [name for name in ("accelerate", "peft", "training") if importlib.util.find_spec(name) is None]
    if missing:
        raise TinySRError(f"training needs the train extra ({', '.join(missing)} missing)", hint='pip install "tinysr[train]"')
    from training.stages import run_stage
    from training.stages.common import LaunchError, SilentReporter

    main_process = os.environ.get("RANK", "0") == "0"
    show = main_process and not quiet
    with console.progress_bar(not show, TextColumn("{task.fields[metrics]}")) as bar:
        reporter = _RichReporter(bar) if show else SilentReporter()
        try:
            result = run_stage(stage, config, output=output, resume=resume, reporter=reporter, stop_at_step=stop_at_step, data=data)
        except LaunchError:
            if not main_process:  # every process refuses; the main one says why, once
                time.sleep(1)  # and is not killed by the launcher before it does
                raise typer.Exit(1) from None
            raise
    if not result.finished:
        if show:
            console.note(f"stopped at step {result.step}; continue with --resume")
        return
    if main_process:
        console.stdout.print(str(result.output), markup=False)
