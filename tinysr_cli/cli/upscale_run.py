"""The batch loop behind `tinysr upscale`: the pipeline's results rendered, with progress bars."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import typer

from tinysr_cli import pipeline
from tinysr_cli.cli import console
from tinysr_cli.errors import TinySRError, cli_text
from tinysr_cli.io import video
from tinysr_cli.io.paths import Plan
from tinysr_cli.pipeline import BatchOptions, Result


def render(result: Result, quiet: bool, result_line=None) -> None:
    """One result as `tinysr upscale` shows it: written paths on stdout, the rest on stderr."""
    if not quiet:
        for warning in result.warnings:
            console.warn(warning)
    if result.status == "failed":
        console.error(cli_text(result.message_template), hint=result.hint_template and cli_text(result.hint_template))
    if not quiet:
        for note in result.notes:
            console.note(note)
    if result.status == "done":
        (result_line or (lambda text: console.stdout.print(text, markup=False)))(str(result.output))
        if not quiet and result.seconds:
            console.note(f"{result.source} -> {result.output} ({result.seconds:.1f} s)")
    elif result.status == "skipped" and not quiet:
        console.note(cli_text(result.message_template))


def run_batch(plan: Plan, options: BatchOptions) -> list[tuple[Path, str]]:
    """Process every job; returns the failures as (input, message). Results go to stdout.

    Ctrl-C (and SIGTERM/SIGHUP, turned into KeyboardInterrupt by the CLI) stops the batch with a
    line saying how far it got and the partial summary, then exits 128 + the signal number.
    """
    if not options.quiet:
        for path, reason in plan.skipped:
            console.note(f"skipped {path}: {reason}")
    if not plan.jobs and not plan.failed:
        raise TinySRError("nothing to upscale: no image or video among the inputs")
    pending, decided = pipeline.triage(plan, options)
    counts = {"done": 0, "skipped": 0, "failed": 0}
    failures: list[tuple[Path, str]] = []

    def record(result: Result, result_line=None) -> None:
        counts[result.status] += 1
        if result.status == "failed":
            failures.append((result.source, cli_text(result.message_template)))
        render(result, options.quiet, result_line)

    def summary() -> None:
        if not options.quiet or failures:
            console.note(f"{counts['done']} upscaled, {counts['skipped']} skipped, {counts['failed']} failed")
        for path, _ in failures:
            console.note(f"  failed: {path}")

    for result in decided:
        record(result)
    decided_count = len(decided)
    inputs = frozenset(job.source.resolve() for job in plan.jobs)
    try:
        upscalers = pipeline.load_upscalers(options, warn=console.warn) if pending else []
        # Progress only on a terminal (logs get the result and summary lines, not bar redraws).
        show = not options.quiet and console.stderr.is_terminal
        with console.progress_bar(disable=not show) as bar:
            files_task = bar.add_task("files", total=len(pending), eta=None)
            tiles_task = bar.add_task("", total=None, visible=False)
            batch_started = time.perf_counter()
            several = len(upscalers) > 1  # files run at once: only the files bar (see pipeline.upscale_jobs)

            def on_progress(stage: str, current: int, total: int) -> None:
                # The engine reports backbone tiles; before the first report it encodes, after the last it decodes.
                label = "decode (VAE)" if total and current >= total else "backbone tiles"
                bar.update(tiles_task, completed=current, total=total, description=label, visible=True)

            def on_video_progress(progress: video.VideoProgress) -> None:
                eta = f", ETA {time.strftime('%H:%M:%S', time.gmtime(progress.eta))}" if progress.eta is not None else ""
                total = max(progress.estimated_frames, progress.frames) if progress.estimated_frames else None
                bar.update(
                    tiles_task, completed=progress.frames, total=total, description=f"frames ({progress.fps:.2f}/s{eta})", visible=True
                )

            def result_line(text: str) -> None:
                if show and console.stdout.is_terminal:  # one terminal: printed above the bars, not through them
                    bar.console.print(text, markup=False, highlight=False)
                else:
                    console.stdout.print(text, markup=False)

            def announce(index: int) -> None:
                """The bars for the job about to run (one device), or the device count (several)."""
                if several:
                    bar.update(files_task, description=f"files ({len(upscalers)} devices)")
                    return
                if index < len(pending):
                    job = pending[index]
                    bar.update(files_task, description=f"files {_short(job.source.name, 20)}")
                    is_video = pipeline.input_kind(job.source) == "video"
                    bar.reset(tiles_task, total=None, description="frames" if is_video else "encode (VAE)", visible=not is_video)

            announce(0)
            results = pipeline.upscale_jobs(
                upscalers, pending, options, inputs=inputs, progress=on_progress, video_progress=on_video_progress
            )
            for finished, result in enumerate(results, start=1):
                record(result, result_line)
                elapsed = time.perf_counter() - batch_started
                bar.update(files_task, advance=1, eta=elapsed / finished * (len(pending) - finished))
                announce(finished)
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        left = len(pending) - (sum(counts.values()) - decided_count)
        partial = getattr(exc, "partial", None)
        if partial is not None:
            console.note(f"kept the part written so far in {partial}")
        console.note(f"interrupted: {counts['done']} done, {left} left; run the same command to resume")
        summary()
        raise typer.Exit(128 + int(signum)) from None

    summary()
    return failures


def _short(name: str, width: int) -> str:
    """A file name cut in the middle to ``width`` characters, so the bars fit 80 columns."""
    return name if len(name) <= width else name[: width // 2 - 1] + "…" + name[-(width - width // 2):]
