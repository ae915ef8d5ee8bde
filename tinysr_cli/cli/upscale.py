"""`tinysr upscale`: files, folders and globs in; one bad file never stops the batch."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

if TYPE_CHECKING:
    from tinysr_cli.io.paths import Plan

_ENGINE = "Engine"
_OUTPUT = "Output"
_VIDEO = "Video"
_CLUSTER = "Cluster"


def upscale_command(
    inputs: Annotated[list[str], typer.Argument(help="Images, videos, folders or glob patterns.", show_default=False)],
    output: Annotated[
        Optional[str],
        typer.Option("--output", "-o", help="Output file (one input) or folder, or a URI (s3://...). Default: next to each input."),
    ] = None,
    model: Annotated[Optional[str], typer.Option(
            "--model", "-m", "-n",
            help="Registry name, owner/name\\[@revision]\\[/file.safetensors], hf:// URI or local .safetensors "
            "(default: the configured model, see docs/weights.md).",
            rich_help_panel=_ENGINE,
        )] = None,
    device: Annotated[str, typer.Option(
            help="auto, cpu, cuda, cuda:N or mps; several GPUs as cuda:0,1 (or cuda:0,cuda:1): one model per GPU, "
            "each taking the next file when it is free.",
            rich_help_panel=_ENGINE,
        )] = "auto",
    precision: Annotated[
        str, typer.Option(help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16 or bf16.", rich_help_panel=_ENGINE)
    ] = "auto",
    tile: Annotated[
        int,
        typer.Option(
            "--tile", "-t",
            help="Backbone tile side in latent pixels (1 latent pixel = 8 output pixels); 0 = the model's own (64 = 512 px).",
            rich_help_panel=_ENGINE,
        ),
    ] = 0,
    tile_overlap: Annotated[int, typer.Option(help="Overlap of backbone tiles, latent pixels.", rich_help_panel=_ENGINE)] = 8,
    batch_size: Annotated[int, typer.Option(help="Tiles per forward pass; 0 = automatic.", rich_help_panel=_ENGINE)] = 0,
    color_fix: Annotated[
        Optional[str], typer.Option(help="adain, wavelet or none (default: the model's).", rich_help_panel=_ENGINE)
    ] = None,
    scale: Annotated[
        Optional[float],
        typer.Option("--scale", "-s", help="Final scale, above 0 and at most 16 (the model runs at 4x, then Lanczos).", rich_help_panel=_OUTPUT),
    ] = None,
    width: Annotated[Optional[int], typer.Option(help="Final width in pixels.", rich_help_panel=_OUTPUT)] = None,
    height: Annotated[Optional[int], typer.Option(help="Final height in pixels.", rich_help_panel=_OUTPUT)] = None,
    output_format: Annotated[
        Optional[str], typer.Option("--format", "-f", help="png, jpg, webp, tiff or bmp (default: the input's).", rich_help_panel=_OUTPUT)
    ] = None,
    quality: Annotated[int, typer.Option(min=1, max=100, help="JPEG/WebP quality.", rich_help_panel=_OUTPUT)] = 95,
    suffix: Annotated[
        Optional[str],
        typer.Option(
            help="Added to output names (default beside the input: '_x4', or '_x2' etc. with --scale, '_w1920' with --width; "
            "else none).",
            rich_help_panel=_OUTPUT,
        ),
    ] = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Descend into sub-folders, mirroring the tree.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs (default: skip them, so re-runs resume).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or notes; errors only.")] = False,
    strip_metadata: Annotated[
        bool, typer.Option("--strip-metadata", help="Do not copy EXIF, XMP and the ICC profile to outputs.", rich_help_panel=_OUTPUT)
    ] = False,
    max_pixels: Annotated[
        int,
        typer.Option(
            min=1,
            help="Refuse inputs with more pixels than this, before decoding (decompression-bomb guard; "
            "default: Pillow's, 89478485).",
        ),
    ] = 89478485,
    codec: Annotated[
        Optional[str],
        typer.Option(help="h264, hevc, vp9 or av1 (those this PyAV build encodes; default: vp9 for .webm, else h264).", rich_help_panel=_VIDEO),
    ] = None,
    crf: Annotated[
        Optional[int],
        typer.Option(help="Constant quality, lower is better (default: h264 18, hevc 20, vp9 24, av1 28).", rich_help_panel=_VIDEO),
    ] = None,
    pix_fmt: Annotated[
        Optional[str],
        typer.Option(
            "--pix-fmt",
            help="e.g. yuv420p10le, or 'source' for the source's chroma layout and bit depth (default: 4:2:0 that common "
            "players decode, 8-bit; 10-bit from a deeper source with hevc or av1).",
            rich_help_panel=_VIDEO,
        ),
    ] = None,
    keep_partial: Annotated[
        bool,
        typer.Option("--keep-partial", help="After a failure or Ctrl-C keep the playable start as NAME.partial.EXT.", rich_help_panel=_VIDEO),
    ] = False,
    skip_damaged: Annotated[
        bool,
        typer.Option(
            "--skip-damaged",
            help="Go on past frames the decoder rejects (counted in a note) instead of failing the video.",
            rich_help_panel=_VIDEO,
        ),
    ] = False,
    video_only: Annotated[bool, typer.Option("--video-only", help="Upscale videos only, skip images.")] = False,
    images_only: Annotated[bool, typer.Option("--images-only", help="Upscale images only, skip videos.")] = False,
    ray: Annotated[Optional[str], typer.Option(
            "--ray", metavar="ADDRESS",
            help="Run on Ray (pip install 'tinysr\\[ray]'): local (a Ray instance on this machine), auto (the cluster "
            "`ray start` joined) or ray://HOST:10001. One model per worker; see docs/distributed.md.",
            rich_help_panel=_CLUSTER,
        )] = None,
    workers: Annotated[Optional[int], typer.Option(
            min=1, help="Ray workers (default: one per GPU, or per CPU on a CPU cluster).", rich_help_panel=_CLUSTER
        )] = None,
    shard: Annotated[Optional[str], typer.Option(
            "--shard", metavar="K/N",
            help="Only the inputs of shard K (from 0) of N, for job arrays (Slurm, Kubernetes): "
            "sha256 of the input path mod N, so give every shard the same arguments.",
            rich_help_panel=_CLUSTER,
        )] = None,
    chunk_seconds: Annotated[float, typer.Option(
            "--chunk-seconds", min=0,
            help="With --ray: cut videos at keyframes into chunks of at least this many seconds, upscaled on several "
            "workers and joined without re-encoding (0: each video whole on one worker).",
            rich_help_panel=_CLUSTER,
        )] = 60.0,
) -> None:
    """Upscale images and videos 4x with TinySR."""
    from tinysr_cli.cli.upscale_run import run_batch
    from tinysr_cli.engine.upscaler import UpscaleOptions
    from tinysr_cli.errors import TinySRError
    from tinysr_cli.io import video
    from tinysr_cli.pipeline import BatchOptions, input_kind, plan_inputs

    if workers is not None and ray is None:
        raise TinySRError("--workers needs --ray")
    check_devices(device, ray=ray is not None)
    check_options(scale=scale, width=width, height=height, tile=tile, tile_overlap=tile_overlap, batch_size=batch_size,
                  output_format=output_format)
    try:
        engine_options = UpscaleOptions(tile=tile, tile_overlap=tile_overlap, batch_size=batch_size, color_fix=color_fix)
    except ValueError as exc:
        raise TinySRError(f"--color-fix: {exc}" if "color_fix" in str(exc) else str(exc)) from None
    from tinysr_cli import storage

    uris = storage.is_uri(output) or any(storage.is_uri(text) for text in inputs)
    plan = (plan_uri_inputs if uris else plan_inputs)(
        inputs,
        output if uris or output is None else Path(output),
        video_only=video_only,
        images_only=images_only,
        recursive=recursive,
        suffix=suffix,
        output_format=output_format,
        default_suffix=default_suffix(scale, width, height),
    )
    if shard is not None:
        from tinysr_cli.distributed import parse_shard, shard_plan

        plan = shard_plan(plan, *parse_shard(shard))
    for chosen in sorted({codec or video.default_codec(Path(str(job.output))) for job in plan.jobs if input_kind(Path(str(job.source))) == "video"}):
        video.check_settings(chosen, crf, pix_fmt)
    options = BatchOptions(
        model=model,
        device=device,
        precision=precision,
        engine=engine_options,
        scale=scale,
        width=width,
        height=height,
        quality=quality,
        overwrite=overwrite,
        quiet=quiet,
        strip_metadata=strip_metadata,
        max_pixels=max_pixels,
        codec=codec,
        crf=crf,
        pix_fmt=pix_fmt,
        keep_partial=keep_partial,
        skip_damaged=skip_damaged,
    )
    if ray is not None:
        from tinysr_cli.distributed import run_cluster

        failures = run_cluster(plan, options, address=ray, workers=workers, chunk_seconds=chunk_seconds)
    elif uris:
        from tinysr_cli.distributed import run_here

        if "," in device:
            raise TinySRError(f"--device {device}: several devices work on local files; with URIs use one, or --ray")

        failures = run_here(plan, options)
    else:
        failures = run_batch(plan, options)
    if failures:
        raise typer.Exit(1)


OUTPUT_FORMATS = ("png", "jpg", "jpeg", "webp", "tiff", "tif", "bmp", "avif", "heic", "heif")
MAX_SCALE = 16
MAX_SIDE = 65535


def plan_uri_inputs(inputs: list[str], output: str | None, *, video_only: bool, images_only: bool, **naming: object) -> Plan:
    """``plan_inputs`` for URIs (docs/distributed.md): objects chosen by suffix, nothing downloaded."""
    from tinysr_cli import storage
    from tinysr_cli.errors import TinySRError
    from tinysr_cli.io import video
    from tinysr_cli.io.images import IMAGE_SUFFIXES

    if video_only and images_only:
        raise TinySRError("--video-only and --images-only exclude each other")
    wanted = (set() if video_only else set(IMAGE_SUFFIXES)) | (set() if images_only else set(video.VIDEO_SUFFIXES))
    note = "not a video" if video_only else "not an image" if images_only else "not an image or video"

    def suffix_for(name: str) -> str | None:
        return video.output_suffix(Path(name)) if Path(name).suffix.lower() in video.VIDEO_SUFFIXES else None

    return storage.plan_uris(inputs, output, accept=lambda name: Path(name).suffix.lower() in wanted, suffix_for=suffix_for, skip_note=note, **naming)


def check_options(
    *, scale: float | None, width: int | None, height: int | None, tile: int, tile_overlap: int, batch_size: int,
    output_format: str | None,
) -> None:
    """Refuse impossible option values before anything is loaded, naming the option."""
    import math

    from tinysr_cli.errors import TinySRError
    from tinysr_cli.io.images import FORMATS

    if scale is not None and (width is not None or height is not None):
        raise TinySRError("--scale cannot be combined with --width/--height")
    if scale is not None and not (math.isfinite(scale) and 0 < scale <= MAX_SCALE):
        raise TinySRError(f"--scale {scale:g}: must be above 0 and at most {MAX_SCALE}")
    for name, value in (("--width", width), ("--height", height)):
        if value is not None and not 1 <= value <= MAX_SIDE:
            raise TinySRError(f"{name} {value}: must be between 1 and {MAX_SIDE} pixels")
    if tile < 0:
        raise TinySRError(f"--tile {tile}: must be 0 (the model's own) or a positive number of latent pixels")
    if tile_overlap < 0:
        raise TinySRError(f"--tile-overlap {tile_overlap}: must be 0 or more latent pixels")
    if tile and tile_overlap >= tile:
        raise TinySRError(f"--tile-overlap {tile_overlap}: must be smaller than --tile {tile}")
    if batch_size < 0:
        raise TinySRError(f"--batch-size {batch_size}: must be 0 (automatic) or more")
    if output_format is not None:
        usable = [name for name in OUTPUT_FORMATS if name in FORMATS]
        if output_format.lower() not in usable:
            raise TinySRError(f"--format {output_format}: unknown output format", hint=f"choose from {', '.join(usable)}")


def check_devices(device: str, *, ray: bool) -> None:
    """Refuse a device this machine lacks before planning; with --ray the workers' devices count, not
    the driver's, and Ray gives each worker its own GPU, so a list is refused there."""
    from tinysr_cli.engine.device import resolve_devices
    from tinysr_cli.errors import TinySRError

    if ray:
        if "," in device:
            raise TinySRError(f"--device {device}: with --ray each worker gets one GPU; use --workers to use several")
        return
    resolve_devices(device)


def default_suffix(scale: float | None, width: int | None, height: int | None) -> str:
    """The name suffix beside the input: what the output's size is, relative to the input's."""
    if width and height:
        return f"_{width}x{height}"
    if width:
        return f"_w{width}"
    if height:
        return f"_h{height}"
    return f"_x{scale:g}" if scale is not None else "_x4"
