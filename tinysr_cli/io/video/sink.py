"""Sink: the output container, the video encoder and the side streams."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np

from tinysr_cli.io.video.colour import _Colour, rgb_to_frame
from tinysr_cli.io.video.common import UPSCALE, av
from tinysr_cli.io.video.encoders import _ENCODER_OPTIONS, _Encoder
from tinysr_cli.io.video.hdr import HdrMetadata
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
        hdr: HdrMetadata | None = None,
    ) -> None:
        self.pix_fmt, self.colour, self.hdr = pix_fmt, colour, hdr
        self.time_base = source.time_base
        self.frames_written = 0
        self.start_time: Fraction | None = None
        self.end_time = Fraction(0)
        self._pending: tuple[np.ndarray, int, int] | None = None  # a frame held until the next one gives its duration
        self._durations: dict[int, int] = {}
        self._last_step = max(1, round(1 / (source.rate * source.time_base)))  # for a last frame without a duration
        self._end = source.announced_end  # where the last frame ends, if the source says so exactly
        self._submitted: tuple[int, int] | None = None  # first and latest pts given to the encoder
        self._last_dts: int | None = None
        self._first_dts: int | None = None
        self._held_packet: av.Packet | None = None  # the latest video packet, muxed once the next one comes
        self._dts_timed = container_format in ("mp4", "mov")  # sample durations are DTS gaps there
        self.container = av.open(str(path), "w", format=container_format)
        try:
            self.container.metadata.update(
                {k: v for k, v in source.container.metadata.items() if k.lower() not in _DROPPED_CONTAINER_TAGS}
            )
            self.video = self._add_video(encoder, source, container_format)
            self._side: dict[int, _SideWriter] = {}
            for plan in side:
                if plan.action != "drop":
                    self._side[plan.stream.index] = _SideWriter(self.container, plan)
        except BaseException:
            self.container.close()
            raise

    def _add_video(self, encoder: _Encoder, source: _Source, container_format: str) -> av.video.stream.VideoStream:
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
        if encoder.canonical == "hevc" and container_format in ("mp4", "mov"):
            context.codec_tag = "hvc1"  # parameter sets out of band; Apple's players refuse the default hev1
        sar = source.video.sample_aspect_ratio
        if sar:
            context.sample_aspect_ratio = sar
        if encoder.name in ("libvpx-vp9", "libaom-av1"):
            context.bit_rate = 0
        if encoder.name == "libsvtav1":  # it prints its whole configuration on stderr unless told 1 (errors only)
            os.environ.setdefault("SVT_LOG", "1")
        options = {"crf": str(encoder.crf), **_ENCODER_OPTIONS.get(encoder.name, {})}
        for key, params in ((self.hdr and self.hdr.encoder_options(encoder.name)) or {}).items():
            options[key] = f"{options[key]}:{params}" if key in options else params
        context.options = options
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
        self._submitted = (self._submitted[0] if self._submitted else stamp, stamp)
        self._mux_video(self.video.encode(frame))
        self.frames_written += 1
        if self.start_time is None:
            self.start_time = stamp * self.time_base
        self.end_time = (stamp + duration) * self.time_base

    def _mux_video(self, packets: list[av.Packet]) -> None:
        for packet in packets:
            packet.duration = self._durations.pop(packet.pts, packet.duration)
            packet.dts = self._checked_dts(packet)
            self._last_dts = packet.dts
            if self._first_dts is None:
                self._first_dts = packet.dts
            if self._held_packet is not None:
                self.container.mux(self._held_packet)
            self._held_packet = packet

    def _checked_dts(self, packet: av.Packet) -> int:
        """The encoder's DTS if it is possible, else the packet's PTS (or just after the previous DTS).

        Possible: after the previous packet's, not after its own PTS, and not earlier than the first
        frame by more than the span of frames submitted (the most any reordering can delay).
        libx265 returns garbage DTS for clips shorter than its reorder depth (two frames or fewer).
        """
        dts, pts = packet.dts, packet.pts
        first, latest = self._submitted
        if dts is not None and (self._last_dts is None or dts > self._last_dts) and 2 * first - latest <= dts <= pts:
            return dts
        return pts if self._last_dts is None or pts > self._last_dts else self._last_dts + 1

    def finish(self) -> None:
        """Encode the held frame, flush every encoder and close the file, which is then playable."""
        if self._pending is not None:
            rgb, stamp, own = self._pending
            self._pending = None
            # The container's end is exact where the decoded duration is not: with B-frames an MP4's
            # per-frame durations are decode-order gaps, not how long the last frame is shown.
            last = self._end - stamp if self._end is not None and self._end > stamp else own or self._last_step
            self._encode(rgb, stamp, last)
        self._mux_video(self.video.encode(None))
        if self._held_packet is not None:
            if self._dts_timed:
                # MP4 lasts from the first DTS to the last DTS plus the last packet's duration; with
                # B-frames and a variable rate the DTS gaps do not add up to the frames' durations,
                # so the last packet takes what makes the track end where the last frame does.
                span = round((self.end_time - self.start_time) / self.time_base)
                self._held_packet.duration = max(1, span - (self._held_packet.dts - self._first_dts))
            self.container.mux(self._held_packet)
        for writer in self._side.values():
            writer.finish()
        self.container.close()

    def close(self) -> None:
        self.container.close()
