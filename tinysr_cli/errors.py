"""Exceptions the CLI turns into a one-line ``Error: ...`` message (and an optional hint).

A library error says *which option* and *which file* as fields (``option``, ``path``), and its text
names options as ``{opt:NAME}`` placeholders: ``str(error)`` reads them as the Python argument
(``precision``), and only the CLI's error boundary (:func:`cli_text`) writes them as flags
(``--precision``). A Python caller therefore never reads about flags it cannot pass.
"""

from __future__ import annotations

import re
from pathlib import Path

_OPTION = re.compile(r"\{opt:([A-Za-z_]+)\}")
# Where a flag's name is not the argument's name with dashes.
_FLAGS = {"output": "-o", "output_format": "--format"}


def python_text(text: str) -> str:
    """``{opt:tile_overlap}`` -> ``tile_overlap``: the option as a Python caller passes it."""
    return _OPTION.sub(lambda match: match.group(1), text)


def flag(option: str) -> str:
    """The command-line flag of a library option: ``tile_overlap`` -> ``--tile-overlap``."""
    return _FLAGS.get(option, "--" + option.replace("_", "-"))


def cli_text(text: str) -> str:
    """``{opt:tile_overlap}`` -> ``--tile-overlap``: the option as the command line spells it."""
    return _OPTION.sub(lambda match: flag(match.group(1)), text)


class TinySRError(Exception):
    """A failure the user can act on; ``hint`` says how. ``option``: the option at fault (its Python
    name), ``path``: the file at fault, when there is one."""

    def __init__(self, message: str, hint: str | None = None, *, option: str | None = None, path: Path | str | None = None) -> None:
        super().__init__(python_text(message))
        self.template = message
        self.hint_template = hint
        self.hint = None if hint is None else python_text(hint)
        self.option = option
        self.path = None if path is None else Path(path)

    def cli_message(self) -> str:
        return cli_text(self.template)

    def cli_hint(self) -> str | None:
        return None if self.hint_template is None else cli_text(self.hint_template)


class WeightsError(TinySRError):
    """A weights file is missing, malformed, or does not match its architecture."""


class InputError(TinySRError):
    """An input file cannot be read or is not something we can upscale."""
