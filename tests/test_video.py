"""Videos: streamed 4x upscaling with timestamps, audio, subtitles, colour and bit depth kept.

Every clip is generated here with PyAV. The pipeline is driven by a real, simple upscaler
(bicubic x4, clamped), except in the end-to-end test, which runs the real engine.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tinysr_cli.errors import InputError, TinySRError
from tinysr_cli.io import video
from tinysr_cli.io.video import (
    VideoProgress,
    available_codecs,
    frame_to_rgb,
    is_video,
    partial_path,
    rgb_to_frame,
    upscale_video,
)

SAMPLE_RATE = 48000


def bicubic_x4(frames: torch.Tensor) -> torch.Tensor:
    return F.interpolate(frames, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)


# --------------------------------------------------------------------------------------------
# Clip generation and inspection


def pattern(index: int, height: int, width: int) -> np.ndarray:
    """A moving white bar over a vertical green ramp, as uint8 RGB."""
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 1] = np.linspace(0, 255, height, dtype=np.uint8)[:, None]
    x = (index * 5) % width
    image[:, x : x + 7] = 255
    return image


def make_clip(
    path: Path,
    *,
    frames: int = 12,
    size: tuple[int, int] = (64, 48),
    steps_ms: list[int] | int = 40,
    audio: str | None = "aac",
    pix_fmt: str = "yuv420p",
    codec: str = "libx264",
    options: dict | None = None,
    poses: list[int] | None = None,
    rotation: int = 0,
    subtitles: str | None = None,
    frame_source=None,
    tags: dict[str, int] | None = None,
) -> list[int]:
    """Write a clip with millisecond timestamps; returns the frames' pts in ms.

    ``steps_ms`` is the gap after each frame (a list gives variable frame rate); ``poses`` picks
    the pattern shown by each frame (equal poses give identical frames); ``subtitles`` is SRT text;
    ``tags`` sets colour attributes (colorspace, color_range, ...) on the encoder.
    """
    width, height = size
    steps = [steps_ms] * frames if isinstance(steps_ms, int) else steps_ms
    poses = poses if poses is not None else list(range(frames))
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.codec_context.time_base = Fraction(1, 1000)
        stream.codec_context.options = options or {}
        for name, value in (tags or {}).items():
            setattr(stream.codec_context, name, value)
        if rotation:
            stream.set_display_rotation(rotation)
        audio_stream = None
        if audio:
            audio_stream = container.add_stream(audio, rate=SAMPLE_RATE)
            audio_stream.codec_context.layout = "stereo"
        srt = None
        if subtitles is not None:
            srt_path = path.with_suffix(".srt")
            srt_path.write_text(subtitles)
            srt = av.open(str(srt_path))
            sub_stream = container.add_stream_from_template(srt.streams.subtitles[0])
        stamps, pts = [], 0
        for index in range(frames):
            frame = frame_source(index) if frame_source else av.VideoFrame.from_ndarray(pattern(poses[index], height, width), format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            container.mux(stream.encode(frame))
            stamps.append(pts)
            pts += steps[index]
        container.mux(stream.encode(None))
        if audio_stream is not None:
            samples = round(pts / 1000 * SAMPLE_RATE)
            tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(samples) / SAMPLE_RATE)).astype(np.float32)
            for start in range(0, samples, 1024):
                chunk = np.ascontiguousarray(np.stack([tone[start : start + 1024]] * 2))
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
                frame.sample_rate, frame.pts, frame.time_base = SAMPLE_RATE, start, Fraction(1, SAMPLE_RATE)
                container.mux(audio_stream.encode(frame))
            container.mux(audio_stream.encode(None))
        if srt is not None:
            for packet in srt.demux():
                if packet.dts is not None:
                    packet.stream = sub_stream
                    container.mux(packet)
            srt.close()
    return stamps


def video_frames(path: Path) -> list[av.VideoFrame]:
    with av.open(str(path)) as container:
        return list(container.decode(video=0))


def frame_times(path: Path) -> list[tuple[float, float]]:
    """(start, duration) in seconds of every decoded video frame."""
    return [(float(f.time), float(f.duration * f.time_base)) for f in video_frames(path)]


def stream_span(path: Path, kind: str) -> tuple[str, float] | None:
    """(codec, seconds from the first packet's pts to the end of the last) of the first ``kind`` stream."""
    with av.open(str(path)) as container:
        streams = getattr(container.streams, kind)
        if not streams:
            return None
        stream = streams[0]
        spans = [(p.pts, p.pts + p.duration) for p in container.demux(stream) if p.pts is not None]
        start, end = min(s for s, _ in spans), max(e for _, e in spans)
        return stream.codec_context.codec.canonical_name, float((end - start) * stream.time_base)


def audio_packets(path: Path) -> list[tuple[float, bytes]]:
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        return [(float(p.pts * p.time_base), bytes(p)) for p in container.demux(stream) if p.pts is not None]


def leftovers(folder: Path, *keep: Path) -> list[str]:
    keep_names = {p.name for p in keep}
    return sorted(p.name for p in folder.iterdir() if p.name not in keep_names and p.suffix != ".srt")


# --------------------------------------------------------------------------------------------
# Timing, size, audio


def test_constant_rate_clip_keeps_timestamps_duration_and_audio_bytes(tmp_path):
    src, dst = tmp_path / "clip.mp4", tmp_path / "clip_x4.mp4"
    make_clip(src, frames=12, steps_ms=40)
    reports: list[VideoProgress] = []
    result = upscale_video(src, dst, bicubic_x4, batch_size=5, progress=reports.append)

    frames = video_frames(dst)
    assert len(frames) == 12 == result.frames
    assert {(f.width, f.height) for f in frames} == {(256, 192)} and (result.width, result.height) == (256, 192)
    source_times, output_times = frame_times(src), frame_times(dst)
    assert [round(t, 6) for t, _ in output_times] == [round(t, 6) for t, _ in source_times]
    assert output_times[-1][1] == pytest.approx(source_times[-1][1], abs=1e-3)
    assert stream_span(dst, "video")[1] == pytest.approx(stream_span(src, "video")[1], abs=1e-3)
    assert result.duration == pytest.approx(stream_span(src, "video")[1], abs=1e-3)
    # Audio copied untouched: the same packets, bytes and timestamps.
    assert stream_span(dst, "audio")[0] == "aac"
    assert audio_packets(dst) == audio_packets(src)
    assert result.notes == () and result.encoder == "libx264" and result.pix_fmt == "yuv420p"
    # Progress: one report per batch, frames counted up to the total, positions in the video increasing.
    assert [r.frames for r in reports] == [5, 10, 12]
    assert [r.position for r in reports] == sorted(r.position for r in reports)
    assert reports[-1].eta == pytest.approx(0, abs=0.5) and reports[0].estimated_frames in (12, 13)


def test_variable_frame_rate_survives(tmp_path):
    src, dst = tmp_path / "vfr.mkv", tmp_path / "vfr_x4.mkv"
    steps = [80, 40, 40, 120, 40, 80, 40, 40, 200, 40]
    stamps = make_clip(src, frames=10, steps_ms=steps)
    upscale_video(src, dst, bicubic_x4, batch_size=4)
    output_times = frame_times(dst)
    assert [round(t * 1000) for t, _ in output_times] == stamps  # every timestamp kept, to the millisecond
    # Each frame lasts until the next one; the last keeps the source's duration.
    assert [round(d * 1000) for d, _ in zip([d for _, d in output_times][:-1], steps)] == steps[:-1]
    assert stream_span(dst, "video")[1] == pytest.approx(stream_span(src, "video")[1], abs=1e-3)
    assert stream_span(dst, "audio")[1] == pytest.approx(stream_span(src, "audio")[1], abs=1e-3)


def test_output_frames_match_an_independent_reference(tmp_path):
    """Geometry and colour end to end: the decoded output against bicubic of the decoded input (swscale's RGB)."""
    src, dst = tmp_path / "ref.mkv", tmp_path / "ref_x4.mkv"
    make_clip(src, frames=4, size=(48, 32), audio=None, pix_fmt="yuv444p", options={"qp": "0"})
    upscale_video(src, dst, bicubic_x4, crf=0, pix_fmt="source")
    for source, output in zip(video_frames(src), video_frames(dst), strict=True):
        lr = torch.from_numpy(source.to_ndarray(format="rgb24")).permute(2, 0, 1)[None].float() / 255
        expected = bicubic_x4(lr)[0].permute(1, 2, 0).numpy() * 255
        got = output.to_ndarray(format="rgb24").astype(np.float32)
        # 4:4:4 and lossless both ways: only 8-bit rounding (twice) and swscale's precision differ
        assert np.abs(got - expected).mean() < 1 and np.abs(got - expected).max() <= 3


def test_identical_frames_upscale_identically_across_batches(tmp_path):
    src, dst = tmp_path / "static.mkv", tmp_path / "static_x4.mkv"
    make_clip(src, frames=7, audio=None, poses=[0, 1, 2, 3, 3, 3, 4], options={"qp": "0"})
    upscale_video(src, dst, bicubic_x4, batch_size=4, crf=0)  # frames 3 | 4, 5: two batches
    planes = [np.concatenate([np.asarray(p).ravel() for p in f.to_ndarray()]) for f in video_frames(dst)]
    assert np.array_equal(planes[3], planes[4]) and np.array_equal(planes[4], planes[5])
    assert not np.array_equal(planes[2], planes[3])


# --------------------------------------------------------------------------------------------
# Audio and subtitles


def test_audio_is_reencoded_when_the_container_cannot_hold_it(tmp_path):
    src, dst = tmp_path / "clip.mp4", tmp_path / "clip_x4.webm"
    if "vp9" not in available_codecs():
        pytest.skip("this PyAV build has no VP9 encoder")
    make_clip(src, frames=10, steps_ms=50)
    result = upscale_video(src, dst, bicubic_x4, codec="vp9")
    assert result.notes == ("audio stream #1 (aac) re-encoded to libopus: .webm cannot hold aac",)
    codec, seconds = stream_span(dst, "audio")
    assert codec == "opus" and seconds == pytest.approx(stream_span(src, "audio")[1], abs=0.03)
    assert len(video_frames(dst)) == 10


def test_pcm_audio_is_copied_bit_exact(tmp_path):
    src = tmp_path / "pcm.mkv"
    make_clip(src, frames=6, audio="pcm_s16le")
    kept = upscale_video(src, tmp_path / "pcm_x4.mkv", bicubic_x4)
    assert kept.notes == () and stream_span(tmp_path / "pcm_x4.mkv", "audio")[0] == "pcm_s16le"
    assert audio_packets(tmp_path / "pcm_x4.mkv") == audio_packets(src)


def subtitle_texts(path: Path) -> tuple[str, list[str]]:
    with av.open(str(path)) as container:
        stream = container.streams.subtitles[0]
        texts = []
        for packet in container.demux(stream):
            if packet.dts is None:
                continue
            decoded = stream.codec_context.decode2(packet)
            if decoded is not None:
                texts += [r.ass.decode().rsplit(",", 1)[-1] for r in decoded.rects if r.ass]
        return stream.codec_context.codec.canonical_name, texts


SRT = "1\n00:00:00,000 --> 00:00:00,200\nHello\n\n2\n00:00:00,250 --> 00:00:00,400\nWorld\n"


def test_subtitles_are_copied_or_converted_to_the_containers_text_format(tmp_path):
    src = tmp_path / "subs.mkv"
    make_clip(src, frames=12, subtitles=SRT)
    copied = upscale_video(src, tmp_path / "copy.mkv", bicubic_x4)
    assert copied.notes == () and subtitle_texts(tmp_path / "copy.mkv") == ("subrip", ["Hello", "World"])
    converted = upscale_video(src, tmp_path / "conv.mp4", bicubic_x4)
    assert converted.notes == ("subtitle stream #2 (subrip) converted to mov_text: .mp4 cannot hold subrip",)
    assert subtitle_texts(tmp_path / "conv.mp4") == ("mov_text", ["Hello", "World"])
    assert stream_span(tmp_path / "conv.mp4", "audio")[0] == "aac"


# --------------------------------------------------------------------------------------------
# Pixels: bit depth, colour tags, rotation, codecs


def gray_ramp_10bit(index: int, width: int = 96, height: int = 16) -> av.VideoFrame:
    """A horizontal gray ramp with 10-bit luma codes 64..940 (gray: U = V = 512)."""
    frame = av.VideoFrame(width, height, "yuv444p10le")
    codes = [np.rint(np.linspace(64, 940, width)).astype(np.uint16)[None].repeat(height, 0)] + [np.full((height, width), 512, np.uint16)] * 2
    for plane, values in zip(frame.planes, codes):
        np.frombuffer(plane, np.uint16).reshape(plane.height, -1)[:, :width] = values
    frame.colorspace, frame.color_range = 1, 1  # BT.709, limited
    return frame


def test_ten_bit_video_keeps_ten_bit_precision_both_ways(tmp_path):
    src, dst = tmp_path / "ramp10.mkv", tmp_path / "ramp10_x4.mkv"
    make_clip(src, frames=3, size=(96, 16), audio=None, pix_fmt="yuv444p10le", options={"qp": "0"}, frame_source=gray_ramp_10bit)
    seen = []

    def recording_upscaler(frames):
        seen.append(frames.clone())
        return bicubic_x4(frames)

    result = upscale_video(src, dst, recording_upscaler, crf=0, batch_size=3, pix_fmt="source")
    assert result.pix_fmt == "yuv444p10le"
    # In: gray levels with full 10-bit precision (an 8-bit path would be off by up to 1/510).
    expected_in = (np.rint(np.linspace(64, 940, 96)) - 64) / 876
    assert np.abs(seen[0][0, :, 0].numpy() - expected_in).max() < 1e-6
    # Out: lossless 10-bit luma codes equal to the bicubic result, and far more levels than 8 bits hold.
    out = video_frames(dst)[0]
    assert out.format.name == "yuv444p10le"
    luma = np.frombuffer(out.planes[0], np.uint16).reshape(out.planes[0].height, -1)[:, : out.width].astype(int)
    reference = bicubic_x4(torch.from_numpy(expected_in).float().expand(1, 3, 16, 96))[0, 0].numpy()
    assert np.abs(luma - np.rint(64 + 876 * reference)).max() <= 1
    assert len(np.unique(luma[0])) > 256


def test_ten_bit_falls_back_with_a_note_when_the_codec_has_no_ten_bit(tmp_path):
    vp9 = available_codecs().get("vp9")
    if vp9 is None or "yuv420p10le" in {f.name for f in av.codec.Codec(vp9, "w").video_formats}:
        pytest.skip("needs a VP9 encoder without 10-bit support (as in PyAV's wheels)")
    src = tmp_path / "ten.mkv"
    make_clip(src, frames=3, audio=None, pix_fmt="yuv420p10le")
    result = upscale_video(src, tmp_path / "ten.webm", bicubic_x4, codec="vp9", pix_fmt="source")
    assert result.pix_fmt == "yuv420p" and result.notes == ("libvpx-vp9 cannot write 10-bit video here; writing 8-bit",)


def test_colour_tags_rotation_and_range_are_kept(tmp_path):
    src, dst = tmp_path / "tagged.mp4", tmp_path / "tagged_x4.mp4"

    def tagged(index):
        frame = av.VideoFrame.from_ndarray(pattern(index, 48, 64), format="rgb24").reformat(
            format="yuv420p", dst_colorspace="ITU709", dst_color_range="JPEG"
        )
        return frame

    tags = {"colorspace": 1, "color_range": 2, "color_primaries": 1, "color_trc": 1}
    make_clip(src, frames=3, audio=None, rotation=90, frame_source=tagged, tags=tags)
    upscale_video(src, dst, bicubic_x4)
    first_in, first_out = video_frames(src)[0], video_frames(dst)[0]
    assert int(first_in.colorspace) == 1 and int(first_in.color_range) == 2  # the source is what we meant
    for attribute in ("colorspace", "color_range", "color_primaries", "color_trc", "rotation"):
        assert int(getattr(first_out, attribute)) == int(getattr(first_in, attribute)), attribute


@pytest.mark.parametrize("codec", ["h264", "hevc", "vp9", "av1"])
def test_each_codec_the_build_has(tmp_path, codec):
    if codec not in available_codecs():
        pytest.skip(f"this PyAV build has no {codec} encoder")
    src = tmp_path / "clip.mkv"
    make_clip(src, frames=4, audio=None)
    result = upscale_video(src, tmp_path / "out.mkv", bicubic_x4, codec=codec, crf=30)
    frames = video_frames(tmp_path / "out.mkv")
    assert len(frames) == 4 and (frames[0].width, frames[0].height) == (256, 192)
    with av.open(str(tmp_path / "out.mkv")) as container:
        assert container.streams.video[0].codec_context.codec.canonical_name == codec
    assert result.encoder == available_codecs()[codec]


def test_colour_conversion_matches_the_bt709_formulas():
    """Ours against the textbook equations, 10-bit 4:4:4 limited range, both directions."""
    rng = np.random.default_rng(0)
    codes = [rng.integers(64, 941, (8, 10)), rng.integers(64, 961, (8, 10)), rng.integers(64, 961, (8, 10))]
    frame = av.VideoFrame(10, 8, "yuv444p10le")
    for plane, values in zip(frame.planes, codes):
        np.frombuffer(plane, np.uint16).reshape(plane.height, -1)[:, :10] = values
    frame.colorspace, frame.color_range = 1, 1
    y, u, v = (codes[0] - 64) / 876, (codes[1] - 512) / 896, (codes[2] - 512) / 896
    r, b = y + 1.5748 * v, y + 1.8556 * u
    g = (y - 0.2126 * r - 0.0722 * b) / 0.7152
    expected = np.clip(np.stack([r, g, b]), 0, 1)
    colour = video._Colour.of(frame)
    assert np.abs(frame_to_rgb(frame, colour) - expected).max() < 1e-5

    rgb = rng.random((3, 8, 10)).astype(np.float32)
    back = rgb_to_frame(rgb, "yuv444p10le", colour)
    r, g, b = rgb.astype(np.float64)
    luma = 0.2126 * r + 0.7152 * g + 0.0722 * b
    want = [64 + 876 * luma, 512 + 896 * (b - luma) / 1.8556, 512 + 896 * (r - luma) / 1.5748]
    for plane, values in zip(back.planes, want):
        got = np.frombuffer(plane, np.uint16).reshape(plane.height, -1)[:, :10]
        assert np.abs(got - values).max() <= 0.5 + 1e-3  # rounded to the nearest code
    assert (int(back.colorspace), int(back.color_range)) == (1, 1)


def test_subsampled_round_trip_is_close():
    """RGB -> subsampled YUV -> RGB on a smooth ramp: within 2 codes of the bit depth away from the
    borders (quantisation of Y, U and V only; the chroma siting is exact on linear ramps), and
    within 8/255 at the borders, where chroma is extended."""
    across, down = np.meshgrid(np.linspace(0.1, 0.9, 32), np.linspace(0.2, 0.8, 24))
    smooth = np.stack([down, across, np.full((24, 32), 0.5)]).astype(np.float32)
    colour = video._Colour(matrix=1, full_range=False, primaries=2, transfer=2)
    for pix_fmt, bits in (("yuv420p", 8), ("yuv422p10le", 10), ("yuv420p12le", 12)):
        error = np.abs(frame_to_rgb(rgb_to_frame(smooth, pix_fmt, colour), colour) - smooth)
        assert error[:, 2:-2, 2:-2].max() * ((1 << bits) - 1) <= 2, pix_fmt
        assert error.max() <= 8 / 255, pix_fmt


def test_odd_sized_subsampled_video_comes_out_exactly_4x(tmp_path):
    """4:2:0 with odd sides (FFV1 allows it): chroma covers the last row and column, output even."""
    src, dst = tmp_path / "odd.mkv", tmp_path / "odd_x4.mkv"
    make_clip(src, frames=3, size=(33, 25), audio=None, codec="ffv1", pix_fmt="yuv420p")
    result = upscale_video(src, dst, bicubic_x4)
    frames = video_frames(dst)
    assert len(frames) == 3 and {(f.width, f.height) for f in frames} == {(132, 100)} == {(result.width, result.height)}
    lr = frame_to_rgb(video_frames(src)[0], video._Colour.of(video_frames(src)[0]))
    assert lr.shape == (3, 25, 33) and np.isfinite(lr).all()


# --------------------------------------------------------------------------------------------
# Bad input, bad settings, interruption


def write_broken_inputs(folder: Path) -> dict[str, Path]:
    good_mp4, good_mkv = folder / "good.mp4", folder / "good.mkv"
    make_clip(good_mp4, frames=12)
    make_clip(good_mkv, frames=25)
    cases = {}
    cases["damaged or not a video"] = folder / "junk.mp4"
    cases["damaged or not a video"].write_bytes(b"this is not a video " * 50)
    cases["truncated, the video stops"] = folder / "cut.mkv"
    cases["truncated, the video stops"].write_bytes(good_mkv.read_bytes()[: good_mkv.stat().st_size // 2])
    cases["damaged or not a video "] = folder / "cut.mp4"  # the index (moov) is at the end: gone
    cases["damaged or not a video "].write_bytes(good_mp4.read_bytes()[: good_mp4.stat().st_size // 2])
    cases["damaged or not a video (its video stream names no codec"] = folder / "unknown.mkv"
    cases["damaged or not a video (its video stream names no codec"].write_bytes(good_mkv.read_bytes().replace(b"V_MPEG4/ISO/AVC", b"V_QQQQQ/ISO/AVC"))
    no_frames = folder / "empty.mkv"
    with av.open(str(no_frames), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height = 64, 48
        sound = container.add_stream("aac", rate=SAMPLE_RATE)
        frame = av.AudioFrame.from_ndarray(np.zeros((2, 1024), np.float32), format="fltp", layout="stereo")
        frame.sample_rate, frame.pts = SAMPLE_RATE, 0
        container.mux(sound.encode(frame))
        container.mux(sound.encode(None))
    cases["the video stream has no frames"] = no_frames
    audio_only = folder / "sound.mka"
    make_clip(audio_only.with_suffix(".tmp.mkv"), frames=2)
    with av.open(str(audio_only.with_suffix(".tmp.mkv"))) as source, av.open(str(audio_only), "w") as container:
        out = container.add_stream_from_template(source.streams.audio[0])
        for packet in source.demux(source.streams.audio[0]):
            if packet.dts is not None:
                packet.stream = out
                container.mux(packet)
    audio_only.with_suffix(".tmp.mkv").unlink()
    cases["has no video stream"] = audio_only
    good_mp4.unlink()
    good_mkv.unlink()
    return cases


def test_broken_inputs_give_one_clear_line_and_leave_nothing(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    cases = write_broken_inputs(inputs)
    out = tmp_path / "out"
    out.mkdir()
    for expected, path in cases.items():
        before = path.read_bytes()
        with pytest.raises(InputError) as caught:
            upscale_video(path, out / f"{path.stem}_x4.mkv", bicubic_x4)
        message = str(caught.value)
        assert message.startswith(f"{path}: ") and expected.strip() in message and "\n" not in message, message
        assert path.read_bytes() == before
    assert list(out.iterdir()) == []


def test_is_video_probes_content_not_names(tmp_path):
    make_clip(tmp_path / "clip.mp4", frames=2)
    (tmp_path / "clip.mp4").rename(tmp_path / "renamed.dat")
    from PIL import Image

    Image.fromarray(pattern(0, 16, 16)).save(tmp_path / "still.png")
    (tmp_path / "notes.txt").write_text("hello")
    write_broken_inputs(tmp_path)
    assert is_video(tmp_path / "renamed.dat")
    assert not is_video(tmp_path / "still.png")
    assert not is_video(tmp_path / "notes.txt")
    assert not is_video(tmp_path / "sound.mka")
    assert not is_video(tmp_path / "junk.mp4")


def test_bad_settings_are_refused_before_anything_is_written(tmp_path):
    src = tmp_path / "clip.mp4"
    make_clip(src, frames=2)
    bad = [
        (dict(codec="h265"), "unknown video codec 'h265'"),
        (dict(crf=99), "--crf for h264 must be between 0 and 51, got 99"),
        (dict(pix_fmt="nv12"), "libx264 cannot write pixel format 'nv12'"),
    ]
    for kwargs, message in bad:
        with pytest.raises(TinySRError, match=message):
            upscale_video(src, tmp_path / "out.mp4", bicubic_x4, **kwargs)
    with pytest.raises(TinySRError, match="cannot hold h264 video"):
        upscale_video(src, tmp_path / "out.webm", bicubic_x4)
    with pytest.raises(TinySRError, match="cannot write .avi videos"):
        upscale_video(src, tmp_path / "out.avi", bicubic_x4)
    assert leftovers(tmp_path, src) == []


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("error", [KeyboardInterrupt, Boom])
@pytest.mark.parametrize("keep_partial", [False, True])
def test_interruption_leaves_no_file_under_the_final_name(tmp_path, error, keep_partial):
    src, dst = tmp_path / "clip.mp4", tmp_path / "clip_x4.mp4"
    make_clip(src, frames=12)
    calls = []

    def failing_upscaler(frames):
        calls.append(len(frames))
        if len(calls) == 3:
            raise error()
        return bicubic_x4(frames)

    with pytest.raises(error):
        upscale_video(src, dst, failing_upscaler, batch_size=2, keep_partial=keep_partial)
    assert not dst.exists()
    if keep_partial:  # the two batches upscaled before the failure, playable
        assert leftovers(tmp_path, src) == [partial_path(dst).name] == ["clip_x4.partial.mp4"]
        frames = video_frames(partial_path(dst))
        assert len(frames) == 4 and (frames[0].width, frames[0].height) == (256, 192)
    else:
        assert leftovers(tmp_path, src) == []


def test_a_decoding_failure_keeps_going_as_an_input_error_with_partial(tmp_path):
    src, dst = tmp_path / "cut.mkv", tmp_path / "cut_x4.mkv"
    make_clip(tmp_path / "whole.mkv", frames=25)
    src.write_bytes((tmp_path / "whole.mkv").read_bytes()[: (tmp_path / "whole.mkv").stat().st_size // 2])
    with pytest.raises(InputError, match="truncated"):
        upscale_video(src, dst, bicubic_x4, keep_partial=True)
    assert not dst.exists() and 0 < len(video_frames(partial_path(dst))) < 25


# --------------------------------------------------------------------------------------------
# With the real engine


def test_end_to_end_with_the_engine(tmp_path, tiny_weights):
    from tinysr_cli.engine.upscaler import Upscaler
    from tinysr_cli.weights.format import load_weights

    model, _ = load_weights(tiny_weights)
    upscaler = Upscaler(model)
    src, dst = tmp_path / "clip.mkv", tmp_path / "clip_x4.mkv"
    make_clip(src, frames=2, size=(32, 24), poses=[1, 1], steps_ms=[40, 80], options={"qp": "0"})
    result = upscale_video(src, dst, upscaler.upscale_batch, batch_size=1, crf=0)  # one engine call per frame
    frames = video_frames(dst)
    assert result.frames == len(frames) == 2 and (frames[0].width, frames[0].height) == (128, 96)
    assert frame_times(dst) == frame_times(src) and frame_times(dst)[1][0] == pytest.approx(0.04)
    assert stream_span(dst, "audio")[0] == "aac"
    planes = [np.concatenate([np.asarray(p).ravel() for p in f.to_ndarray()]) for f in frames]
    assert np.array_equal(planes[0], planes[1])  # the same frame in two engine calls: the same output


def test_without_pyav_videos_say_what_to_install(tmp_path):
    """The "video" extra is optional: without PyAV nothing is a video and upscaling one names the extra."""
    import subprocess
    import sys

    make_clip(tmp_path / "clip.mp4", frames=2)
    script = (
        "import sys; sys.modules['av'] = None\n"
        "from tinysr_cli.errors import TinySRError\n"
        "from tinysr_cli.io import video\n"
        f"assert not video.is_video({str(tmp_path / 'clip.mp4')!r})\n"
        "try:\n"
        f"    video.upscale_video({str(tmp_path / 'clip.mp4')!r}, {str(tmp_path / 'out.mp4')!r}, None)\n"
        "except TinySRError as exc:\n"
        "    print(exc, '|', exc.hint)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "video support needs PyAV, which is not installed | pip install 'tinysr[video]'", done.stderr
    assert not (tmp_path / "out.mp4").exists()


# --------------------------------------------------------------------------------------------
# Through the CLI


def test_cli_upscales_videos_in_a_folder_and_reports_the_broken_one(tmp_path, tiny_weights):
    from cli_helpers import run_cli, tree_digest
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    make_clip(folder / "clip.mp4", frames=2, size=(32, 24))
    (folder / "clip.mp4").rename(folder / "clip.dat")  # found by probing, not by name
    Image.fromarray(pattern(0, 24, 32)).save(folder / "still.png")
    (folder / "broken.mov").write_bytes(b"not a video at all " * 20)
    before = tree_digest(folder)
    out = tmp_path / "out"

    result = run_cli("upscale", folder, "-o", out, "--video-only", "--model", tiny_weights, "--crf", "20")
    assert result.returncode == 1, result.stderr  # broken.mov failed, the batch went on
    assert result.stdout.strip() == str(out / "clip.mkv")  # .dat is not a container we write: Matroska
    assert f"{folder / 'broken.mov'}: damaged or not a video" in result.stderr
    assert f"skipped {folder / 'still.png'}: not a video" in result.stderr
    assert "1 upscaled, 0 skipped, 1 failed" in result.stderr
    frames = video_frames(out / "clip.mkv")
    assert len(frames) == 2 and (frames[0].width, frames[0].height) == (128, 96)
    assert stream_span(out / "clip.mkv", "audio")[0] == "aac"
    assert sorted(p.name for p in out.iterdir()) == ["clip.mkv"]  # nothing for broken.mov, no temporary file
    assert tree_digest(folder) == before

    bad = run_cli("upscale", folder / "clip.dat", "-o", tmp_path / "x.mp4", "--model", tiny_weights, "--codec", "h265")
    assert bad.returncode == 1 and "Error: unknown video codec 'h265'" in bad.stderr
    assert not (tmp_path / "x.mp4").exists()


def _audio_only(path: Path) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=SAMPLE_RATE)
        stream.codec_context.layout = "stereo"
        tone = np.zeros((2, SAMPLE_RATE // 4), np.float32)
        for start in range(0, tone.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(tone[:, start : start + 1024]), format="fltp", layout="stereo")
            frame.sample_rate, frame.pts, frame.time_base = SAMPLE_RATE, start, Fraction(1, SAMPLE_RATE)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def test_cli_webm_defaults_to_vp9_and_audio_only_is_skipped(tmp_path, tiny_weights):
    from cli_helpers import run_cli

    folder = tmp_path / "in"
    folder.mkdir()
    make_clip(folder / "clip.webm", frames=2, size=(32, 24), codec="libvpx-vp9", audio="libopus")
    _audio_only(folder / "voice.mp4")
    out = tmp_path / "out"
    result = run_cli("upscale", folder, "-o", out, "--model", tiny_weights)
    assert result.returncode == 0, result.stderr
    assert f"skipped {folder / 'voice.mp4'}: audio only, no video stream" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["clip.webm"]
    with av.open(str(out / "clip.webm")) as container:
        assert container.streams.video[0].codec_context.name == "vp9"

