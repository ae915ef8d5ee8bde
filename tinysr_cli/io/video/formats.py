"""Which files are videos, which containers we write, and what each container can hold."""

from __future__ import annotations

import functools
import io
from pathlib import Path

from tinysr_cli.io.video.common import av
from tinysr_cli.io.video.source import _main_video_stream

# Inputs recognised by name; anything else is probed (`is_video`).
VIDEO_SUFFIXES = frozenset({
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".wmv", ".flv", ".ts", ".m2ts", ".mts", ".mpg",
    ".mpeg", ".3gp", ".ogv", ".mxf", ".vob", ".y4m",
})
# Containers we write, by output suffix; other inputs are written as Matroska, which holds anything.
CONTAINERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm"}
FALLBACK_SUFFIX = ".mkv"
_STILL_IMAGE_DEMUXERS = {"image2", "gif", "apng"}  # plus every "*_pipe" demuxer


def output_suffix(source: Path) -> str:
    """The suffix of an upscaled copy of ``source``: its own if we write that container, else .mkv."""
    suffix = source.suffix.lower()
    return suffix if suffix in CONTAINERS else FALLBACK_SUFFIX


def partial_path(output: Path) -> Path:
    """Where ``--keep-partial`` leaves the playable prefix of an interrupted or failed video."""
    return output.with_name(f"{output.stem}.partial{output.suffix}")


def is_video(path: Path | str) -> bool:
    """True if PyAV opens ``path`` and finds a moving-picture stream (still images and cover art are not videos)."""
    if av is None or not Path(path).is_file():  # never open a FIFO or device, which could block
        return False
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.FFmpegError, OSError, ValueError):
        return False
    with container:
        name = container.format.name
        if name in _STILL_IMAGE_DEMUXERS or name.endswith("_pipe"):
            return False
        return _main_video_stream(container) is not None


@functools.cache
def _container_codecs(container_format: str) -> frozenset[str]:
    with av.open(io.BytesIO(), "w", format=container_format) as probe:
        return frozenset(probe.supported_codecs)
