"""Videos in and out with PyAV: decode -> batches of RGB frames -> a frame upscaler -> encode.

Streamed in three overlapping stages joined by bounded queues, so memory stays flat whatever the
length: a thread decodes, the calling thread runs the upscaler, a thread encodes and muxes.
Every frame keeps its own timestamp (variable frame rate survives) and its own duration, so the
output lasts exactly as long as the input; no frame-count header is trusted. Audio and subtitles
are copied when the target container can hold their codec, otherwise converted with a note.
The output is written under a temporary name in the target folder and renamed when complete.

The parts: `formats` (which files are videos, what containers hold), `encoders` (codec and pixel
format choice), `colour` (YUV <-> RGB and colour tags), `hdr` (HDR10 metadata), `source`
(decoding, timestamps from 0, damaged frames), `streams` (audio/subtitle copying), `sink`
(encoding and muxing) and `pipeline` (the threads, and `upscale_video`).
"""

from tinysr_cli.io.video.colour import _Colour, frame_to_rgb, rgb_to_frame
from tinysr_cli.io.video.common import UPSCALE, av
from tinysr_cli.io.video.encoders import CRF, ENCODERS, SOURCE_PIX_FMT, available_codecs, check_settings, default_codec
from tinysr_cli.io.video.formats import CONTAINERS, FALLBACK_SUFFIX, VIDEO_SUFFIXES, is_video, output_suffix, partial_path
from tinysr_cli.io.video.pipeline import (
    DEFAULT_BATCH_SIZE,
    FrameUpscaler,
    VideoProgress,
    VideoProgressCallback,
    VideoResult,
    upscale_video,
)
from tinysr_cli.io.video.source import _main_video_stream

__all__ = [
    "CONTAINERS",
    "CRF",
    "DEFAULT_BATCH_SIZE",
    "ENCODERS",
    "SOURCE_PIX_FMT",
    "FALLBACK_SUFFIX",
    "UPSCALE",
    "VIDEO_SUFFIXES",
    "FrameUpscaler",
    "VideoProgress",
    "VideoProgressCallback",
    "VideoResult",
    "av",
    "available_codecs",
    "check_settings",
    "default_codec",
    "frame_to_rgb",
    "is_video",
    "output_suffix",
    "partial_path",
    "rgb_to_frame",
    "upscale_video",
    "_Colour",  # used by the tests
    "_main_video_stream",  # used by the CLI's audio-only check
]
