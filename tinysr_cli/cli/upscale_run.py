"""The batch loop behind `tinysr upscale`: load the model once, process jobs, render progress."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

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
    codec: str = "h264"
    crf: int | None = None
    pix_fmt: str | None = None
    keep_partial: bool = False


@functools.lru_cache(maxsize=4096)
def input_kind(path: Path) -> str | None:
    """"image" or "video" by suffix; other files are probed for a video stream. None: neither."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in video.VIDEO_SUFFIXES or video.is_video(path):
        return "video"
    return None


def plan_inputs(inputs: list[str], output: Path | None, *, video_only: bool, images_only: bool, **naming) -> Plan:
    """`plan_jobs` for images and videos (videos keep a container we write); the filters apply to
    every input, named ones too (a shell glob arrives as names)."""
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
        **naming,
    )
    if not (video_only or images_only):
        return plan
    kept = [job for job in plan.jobs if input_kind(job.source) in wanted]
    dropped = [(job.source, note) for job in plan.jobs if input_kind(job.source) not in wanted]
    return Plan(kept, plan.skipped + dropped)


def load_upscaler(options: BatchOptions) -> Upscaler | PixelUpscaler:
    device = resolve_device(options.device)
    dtype = resolve_precision(options.precision, device)
    pixel = load_pixel_upscaler(options.model, device, dtype, tile=options.engine.tile * 8)
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


def check_memory(job: Job, info: ImageInfo, upscaler: Upscaler, animated: bool) -> None:
    """Refuse up front, with the numbers, a job that cannot fit in the memory available now."""
    needed = upscaler.memory_needed(info.height, info.width)
    if animated:  # every upscaled frame is kept (8-bit RGBA) until the file is written
        needed += info.frames * info.height * info.width * UPSCALE * UPSCALE * 4
    available = available_memory()
    if available is not None and needed > available:
        raise TinySRError(
            f"{job.source}: {info.width}x{info.height} needs about {needed / 1e9:.1f} GB of memory to upscale, "
            f"{available / 1e9:.1f} GB is available",
            hint="split the image into parts, or free memory",
        )


def _claim_output(job: Job, output: Path, options: BatchOptions) -> bool:
    """Whether ``output`` (``job.output`` or its format switch) may be written; never the input itself."""
    if output == job.output:
        return True
    if output.resolve() == job.source.resolve():
        raise TinySRError(f"{job.source}: the output path is the input file (after switching to {output.suffix})")
    if output.exists() and not options.overwrite:
        if not options.quiet:
            console.note(f"skipped {job.source}: {output} exists (use --overwrite)")
        return False
    return True


def process_image(upscaler: Upscaler, job: Job, options: BatchOptions, progress) -> Path | None:
    """Upscale one file; returns the path written (its format may have switched), None if skipped."""
    info = probe_image(job.source, max_pixels=options.max_pixels)
    animated = info.frames > 1 and job.source.suffix.lower() in ANIMATION_SUFFIXES
    check_memory(job, info, upscaler, animated)
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
    if not _claim_output(job, output, options):
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
            codec=options.codec,
            crf=options.crf,
            pix_fmt=options.pix_fmt,
            keep_partial=options.keep_partial,
            batch_size=1 if upscaler.device.type == "cpu" else video.DEFAULT_BATCH_SIZE,
            progress=on_progress,
        )
    except TinySRError:
        partial = video.partial_path(job.output)
        if options.keep_partial and partial.exists() and not options.quiet:
            console.note(f"kept the part written so far in {partial}")
        raise
    finally:
        bar.remove_task(task)
    if not options.quiet:
        for note in result.notes:
            console.note(f"{job.source.name}: {note}")
    return job.output


def run_batch(plan: Plan, options: BatchOptions) -> list[tuple[Path, str]]:
    """Process every job; returns the failures as (input, message). Results go to stdout."""
    failures: list[tuple[Path, str]] = []
    done = skipped = 0
    if not options.quiet:
        for path, reason in plan.skipped:
            console.note(f"skipped {path}: {reason}")
    pending = []
    claimed: dict[Path, Path] = {}
    for job in plan.jobs:
        key = job.output.resolve()
        if key == job.source.resolve():
            failures.append((job.source, f"{job.source}: the output path is the input file"))
            console.error(failures[-1][1])
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

    upscaler = load_upscaler(options) if pending else None
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console.stderr, disable=options.quiet, transient=True) as bar:
        files_task = bar.add_task("files", total=len(pending))
        tiles_task = bar.add_task("tiles", total=None)

        def on_progress(stage: str, current: int, total: int) -> None:
            bar.update(tiles_task, completed=current, total=total)

        for job in pending:
            bar.update(files_task, description=f"files ({job.source.name})")
            started = time.perf_counter()
            try:
                if input_kind(job.source) == "video":
                    written = process_video(upscaler, job, options, bar)
                else:
                    written = process_image(upscaler, job, options, on_progress)
            except TinySRError as exc:
                failures.append((job.source, str(exc)))
                console.error(str(exc), hint=exc.hint)
            except (OSError, ValueError, RuntimeError, MemoryError) as exc:
                message = f"{job.source}: {type(exc).__name__}: {exc}"
                failures.append((job.source, message))
                console.error(message)
            else:
                if written is None:
                    skipped += 1
                else:
                    done += 1
                    console.stdout.print(str(written), markup=False)
                    if not options.quiet:
                        console.note(f"{job.source} -> {written} ({time.perf_counter() - started:.1f} s)")
            bar.advance(files_task)

    if not options.quiet or failures:
        console.note(f"{done} upscaled, {skipped} skipped, {len(failures)} failed")
    for path, _ in failures:
        console.note(f"  failed: {path}")
    return failures
