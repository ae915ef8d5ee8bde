"""The pipeline: decode thread -> upscaler (calling thread) -> encode thread, and `upscale_video`."""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tinysr_cli.atomic import atomic_path
from tinysr_cli.errors import TinySRError
from tinysr_cli.io.images import prepare_output_folder
from tinysr_cli.io.video.colour import _Colour
from tinysr_cli.io.video.common import UPSCALE, _reason, _require_av, av
from tinysr_cli.io.video.encoders import _choose_pix_fmt, _encoder_settings
from tinysr_cli.io.video.hdr import HdrMetadata
from tinysr_cli.io.video.formats import CONTAINERS, _container_codecs, partial_path
from tinysr_cli.io.video.sink import _Sink
from tinysr_cli.io.video.source import _batches, _Source
from tinysr_cli.io.video.streams import _plan_side_streams

# [N, 3, H, W] float32 in [0, 1] on the CPU -> [N, 3, 4H, 4W], same convention.
FrameUpscaler = Callable[[torch.Tensor], torch.Tensor]

DEFAULT_BATCH_SIZE = 4


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


def upscale_video(
    src: Path | str,
    dst: Path | str,
    upscale_frames: FrameUpscaler,
    *,
    codec: str = "h264",
    crf: int | None = None,
    pix_fmt: str | None = None,
    keep_partial: bool = False,
    skip_damaged: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: VideoProgressCallback | None = None,
) -> VideoResult:
    """Upscale every frame of ``src`` 4x into ``dst`` (container chosen by its suffix).

    ``pix_fmt``: None for a format common players decode (see `_choose_pix_fmt`), "source" for
    the source's bit depth and chroma layout, or a pixel format name. HDR10 metadata is kept
    where the encoder can write it (x264, x265, SVT-AV1), else a note says it was left out.

    Raises InputError for a source that is not a readable video (or, unless ``skip_damaged``,
    one whose decoder rejects a frame), TinySRError for settings the build or container cannot
    honour. Nothing appears under ``dst`` unless the whole video was written; with
    ``keep_partial`` an interrupted or failed run leaves what was encoded, playable, at
    ``partial_path(dst)``.
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
        with _Source(src, skip_damaged) as source:
            first = source.first_frame
            colour = _Colour.of(first)
            chosen_pix_fmt, depth_note = _choose_pix_fmt(encoder, first.format.name, pix_fmt)
            hdr = HdrMetadata.of(first)
            hdr_note = None
            if hdr is not None and hdr.encoder_options(encoder.name) is None:
                hdr_note = f"HDR10 mastering metadata left out: {encoder.name} cannot write it (hevc and av1 can)"
            side = _plan_side_streams(source.container, source.video, container_format, dst.suffix)
            notes = [note for note in [depth_note, hdr_note, *(plan.note for plan in side)] if note]
            batch = min(batch_size, source.estimated_frames or batch_size)
            prepare_output_folder(dst)
            with atomic_path(dst) as tmp:
                sink = _Sink(tmp, container_format, encoder, chosen_pix_fmt, colour, source, side, hdr)
                try:
                    written = _Pipeline(source, sink, colour, upscale_frames, batch, progress, keep_partial).run()
                except BaseException:
                    if keep_partial and sink.frames_written:
                        os.replace(tmp, partial_path(dst))
                    raise
            damage = source.damage_note()
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
        notes=(*notes, damage) if damage else tuple(notes),
        elapsed=time.perf_counter() - started,
    )


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
