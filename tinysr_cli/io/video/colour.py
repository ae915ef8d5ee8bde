"""Colour: planar YUV <-> RGB in float, with the source's matrix and range.

Computed here instead of by swscale, whose RGB conversions of 10-bit video are only about 8 bits
accurate: frames reach the upscaler with the source's full precision, and the output is encoded
with the source's matrix and range (and tagged with them, primaries and transfer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from tinysr_cli.io.video.common import av

_PLANAR_YUV = re.compile(r"(yuvj?)(420|422|444)p(?:(9|10|12|14|16)le)?")
_ENCODABLE_PIX_FMT = re.compile(r"yuv(420|422|444)p(?:(10|12)le)?")

# AVColorSpace -> (Kr, Kb) of the YUV matrix.
_MATRICES = {1: (0.2126, 0.0722), 4: (0.30, 0.11), 5: (0.299, 0.114), 6: (0.299, 0.114), 7: (0.212, 0.087), 9: (0.2627, 0.0593), 10: (0.2627, 0.0593)}
_BT709, _BT601 = 1, 6
_RANGE_LIMITED, _RANGE_FULL = 1, 2


@dataclass(frozen=True)
class _Colour:
    matrix: int  # AVColorSpace of the YUV matrix, never unspecified
    full_range: bool
    primaries: int
    transfer: int

    @staticmethod
    def of(frame: av.VideoFrame) -> _Colour:
        """The source's colour description, which the output keeps.

        An unspecified matrix (or an RGB source) means BT.709 from 720 lines up, else BT.601; RGB
        sources are written in limited range.
        """
        matrix = int(frame.colorspace)
        if matrix not in _MATRICES:
            matrix = _BT709 if frame.height >= 720 else _BT601
        name = frame.format.name
        yuv_full = int(frame.color_range) == _RANGE_FULL and not av.VideoFormat(name).is_rgb
        return _Colour(matrix, yuv_full or name.startswith("yuvj"), int(frame.color_primaries), int(frame.color_trc))

    @property
    def range_tag(self) -> int:
        return _RANGE_FULL if self.full_range else _RANGE_LIMITED


def _levels(bits: int, full: bool) -> tuple[float, float, float, float]:
    """(luma offset, luma scale, chroma midpoint, chroma scale) of ``bits``-bit YUV codes."""
    if full:
        peak = float((1 << bits) - 1)
        return 0.0, peak, float(1 << (bits - 1)), peak
    step = float(1 << (bits - 8))
    return 16 * step, 219 * step, 128 * step, 224 * step


def _plane(frame: av.VideoFrame, index: int, dtype: np.dtype) -> np.ndarray:
    """A writable [height, width] view of one plane (line padding cut off)."""
    plane = frame.planes[index]
    rows = np.frombuffer(plane, dtype).reshape(plane.height, plane.line_size // dtype.itemsize)
    return rows[:, : plane.width]


def _upsample_chroma(chroma: np.ndarray, height: int, width: int, sub_x: bool, sub_y: bool) -> np.ndarray:
    """Chroma to full resolution: samples sit on even luma columns (H.264/HEVC's default, left)
    and between luma rows (centre); linear interpolation in between, edges replicated."""
    if sub_x:
        wide = np.empty((chroma.shape[0], chroma.shape[1] * 2), np.float32)
        wide[:, 0::2] = chroma
        wide[:, 1::2] = (chroma + np.concatenate([chroma[:, 1:], chroma[:, -1:]], axis=1)) / 2
        chroma = wide[:, :width]
    if sub_y:
        above = np.concatenate([chroma[:1], chroma[:-1]], axis=0)
        below = np.concatenate([chroma[1:], chroma[-1:]], axis=0)
        tall = np.empty((chroma.shape[0] * 2, chroma.shape[1]), np.float32)
        tall[0::2] = 0.75 * chroma + 0.25 * above
        tall[1::2] = 0.75 * chroma + 0.25 * below
        chroma = tall[:height]
    return chroma


def _downsample_chroma(chroma: np.ndarray, sub_x: bool, sub_y: bool) -> np.ndarray:
    """The inverse siting of `_upsample_chroma`: [1, 2, 1] / 4 around even columns, row pairs averaged."""
    if sub_x:
        padded = np.concatenate([chroma[:, :1], chroma, chroma[:, -1:]], axis=1)
        if chroma.shape[1] % 2:
            padded = np.concatenate([padded, chroma[:, -1:]], axis=1)
        chroma = (padded[:, 0:-2:2] + 2 * padded[:, 1:-1:2] + padded[:, 2::2]) / 4
    if sub_y:
        if chroma.shape[0] % 2:
            chroma = np.concatenate([chroma, chroma[-1:]], axis=0)
        chroma = (chroma[0::2] + chroma[1::2]) / 2
    return chroma


def frame_to_rgb(frame: av.VideoFrame, colour: _Colour) -> np.ndarray:
    """A decoded frame as float32 RGB [3, H, W] in [0, 1]."""
    match = _PLANAR_YUV.fullmatch(frame.format.name)
    if match is None:  # RGB, palette, gray, packed or semi-planar sources: swscale is exact enough
        rgb = frame.to_ndarray(format="rgb48le").astype(np.float32) / 65535
        return np.ascontiguousarray(rgb.transpose(2, 0, 1))
    bits = int(match[3] or 8)
    dtype = np.dtype(np.uint8 if bits == 8 else "<u2")
    y_off, y_scale, c_mid, c_scale = _levels(bits, colour.full_range)
    y = (_plane(frame, 0, dtype).astype(np.float32) - y_off) / y_scale
    u, v = ((_plane(frame, i, dtype).astype(np.float32) - c_mid) / c_scale for i in (1, 2))
    sub_x, sub_y = match[2] in ("420", "422"), match[2] == "420"
    u, v = (_upsample_chroma(c, frame.height, frame.width, sub_x, sub_y) for c in (u, v))
    kr, kb = _MATRICES[colour.matrix]
    kg = 1 - kr - kb
    r = y + 2 * (1 - kr) * v
    b = y + 2 * (1 - kb) * u
    g = (y - kr * r - kb * b) / kg
    return np.clip(np.stack([r, g, b]), 0, 1)


def rgb_to_frame(rgb: np.ndarray, pix_fmt: str, colour: _Colour) -> av.VideoFrame:
    """Float RGB [3, H, W] in [0, 1] -> a planar YUV frame (a format `_ENCODABLE_PIX_FMT` accepts), rounded."""
    match = _ENCODABLE_PIX_FMT.fullmatch(pix_fmt)
    if match is None:
        raise ValueError(f"cannot write pixel format {pix_fmt}")
    bits = int(match[2] or 8)
    dtype = np.dtype(np.uint8 if bits == 8 else "<u2")
    kr, kb = _MATRICES[colour.matrix]
    r, g, b = rgb.astype(np.float32, copy=False)
    y = kr * r + (1 - kr - kb) * g + kb * b
    u = (b - y) / (2 * (1 - kb))
    v = (r - y) / (2 * (1 - kr))
    sub_x, sub_y = match[1] in ("420", "422"), match[1] == "420"
    u, v = (_downsample_chroma(c, sub_x, sub_y) for c in (u, v))
    y_off, y_scale, c_mid, c_scale = _levels(bits, colour.full_range)
    peak = (1 << bits) - 1
    frame = av.VideoFrame(rgb.shape[2], rgb.shape[1], pix_fmt)
    for index, (values, offset, scale) in enumerate(((y, y_off, y_scale), (u, c_mid, c_scale), (v, c_mid, c_scale))):
        _plane(frame, index, dtype)[...] = np.clip(np.rint(values * scale + offset), 0, peak)
    frame.colorspace = colour.matrix
    frame.color_range = colour.range_tag
    frame.color_primaries = colour.primaries
    frame.color_trc = colour.transfer
    return frame
