"""Reading recipe files: one TOML reader, one table reader and one error type for every training stage."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from tinysr_cli.errors import TinySRError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["RecipeError", "Table", "positive", "read_toml", "tomllib"]


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


class Table:
    """A recipe table whose keys are consumed as they are read; leftovers are reported as unknown.

    Messages name a key by its path (``run.seed``); the file itself is a table whose keys are named
    bare (``method``) and whose leftovers are reported as ``[<file name>]``.
    """

    def __init__(self, data: Any, name: str, base: Path, *, file: bool = False) -> None:
        if not isinstance(data, dict):
            raise RecipeError(f"[{name}] must be a table")
        self.data, self.name, self.base = dict(data), name, base
        self.prefix = "" if file else f"{name}."

    def value(self, key: str, default: Any, kind: type | tuple[type, ...] | None = None) -> Any:
        if key not in self.data:
            return default
        value = self.data.pop(key)
        kind = kind or type(default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and kind is not bool:
            raise RecipeError(f"{self.prefix}{key} must be a {getattr(kind, '__name__', kind)}, got {value!r}")
        if not isinstance(value, kind):
            raise RecipeError(f"{self.prefix}{key} must be a {getattr(kind, '__name__', kind)}, got {value!r}")
        return value

    def required(self, key: str, kind: type) -> Any:
        if key not in self.data:
            raise RecipeError(f"{self.prefix}{key} is required")
        return self.value(key, None, kind)

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.value(key, default, str)
        if value not in choices:
            raise RecipeError(f"{self.prefix}{key} is {value!r}; choose one of {', '.join(choices)}")
        return value

    def path(self, key: str, required: bool = False) -> Path | None:
        value = self.required(key, str) if required else self.value(key, None, str)
        if value is None or value == "":
            if required:
                raise RecipeError(f"{self.prefix}{key} must be a path")
            return None
        return (self.base / Path(value).expanduser()).resolve()

    def int_list(self, key: str, default: tuple[int, ...] | None) -> tuple[int, ...] | None:
        value = self.value(key, default, (list, tuple))
        if value is None:
            return None
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise RecipeError(f"{self.prefix}{key} must be a list of integers")
        return tuple(value)

    def sub(self, key: str) -> Table | None:
        if key not in self.data:
            return None
        return Table(self.data.pop(key), f"{self.prefix}{key}", self.base)

    def fields(self, cls: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
        """Read every scalar field of a dataclass whose key is present, typed by its default."""
        values = {}
        for item in dataclasses.fields(cls):
            if item.name in skip or item.name not in self.data or item.default is dataclasses.MISSING:
                continue
            values[item.name] = self.value(item.name, item.default)
        return values

    def done(self) -> None:
        if self.data:
            raise RecipeError(f"unknown key(s) in [{self.name}]: {', '.join(sorted(self.data))}")


def positive(name: str, **values: float) -> None:
    """Each value must be above 0; the error names ``name.key``."""
    for key, value in values.items():
        if value <= 0:
            raise RecipeError(f"{name}.{key} must be positive, got {value}")
