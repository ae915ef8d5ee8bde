"""Side streams: audio, subtitles and attachments copied when the output container holds their codec,
otherwise converted (audio to AAC or Opus, text subtitles to the container's text format) or left
out, each with a note; nothing is dropped silently."""

from __future__ import annotations

from dataclasses import dataclass

from tinysr_cli.io.video.common import av
from tinysr_cli.io.video.formats import _container_codecs

_AUDIO_FALLBACKS = ("aac", "libopus", "opus")  # re-encode targets, first the container takes
_TEXT_SUBTITLES = ("mov_text", "ass", "webvtt", "subrip")
_KEPT_STREAM_TAGS = ("language", "title", "handler_name")


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
