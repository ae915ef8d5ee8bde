"""Source: the input container, its main video stream, decoded frames and side packets."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from tinysr_cli.errors import InputError
from tinysr_cli.io.video.colour import _Colour, frame_to_rgb
from tinysr_cli.io.video.common import _reason, av

# The demuxers that state exact per-stream lengths, as PyAV names them.
_MP4, _MATROSKA = "mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm"
SKIP_DAMAGED_HINT = "--skip-damaged decodes past damaged frames"


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


def timeline_origin(container: av.container.InputContainer) -> Fraction:
    """Seconds to subtract from every timestamp of ``container``: the earliest start of its video,
    audio and subtitle streams, if all of them start after 0 (else 0: the source is left as is)."""
    starts = [
        stream.start_time * stream.time_base
        for stream in container.streams
        if stream.type in ("video", "audio", "subtitle") and stream.start_time is not None and stream.time_base
    ]
    return max(Fraction(0), min(starts)) if starts else Fraction(0)


class _Source:
    """Opens the input, checks it holds decodable video, and decodes up to the first frame.

    Timestamps come out shifted so that the earliest stream starts at 0 (MPEG-TS starts at 1.4 s
    or anywhere in its 26-hour clock); a source whose streams start at or before 0 is left as is.
    With ``skip_damaged`` packets the decoder rejects are counted and skipped instead of ending
    the read (the frame before them is shown for longer).
    """

    def __init__(self, path: Path, skip_damaged: bool = False) -> None:
        self.path = path
        self.skip_damaged = skip_damaged
        self.skipped = 0  # packets the decoder rejected (about one frame each)
        self.concealed = 0  # frames the decoder flagged as patched up
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        try:
            self.container = av.open(str(path), metadata_errors="ignore")
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise InputError(f"{path}: damaged or not a video ({_reason(exc)})") from None
        try:
            video = _main_video_stream(self.container)
            if video is None:
                raise InputError(f"{path}: has no video stream")
            if video.codec_context is None:  # FFmpeg found no codec it knows in the stream's header
                raise InputError(f"{path}: damaged or not a video (its video stream names no codec FFmpeg knows)")
            video.codec_context.thread_type = "AUTO"
            self.video = video
            self.time_base: Fraction = video.time_base
            self.rate: Fraction = video.average_rate or video.guessed_rate or Fraction(25)
            self.origin = timeline_origin(self.container)
            self._video_shift = round(self.origin / self.time_base)
            self.video_start = video.start_time - self._video_shift if video.start_time is not None else 0
            self.announced_end = self._announced_end()
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

    def _announced_length(self) -> float | None:
        """The video stream's length where the container states it exactly: MP4/MOV's track
        duration, Matroska's DURATION tag (its stream duration is the whole segment's)."""
        name = self.container.format.name
        if name == _MATROSKA:
            return _tag_duration(self.video)
        if name == _MP4 and self.video.duration:
            return _seconds(self.video.duration, self.time_base)
        return None

    def _announced_end(self) -> int | None:
        """Where the container says the video ends, as a (shifted) timestamp, or None."""
        length = self._announced_length()
        return None if length is None else self.video_start + round(Fraction(length) / self.time_base)

    def damage_note(self) -> str | None:
        """One line on what ``skip_damaged`` skipped or the decoder concealed, if anything."""
        parts = []
        if self.skipped:
            parts.append(f"{self.skipped} damaged frame(s) skipped, the frame before each shown longer")
        if self.concealed:
            parts.append(f"{self.concealed} damaged frame(s) concealed by the decoder")
        return "; ".join(parts) or None

    def _duration(self) -> float | None:
        """The announced length of the video stream, if the container gives one."""
        if self.video.duration:
            return _seconds(self.video.duration, self.time_base)
        tagged = _tag_duration(self.video)
        if tagged is not None:
            return tagged
        return self.container.duration / av.time_base if self.container.duration else None

    def _demux(self) -> Iterator[av.VideoFrame | av.Packet]:
        """Decoded video frames and raw packets of the other streams, in file order, shifted by ``origin``."""
        streams = list(self.container.streams)
        position: float | None = None  # seconds of the last decoded frame, for messages
        try:
            for packet in self.container.demux(streams):
                if packet.stream.index != self.video.index:
                    if packet.dts is not None:
                        self._shift(packet)
                        yield packet
                    continue
                try:
                    frames = self.video.decode(packet)
                except av.FFmpegError as exc:
                    if not self.skip_damaged:
                        raise self._damaged(position, exc, SKIP_DAMAGED_HINT) from None
                    self.skipped += 1
                    continue
                for frame in frames:
                    if frame.pts is not None:
                        frame.pts -= self._video_shift
                    self.concealed += int(frame.is_corrupt)
                    position = float(frame.time) if frame.time is not None else position
                    yield frame
        except av.FFmpegError as exc:  # the container itself: nothing to skip to
            raise self._damaged(position, exc, None) from None

    def _damaged(self, position: float | None, exc: av.FFmpegError, hint: str | None) -> InputError:
        if position is None:  # nothing decoded yet: the header or the first frame is broken
            return InputError(f"{self.path}: damaged or not a video ({_reason(exc)})", hint=hint)
        return InputError(f"{self.path}: damaged at ~{position:.2f} s ({_reason(exc)})", hint=hint)

    def _shift(self, packet: av.Packet) -> None:
        if self.origin:
            shift = round(self.origin / packet.time_base)
            if packet.pts is not None:
                packet.pts -= shift
            packet.dts -= shift

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
        announced = self._announced_length()
        if announced is None:
            return
        start = float(self.video_start * self.time_base)
        slack = 2 / float(self.rate) + 0.01 * announced
        if end_time - start < announced - slack:
            raise InputError(f"{self.path}: truncated, the video stops at {end_time - start:.2f} s of {announced:.2f} s")


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
        position = float((stamp + (item.duration or last_step) - source.video_start) * source.time_base)
        if len(frames) == batch_size:
            yield flush()
    if frames or side:
        yield flush()
