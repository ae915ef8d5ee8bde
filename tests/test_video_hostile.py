"""Videos that broke the first release: Apple's HEVC tag, 10-bit and 4:2:2 sources, HDR10 metadata,
MPEG-TS start offsets, variable frame rate with B-frames, and damaged files.

Every clip is built here with PyAV, a few tiny frames each; the upscaler is bicubic x4.
"""

from __future__ import annotations

import re
from fractions import Fraction

import av
import pytest

from test_video import bicubic_x4, frame_times, make_clip, pattern, video_frames
from tinysr_cli.errors import InputError
from tinysr_cli.io.video import available_codecs, upscale_video


def video_codec_tag(path) -> str:
    with av.open(str(path)) as container:
        return container.streams.video[0].codec_context.codec_tag


# --------------------------------------------------------------------------------------------
# HEVC in MP4/MOV


@pytest.mark.parametrize("suffix", [".mp4", ".mov"])
def test_hevc_in_mp4_and_mov_is_tagged_hvc1_for_apple_players(tmp_path, suffix):
    if "hevc" not in available_codecs():
        pytest.skip("this PyAV build has no HEVC encoder (libx265)")
    src, dst = tmp_path / "clip.mp4", tmp_path / f"clip_x4{suffix}"
    make_clip(src, frames=3, audio=None)
    upscale_video(src, dst, bicubic_x4, codec="hevc", crf=40)
    assert video_codec_tag(dst) == "hvc1"
    assert len(video_frames(dst)) == 3  # and it still decodes


# --------------------------------------------------------------------------------------------
# Bit depth and chroma layout


@pytest.mark.parametrize(
    ("source_fmt", "codec", "expected_fmt", "note"),
    [
        ("yuv420p", "h264", "yuv420p", None),
        ("yuv444p", "h264", "yuv420p",
         "the source is 8-bit 4:4:4; writing 8-bit 4:2:0, which common players decode (--pix-fmt source keeps yuv444p)"),
        ("yuv422p10le", "h264", "yuv420p",
         "the source is 10-bit 4:2:2; writing 8-bit 4:2:0, which common players decode "
         "(--codec hevc or av1 keeps 10 bits; --pix-fmt source keeps yuv422p10le)"),
        ("yuv420p10le", "hevc", "yuv420p10le", None),
        ("yuv422p10le", "hevc", "yuv420p10le",
         "the source is 10-bit 4:2:2; writing 10-bit 4:2:0, which common players decode (--pix-fmt source keeps yuv422p10le)"),
        ("yuv420p10le", "av1", "yuv420p10le", None),
    ],
)
def test_deep_or_wide_chroma_sources_default_to_what_players_decode(tmp_path, source_fmt, codec, expected_fmt, note):
    if codec not in available_codecs():
        pytest.skip(f"this PyAV build has no {codec} encoder")
    src, dst = tmp_path / "src.mkv", tmp_path / "out.mkv"
    make_clip(src, frames=2, size=(32, 16), audio=None, pix_fmt=source_fmt)
    result = upscale_video(src, dst, bicubic_x4, codec=codec, crf=40)
    assert result.pix_fmt == expected_fmt and video_frames(dst)[0].format.name == expected_fmt
    assert result.notes == ((note,) if note else ())


def test_pix_fmt_source_keeps_the_exact_bit_depth_and_layout(tmp_path):
    src, dst = tmp_path / "src.mkv", tmp_path / "out.mkv"
    make_clip(src, frames=2, size=(32, 16), audio=None, pix_fmt="yuv422p10le")
    result = upscale_video(src, dst, bicubic_x4, pix_fmt="source")
    assert result.pix_fmt == "yuv422p10le" and result.notes == ()
    assert video_frames(dst)[0].format.name == "yuv422p10le"


# --------------------------------------------------------------------------------------------
# HDR10 metadata

MASTER_DISPLAY = "G(13250,34500)B(7500,3000)R(34000,16000)WP(15635,16450)L(10000000,1)"  # BT.2020, 1000 cd/m2
HDR10_TAGS = {"color_primaries": 9, "color_trc": 16, "colorspace": 9}  # BT.2020, PQ


def hdr_side_data(path) -> dict[str, bytes]:
    """The first decoded frame's HDR10 side data, raw (FFmpeg's AVMasteringDisplayMetadata and
    AVContentLightMetadata), by type name."""
    frame = video_frames(path)[0]
    wanted = ("MASTERING_DISPLAY_METADATA", "CONTENT_LIGHT_LEVEL")
    return {item.type.name: bytes(item) for item in frame.side_data if item.type.name in wanted}


def make_hdr10_clip(path):
    if "hevc" not in available_codecs():
        pytest.skip("making an HDR10 clip needs libx265")
    params = f"log-level=error:master-display={MASTER_DISPLAY}:max-cll=1000,400"
    make_clip(path, frames=2, size=(32, 16), audio=None, pix_fmt="yuv420p10le", codec="libx265",
              options={"x265-params": params}, tags=HDR10_TAGS)


@pytest.mark.parametrize("codec", ["hevc", "h264"])
def test_hdr10_metadata_is_kept_bit_exact_by_x265_and_x264(tmp_path, codec):
    src, dst = tmp_path / "hdr.mkv", tmp_path / "hdr_x4.mp4"
    make_hdr10_clip(src)
    source_data = hdr_side_data(src)
    assert sorted(source_data) == ["CONTENT_LIGHT_LEVEL", "MASTERING_DISPLAY_METADATA"]  # the source is what we meant
    result = upscale_video(src, dst, bicubic_x4, codec=codec, crf=40)
    assert hdr_side_data(dst) == source_data
    assert not any("HDR" in note for note in result.notes)
    out = video_frames(dst)[0]
    assert (int(out.color_primaries), int(out.color_trc), int(out.colorspace)) == (9, 16, 9)


def test_hdr10_metadata_survives_av1_within_its_precision(tmp_path):
    if "av1" not in available_codecs():
        pytest.skip("this PyAV build has no AV1 encoder")
    from tinysr_cli.io.video.hdr import parse_light_level, parse_mastering_display

    src, dst = tmp_path / "hdr.mkv", tmp_path / "hdr_x4.mkv"
    make_hdr10_clip(src)
    upscale_video(src, dst, bicubic_x4, codec="av1", crf=50)
    got, want = hdr_side_data(dst), hdr_side_data(src)
    assert parse_light_level(got["CONTENT_LIGHT_LEVEL"]) == (1000, 400)
    mastering, expected = (parse_mastering_display(d["MASTERING_DISPLAY_METADATA"]) for d in (got, want))
    pairs = [*zip(mastering.primaries, expected.primaries), (mastering.white_point, expected.white_point)]
    assert all(abs(a - b) < 1 / 50000 for got_xy, want_xy in pairs for a, b in zip(got_xy, want_xy))
    assert mastering.max_luminance == 1000 and abs(mastering.min_luminance - expected.min_luminance) < 1e-4


def test_hdr10_metadata_vp9_cannot_carry_is_named_in_a_note(tmp_path):
    src = tmp_path / "hdr.mkv"
    make_hdr10_clip(src)
    result = upscale_video(src, tmp_path / "hdr_x4.webm", bicubic_x4, codec="vp9", crf=50)
    assert "HDR10 mastering metadata left out: libvpx-vp9 cannot write it (hevc and av1 can)" in result.notes


# --------------------------------------------------------------------------------------------
# Timestamps: MPEG-TS offsets, variable frame rate with B-frames, libx265's short clips


def container_span(path) -> tuple[float, float]:
    """(start, duration) in seconds as the container reports them."""
    with av.open(str(path)) as container:
        return container.start_time / av.time_base, container.duration / av.time_base


@pytest.mark.parametrize("offset", [1.4, 36000])  # ffmpeg's usual start; a broadcast clock ten hours in
def test_mpeg_ts_outputs_start_at_zero_and_last_as_long(tmp_path, offset):
    src, dst = tmp_path / "clip.ts", tmp_path / "clip_x4.mkv"
    with av.open(str(src), "w", container_options={"output_ts_offset": str(offset)}) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        for index in range(10):
            frame = av.VideoFrame.from_ndarray(pattern(index, 24, 32), format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, 25)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    source_start, source_length = container_span(src)
    assert source_start >= offset  # the source is what we meant
    result = upscale_video(src, dst, bicubic_x4)
    start, length = container_span(dst)
    assert start == 0 and video_frames(dst)[0].time == 0
    assert abs(length - source_length) <= 0.04 and abs(result.duration - source_length) <= 0.04  # within a frame
    assert len(video_frames(dst)) == 10


def make_vfr_clip(path, steps_ms: list[int]) -> None:
    """H.264 with B-frames whose packets carry their frame's own duration (``steps_ms``), as a
    camera's would (libx264 gives every packet 1/rate)."""
    starts = [sum(steps_ms[:index]) for index in range(len(steps_ms))]
    durations = dict(zip(starts, steps_ms))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        stream.codec_context.options = {"bframes": "3"}

        def mux(packets):
            for packet in packets:
                packet.duration = durations[packet.pts]
                container.mux(packet)

        for index, start in enumerate(starts):
            frame = av.VideoFrame.from_ndarray(pattern(index, 24, 32), format="rgb24")
            frame.pts, frame.time_base = start, Fraction(1, 1000)
            mux(stream.encode(frame))
        mux(stream.encode(None))


def video_packets(path) -> tuple[list[tuple[int, int]], float | None]:
    """(pts, dts) of every video packet in file order, and the video track's duration in seconds
    (MP4's track duration; Matroska's has none)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        packets = [(p.pts, p.dts) for p in container.demux(stream) if p.pts is not None]
        mp4 = container.format.name.startswith("mov")
        return packets, float(stream.duration * stream.time_base) if mp4 else None


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_variable_frame_rate_with_b_frames_into_mp4_keeps_the_last_frame_and_monotonic_dts(tmp_path, suffix):
    steps = [20, 60, 20, 60, 20, 60, 20, 300, 20]  # the last frame in decode order is shown 300 ms
    src, dst = tmp_path / f"vfr{suffix}", tmp_path / "vfr_x4.mp4"
    make_vfr_clip(src, steps)
    assert any(pts != dts for pts, dts in video_packets(src)[0] if dts is not None)  # B-frames: reordered
    upscale_video(src, dst, bicubic_x4)
    packets, length = video_packets(dst)
    assert all(a < b for (_, a), (_, b) in zip(packets, packets[1:])) and all(dts <= pts for pts, dts in packets)
    assert length == pytest.approx(sum(steps) / 1000, abs=1e-4)
    assert [t for t, _ in frame_times(dst)] == [t for t, _ in frame_times(src)]


@pytest.mark.parametrize("frames", [1, 2])
def test_hevc_clips_shorter_than_its_reorder_depth_are_written(tmp_path, frames):
    """libx265 returns garbage DTS for one- and two-frame clips; the muxer refused them."""
    if "hevc" not in available_codecs():
        pytest.skip("this PyAV build has no HEVC encoder (libx265)")
    src, dst = tmp_path / "short.mkv", tmp_path / "short_x4.mkv"
    make_clip(src, frames=frames, audio=None)
    upscale_video(src, dst, bicubic_x4, codec="hevc", crf=40)
    assert frame_times(dst) == frame_times(src) == [(0.04 * index, 0.04) for index in range(frames)]


# --------------------------------------------------------------------------------------------
# Damaged files


def damage_packet(src, dst, index: int) -> None:
    """Copy ``src`` to ``dst`` with all but the first 4 bytes of video packet ``index`` overwritten."""
    with av.open(str(src)) as container:
        packet = [p for p in container.demux(video=0) if p.size][index]
        position, size = packet.pos, packet.size
    data = bytearray(src.read_bytes())
    data[position + 4 : position + size] = b"\xff" * (size - 4)
    dst.write_bytes(bytes(data))


def test_a_damaged_frame_is_skipped_on_request_and_named_otherwise(tmp_path):
    whole, src, dst = tmp_path / "whole.mp4", tmp_path / "damaged.mp4", tmp_path / "damaged_x4.mp4"
    make_clip(whole, frames=24, audio=None)
    damage_packet(whole, src, 6)
    before = src.read_bytes()

    with pytest.raises(InputError) as caught:
        upscale_video(src, dst, bicubic_x4)
    assert re.fullmatch(rf"{re.escape(str(src))}: damaged at ~0\.\d\d s \(Invalid data found when processing input\)", str(caught.value))
    assert caught.value.hint == "--skip-damaged decodes past damaged frames"
    assert not dst.exists()

    result = upscale_video(src, dst, bicubic_x4, skip_damaged=True)
    assert result.frames == len(video_frames(dst)) == 23
    assert result.notes == ("1 damaged frame(s) skipped, the frame before each shown longer",)
    assert video_packets(dst)[1] == pytest.approx(video_packets(whole)[1], abs=1e-4)  # as long as the source
    assert src.read_bytes() == before


def test_a_damaged_header_is_reported_as_damaged_not_as_an_unsupported_codec(tmp_path):
    whole, src = tmp_path / "whole.mov", tmp_path / "garbled.mov"
    make_clip(whole, frames=3, audio=None)
    data = whole.read_bytes()
    codec_entry = data.index(b"avc1", data.index(b"stsd"))  # the sample description's codec
    src.write_bytes(data[:codec_entry] + b"\x13\x37\x13\x37" + data[codec_entry + 4 :])
    with pytest.raises(InputError, match=r"garbled\.mov: damaged or not a video \(its video stream names no codec FFmpeg knows\)$"):
        upscale_video(src, tmp_path / "out.mov", bicubic_x4)
    for size in (16, 200):
        src.write_bytes(bytes(size) + data[size:])
        with pytest.raises(InputError, match=r"garbled\.mov: damaged or not a video \("):
            upscale_video(src, tmp_path / "out.mov", bicubic_x4)
    assert not (tmp_path / "out.mov").exists()


def test_cli_names_skip_damaged_and_goes_on_with_it(tmp_path, tiny_weights):
    from cli_helpers import run_cli

    whole, src, out = tmp_path / "whole.mp4", tmp_path / "damaged.mp4", tmp_path / "out.mp4"
    make_clip(whole, frames=24, size=(16, 16), audio=None)
    damage_packet(whole, src, 6)
    refused = run_cli("upscale", src, "-o", out, "--model", tiny_weights)
    assert refused.returncode == 1 and not out.exists()
    assert f"Error: {src}: damaged at ~0." in refused.stderr
    assert "Hint: --skip-damaged decodes past damaged frames" in refused.stderr

    done = run_cli("upscale", src, "-o", out, "--model", tiny_weights, "--skip-damaged")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out) and len(video_frames(out)) == 23
    assert "damaged.mp4: 1 damaged frame(s) skipped, the frame before each shown longer" in done.stderr
