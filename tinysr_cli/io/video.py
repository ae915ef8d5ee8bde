"""Videos in and out with PyAV: decode -> batches of RGB frames -> a frame upscaler -> encode.

Streamed in three overlapping stages joined by bounded queues, so memory stays flat whatever the
length: a thread decodes, the calling thread runs the upscaler, a thread encodes and muxes.
Every frame keeps its own timestamp (variable frame rate survives) and its own duration, so the
output lasts exactly as long as the input; no frame-count header is trusted. Audio and subtitles
are copied when the target container can hold their codec, otherwise converted (audio to AAC or
Opus, text subtitles to the container's text format) with a note; nothing is dropped silently.
The output is written under a temporary name in the target folder and renamed when complete.

YUV <-> RGB is computed here instead of by swscale, whose RGB conversions of 10-bit video are
only about 8 bits accurate: frames reach the upscaler with the source's full precision, and the
output is encoded with the source's matrix and range (and tagged with them, primaries and transfer).
"""

from __future__ import annotations

import functools
import io
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from tinysr_cli.atomic import atomic_path
from tinysr_cli.errors import InputError, TinySRError
from tinysr_cli.io.images import prepare_output_folder

try:
    import av
except ImportError:  # the optional "video" extra: images keep working, videos say what to install
    av = None

# [N, 3, H, W] float32 in [0, 1] on the CPU -> [N, 3, 4H, 4W], same convention.
FrameUpscaler = Callable[[torch.Tensor], torch.Tensor]

UPSCALE = 4  # the FrameUpscaler contract
DEFAULT_BATCH_SIZE = 4

# Inputs recognised by name; anything else is probed (`is_video`).
VIDEO_SUFFIXES = frozenset({
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".wmv", ".flv", ".ts", ".m2ts", ".mts", ".mpg",
    ".mpeg", ".3gp", ".ogv", ".mxf", ".vob", ".y4m",
})
# Containers we write, by output suffix; other inputs are written as Matroska, which holds anything.
CONTAINERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm"}
FALLBACK_SUFFIX = ".mkv"

# --codec name -> encoders to try, in order; CRF (default, highest accepted).
ENCODERS = {"h264": ("libx264",), "hevc": ("libx265",), "vp9": ("libvpx-vp9",), "av1": ("libsvtav1", "libaom-av1")}
CRF = {"h264": (18, 51), "hevc": (20, 51), "vp9": (24, 63), "av1": (28, 63)}
_ENCODER_OPTIONS = {
    "libx265": {"x265-params": "log-level=error"},
    "libvpx-vp9": {"b": "0", "row-mt": "1"},  # b=0: constant quality (CRF) mode
    "libaom-av1": {"b": "0", "cpu-used": "6", "row-mt": "1"},
}
_AUDIO_FALLBACKS = ("aac", "libopus", "opus")  # re-encode targets, first the container takes
_TEXT_SUBTITLES = ("mov_text", "ass", "webvtt", "subrip")
_STILL_IMAGE_DEMUXERS = {"image2", "gif", "apng"}  # plus every "*_pipe" demuxer
_PLANAR_YUV = re.compile(r"(yuvj?)(420|422|444)p(?:(9|10|12|14|16)le)?")
_ENCODABLE_PIX_FMT = re.compile(r"yuv(420|422|444)p(?:(10|12)le)?")

# AVColorSpace -> (Kr, Kb) of the YUV matrix.
_MATRICES = {1: (0.2126, 0.0722), 4: (0.30, 0.11), 5: (0.299, 0.114), 6: (0.299, 0.114), 7: (0.212, 0.087), 9: (0.2627, 0.0593), 10: (0.2627, 0.0593)}
_BT709, _BT601 = 1, 6
_RANGE_LIMITED, _RANGE_FULL = 1, 2


@dataclass(frozen=True)
class VideoProgress:
    """Reported after every batch: frames done so far, speed, and the estimated time left."""

    frames: int
    fps: float
    elapsed: float  # seconds since the first frame was decoded
    position: float  # seconds of the video done
    duration: float | None  # the container's announced length, if any
    estimated_frames: int | None  # from the announced length and rate; only an estimate

    @property
    def eta(self) -> float | None:
        if not self.duration or self.position <= 0:
            return None
        return max(0.0, self.elapsed * (self.duration - self.position) / self.position)


VideoProgressCallback = Callable[[VideoProgress], None]


@dataclass(frozen=True)
class VideoResult:
    output: Path
    frames: int
    width: int
    height: int
    duration: float  # seconds, from the first frame's timestamp to the end of the last frame
    encoder: str
    pix_fmt: str
    notes: tuple[str, ...]  # streams re-encoded, converted or left out, and why
    elapsed: float

    @property
    def fps(self) -> float:
        return self.frames / self.elapsed if self.elapsed > 0 else 0.0


def _require_av() -> None:
    if av is None:
        raise TinySRError("video support needs PyAV, which is not installed", hint="pip install 'tinysr[video]'")


def available_codecs() -> dict[str, str]:
    """--codec names this PyAV build can encode, with the encoder each one uses."""
    _require_av()
    found = {}
    for name, candidates in ENCODERS.items():
        encoder = _first_encoder(candidates)
        if encoder is not None:
            found[name] = encoder
    return found


def output_suffix(source: Path) -> str:
    """The suffix of an upscaled copy of ``source``: its own if we write that container, else .mkv."""
    suffix = source.suffix.lower()
    return suffix if suffix in CONTAINERS else FALLBACK_SUFFIX


def default_codec(output: Path) -> str:
    """The codec when the user names none: VP9 for WebM (which cannot hold H.264), else H.264."""
    return "vp9" if output.suffix.lower() == ".webm" else "h264"


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


def check_settings(codec: str, crf: int | None, pix_fmt: str | None) -> None:
    """Validate --codec/--crf/--pix-fmt once, before any file is touched (raises TinySRError)."""
    _require_av()
    _encoder_settings(codec, crf, pix_fmt)


def upscale_video(
    src: Path | str,
    dst: Path | str,
    upscale_frames: FrameUpscaler,
    *,
    codec: str = "h264",
    crf: int | None = None,
    pix_fmt: str | None = None,
    keep_partial: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: VideoProgressCallback | None = None,
) -> VideoResult:
    """Upscale every frame of ``src`` 4x into ``dst`` (container chosen by its suffix).

    Raises InputError for a source that is not a readable video, TinySRError for settings the
    build or container cannot honour. Nothing appears under ``dst`` unless the whole video was
    written; with ``keep_partial`` an interrupted or failed run leaves what was encoded, playable,
    at ``partial_path(dst)``.
    """
    _require_av()
    src, dst = Path(src), Path(dst)
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    container_format = CONTAINERS.get(dst.suffix.lower())
    if container_format is None:
        raise TinySRError(
            f"{dst}: cannot write {dst.suffix or 'files without a suffix'} videos",
            hint=f"use one of {', '.join(sorted(CONTAINERS))}",
        )
    encoder = _encoder_settings(codec, crf, pix_fmt)
    if encoder.canonical not in _container_codecs(container_format):
        raise TinySRError(f"{dst}: {dst.suffix} cannot hold {codec} video", hint="use .mkv or .mp4")

    started = time.perf_counter()
    try:
        with _Source(src) as source:
            first = source.first_frame
            colour = _Colour.of(first)
            chosen_pix_fmt, depth_note = _choose_pix_fmt(encoder, first.format.name, pix_fmt)
            side = _plan_side_streams(source.container, source.video, container_format, dst.suffix)
            notes = tuple(note for note in [depth_note, *(plan.note for plan in side)] if note)
            batch = min(batch_size, source.estimated_frames or batch_size)
            prepare_output_folder(dst)
            with atomic_path(dst) as tmp:
                sink = _Sink(tmp, container_format, encoder, chosen_pix_fmt, colour, source, side)
                try:
                    written = _Pipeline(source, sink, colour, upscale_frames, batch, progress, keep_partial).run()
                except BaseException:
                    if keep_partial and sink.frames_written:
                        os.replace(tmp, partial_path(dst))
                    raise
    except av.FFmpegError as exc:  # encoding or muxing; reading errors are InputErrors already
        raise TinySRError(f"{src}: writing {dst.name} failed ({_reason(exc)})") from exc
    return VideoResult(
        output=dst,
        frames=written,
        width=first.width * UPSCALE,
        height=first.height * UPSCALE,
        duration=float(sink.end_time - sink.start_time),
        encoder=encoder.name,
        pix_fmt=chosen_pix_fmt,
        notes=notes,
        elapsed=time.perf_counter() - started,
    )


# --------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class _Encoder:
    name: str  # the encoder, e.g. libx264
    canonical: str  # the codec it writes, as containers name it
    crf: int
    pix_fmts: tuple[str, ...]


def _first_encoder(candidates: Iterable[str]) -> str | None:
    for name in candidates:
        try:
            av.codec.Codec(name, "w")
        except (av.FFmpegError, ValueError):
            continue
        return name
    return None


def _encoder_settings(codec: str, crf: int | None, pix_fmt: str | None) -> _Encoder:
    if codec not in ENCODERS:
        raise TinySRError(f"unknown video codec {codec!r}", hint=f"choose from {', '.join(ENCODERS)}")
    name = _first_encoder(ENCODERS[codec])
    if name is None:
        have = ", ".join(available_codecs()) or "none"
        raise TinySRError(f"this PyAV build has no {codec} encoder ({', '.join(ENCODERS[codec])})", hint=f"available: {have}")
    default_crf, max_crf = CRF[codec]
    if crf is not None and not 0 <= crf <= max_crf:
        raise TinySRError(f"--crf for {codec} must be between 0 and {max_crf}, got {crf}")
    info = av.codec.Codec(name, "w")
    pix_fmts = tuple(f.name for f in info.video_formats or ())
    if pix_fmt is not None:
        encodable = [f for f in pix_fmts if _ENCODABLE_PIX_FMT.fullmatch(f)]
        if pix_fmt not in encodable:
            raise TinySRError(f"{name} cannot write pixel format {pix_fmt!r}", hint=f"choose from {', '.join(encodable)}")
    return _Encoder(name, info.canonical_name, default_crf if crf is None else crf, pix_fmts)


def _choose_pix_fmt(encoder: _Encoder, source_fmt: str, requested: str | None) -> tuple[str, str | None]:
    """The requested format, else the source's chroma layout and bit depth where the encoder has them.

    Returns (pix_fmt, note); the note says when the source's bit depth could not be kept.
    """
    if requested is not None:
        return requested, None
    match = _PLANAR_YUV.fullmatch(source_fmt)
    chroma = match[2] if match else "420"  # RGB and other sources: the widely playable layout
    depth = _bit_depth(source_fmt)
    depths = [d for d in (12, 10) if d <= depth] + [8]
    for bits in depths:
        for layout in dict.fromkeys((chroma, "420")):
            name = f"yuv{layout}p" + ("" if bits == 8 else f"{bits}le")
            if name in encoder.pix_fmts:
                note = None
                if bits < depth and depth > 8:
                    note = f"{encoder.name} cannot write {depth}-bit video here; writing {bits}-bit"
                return name, note
    raise TinySRError(f"{encoder.name} writes none of the YUV formats tinysr produces")


def _bit_depth(pix_fmt: str) -> int:
    return max(component.bits for component in av.VideoFormat(pix_fmt).components)


@functools.cache
def _container_codecs(container_format: str) -> frozenset[str]:
    with av.open(io.BytesIO(), "w", format=container_format) as probe:
        return frozenset(probe.supported_codecs)


# --------------------------------------------------------------------------------------------
# Colour: planar YUV <-> RGB in float, with the source's matrix and range


@dataclass(frozen=True)
class _Colour:
    matrix: int  # AVColorSpace of the YUV matrix, never unspecified
    full_range: bool
    primaries: int
    transfer: int

    @staticmethod
    def of(frame: av.VideoFrame) -> _Colour:
        """The source's colour description, which the output keeps.

        An unspecified matrix (or an RGB source) means BT.709 from 720 lines up, else BT.601; RGB
        sources are written in limited range.
        """
        matrix = int(frame.colorspace)
        if matrix not in _MATRICES:
            matrix = _BT709 if frame.height >= 720 else _BT601
        name = frame.format.name
        yuv_full = int(frame.color_range) == _RANGE_FULL and not av.VideoFormat(name).is_rgb
        return _Colour(matrix, yuv_full or name.startswith("yuvj"), int(frame.color_primaries), int(frame.color_trc))

    @property
    def range_tag(self) -> int:
        return _RANGE_FULL if self.full_range else _RANGE_LIMITED


def _levels(bits: int, full: bool) -> tuple[float, float, float, float]:
    """(luma offset, luma scale, chroma midpoint, chroma scale) of ``bits``-bit YUV codes."""
    if full:
        peak = float((1 << bits) - 1)
        return 0.0, peak, float(1 << (bits - 1)), peak
    step = float(1 << (bits - 8))
    return 16 * step, 219 * step, 128 * step, 224 * step


def _plane(frame: av.VideoFrame, index: int, dtype: np.dtype) -> np.ndarray:
    """A writable [height, width] view of one plane (line padding cut off)."""
    plane = frame.planes[index]
    rows = np.frombuffer(plane, dtype).reshape(plane.height, plane.line_size // dtype.itemsize)
    return rows[:, : plane.width]


def _upsample_chroma(chroma: np.ndarray, height: int, width: int, sub_x: bool, sub_y: bool) -> np.ndarray:
    """Chroma to full resolution: samples sit on even luma columns (H.264/HEVC's default, left)
    and between luma rows (centre); linear interpolation in between, edges replicated."""
    if sub_x:
        wide = np.empty((chroma.shape[0], chroma.shape[1] * 2), np.float32)
        wide[:, 0::2] = chroma
        wide[:, 1::2] = (chroma + np.concatenate([chroma[:, 1:], chroma[:, -1:]], axis=1)) / 2
        chroma = wide[:, :width]
    if sub_y:
        above = np.concatenate([chroma[:1], chroma[:-1]], axis=0)
        below = np.concatenate([chroma[1:], chroma[-1:]], axis=0)
        tall = np.empty((chroma.shape[0] * 2, chroma.shape[1]), np.float32)
        tall[0::2] = 0.75 * chroma + 0.25 * above
        tall[1::2] = 0.75 * chroma + 0.25 * below
        chroma = tall[:height]
    return chroma


def _downsample_chroma(chroma: np.ndarray, sub_x: bool, sub_y: bool) -> np.ndarray:
    """The inverse siting of `_upsample_chroma`: [1, 2, 1] / 4 around even columns, row pairs averaged."""
    if sub_x:
        padded = np.concatenate([chroma[:, :1], chroma, chroma[:, -1:]], axis=1)
        if chroma.shape[1] % 2:
            padded = np.concatenate([padded, chroma[:, -1:]], axis=1)
        chroma = (padded[:, 0:-2:2] + 2 * padded[:, 1:-1:2] + padded[:, 2::2]) / 4
    if sub_y:
        if chroma.shape[0] % 2:
            chroma = np.concatenate([chroma, chroma[-1:]], axis=0)
        chroma = (chroma[0::2] + chroma[1::2]) / 2
    return chroma


def frame_to_rgb(frame: av.VideoFrame, colour: _Colour) -> np.ndarray:
    """A decoded frame as float32 RGB [3, H, W] in [0, 1]."""
    match = _PLANAR_YUV.fullmatch(frame.format.name)
    if match is None:  # RGB, palette, gray, packed or semi-planar sources: swscale is exact enough
        rgb = frame.to_ndarray(format="rgb48le").astype(np.float32) / 65535
        return np.ascontiguousarray(rgb.transpose(2, 0, 1))
    bits = int(match[3] or 8)
    dtype = np.dtype(np.uint8 if bits == 8 else "<u2")
    y_off, y_scale, c_mid, c_scale = _levels(bits, colour.full_range)
    y = (_plane(frame, 0, dtype).astype(np.float32) - y_off) / y_scale
    u, v = ((_plane(frame, i, dtype).astype(np.float32) - c_mid) / c_scale for i in (1, 2))
    sub_x, sub_y = match[2] in ("420", "422"), match[2] == "420"
    u, v = (_upsample_chroma(c, frame.height, frame.width, sub_x, sub_y) for c in (u, v))
    kr, kb = _MATRICES[colour.matrix]
    kg = 1 - kr - kb
    r = y + 2 * (1 - kr) * v
    b = y + 2 * (1 - kb) * u
    g = (y - kr * r - kb * b) / kg
    return np.clip(np.stack([r, g, b]), 0, 1)


def rgb_to_frame(rgb: np.ndarray, pix_fmt: str, colour: _Colour) -> av.VideoFrame:
    """Float RGB [3, H, W] in [0, 1] -> a planar YUV frame (a format `_ENCODABLE_PIX_FMT` accepts), rounded."""
    match = _ENCODABLE_PIX_FMT.fullmatch(pix_fmt)
    if match is None:
        raise ValueError(f"cannot write pixel format {pix_fmt}")
    bits = int(match[2] or 8)
    dtype = np.dtype(np.uint8 if bits == 8 else "<u2")
    kr, kb = _MATRICES[colour.matrix]
    r, g, b = rgb.astype(np.float32, copy=False)
    y = kr * r + (1 - kr - kb) * g + kb * b
    u = (b - y) / (2 * (1 - kb))
    v = (r - y) / (2 * (1 - kr))
    sub_x, sub_y = match[1] in ("420", "422"), match[1] == "420"
    u, v = (_downsample_chroma(c, sub_x, sub_y) for c in (u, v))
    y_off, y_scale, c_mid, c_scale = _levels(bits, colour.full_range)
    peak = (1 << bits) - 1
    frame = av.VideoFrame(rgb.shape[2], rgb.shape[1], pix_fmt)
    for index, (values, offset, scale) in enumerate(((y, y_off, y_scale), (u, c_mid, c_scale), (v, c_mid, c_scale))):
        _plane(frame, index, dtype)[...] = np.clip(np.rint(values * scale + offset), 0, peak)
    frame.colorspace = colour.matrix
    frame.color_range = colour.range_tag
    frame.color_primaries = colour.primaries
    frame.color_trc = colour.transfer
    return frame


# --------------------------------------------------------------------------------------------
# Source: the input container, its main video stream, decoded frames and side packets


def _main_video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream | None:
    """The first video stream that is not cover art."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    return None


def _seconds(value: int | None, time_base: Fraction | None) -> float | None:
    return None if value is None or time_base is None else float(value * time_base)


def _tag_duration(stream: av.stream.Stream) -> float | None:
    """Matroska's per-track DURATION tag ("HH:MM:SS.nnnnnnnnn"), in seconds."""
    text = stream.metadata.get("DURATION")
    match = re.fullmatch(r"(\d+):(\d\d):(\d\d(?:\.\d+)?)", text or "")
    return int(match[1]) * 3600 + int(match[2]) * 60 + float(match[3]) if match else None


class _Source:
    """Opens the input, checks it holds decodable video, and decodes up to the first frame."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        try:
            self.container = av.open(str(path), metadata_errors="ignore")
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise InputError(f"{path}: not a readable video ({_reason(exc)})") from None
        try:
            video = _main_video_stream(self.container)
            if video is None:
                raise InputError(f"{path}: has no video stream")
            if video.codec_context is None:
                raise InputError(f"{path}: its video codec is not supported by this PyAV build")
            video.codec_context.thread_type = "AUTO"
            self.video = video
            self.time_base: Fraction = video.time_base
            self.rate: Fraction = video.average_rate or video.guessed_rate or Fraction(25)
            self.duration = self._duration()
            self.estimated_frames = round(self.duration * self.rate) if self.duration else None
            self._items = self._demux()
            self._pending: list[av.Packet] = []
            self.first_frame = self._first_frame()
        except BaseException:
            self.container.close()
            raise

    def __enter__(self) -> _Source:
        return self

    def __exit__(self, *exc_info) -> None:
        self.container.close()

    def _duration(self) -> float | None:
        """The announced length of the video stream, if the container gives one."""
        if self.video.duration:
            return _seconds(self.video.duration, self.time_base)
        tagged = _tag_duration(self.video)
        if tagged is not None:
            return tagged
        return self.container.duration / av.time_base if self.container.duration else None

    def _demux(self) -> Iterator[av.VideoFrame | av.Packet]:
        """Decoded video frames and raw packets of the other streams, in file order."""
        streams = list(self.container.streams)
        position = 0.0
        try:
            for packet in self.container.demux(streams):
                if packet.stream.index == self.video.index:
                    for frame in self.video.decode(packet):
                        position = frame.time or position
                        yield frame
                elif packet.dts is not None:
                    yield packet
        except av.FFmpegError as exc:
            raise InputError(f"{self.path}: damaged at {position:.2f} s ({_reason(exc)})") from None

    def _first_frame(self) -> av.VideoFrame:
        for item in self._items:
            if isinstance(item, av.VideoFrame):
                self._first = item
                return item
            self._pending.append(item)
        raise InputError(f"{self.path}: the video stream has no frames")

    def items(self) -> Iterator[av.VideoFrame | av.Packet]:
        """Everything from the first frame on (side packets seen before it first)."""
        yield from self._pending
        yield self._first
        yield from self._items

    def check_complete(self, end_time: float) -> None:
        """Raise InputError if the video stopped well before the length its container announces.

        Only containers with exact per-stream lengths (MP4/MOV, Matroska) are checked, so a
        truncated file is not mistaken for a short one.
        """
        announced = _seconds(self.video.duration, self.time_base) if self.video.duration else _tag_duration(self.video)
        if announced is None or self.container.format.name not in ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm"):
            return
        start = _seconds(self.video.start_time, self.time_base) or 0.0
        slack = 2 / float(self.rate) + 0.01 * announced
        if end_time - start < announced - slack:
            raise InputError(f"{self.path}: truncated, the video stops at {end_time - start:.2f} s of {announced:.2f} s")


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc)


@dataclass
class _Batch:
    frames: np.ndarray | None  # [n, 3, H, W] float32, or None when the batch only carries side packets
    pts: list[int]
    durations: list[int]  # each frame's own duration from the decoder (0 if unknown)
    side: list[av.Packet]
    position: float  # seconds of video reached (the end of the batch's last frame)


def _batches(source: _Source, batch_size: int, colour: _Colour) -> Iterator[_Batch]:
    """Frames grouped ``batch_size`` at a time with the side packets demuxed alongside them.

    Timestamps are the decoder's; a missing one continues from the previous frame, and a frame
    whose timestamp does not increase is dropped (encoders require increasing timestamps).
    """
    first = source.first_frame
    height, width = first.height, first.width
    frames: list[np.ndarray] = []
    pts: list[int] = []
    durations: list[int] = []
    side: list[av.Packet] = []
    last_pts: int | None = None
    last_step = max(1, round(1 / (source.rate * source.time_base)))
    position = 0.0

    def flush() -> _Batch:
        batch = _Batch(np.stack(frames) if frames else None, list(pts), list(durations), list(side), position)
        for gathered in (frames, pts, durations, side):
            gathered.clear()
        return batch

    for item in source.items():
        if isinstance(item, av.Packet):
            side.append(item)
            if len(side) >= 256:  # long stretches without video (audio running on) stay bounded
                yield flush()
            continue
        stamp = item.pts if item.pts is not None else (last_pts + last_step if last_pts is not None else 0)
        if last_pts is not None and stamp <= last_pts:
            continue
        if last_pts is not None:
            last_step = stamp - last_pts
        last_pts = stamp
        if (item.width, item.height) != (width, height):  # a mid-stream size change: keep the first size
            item = item.reformat(width=width, height=height)
        frames.append(frame_to_rgb(item, colour))
        pts.append(stamp)
        durations.append(int(item.duration or 0))
        position = float((stamp + (item.duration or last_step) - (source.video.start_time or 0)) * source.time_base)
        if len(frames) == batch_size:
            yield flush()
    if frames or side:
        yield flush()


# --------------------------------------------------------------------------------------------
# Sink: the output container, the video encoder and the side streams


@dataclass(frozen=True)
class _SidePlan:
    stream: av.stream.Stream
    action: str  # "copy", "audio" (re-encode), "subtitle" (convert text), "drop"
    target: str | None  # the encoder for "audio"/"subtitle"
    note: str | None


def _plan_side_streams(container, video, container_format: str, suffix: str) -> list[_SidePlan]:
    supported = _container_codecs(container_format)
    plans = []
    for stream in container.streams:
        if stream.index == video.index:
            continue
        context = stream.codec_context
        codec = context.codec.canonical_name if context is not None else None
        label = f"{stream.type} stream #{stream.index}" + (f" ({codec})" if codec else "")
        if stream.type == "attachment":
            keep = container_format == "matroska"
            plans.append(_SidePlan(stream, "copy" if keep else "drop", None, None if keep else f"{label} left out: {suffix} cannot hold attachments"))
        elif stream.type in ("audio", "subtitle") and codec in supported:
            plans.append(_SidePlan(stream, "copy", None, None))
        elif stream.type == "audio" and codec is not None:
            target = next((name for name in _AUDIO_FALLBACKS if _codec_canonical(name) in supported), None)
            if target is None:
                plans.append(_SidePlan(stream, "drop", None, f"{label} left out: {suffix} takes none of {', '.join(_AUDIO_FALLBACKS)}"))
            else:
                plans.append(_SidePlan(stream, "audio", target, f"{label} re-encoded to {target}: {suffix} cannot hold {codec}"))
        elif stream.type == "subtitle" and codec is not None and context.codec.text_sub:
            target = next((name for name in _TEXT_SUBTITLES if name in supported), None)
            if target is None:
                plans.append(_SidePlan(stream, "drop", None, f"{label} left out: {suffix} holds no text subtitles"))
            else:
                plans.append(_SidePlan(stream, "subtitle", target, f"{label} converted to {target}: {suffix} cannot hold {codec}"))
        elif stream.type in ("audio", "subtitle"):
            why = "its codec is unknown to this build" if codec is None else f"{suffix} cannot hold it"
            hint = " (use .mkv)" if codec is not None and container_format != "matroska" else ""
            plans.append(_SidePlan(stream, "drop", None, f"{label} left out: {why}{hint}"))
        else:
            plans.append(_SidePlan(stream, "drop", None, f"{label} left out: only audio and subtitles are carried over"))
    return plans


def _codec_canonical(name: str) -> str | None:
    try:
        return av.codec.Codec(name, "w").canonical_name
    except (av.FFmpegError, ValueError):
        return None


_KEPT_STREAM_TAGS = ("language", "title", "handler_name")
_DROPPED_CONTAINER_TAGS = ("encoder", "major_brand", "minor_version", "compatible_brands")  # describe the old file


class _Sink:
    """The temporary output file. Used from one thread at a time (the encoding thread once running)."""

    def __init__(
        self,
        path: Path,
        container_format: str,
        encoder: _Encoder,
        pix_fmt: str,
        colour: _Colour,
        source: _Source,
        side: list[_SidePlan],
    ) -> None:
        self.pix_fmt, self.colour = pix_fmt, colour
        self.time_base = source.time_base
        self.frames_written = 0
        self.start_time: Fraction | None = None
        self.end_time = Fraction(0)
        self._pending: tuple[np.ndarray, int, int] | None = None  # a frame held until the next one gives its duration
        self._durations: dict[int, int] = {}
        self._last_step = max(1, round(1 / (source.rate * source.time_base)))  # for a last frame without a duration
        self.container = av.open(str(path), "w", format=container_format)
        try:
            self.container.metadata.update(
                {k: v for k, v in source.container.metadata.items() if k.lower() not in _DROPPED_CONTAINER_TAGS}
            )
            self.video = self._add_video(encoder, source)
            self._side: dict[int, _SideWriter] = {}
            for plan in side:
                if plan.action != "drop":
                    self._side[plan.stream.index] = _SideWriter(self.container, plan)
        except BaseException:
            self.container.close()
            raise

    def _add_video(self, encoder: _Encoder, source: _Source) -> av.video.stream.VideoStream:
        first = source.first_frame
        stream = self.container.add_stream(encoder.name, rate=source.rate)
        stream.width, stream.height = first.width * UPSCALE, first.height * UPSCALE
        stream.pix_fmt = self.pix_fmt
        stream.time_base = self.time_base
        context = stream.codec_context
        context.time_base = self.time_base
        context.framerate = source.rate
        context.color_range = self.colour.range_tag
        context.colorspace = self.colour.matrix
        context.color_primaries = self.colour.primaries
        context.color_trc = self.colour.transfer
        sar = source.video.sample_aspect_ratio
        if sar:
            context.sample_aspect_ratio = sar
        if encoder.name in ("libvpx-vp9", "libaom-av1"):
            context.bit_rate = 0
        if encoder.name == "libsvtav1":  # it prints its whole configuration on stderr unless told 1 (errors only)
            os.environ.setdefault("SVT_LOG", "1")
        context.options = {"crf": str(encoder.crf), **_ENCODER_OPTIONS.get(encoder.name, {})}
        if first.rotation:
            stream.set_display_rotation(first.rotation)
        for key in _KEPT_STREAM_TAGS:
            if key in source.video.metadata:
                stream.metadata[key] = source.video.metadata[key]
        return stream

    def write(self, frames: np.ndarray | None, pts: list[int], durations: list[int], side: list[av.Packet]) -> None:
        """Encode upscaled frames ([n, 3, H, W] float) with their source timestamps, then mux ``side``."""
        for index, stamp in enumerate(pts):
            if self._pending is not None:
                self._last_step = stamp - self._pending[1]
                self._encode(self._pending[0], self._pending[1], self._last_step)
            self._pending = (frames[index], stamp, durations[index])
        for packet in side:
            writer = self._side.get(packet.stream.index)
            if writer is not None:
                writer.write(packet)

    def _encode(self, rgb: np.ndarray, stamp: int, duration: int) -> None:
        frame = rgb_to_frame(rgb, self.pix_fmt, self.colour)
        frame.pts = stamp
        frame.time_base = self.time_base
        frame.duration = duration
        self._durations[stamp] = duration
        self._mux_video(self.video.encode(frame))
        self.frames_written += 1
        if self.start_time is None:
            self.start_time = stamp * self.time_base
        self.end_time = (stamp + duration) * self.time_base

    def _mux_video(self, packets: list[av.Packet]) -> None:
        for packet in packets:
            packet.duration = self._durations.pop(packet.pts, packet.duration)
            self.container.mux(packet)

    def finish(self) -> None:
        """Encode the held frame, flush every encoder and close the file, which is then playable."""
        if self._pending is not None:
            rgb, stamp, own = self._pending
            self._pending = None
            self._encode(rgb, stamp, own or self._last_step)
        self._mux_video(self.video.encode(None))
        for writer in self._side.values():
            writer.finish()
        self.container.close()

    def close(self) -> None:
        self.container.close()


class _SideWriter:
    """One audio/subtitle/attachment stream of the output: copied, re-encoded or converted."""

    def __init__(self, container: av.container.OutputContainer, plan: _SidePlan) -> None:
        self.container, self.plan = container, plan
        source = plan.stream
        if plan.action == "copy":
            self.stream = container.add_stream_from_template(source)
        elif plan.action == "audio":
            rate = source.codec_context.sample_rate
            allowed = av.codec.Codec(plan.target, "w").audio_rates
            if allowed and rate not in allowed:
                rate = max(allowed)
            self.stream = container.add_stream(plan.target, rate=rate)
            self.stream.codec_context.layout = source.codec_context.layout
        else:
            self.stream = container.add_stream(plan.target)
            decoder = source.codec_context
            decoder.open(strict=False)
            self.stream.codec_context.subtitle_header = decoder.subtitle_header
        for key in _KEPT_STREAM_TAGS:
            if key in source.metadata:
                self.stream.metadata[key] = source.metadata[key]
        self.stream.disposition = source.disposition

    def write(self, packet: av.Packet) -> None:
        action = self.plan.action
        if action == "copy":
            if packet.pts is None:
                packet.pts = packet.dts
            packet.stream = self.stream
            self.container.mux(packet)
        elif action == "audio":
            for frame in self.plan.stream.decode(packet):
                self.container.mux(self.stream.encode(frame))
        else:
            subtitles = self.plan.stream.codec_context.decode2(packet)
            if subtitles is not None:
                converted = self.stream.codec_context.encode_subtitle(subtitles)
                converted.pts, converted.dts, converted.duration = packet.pts, packet.dts, packet.duration
                converted.time_base = packet.time_base
                converted.stream = self.stream
                self.container.mux(converted)

    def finish(self) -> None:
        if self.plan.action == "audio":
            self.container.mux(self.stream.encode(None))


# --------------------------------------------------------------------------------------------
# Pipeline: decode thread -> upscaler (calling thread) -> encode thread


class _Cancelled(Exception):
    pass


_END = object()


class _Pipe:
    """A bounded queue whose waits give up once ``cancelled`` is set."""

    def __init__(self, size: int, cancelled: threading.Event) -> None:
        self._queue: queue.Queue = queue.Queue(size)
        self._cancelled = cancelled

    def put(self, item) -> None:
        while not self._cancelled.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                pass
        raise _Cancelled

    def get(self):
        while not self._cancelled.is_set():
            try:
                return self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        raise _Cancelled


class _Pipeline:
    def __init__(
        self,
        source: _Source,
        sink: _Sink,
        colour: _Colour,
        upscale_frames: FrameUpscaler,
        batch_size: int,
        progress: VideoProgressCallback | None,
        keep_partial: bool,
    ) -> None:
        self.source, self.sink, self.colour = source, sink, colour
        self.upscale_frames, self.batch_size = upscale_frames, batch_size
        self.progress, self.keep_partial = progress, keep_partial
        self.stop_reading, self.stop_writing = threading.Event(), threading.Event()
        self.decoded = _Pipe(2, self.stop_reading)
        self.upscaled = _Pipe(2, self.stop_writing)
        self.writer_error: BaseException | None = None
        self.end_time = 0.0

    def run(self) -> int:
        """Run all three stages; returns the number of frames written. Raises the first failure."""
        reader = threading.Thread(target=self._read, name="tinysr-video-decode", daemon=True)
        writer = threading.Thread(target=self._write, name="tinysr-video-encode", daemon=True)
        reader.start()
        writer.start()
        try:
            self._upscale_all()
            self.upscaled.put(_END)
        except _Cancelled:  # the writer failed
            pass
        except BaseException:
            self.stop_reading.set()
            if self.keep_partial:  # let the writer finish what it has, so the prefix plays
                try:
                    self.upscaled.put(_END)
                except _Cancelled:
                    pass
            else:
                self.stop_writing.set()
            writer.join()
            self.sink.close()
            raise
        finally:
            self.stop_reading.set()
            reader.join()
        writer.join()
        self.sink.close()
        if self.writer_error is not None:
            raise self.writer_error
        self.source.check_complete(self.end_time)
        return self.sink.frames_written

    def _read(self) -> None:
        try:
            for batch in _batches(self.source, self.batch_size, self.colour):
                self.decoded.put(batch)
            self.decoded.put(_END)
        except _Cancelled:
            pass
        except BaseException as exc:
            try:
                self.decoded.put(exc)
            except _Cancelled:
                pass

    def _upscale_all(self) -> None:
        started = time.perf_counter()
        done = 0
        while True:
            item = self.decoded.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            upscaled = self._upscale(item.frames) if item.frames is not None else None
            self.upscaled.put((upscaled, item))
            done += len(item.pts)
            if item.pts:
                self.end_time = float((item.pts[-1] + (item.durations[-1] or 0)) * self.source.time_base)
            if self.progress is not None and item.pts:
                elapsed = time.perf_counter() - started
                self.progress(
                    VideoProgress(done, done / elapsed if elapsed > 0 else 0.0, elapsed, item.position, self.source.duration, self.source.estimated_frames)
                )

    def _upscale(self, frames: np.ndarray) -> np.ndarray:
        """Run the upscaler on exactly ``batch_size`` frames (a short batch is padded with its last
        frame), so every call has the same shape and equal frames give bit-identical outputs."""
        count, _, height, width = frames.shape
        if count < self.batch_size:
            frames = np.concatenate([frames, np.repeat(frames[-1:], self.batch_size - count, axis=0)])
        out = self.upscale_frames(torch.from_numpy(frames))
        expected = (self.batch_size, 3, height * UPSCALE, width * UPSCALE)
        if tuple(out.shape) != expected:
            raise RuntimeError(f"the frame upscaler returned {tuple(out.shape)}, expected {expected}")
        return out[:count].detach().to("cpu", torch.float32).numpy()

    def _write(self) -> None:
        try:
            while True:
                item = self.upscaled.get()
                if item is _END:
                    self.sink.finish()
                    return
                frames, batch = item
                self.sink.write(frames, batch.pts, batch.durations, batch.side)
        except _Cancelled:
            pass
        except BaseException as exc:
            self.writer_error = exc
            self.stop_reading.set()
            self.stop_writing.set()
