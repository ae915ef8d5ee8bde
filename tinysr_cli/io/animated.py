"""Animated GIF, WebP and APNG: frames decoded as full canvases, written back with durations and loop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from tinysr_cli.atomic import atomic_path
from tinysr_cli.errors import TinySRError
from tinysr_cli.io.images import (
    DEFAULT_MAX_PIXELS,
    LoadedImage,
    open_image,
    prepare_output_folder,
    read_metadata,
    to_loaded_image,
)

ANIMATION_SUFFIXES = {".gif", ".png", ".webp"}
_FORMAT = {".gif": "GIF", ".png": "PNG", ".webp": "WEBP"}


@dataclass
class Animation:
    frames: list[LoadedImage]  # every frame composited onto the full canvas (Pillow applies disposal/blend)
    durations: list[int]  # milliseconds, one per frame
    loop: int | None  # 0 = forever, N = as the file says, None = no loop instruction (GIF: play once)
    metadata: dict


def load_animation(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Animation:
    path = Path(path)
    with open_image(path, max_pixels) as image:
        loop = image.info.get("loop")
        metadata = {key: value for key, value in read_metadata(image).items() if key == "icc_profile"}
        frames, durations = [], []
        for index in range(getattr(image, "n_frames", 1)):
            image.seek(index)
            canvas = image.convert("RGBA")  # decodes the frame; its duration is known from here on
            durations.append(int(image.info.get("duration", 0) or 0))
            frames.append(to_loaded_image(np.asarray(canvas), grayscale=False, metadata=metadata))
    return Animation(frames, durations, loop, metadata)


def plan_animation_output(path: Path) -> tuple[Path, list[str]]:
    """Formats that cannot animate switch to .png (APNG), with a warning."""
    if path.suffix.lower() in ANIMATION_SUFFIXES:
        return path, []
    new = path.with_suffix(".png")
    return new, [f"{path.name}: {path.suffix} cannot store an animation, writing {new.name} (APNG) instead"]


def save_animation(
    path: Path,
    frames: list[np.ndarray],
    durations: list[int],
    loop: int | None,
    *,
    quality: int = 95,
    metadata: dict | None = None,
) -> None:
    """Write H x W x 3 (opaque) or x 4 (RGBA) uint8 frames atomically as GIF, APNG or animated WebP."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in ANIMATION_SUFFIXES:
        raise TinySRError(f"{path}: {suffix} cannot store an animation")
    transparent = any(frame.shape[2] == 4 for frame in frames)
    images = []
    for frame in frames:
        if transparent and frame.shape[2] == 3:
            frame = np.dstack([frame, np.full(frame.shape[:2], 255, dtype=np.uint8)])
        images.append(Image.fromarray(frame))
    options: dict = {"save_all": True, "append_images": images[1:], "duration": durations}
    if loop is not None:
        options["loop"] = loop
    elif suffix != ".gif":  # a GIF without a loop instruction plays once
        options["loop"] = 1
    if suffix == ".gif":
        options["disposal"] = 2  # each frame is a full canvas: clear before drawing the next
    elif suffix == ".png":
        options.update(disposal=PngImagePlugin.Disposal.OP_NONE, blend=PngImagePlugin.Blend.OP_SOURCE)
    else:
        options["quality"] = quality
    if metadata and metadata.get("icc_profile") and suffix != ".gif":
        options["icc_profile"] = metadata["icc_profile"]
    prepare_output_folder(path)
    try:
        with atomic_path(path) as tmp:
            images[0].save(tmp, format=_FORMAT[suffix], **options)
    except OSError as exc:
        raise TinySRError(f"{path}: cannot write ({exc.strerror or exc})") from None
