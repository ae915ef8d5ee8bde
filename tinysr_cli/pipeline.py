"""Upscale files and folders from Python: what `tinysr upscale` does, without the terminal.

::

    from tinysr_cli.pipeline import BatchOptions, upscale_files

    for result in upscale_files(["photos/"], "out/", BatchOptions(model="tinysr-v1")):
        print(result.status, result.output, result.warnings)

The pieces are public too: ``plan_inputs`` (inputs -> jobs), ``triage`` (what can be decided before
the model loads), ``load_upscaler`` and ``upscale_job`` (one file -> a :class:`Result`). Nothing here
prints; results carry their warnings and notes, and progress goes through callbacks.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from tinysr_cli.engine.device import resolve_devices, resolve_precision
from tinysr_cli.engine.pixel import PixelUpscaler, load_pixel_upscaler
from tinysr_cli.engine.upscaler import ProgressCallback, UpscaleOptions, Upscaler, available_memory
from tinysr_cli.errors import TinySRError, python_text
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
from tinysr_cli.weights.registry import load_registry

# What one bad file may raise without stopping a batch (anything else is a bug or an interrupt).
ITEM_ERRORS = (TinySRError, OSError, ValueError, RuntimeError, MemoryError)


@dataclass(frozen=True)
class BatchOptions:
    model: str | None = None  # None: the configured default (TINYSR_MODEL, config file, registry)
    # One device, or several (``"cuda:0,1"``, or a list of names such as ``["cpu", "cpu"]``): one
    # model per device, the files shared among them (see ``upscale_jobs``).
    device: str | Sequence[str] = "auto"
    precision: str = "auto"
    engine: UpscaleOptions = UpscaleOptions()
    scale: float | None = None
    width: int | None = None
    height: int | None = None
    quality: int = 95
    overwrite: bool = False
    quiet: bool = False  # no download progress
    strip_metadata: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    codec: str | None = None  # None: video.default_codec of each output
    crf: int | None = None
    pix_fmt: str | None = None
    keep_partial: bool = False
    skip_damaged: bool = False


@dataclass(frozen=True)
class Result:
    """What happened to one input. ``status``: "done", "skipped" or "failed"."""

    source: Path
    output: Path | None  # the file written (its format may have switched); None unless done
    status: str
    # Why it was skipped or failed, naming the file; options as {opt:NAME} (see tinysr_cli.errors).
    message_template: str = ""
    hint_template: str | None = None
    warnings: tuple[str, ...] = ()  # each names its file
    notes: tuple[str, ...] = ()
    seconds: float = 0.0

    @property
    def message(self) -> str:
        return python_text(self.message_template)

    @property
    def hint(self) -> str | None:
        return None if self.hint_template is None else python_text(self.hint_template)


Upscalers = Upscaler | PixelUpscaler
VideoProgressCallback = Callable[[video.VideoProgress], None]


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


def plan_inputs(
    inputs: list[str], output: Path | None, *, video_only: bool = False, images_only: bool = False, **naming
) -> Plan:
    """`plan_jobs` for images and videos (videos keep a container we write); the filters apply to
    every input, named ones too (a shell glob arrives as names). Our own earlier outputs found by
    a scan are left out; containers with audio but no picture are skipped with a note."""
    if video_only and images_only:
        raise TinySRError("{opt:video_only} and {opt:images_only} exclude each other", option="video_only")
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


def load_upscaler(
    options: BatchOptions, warn: Callable[[str], None] | None = None, *, device: torch.device | None = None
) -> Upscalers:
    """The model ``options.model`` names, placed on ``device`` (default: the one ``options.device``
    names); ``warn`` hears about random weights."""
    if device is None:
        devices = resolve_devices(options.device)
        if len(devices) > 1:
            raise TinySRError(f"{{opt:device}} lists {len(devices)} devices: load_upscalers loads one model on each", option="device")
        device = devices[0]
    dtype = resolve_precision(options.precision, device)
    # TINYSR_MODEL or the config file may name a pixel-space model too.
    spec = options.model if options.model is not None else load_registry().default
    pixel = load_pixel_upscaler(spec, device, dtype, tile=options.engine.tile * 8)
    if pixel is not None:
        return pixel
    try:
        return Upscaler.from_pretrained(
            options.model, device=device, precision=dtype, options=options.engine, progress=not options.quiet, warn=warn
        )
    except ValueError as exc:  # the model's own tile limits
        if "tile" in str(exc):
            raise TinySRError(
                f"{{opt:tile}} {options.engine.tile} / {{opt:tile_overlap}} {options.engine.tile_overlap}: {exc}", option="tile"
            ) from None
        raise


def load_upscalers(options: BatchOptions, warn: Callable[[str], None] | None = None) -> list[Upscalers]:
    """One model per device ``options.device`` lists, each loaded once (``warn`` hears the first)."""
    devices = resolve_devices(options.device)
    return [load_upscaler(options, warn if index == 0 else None, device=device) for index, device in enumerate(devices)]


def final_size(height: int, width: int, options: BatchOptions) -> tuple[int, int]:
    """Output (height, width): 4x, or what scale/width/height ask for (aspect kept if one is given)."""
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
    upscaler: Upscalers, image: LoadedImage, size: tuple[int, int], progress: ProgressCallback | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RGB through the model (edge colours bled under full transparency first), alpha resized on its own."""
    rgb = image.rgb if image.alpha is None else bleed_transparent(image.rgb, image.alpha)
    rgb = resample(upscaler.upscale(rgb, progress), size)
    if image.alpha is None:
        return rgb, None
    if bool(image.alpha.min() == image.alpha.max()):  # constant alpha: refilled, not resampled
        return rgb, torch.full((1, *size), float(image.alpha[0, 0, 0]))
    return rgb, resample(upscale_alpha(image.alpha), size)


def check_memory(job: Job, info: ImageInfo, upscaler: Upscalers, animated: bool, options: BatchOptions | None = None) -> None:
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


def input_conflict(job: Job, output: Path, inputs: frozenset[Path]) -> str | None:
    """The message if ``output`` is this job's input or any other input of the run, else None."""
    key = output.resolve()
    if key == job.source.resolve():
        return f"{job.source}: the output path is the input file"
    if key in inputs:
        return f"{job.source}: the output {output} is an input of this run"
    return None


def _exists_message(job: Job, output: Path) -> str:
    return f"skipped {job.source}: {output} exists (use {{opt:overwrite}})"


def _claim_output(job: Job, output: Path, options: BatchOptions, inputs: frozenset[Path]) -> str | None:
    """None if ``output`` (``job.output`` or its format switch) may be written, else why it is skipped.
    Raises if it is an input of the run."""
    if output == job.output:
        return None
    conflict = input_conflict(job, output, inputs | {job.source.resolve()})
    if conflict:
        raise TinySRError(f"{conflict} (after switching to {output.suffix})")
    if output.exists() and not options.overwrite:
        return _exists_message(job, output)
    return None


def triage(plan: Plan, options: BatchOptions) -> tuple[list[Job], list[Result]]:
    """What can be decided before the model loads: the jobs to run, and results for the rest (planning
    failures, outputs that are inputs of the run, two inputs sharing an output, existing outputs)."""
    decided = [Result(path, None, "failed", message) for path, message in plan.failed]
    inputs = frozenset(job.source.resolve() for job in plan.jobs)
    pending: list[Job] = []
    claimed: dict[Path, Path] = {}
    for job in plan.jobs:
        key = job.output.resolve()
        conflict = input_conflict(job, job.output, inputs)
        if conflict:
            decided.append(Result(job.source, None, "failed", conflict))
        elif key in claimed:
            message = f"{job.source}: output {job.output} is also the output of {claimed[key]}"
            decided.append(Result(job.source, None, "failed", message))
        elif job.output.exists() and not options.overwrite:
            decided.append(Result(job.source, None, "skipped", _exists_message(job, job.output)))
        else:
            claimed[key] = job.source
            pending.append(job)
    return pending, decided


def process_image(
    upscaler: Upscalers,
    job: Job,
    options: BatchOptions,
    progress: ProgressCallback | None = None,
    inputs: frozenset[Path] = frozenset(),
) -> Result:
    """Upscale one image (or animation); raises on failure. The output's format may have switched."""
    info = probe_image(job.source, max_pixels=options.max_pixels)
    animated = info.frames > 1 and job.source.suffix.lower() in ANIMATION_SUFFIXES
    check_memory(job, info, upscaler, animated, options)
    if animated:
        animation = load_animation(job.source, max_pixels=options.max_pixels)
        output, notices = plan_animation_output(job.output)
        frames, metadata = animation.frames, animation.metadata
    else:
        image = load_image(job.source, max_pixels=options.max_pixels)
        output, notices = plan_output(
            job.output,
            alpha=image.alpha is not None,
            bit_depth=image.bit_depth,
            grayscale=image.grayscale,
            metadata=bool(image.metadata) and not options.strip_metadata,
        )
        frames, metadata = [image], image.metadata
        if info.frames > 1:
            notices.append(f"{job.source.name}: only the first of its {info.frames} pages is upscaled")
    skip = _claim_output(job, output, options, inputs)
    if skip is not None:
        return Result(job.source, None, "skipped", skip)
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
    return Result(job.source, output, "done", warnings=tuple(notices))


def process_video(
    upscaler: Upscalers, job: Job, options: BatchOptions, progress: VideoProgressCallback | None = None
) -> Result:
    """Upscale one video exactly 4x, streamed; raises on failure (with ``keep_partial``, a failure's
    or an interrupt's exception carries ``partial``: where the playable start was kept)."""
    if options.scale is not None or options.width or options.height:
        raise TinySRError(
            f"{job.source}: {{opt:scale}}, {{opt:width}} and {{opt:height}} apply to images; videos are upscaled 4x",
            option="scale", path=job.source,
        )
    partial = video.partial_path(job.output)
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
            progress=progress,
        )
    except (TinySRError, KeyboardInterrupt) as exc:
        if options.keep_partial and partial.exists():
            exc.partial = partial
        raise
    partial.unlink(missing_ok=True)  # an older run's part: the whole video is here now
    return Result(job.source, job.output, "done", notes=tuple(f"{job.source.name}: {note}" for note in result.notes))


def upscale_job(
    upscaler: Upscalers,
    job: Job,
    options: BatchOptions,
    *,
    inputs: frozenset[Path] = frozenset(),
    progress: ProgressCallback | None = None,
    video_progress: VideoProgressCallback | None = None,
) -> Result:
    """One file, image or video, to a :class:`Result`; a bad file fails its result instead of raising.

    Python warnings raised meanwhile (Pillow's "Corrupt EXIF data", a damaged ICC profile) become the
    result's warnings, each naming the file. ``inputs``: every input of the run (resolved), never written.
    """
    started = time.perf_counter()
    caught: list[str] = []
    try:
        with _library_warnings(job.source, caught):
            if input_kind(job.source) == "video":
                result = process_video(upscaler, job, options, video_progress)
            else:
                result = process_image(upscaler, job, options, progress, inputs)
    except ITEM_ERRORS as exc:
        if isinstance(exc, TinySRError):
            # Messages name their file already; the engine's (NaN/inf) get the input's name.
            named = str(exc).startswith((str(job.source), str(job.output.parent), "/"))
            message, hint = (exc.template if named else f"{job.source}: {exc.template}"), exc.hint_template
        else:
            message, hint = f"{job.source}: {type(exc).__name__}: {exc}", None
        partial = getattr(exc, "partial", None)
        notes = (f"kept the part written so far in {partial}",) if partial else ()
        return Result(job.source, None, "failed", message, hint, tuple(caught), notes, time.perf_counter() - started)
    return Result(
        result.source, result.output, result.status, result.message_template, result.hint_template,
        result.warnings + tuple(caught), result.notes, time.perf_counter() - started,
    )


def upscale_jobs(
    upscalers: Sequence[Upscalers],
    jobs: Sequence[Job],
    options: BatchOptions,
    *,
    inputs: frozenset[Path] = frozenset(),
    progress: ProgressCallback | None = None,
    video_progress: VideoProgressCallback | None = None,
) -> Iterator[Result]:
    """Every job once, one :class:`Result` each as it finishes, as :func:`upscale_job` makes them.

    One upscaler: in order, on this thread, with ``progress`` and ``video_progress``. Several (one per
    device): each on its own thread, taking the next job whenever it is free, so a long video on one
    device never holds back the images behind it; the callbacks are not called (tile progress of
    jobs running at once would interleave). A bug (an exception a bad file cannot cause) in a thread
    stops the others after their current job and is raised here.
    """
    if len(upscalers) == 1:
        for job in jobs:
            yield upscale_job(upscalers[0], job, options, inputs=inputs, progress=progress, video_progress=video_progress)
        return
    todo: queue.SimpleQueue[Job] = queue.SimpleQueue()
    for job in jobs:
        todo.put(job)
    finished: queue.SimpleQueue[Result | BaseException | None] = queue.SimpleQueue()
    stop = threading.Event()

    def work(upscaler: Upscalers) -> None:
        _routed.active = True
        try:
            while not stop.is_set():
                try:
                    job = todo.get_nowait()
                except queue.Empty:
                    return
                finished.put(upscale_job(upscaler, job, options, inputs=inputs))
        except BaseException as exc:  # handed to the caller's thread, which raises it
            finished.put(exc)
        finally:
            finished.put(None)

    threads = [threading.Thread(target=work, args=(upscaler,), name=f"tinysr-{index}-{upscaler.device}", daemon=True)
               for index, upscaler in enumerate(upscalers)]
    with _routing_warnings():
        for thread in threads:
            thread.start()
        running = len(threads)
        try:
            while running:
                item = finished.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            stop.set()  # an interrupt or a bug: each thread stops after its current job (written atomically)


def upscale_files(
    inputs: list[str | Path],
    output: str | Path | None = None,
    options: BatchOptions = BatchOptions(),
    *,
    upscaler: Upscalers | Sequence[Upscalers] | None = None,
    progress: ProgressCallback | None = None,
    **naming,
) -> Iterator[Result]:
    """Every image and video among ``inputs`` (files, folders, globs), one :class:`Result` each as it
    finishes. ``naming``: ``recursive``, ``suffix``, ``output_format``, ``video_only``, ``images_only``
    as for `tinysr upscale`. The model loads only if something is left to do: once per device that
    ``options.device`` lists, the files shared among the devices (:func:`upscale_jobs`)."""
    plan = plan_inputs([str(path) for path in inputs], Path(output) if output is not None else None, **naming)
    pending, decided = triage(plan, options)
    yield from decided
    if not pending:
        return
    if upscaler is None:
        upscalers = load_upscalers(options, warn=lambda text: warnings.warn(text, stacklevel=2))
    else:
        upscalers = list(upscaler) if isinstance(upscaler, Sequence) else [upscaler]
    sources = frozenset(job.source.resolve() for job in plan.jobs)
    yield from upscale_jobs(upscalers, pending, options, inputs=sources, progress=progress)


# Worker threads of ``upscale_jobs`` set ``active``; ``caught`` is the list of the job they run.
_routed = threading.local()


@contextlib.contextmanager
def _routing_warnings():
    """Python warnings raised on worker threads go to the running job's list, by thread.

    ``warnings.catch_warnings`` swaps process-wide state, so jobs on several threads cannot each
    enter it (they would restore each other's state and lose or swap warnings): one catch here, and
    a ``showwarning`` that files each warning under the thread that raised it.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        shown = warnings.showwarning

        def file_by_thread(message, category, filename, lineno, file=None, line=None) -> None:
            caught = getattr(_routed, "caught", None)
            if caught is None:
                shown(message, category, filename, lineno, file, line)
            else:
                caught.append(warnings.WarningMessage(message, category, filename, lineno, file, line))

        warnings.showwarning = file_by_thread
        yield


@contextlib.contextmanager
def _library_warnings(source: Path, sink: list[str]):
    """Python warnings raised inside, as ``FILE: message`` lines in ``sink`` (each text once)."""
    routed = getattr(_routed, "active", False)  # a worker thread of upscale_jobs: see _routing_warnings
    with contextlib.nullcontext([]) if routed else warnings.catch_warnings(record=True) as caught:
        if routed:
            _routed.caught = caught
        else:
            warnings.simplefilter("always")
        try:
            yield
        finally:
            _routed.caught = None
            for item in caught:
                text = f"{source}: {' '.join(str(item.message).split())}"
                if text not in sink:
                    sink.append(text)
