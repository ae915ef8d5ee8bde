"""The batch loop behind `tinysr upscale`: load the model once, process jobs, render progress."""

from __future__ import annotations

import contextlib
import datetime
import functools
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from tinysr_cli.cli import console
from tinysr_cli.engine.device import resolve_device, resolve_precision
from tinysr_cli.engine.pixel import PixelUpscaler, load_pixel_upscaler
from tinysr_cli.engine.upscaler import UpscaleOptions, Upscaler, available_memory
from tinysr_cli.errors import TinySRError
from tinysr_cli.io import video
from tinysr_cli.io.animated import ANIMATION_SUFFIXES, load_animation, plan_animation_output, save_animation
from tinysr_cli.io.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    ImageInfo,
    LoadedImage,
    bleed_transparent,
    load_image,
    plan_output,
    probe_image,
    save_image,
    to_uint8,
)
from tinysr_cli.io.paths import Job, Plan, plan_jobs
from tinysr_cli.models.tinysr import UPSCALE
from tinysr_cli.weights.format import RANDOM_INIT_WARNING, load_weights
from tinysr_cli.weights.hub import resolve_model
from tinysr_cli.weights.registry import load_registry


@dataclass(frozen=True)
class BatchOptions:
    model: str | None
    device: str
    precision: str
    engine: UpscaleOptions
    scale: float | None
    width: int | None
    height: int | None
    quality: int
    overwrite: bool
    quiet: bool
    strip_metadata: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    codec: str | None = None  # None: video.default_codec of each output
    crf: int | None = None
    pix_fmt: str | None = None
    keep_partial: bool = False
    skip_damaged: bool = False


@functools.lru_cache(maxsize=4096)
def input_kind(path: Path) -> str | None:
    """"image" or "video" by suffix; other files are probed for a video stream. None: neither."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in video.VIDEO_SUFFIXES or video.is_video(path):
        return "video"
    return None


def _audio_only(path: Path) -> bool:
    """A container PyAV opens that holds audio but no moving picture (a podcast saved as .mp4)."""
    if video.av is None or not path.is_file():
        return False
    try:
        container = video.av.open(str(path), metadata_errors="ignore")
    except (video.av.FFmpegError, OSError, ValueError):
        return False
    with container:
        return video._main_video_stream(container) is None and any(s.type == "audio" for s in container.streams)


def plan_inputs(inputs: list[str], output: Path | None, *, video_only: bool, images_only: bool, **naming) -> Plan:
    """`plan_jobs` for images and videos (videos keep a container we write); the filters apply to
    every input, named ones too (a shell glob arrives as names). Our own earlier outputs found by
    a scan are left out; containers with audio but no picture are skipped with a note."""
    if video_only and images_only:
        raise TinySRError("--video-only and --images-only exclude each other")
    wanted = {"video"} if video_only else {"image"} if images_only else {"image", "video"}
    note = "not a video" if video_only else "not an image" if images_only else "not an image or video"
    plan = plan_jobs(
        inputs,
        output,
        accept=lambda path: input_kind(path) in wanted,
        suffix_for=lambda path: video.output_suffix(path) if input_kind(path) == "video" else None,
        skip_note=note,
        exclude_products=True,
        **naming,
    )
    kept, dropped = [], list(plan.skipped)
    for job in plan.jobs:
        kind = input_kind(job.source)
        if kind not in wanted:
            dropped.append((job.source, note))
        elif kind == "video" and _audio_only(job.source):
            dropped.append((job.source, "audio only, no video stream"))
        else:
            kept.append(job)
    return Plan(kept, dropped, plan.failed)


def load_upscaler(options: BatchOptions) -> Upscaler | PixelUpscaler:
    device = resolve_device(options.device)
    dtype = resolve_precision(options.precision, device)
    # TINYSR_MODEL or the config file may name a pixel-space model too.
    spec = options.model if options.model is not None else load_registry().default
    pixel = load_pixel_upscaler(spec, device, dtype, tile=options.engine.tile * 8)
    if pixel is not None:
        return pixel
    model, info = load_weights(resolve_model(options.model, progress=not options.quiet))
    if info.random_init:
        console.warn(RANDOM_INIT_WARNING.format(path=info.path))
    return Upscaler(model, device=device, dtype=dtype, options=options.engine, default_color_fix=info.color_fix)


def final_size(height: int, width: int, options: BatchOptions) -> tuple[int, int]:
    """Output (height, width): 4x, or what --scale/--width/--height ask for (aspect kept if one is given)."""
    if options.width and options.height:
        return options.height, options.width
    if options.width:
        return max(1, round(height * options.width / width)), options.width
    if options.height:
        return options.height, max(1, round(width * options.height / height))
    factor = options.scale if options.scale is not None else UPSCALE
    return max(1, round(height * factor)), max(1, round(width * factor))


def resample(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Lanczos resampling of a [C, H, W] float image (a no-op at the same size)."""
    if tuple(image.shape[-2:]) == size:
        return image
    array = image.permute(1, 2, 0).numpy()
    resized = cv2.resize(array, (size[1], size[0]), interpolation=cv2.INTER_LANCZOS4)
    if resized.ndim == 2:
        resized = resized[..., None]
    return torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1).clamp_(0, 1)


def upscale_alpha(alpha: torch.Tensor) -> torch.Tensor:
    """Alpha is not restored by the model: bicubic x4, clamped."""
    return F.interpolate(alpha[None], scale_factor=UPSCALE, mode="bicubic", align_corners=False)[0].clamp_(0, 1)


def upscale_pixels(
    upscaler: Upscaler, image: LoadedImage, size: tuple[int, int], progress
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RGB through the model (edge colours bled under full transparency first), alpha resized on its own."""
    rgb = image.rgb if image.alpha is None else bleed_transparent(image.rgb, image.alpha)
    rgb = resample(upscaler.upscale(rgb, progress), size)
    if image.alpha is None:
        return rgb, None
    if bool(image.alpha.min() == image.alpha.max()):  # constant alpha: refilled, not resampled
        return rgb, torch.full((1, *size), float(image.alpha[0, 0, 0]))
    return rgb, resample(upscale_alpha(image.alpha), size)


def check_memory(job: Job, info: ImageInfo, upscaler: Upscaler, animated: bool, options: BatchOptions | None = None) -> None:
    """Refuse up front, with the numbers, a job that cannot fit in the memory available now."""
    needed = upscaler.memory_needed(info.height, info.width)
    final_height, final_width = final_size(info.height, info.width, options) if options else (info.height * UPSCALE, info.width * UPSCALE)
    if (final_height, final_width) != (info.height * UPSCALE, info.width * UPSCALE):  # 4x is counted already
        needed += final_height * final_width * 3 * 4 * 2  # the resampled float canvas and its copy
    if animated:  # every upscaled frame is kept (8-bit RGBA) until the file is written
        needed += info.frames * final_height * final_width * 4
    available = available_memory()
    if available is not None and needed > available:
        work_height, work_width = upscaler.work_size(info.height, info.width)
        enlarged = (
            f" (its short side is under {upscaler.min_lr_side} px, so it is enlarged to {work_width}x{work_height} first)"
            if (work_height, work_width) != (info.height, info.width)
            else ""
        )
        raise TinySRError(
            f"{job.source}: {info.width}x{info.height} needs about {needed / 1e9:.1f} GB of memory to upscale{enlarged}, "
            f"{available / 1e9:.1f} GB is available",
            hint="pad the short side to at least 128 px, or split the image into parts" if enlarged else "split the image into parts, or free memory",
        )


def _input_conflict(job: Job, output: Path, inputs: frozenset[Path]) -> str | None:
    """The message if ``output`` is this job's input or any other input of the run, else None."""
    key = output.resolve()
    if key == job.source.resolve():
        return f"{job.source}: the output path is the input file"
    if key in inputs:
        return f"{job.source}: the output {output} is an input of this run"
    return None


def _claim_output(job: Job, output: Path, options: BatchOptions, inputs: frozenset[Path] = frozenset()) -> bool:
    """Whether ``output`` (``job.output`` or its format switch) may be written; never an input of the run."""
    if output == job.output:
        return True
    conflict = _input_conflict(job, output, inputs | {job.source.resolve()})
    if conflict:
        raise TinySRError(f"{conflict} (after switching to {output.suffix})")
    if output.exists() and not options.overwrite:
        if not options.quiet:
            console.note(f"skipped {job.source}: {output} exists (use --overwrite)")
        return False
    return True


def process_image(
    upscaler: Upscaler, job: Job, options: BatchOptions, progress, inputs: frozenset[Path] = frozenset()
) -> Path | None:
    """Upscale one file; returns the path written (its format may have switched), None if skipped."""
    info = probe_image(job.source, max_pixels=options.max_pixels)
    animated = info.frames > 1 and job.source.suffix.lower() in ANIMATION_SUFFIXES
    check_memory(job, info, upscaler, animated, options)
    if animated:
        animation = load_animation(job.source, max_pixels=options.max_pixels)
        output, warnings = plan_animation_output(job.output)
        frames, metadata = animation.frames, animation.metadata
    else:
        image = load_image(job.source, max_pixels=options.max_pixels)
        output, warnings = plan_output(
            job.output,
            alpha=image.alpha is not None,
            bit_depth=image.bit_depth,
            grayscale=image.grayscale,
            metadata=bool(image.metadata) and not options.strip_metadata,
        )
        frames, metadata = [image], image.metadata
        if info.frames > 1:
            warnings.append(f"{job.source.name}: only the first of its {info.frames} pages is upscaled")
    if not _claim_output(job, output, options, inputs):
        return None
    metadata = {} if options.strip_metadata else metadata
    size = final_size(*frames[0].size, options)
    if animated:
        canvases = []
        for frame in frames:
            rgb, alpha = upscale_pixels(upscaler, frame, size, progress)
            canvases.append(to_uint8(rgb if alpha is None else torch.cat([rgb, alpha])))
        save_animation(output, canvases, animation.durations, animation.loop, quality=options.quality, metadata=metadata)
    else:
        rgb, alpha = upscale_pixels(upscaler, image, size, progress)
        save_image(
            output, rgb, alpha, quality=options.quality, metadata=metadata, bit_depth=image.bit_depth, grayscale=image.grayscale
        )
    if not options.quiet:
        for warning in warnings:
            console.warn(warning)
    return output


def process_video(upscaler: Upscaler, job: Job, options: BatchOptions, bar: Progress) -> Path:
    """Upscale one video exactly 4x, streamed; frames, frames/s and ETA on the progress bar."""
    if options.scale is not None or options.width or options.height:
        raise TinySRError(f"{job.source}: --scale, --width and --height apply to images; videos are upscaled 4x")
    task = bar.add_task("frames", total=None)

    def on_progress(progress: video.VideoProgress) -> None:
        eta = f", ETA {time.strftime('%H:%M:%S', time.gmtime(progress.eta))}" if progress.eta is not None else ""
        total = max(progress.estimated_frames, progress.frames) if progress.estimated_frames else None
        bar.update(task, completed=progress.frames, total=total, description=f"frames ({progress.fps:.2f}/s{eta})")

    try:
        result = video.upscale_video(
            job.source,
            job.output,
            upscaler.upscale_batch,
            codec=options.codec or video.default_codec(job.output),
            crf=options.crf,
            pix_fmt=options.pix_fmt,
            keep_partial=options.keep_partial,
            skip_damaged=options.skip_damaged,
            batch_size=1 if upscaler.device.type == "cpu" else video.DEFAULT_BATCH_SIZE,
            progress=on_progress,
        )
    except (TinySRError, KeyboardInterrupt):
        partial = video.partial_path(job.output)
        if options.keep_partial and partial.exists() and not options.quiet:
            console.note(f"kept the part written so far in {partial}")
        raise
    finally:
        bar.remove_task(task)
    video.partial_path(job.output).unlink(missing_ok=True)  # an older run's part: the whole video is here now
    if not options.quiet:
        for note in result.notes:
            console.note(f"{job.source.name}: {note}")
    return job.output


def run_batch(plan: Plan, options: BatchOptions) -> list[tuple[Path, str]]:
    """Process every job; returns the failures as (input, message). Results go to stdout.

    Ctrl-C (and SIGTERM/SIGHUP, turned into KeyboardInterrupt by the CLI) stops the batch with a
    line saying how far it got and the partial summary, then exits 128 + the signal number.
    """
    failures: list[tuple[Path, str]] = []
    done = skipped = 0
    if not options.quiet:
        for path, reason in plan.skipped:
            console.note(f"skipped {path}: {reason}")
    for path, message in plan.failed:
        failures.append((path, message))
        console.error(message)
    inputs = frozenset(job.source.resolve() for job in plan.jobs)
    pending = []
    claimed: dict[Path, Path] = {}
    for job in plan.jobs:
        key = job.output.resolve()
        conflict = _input_conflict(job, job.output, inputs)
        if conflict:
            failures.append((job.source, conflict))
            console.error(conflict)
        elif key in claimed:
            failures.append((job.source, f"{job.source}: output {job.output} is also the output of {claimed[key]}"))
            console.error(failures[-1][1])
        elif job.output.exists() and not options.overwrite:
            skipped += 1
            if not options.quiet:
                console.note(f"skipped {job.source}: {job.output} exists (use --overwrite)")
        else:
            claimed[key] = job.source
            pending.append(job)
    if not plan.jobs and not plan.failed:
        raise TinySRError("nothing to upscale: no image or video among the inputs")

    def summary() -> None:
        if not options.quiet or failures:
            console.note(f"{done} upscaled, {skipped} skipped, {len(failures)} failed")
        for path, _ in failures:
            console.note(f"  failed: {path}")

    failed_before, skipped_before = len(failures), skipped
    try:
        upscaler = _load(options) if pending else None
        columns = [
            TextColumn("{task.description}", style="bold"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            _EtaColumn(),
        ]
        # Progress only on a terminal (logs get the result and summary lines, not bar redraws).
        show = not options.quiet and console.stderr.is_terminal
        with Progress(*columns, console=console.stderr, disable=not show, transient=True) as bar:
            files_task = bar.add_task("files", total=len(pending), eta=None)
            tiles_task = bar.add_task("", total=None, visible=False)
            batch_started = time.perf_counter()

            def on_progress(stage: str, current: int, total: int) -> None:
                # The engine reports backbone tiles; before the first report it encodes, after the last it decodes.
                label = "decode (VAE)" if total and current >= total else "backbone tiles"
                bar.update(tiles_task, completed=current, total=total, description=label, visible=True)

            def result_line(text: str) -> None:
                if show and console.stdout.is_terminal:  # one terminal: printed above the bars, not through them
                    bar.console.print(text, markup=False, highlight=False)
                else:
                    console.stdout.print(text, markup=False)

            for index, job in enumerate(pending):
                bar.update(files_task, description=f"files {_short(job.source.name, 20)}")
                bar.reset(tiles_task, total=None, description="encode (VAE)", visible=input_kind(job.source) != "video")
                started = time.perf_counter()
                try:
                    with _library_warnings(job.source, options.quiet):
                        if input_kind(job.source) == "video":
                            written = process_video(upscaler, job, options, bar)
                        else:
                            written = process_image(upscaler, job, options, on_progress, inputs)
                except TinySRError as exc:
                    # Messages name their file already; the engine's (NaN/inf) get the input's name.
                    named = str(exc).startswith((str(job.source), str(job.output.parent), "/"))
                    message = str(exc) if named else f"{job.source}: {exc}"
                    failures.append((job.source, message))
                    console.error(message, hint=exc.hint)
                except Exception as exc:  # one bad file never stops the batch
                    message = f"{job.source}: {type(exc).__name__}: {exc}"
                    failures.append((job.source, message))
                    console.error(message)
                else:
                    if written is None:
                        skipped += 1
                    else:
                        done += 1
                        result_line(str(written))
                        if not options.quiet:
                            console.note(f"{job.source} -> {written} ({time.perf_counter() - started:.1f} s)")
                finished = index + 1
                elapsed = time.perf_counter() - batch_started
                bar.update(files_task, advance=1, eta=elapsed / finished * (len(pending) - finished))
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        left = len(pending) - done - (len(failures) - failed_before) - (skipped - skipped_before)
        console.note(f"interrupted: {done} done, {left} left; run the same command to resume")
        summary()
        raise typer.Exit(128 + int(signum)) from None

    summary()
    return failures


@contextlib.contextmanager
def _library_warnings(source: Path, quiet: bool):
    """Python warnings raised while one file is processed (Pillow's "Corrupt EXIF data", a damaged
    ICC profile) become one ``Warning: FILE: ...`` line each, instead of library noise without a name."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            if not quiet:
                seen = set()
                for item in caught:
                    text = " ".join(str(item.message).split())
                    if text not in seen:
                        seen.add(text)
                        console.warn(f"{source}: {text}")


class _EtaColumn(ProgressColumn):
    """Time left: the batch's from the mean time per finished file; other rows' from Rich's estimate."""

    def render(self, task) -> Text:
        eta = task.fields["eta"] if "eta" in task.fields else task.time_remaining
        if eta is None:
            return Text("ETA -:--:--", style="progress.remaining")
        return Text(f"ETA {datetime.timedelta(seconds=int(eta))}", style="progress.remaining")


def _short(name: str, width: int) -> str:
    """A file name cut in the middle to ``width`` characters, so the bars fit 80 columns."""
    return name if len(name) <= width else name[: width // 2 - 1] + "…" + name[-(width - width // 2):]


def _load(options: BatchOptions) -> Upscaler:
    """``load_upscaler``, with the engine's tile complaints naming the options."""
    try:
        return load_upscaler(options)
    except ValueError as exc:
        if "tile" in str(exc):
            raise TinySRError(
                f"--tile {options.engine.tile} / --tile-overlap {options.engine.tile_overlap}: {exc}"
            ) from None
        raise

