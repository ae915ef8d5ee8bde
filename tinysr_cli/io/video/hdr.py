"""HDR10 static metadata: the mastering display (SMPTE ST 2086) and content light levels (CTA-861.3).

Read from the first decoded frame's side data (FFmpeg puts both the bitstream's SEI and the
container's boxes there) and handed to the encoder as its own parameters, which write them into
the output's bitstream, where players and PyAV read them back as the same side data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from fractions import Fraction

from tinysr_cli.io.video.common import av

# AVMasteringDisplayMetadata: 10 AVRationals (R, G, B and white point as x, y; min and max
# luminance in cd/m2), then has_primaries and has_luminance; AVContentLightMetadata: MaxCLL, MaxFALL.
_MASTERING = struct.Struct("<20i2i")
_LIGHT_LEVEL = struct.Struct("<2I")
# The encoder parameter each encoder takes the metadata in; vp9 has no way to carry it.
_PARAMS_OPTION = {"libx264": "x264-params", "libx265": "x265-params", "libsvtav1": "svtav1-params"}


@dataclass(frozen=True)
class MasteringDisplay:
    primaries: tuple[tuple[Fraction, Fraction], ...]  # (x, y) of red, green, blue
    white_point: tuple[Fraction, Fraction]
    min_luminance: Fraction  # cd/m2
    max_luminance: Fraction


@dataclass(frozen=True)
class HdrMetadata:
    mastering: MasteringDisplay | None
    light_level: tuple[int, int] | None  # (MaxCLL, MaxFALL) in cd/m2

    @staticmethod
    def of(frame: av.VideoFrame) -> HdrMetadata | None:
        """The frame's HDR10 metadata, or None when it has neither part."""
        mastering = light_level = None
        for item in frame.side_data:
            if item.type.name == "MASTERING_DISPLAY_METADATA" and item.buffer_size == _MASTERING.size:
                mastering = parse_mastering_display(bytes(item))
            elif item.type.name == "CONTENT_LIGHT_LEVEL" and item.buffer_size == _LIGHT_LEVEL.size:
                light_level = parse_light_level(bytes(item))
        return HdrMetadata(mastering, light_level) if mastering or light_level else None

    def encoder_options(self, encoder: str) -> dict[str, str] | None:
        """``{option: parameters}`` that make ``encoder`` write the metadata (x264/x265 take 1/50000
        and 1/10000 units, SVT-AV1 plain numbers), or None if that encoder cannot carry it."""
        if encoder not in _PARAMS_OPTION:
            return None
        params = []
        m = self.mastering
        if m is not None:
            red, green, blue = m.primaries
            points = (("G", green), ("B", blue), ("R", red), ("WP", m.white_point))
            if encoder == "libsvtav1":
                xy = "".join(f"{name}({float(x):.4f},{float(y):.4f})" for name, (x, y) in points)
                params.append(f"mastering-display={xy}L({float(m.max_luminance):.4f},{float(m.min_luminance):.4f})")
            else:
                xy = "".join(f"{name}({round(x * 50000)},{round(y * 50000)})" for name, (x, y) in points)
                luminance = f"L({round(m.max_luminance * 10000)},{round(m.min_luminance * 10000)})"
                params.append(f"{'master-display' if encoder == 'libx265' else 'mastering-display'}={xy}{luminance}")
        if self.light_level is not None:
            key = {"libx265": "max-cll", "libx264": "cll", "libsvtav1": "content-light"}[encoder]
            params.append(f"{key}={self.light_level[0]},{self.light_level[1]}")
        return {_PARAMS_OPTION[encoder]: ":".join(params)}


def parse_mastering_display(data: bytes) -> MasteringDisplay | None:
    """AVMasteringDisplayMetadata's bytes, or None unless both primaries and luminance are set."""
    *rationals, has_primaries, has_luminance = _MASTERING.unpack(data)
    if not (has_primaries and has_luminance) or any(den == 0 for den in rationals[1::2]):
        return None
    values = [Fraction(num, den) for num, den in zip(rationals[0::2], rationals[1::2])]
    return MasteringDisplay(
        primaries=((values[0], values[1]), (values[2], values[3]), (values[4], values[5])),
        white_point=(values[6], values[7]),
        min_luminance=values[8],
        max_luminance=values[9],
    )


def parse_light_level(data: bytes) -> tuple[int, int]:
    """AVContentLightMetadata's bytes as (MaxCLL, MaxFALL)."""
    return _LIGHT_LEVEL.unpack(data)
