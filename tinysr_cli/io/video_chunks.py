"""One video on many workers: cut at keyframes, upscale each chunk with `upscale_video`, join the chunks.

- **plan** (driver, no decode): the video packets' index gives the keyframes; a cut is made at the
  first keyframe at least ``seconds`` after the previous cut, where the GOP is closed (no packet after
  the keyframe in decode order is shown before it). A video that cannot be cut (one chunk, open
  GOPs, a container we do not write, a side stream the output could not take as it is) is one chunk.
- **chunk** (worker): the chunk's video packets are copied (no decode) into a chunk source in the
  source's own container and time base, which ``tinysr_cli.io.video.upscale_video`` upscales
  exactly as it does a whole video: same colour handling, encoder settings and frame timestamps.
- **join** (driver, no re-encode): the chunks' video packets one after the other, each frame's
  duration set to the gap to the next frame as the single-machine encode does, with the audio and
  subtitle packets copied from the source, into the final file under a temporary name, renamed
  when complete.

Against the single-machine output (`tinysr upscale clip.mp4`): the same frame count, the same
presentation timestamps and durations in the same time base, the same size and pixel format, the
audio and subtitle packets byte-identical with the same timestamps. Frame pixels are equal within
the encoder's tolerance only: every chunk starts a fresh encoder, so each chunk begins with a key
frame and its rate control starts anew.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

from tinysr_cli.atomic import atomic_path
from tinysr_cli.errors import InputError, TinySRError
from tinysr_cli.io import video
from tinysr_cli.io.video.common import _require_av
from tinysr_cli.io.video.source import timeline_origin
from tinysr_cli.io.images import prepare_output_folder

av = video.av

# Container formats a chunk source is written in, by the source's suffix: the source's own, so the
# video keeps its time base (and the single-machine path would write the same container).
_SOURCE_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm"}


@dataclass(frozen=True)
class Chunk:
    """Video packets from the keyframe shown at ``start`` up to the keyframe shown at ``end`` (pts in
    the video stream's time base; ``end`` None: to the end)."""

    index: int
    start: int
    end: int | None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Chunk:
        return cls(**json.loads(text))


def _open(path: Path):
    _require_av()
    try:
        return av.open(str(path), metadata_errors="ignore")
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable video ({exc})") from None


def _main_stream(container, path: Path):
    stream = next((s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic), None)
    if stream is None:
        raise InputError(f"{path}: has no video stream")
    return stream


def plan_chunks(source: Path, output: Path, seconds: float) -> tuple[list[Chunk], str | None]:
    """Chunks of at least ``seconds`` each; a single chunk and the reason when the video is not cut."""
    if source.suffix.lower() not in _SOURCE_FORMATS or video.output_suffix(source) != output.suffix.lower():
        return [], f"{source.suffix or 'no suffix'} sources are upscaled whole"
    with _open(source) as container:
        stream = _main_stream(container, source)
        target = video.CONTAINERS[output.suffix.lower()]
        with tempfile.TemporaryDirectory(prefix="tinysr-probe-") as scratch, av.open(str(Path(scratch, f"probe{output.suffix}")), "w", format=target) as probe:
            holdable = probe.supported_codecs
        for side in container.streams:
            if side.index == stream.index:
                continue
            codec = side.codec_context.codec.canonical_name if side.codec_context is not None else None
            if side.type not in ("audio", "subtitle") or codec not in holdable:
                return [], f"its {side.type} stream #{side.index} is not copied as it is, so it is upscaled whole"
        keyframes: list[int] = []  # pts of the first packet, then of keyframes whose GOP is closed
        open_after: int | None = None  # the last keyframe: checked against the packets after it
        try:
            for packet in container.demux(stream):
                if packet.pts is None:
                    if packet.dts is None:
                        continue
                    return [], "packets without timestamps, so it is upscaled whole"
                if not keyframes and open_after is None:  # chunk 0 starts with the first packet, whatever it is
                    keyframes.append(packet.pts)
                elif packet.is_keyframe:
                    if open_after is not None:
                        keyframes.append(open_after)
                    open_after = packet.pts
                elif open_after is not None and packet.pts < open_after:
                    open_after = None  # an open GOP: a frame decoded after the keyframe is shown before it
        except av.FFmpegError as exc:
            raise InputError(f"{source}: damaged ({exc})") from None
        if open_after is not None:
            keyframes.append(open_after)
        time_base = stream.time_base
    if not keyframes:
        return [], "no keyframe to cut at"
    cuts = [keyframes[0]]
    for stamp in keyframes[1:]:
        if (stamp - cuts[-1]) * time_base >= seconds:
            cuts.append(stamp)
    if len(cuts) < 2:
        return [], None
    return [Chunk(i, start, cuts[i + 1] if i + 1 < len(cuts) else None) for i, start in enumerate(cuts)], None


def parts_folder(source: Path, output: Path, settings: str) -> Path:
    """Where the chunk outputs of one video wait for the join: hidden beside the output, named after
    the source's identity (path, size, modification time) and ``settings``, so a re-run with the
    same ones resumes from the chunks done and a changed source or setting starts afresh."""
    status = source.stat()
    key = f"{source.resolve()}|{status.st_size}|{status.st_mtime_ns}|{settings}"
    return output.with_name(f".tinysr-chunks-{output.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}")


def chunk_path(parts: Path, chunk: Chunk, output: Path) -> Path:
    return parts / f"{chunk.index:05d}{output.suffix.lower()}"


def _copy_chunk(source: Path, chunk: Chunk, target: Path) -> None:
    """The chunk's video packets, as they are, into ``target`` (the source's container, video only)."""
    with _open(source) as container:
        stream = _main_stream(container, source)
        with av.open(str(target), "w", format=_SOURCE_FORMATS[source.suffix.lower()]) as out:
            out.metadata.update(container.metadata)
            copy = out.add_stream_from_template(stream)
            copy.time_base = stream.time_base
            for key in ("language", "title", "handler_name"):
                if key in stream.metadata:
                    copy.metadata[key] = stream.metadata[key]
            if chunk.index > 0:
                container.seek(chunk.start, stream=stream, backward=True, any_frame=False)
            started = chunk.index == 0
            for packet in container.demux(stream):
                if packet.pts is None and packet.dts is None:
                    continue
                if packet.is_keyframe and packet.pts == chunk.end:
                    break
                if not started:
                    if not (packet.is_keyframe and packet.pts == chunk.start):
                        continue
                    started = True
                packet.stream = copy
                out.mux(packet)
    if not started:
        raise InputError(f"{source}: no keyframe at {chunk.start} to start chunk {chunk.index} from")


def upscale_chunk(source: Path, chunk: Chunk, target: Path, upscale_frames: video.FrameUpscaler, **settings: object) -> Path:
    """Upscale one chunk of ``source`` into ``target`` (written whole or not at all); ``settings``
    go to ``upscale_video`` (codec, crf, pix_fmt, batch_size)."""
    with tempfile.TemporaryDirectory(prefix="tinysr-chunk-") as scratch:
        piece = Path(scratch, f"{source.stem}{source.suffix.lower()}")
        try:
            _copy_chunk(source, chunk, piece)
            video.upscale_video(piece, target, upscale_frames, **settings)
        except TinySRError as exc:  # name the user's file, not the scratch copy
            raise TinySRError(str(exc).replace(str(piece), f"{source} (chunk {chunk.index})"), hint=exc.hint) from None
    return target


def _packets(container, stream) -> Iterator:
    for packet in container.demux(stream):
        if packet.dts is not None or packet.pts is not None:
            yield packet


def join_chunks(source: Path, parts: list[tuple[Chunk, Path]], output: Path) -> Path:
    """The chunks' video and the source's other streams into ``output``, without re-encoding.

    Each chunk was upscaled as a video of its own, whose timeline may have been moved to start at 0;
    its packets are put back where the chunk starts in the source, on the timeline the
    single-machine run writes (`timeline_origin`: shifted to 0 when every stream starts late).
    """
    chunks = [_open(part) for _, part in parts]
    try:
        streams = [_main_stream(c, part) for c, (_, part) in zip(chunks, parts)]
        first = streams[0]
        for stream, (_, part) in zip(streams[1:], parts[1:]):
            if stream.time_base != first.time_base or stream.codec_context.extradata != first.codec_context.extradata:
                raise TinySRError(f"{source}: chunk {part.name} was encoded with other settings than the first; remove {part.parent} and run again")
        with _open(source) as original:
            main = _main_stream(original, source)
            origin = timeline_origin(original)
            offsets, starts = [], []
            for (chunk, _), container, stream in zip(parts, chunks, streams):
                stamps = [p.pts for p in _packets(container, stream)]
                offset = round((chunk.start * main.time_base - origin) / first.time_base) - min(stamps)
                offsets.append(offset)
                starts.extend(stamp + offset for stamp in stamps)
                container.seek(0, stream=stream)
            # Every frame lasts until the next one starts, as in the single-machine encode; the last keeps its own.
            starts.sort()
            durations = {stamp: following - stamp for stamp, following in zip(starts, starts[1:])}
            prepare_output_folder(output)
            with atomic_path(output) as tmp:
                with av.open(str(tmp), "w", format=video.CONTAINERS[output.suffix.lower()]) as out:
                    out.metadata.update(chunks[0].metadata)
                    target = out.add_stream_from_template(first)
                    target.time_base = first.time_base
                    for key in ("language", "title", "handler_name"):
                        if key in first.metadata:
                            target.metadata[key] = first.metadata[key]
                    sides = {}
                    for side in original.streams:
                        if side.index != main.index:
                            sides[side.index] = out.add_stream_from_template(side)
                            for key in ("language", "title", "handler_name"):
                                if key in side.metadata:
                                    sides[side.index].metadata[key] = side.metadata[key]
                            sides[side.index].disposition = side.disposition
                    videos = (_moved(p, offset) for c, s, offset in zip(chunks, streams, offsets) for p in _packets(c, s))
                    others = (
                        _moved(p, -round(origin / p.time_base))
                        for p in _packets(original, list(original.streams)) if p.stream.index in sides
                    )
                    merged = heapq.merge(
                        ((Fraction(p.dts if p.dts is not None else p.pts) * p.time_base, 0, n, p) for n, p in enumerate(videos)),
                        ((Fraction(p.dts if p.dts is not None else p.pts) * p.time_base, 1, n, p) for n, p in enumerate(others)),
                        key=lambda item: item[:3],
                    )
                    for _, kind, _, packet in merged:
                        if kind == 0:
                            packet.duration = durations.get(packet.pts, packet.duration)
                            packet.stream = target
                        else:
                            if packet.pts is None:
                                packet.pts = packet.dts
                            packet.stream = sides[packet.stream.index]
                        out.mux(packet)
    except av.FFmpegError as exc:
        raise TinySRError(f"{source}: joining the chunks into {output.name} failed ({exc})") from exc
    finally:
        for container in chunks:
            container.close()
    return output


def _moved(packet: av.Packet, offset: int) -> av.Packet:
    """``packet`` with its timestamps moved by ``offset`` (in its own time base)."""
    if offset:
        if packet.pts is not None:
            packet.pts += offset
        if packet.dts is not None:
            packet.dts += offset
    return packet


def remove_parts(parts: Path) -> None:
    shutil.rmtree(parts, ignore_errors=True)
