"""What every part of the video package shares: PyAV (optional), the 4x contract, error text."""

from __future__ import annotations

from tinysr_cli.errors import TinySRError

try:
    import av
except ImportError:  # the optional "video" extra: images keep working, videos say what to install
    av = None

UPSCALE = 4  # the FrameUpscaler contract


def _require_av() -> None:
    if av is None:
        raise TinySRError("video support needs PyAV, which is not installed", hint="pip install 'tinysr[video]'")


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc)
