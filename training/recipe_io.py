"""Reading recipe files: one TOML reader and one error type for every training stage."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tinysr_cli.errors import TinySRError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["RecipeError", "read_toml", "tomllib"]


class RecipeError(TinySRError):
    """The recipe file is missing, unreadable or has a wrong value."""


def read_toml(path: Path) -> dict[str, Any]:
    """The parsed recipe, or a ``RecipeError`` naming the file and what is wrong with it."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RecipeError(f"cannot read the recipe {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path} is not valid TOML: {exc}") from None
