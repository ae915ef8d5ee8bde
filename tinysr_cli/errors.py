"""Exceptions the CLI turns into a one-line ``Error: ...`` message (and an optional hint)."""

from __future__ import annotations


class TinySRError(Exception):
    """A failure the user can act on; ``hint`` says how."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class WeightsError(TinySRError):
    """A weights file is missing, malformed, or does not match its architecture."""


class InputError(TinySRError):
    """An input file cannot be read or is not something we can upscale."""
