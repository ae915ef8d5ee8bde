"""Codec choice: --codec/--crf/--pix-fmt, the encoder each codec uses, and the output pixel format."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tinysr_cli.errors import TinySRError
from tinysr_cli.io.video.colour import _ENCODABLE_PIX_FMT, _PLANAR_YUV
from tinysr_cli.io.video.common import _require_av, av

# --codec name -> encoders to try, in order; CRF (default, highest accepted).
ENCODERS = {"h264": ("libx264",), "hevc": ("libx265",), "vp9": ("libvpx-vp9",), "av1": ("libsvtav1", "libaom-av1")}
CRF = {"h264": (18, 51), "hevc": (20, 51), "vp9": (24, 63), "av1": (28, 63)}
# --pix-fmt value that keeps the source's chroma layout and bit depth (e.g. 10-bit 4:2:2), which
# few players decode; the default is 4:2:0 in 8 bits, or 10 bits with these codecs.
SOURCE_PIX_FMT = "source"
_MAIN10_CODECS = ("hevc", "av1")
_LAYOUTS = {"420": "4:2:0", "422": "4:2:2", "444": "4:4:4"}
_ENCODER_OPTIONS = {
    "libx265": {"x265-params": "log-level=error"},
    "libvpx-vp9": {"b": "0", "row-mt": "1"},  # b=0: constant quality (CRF) mode
    "libaom-av1": {"b": "0", "cpu-used": "6", "row-mt": "1"},
}


def available_codecs() -> dict[str, str]:
    """--codec names this PyAV build can encode, with the encoder each one uses."""
    _require_av()
    found = {}
    for name, candidates in ENCODERS.items():
        encoder = _first_encoder(candidates)
        if encoder is not None:
            found[name] = encoder
    return found


def default_codec(output: Path) -> str:
    """The codec when the user names none: VP9 for WebM (which cannot hold H.264), else H.264."""
    return "vp9" if output.suffix.lower() == ".webm" else "h264"


def check_settings(codec: str, crf: int | None, pix_fmt: str | None) -> None:
    """Validate --codec/--crf/--pix-fmt once, before any file is touched (raises TinySRError)."""
    _require_av()
    _encoder_settings(codec, crf, pix_fmt)


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
    if pix_fmt is not None and pix_fmt != SOURCE_PIX_FMT:
        encodable = [f for f in pix_fmts if _ENCODABLE_PIX_FMT.fullmatch(f)]
        if pix_fmt not in encodable:
            raise TinySRError(
                f"{name} cannot write pixel format {pix_fmt!r}", hint=f"choose from {', '.join([SOURCE_PIX_FMT, *encodable])}"
            )
    return _Encoder(name, info.canonical_name, default_crf if crf is None else crf, pix_fmts)


def _choose_pix_fmt(encoder: _Encoder, source_fmt: str, requested: str | None) -> tuple[str, str | None]:
    """The output pixel format and, when it differs from the source's in depth or layout, one note.

    By default a format common players decode: 8-bit 4:2:0, or 10-bit 4:2:0 from a deeper source
    when the codec is one whose Main 10 profile players handle (hevc, av1). ``SOURCE_PIX_FMT``
    keeps the source's chroma layout and bit depth where the encoder has them; any other value is
    used as given (validated by `_encoder_settings`).
    """
    if requested is not None and requested != SOURCE_PIX_FMT:
        return requested, None
    match = _PLANAR_YUV.fullmatch(source_fmt)
    chroma = match[2] if match else "420"  # RGB and other sources: the widely playable layout
    depth = _bit_depth(source_fmt)
    if requested == SOURCE_PIX_FMT:
        return _closest_pix_fmt(encoder, chroma, depth)
    deep = depth > 8 and encoder.canonical in _MAIN10_CODECS and "yuv420p10le" in encoder.pix_fmts
    chosen = "yuv420p10le" if deep else "yuv420p"
    if chosen not in encoder.pix_fmts:
        return _closest_pix_fmt(encoder, "420", 10 if deep else 8)
    bits = 10 if deep else 8
    if (bits, "420") == (depth, chroma) or (depth <= 8 and chroma == "420"):
        return chosen, None
    keep = [] if deep or depth <= 8 else ["--codec hevc or av1 keeps 10 bits"]
    keep.append(f"--pix-fmt {SOURCE_PIX_FMT} keeps {source_fmt}")
    return chosen, (
        f"the source is {depth}-bit {_LAYOUTS[chroma]}; writing {bits}-bit 4:2:0, which common players decode ({'; '.join(keep)})"
    )


def _closest_pix_fmt(encoder: _Encoder, chroma: str, depth: int) -> tuple[str, str | None]:
    """The source's layout and depth where the encoder has them, else the nearest below (with a note)."""
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
