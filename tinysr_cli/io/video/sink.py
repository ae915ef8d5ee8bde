"""Sink: the output container, the video encoder and the side streams."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np

from tinysr_cli.io.video.colour import _Colour, rgb_to_frame
from tinysr_cli.io.video.common import UPSCALE, av
from tinysr_cli.io.video.encoders import _ENCODER_OPTIONS, _Encoder
from tinysr_cli.io.video.source import _Source
from tinysr_cli.io.video.streams import _KEPT_STREAM_TAGS, _SidePlan, _SideWriter

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
