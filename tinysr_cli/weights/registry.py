"""Named models: the built-in registry plus a user's or team's config file.

The built-in list ships as ``tinysr_cli._registry/registry.toml`` (the top-level ``weights/``
folder). ``$XDG_CONFIG_HOME/tinysr/config.toml`` (default ``~/.config/tinysr/config.toml``) may
set ``model = "..."`` (the default ``--model``) and add ``[models.NAME]`` tables; a table whose
name is already registered replaces that entry as a whole (a team pointing ``tinysr-x4`` at its
own Hub repo). ``TINYSR_MODEL`` overrides the configured default.

This module only reads TOML; it never touches the network or the Hugging Face cache.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from tinysr_cli.errors import WeightsError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

MODEL_ENV = "TINYSR_MODEL"
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
_ENTRY_KEYS = {"bundled", "repo_id", "filename", "revision", "published", "sha256", "size", "license", "license_note", "provenance", "description"}


@dataclass(frozen=True)
class ModelEntry:
    """Where a named model lives on the Hub, and what is known about the published file."""

    name: str
    repo_id: str
    filename: str
    revision: str = "main"
    published: bool = True
    sha256: str | None = None
    size: int | None = None
    license: str = "unknown"
    license_note: str = ""
    provenance: str = ""
    description: str = ""
    origin: str = "built-in"  # "built-in", or the config file that defined it
    bundled: str | None = None  # a file shipped inside the package (tinysr_cli._registry); no Hub needed

    def bundled_path(self) -> Path | None:
        """The shipped file of a bundled entry, or None for a Hub entry."""
        if self.bundled is None:
            return None
        from importlib.resources import files

        return Path(str(files("tinysr_cli._registry").joinpath(self.bundled)))


@dataclass(frozen=True)
class Registry:
    entries: dict[str, ModelEntry]
    default: str
    """The model used when no ``--model`` is given (already resolved through env and config)."""
    default_origin: str
    config_path: Path

    def get(self, name: str) -> ModelEntry | None:
        return self.entries.get(name)

    def find_by_sha256(self, digest: str) -> list[ModelEntry]:
        return [entry for entry in self.entries.values() if entry.sha256 == digest]


def config_path() -> Path:
    """``$XDG_CONFIG_HOME/tinysr/config.toml``, with XDG's default ``~/.config``."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "tinysr" / "config.toml"


def load_registry() -> Registry:
    """The built-in registry merged with the user's config file (read on every call)."""
    builtin_text = (files("tinysr_cli._registry") / "registry.toml").read_text(encoding="utf-8")
    builtin = _parse_toml(builtin_text, "built-in registry.toml")
    entries = _parse_entries(builtin.get("models", {}), origin="built-in")
    default, default_origin = builtin.get("default"), "built-in registry"

    path = config_path()
    if path.is_file():
        user = _parse_toml(path.read_text(encoding="utf-8"), str(path))
        unknown = sorted(set(user) - {"model", "models"})
        if unknown:
            raise WeightsError(f"{path}: unknown setting {unknown[0]!r}", hint="the config file knows `model` and [models.NAME] tables")
        entries.update(_parse_entries(user.get("models", {}), origin=str(path)))
        if "model" in user:
            default, default_origin = _require_str(user, "model", str(path)), str(path)

    if os.environ.get(MODEL_ENV):
        default, default_origin = os.environ[MODEL_ENV], f"${MODEL_ENV}"
    if not isinstance(default, str) or not default:
        raise WeightsError("the built-in registry names no default model")
    return Registry(entries=entries, default=default, default_origin=default_origin, config_path=path)


def _parse_toml(text: str, where: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise WeightsError(f"{where}: not valid TOML ({exc})") from None


def _parse_entries(tables: object, origin: str) -> dict[str, ModelEntry]:
    if not isinstance(tables, dict):
        raise WeightsError(f"{origin}: 'models' must be a table of [models.NAME] tables")
    return {name: _parse_entry(name, table, origin) for name, table in tables.items()}


def _parse_entry(name: str, table: object, origin: str) -> ModelEntry:
    where = f"{origin}: [models.{name}]"
    if "/" in name or not name.strip():
        raise WeightsError(f"{where}: a model name cannot be empty or contain '/' (that syntax means a Hub repo)")
    if not isinstance(table, dict):
        raise WeightsError(f"{where} must be a table")
    unknown = sorted(set(table) - _ENTRY_KEYS)
    if unknown:
        raise WeightsError(f"{where}: unknown field {unknown[0]!r}", hint=f"known fields: {', '.join(sorted(_ENTRY_KEYS))}")
    bundled = table.get("bundled")
    if bundled is not None:
        if origin != "built-in":
            raise WeightsError(f"{where}: only the built-in registry can name a bundled file; use a path with --model")
        if not isinstance(bundled, str) or not bundled.endswith(".safetensors") or "/" in bundled:
            raise WeightsError(f"{where}: bundled must be a .safetensors file name")
        table = {"repo_id": "tinysr/bundled", "filename": bundled, **table}
    repo_id = _require_str(table, "repo_id", where)
    if repo_id.count("/") != 1:
        raise WeightsError(f"{where}: repo_id must be 'owner/name', not {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise WeightsError(f"{where}: {exc}") from None
    filename = _require_str(table, "filename", where)
    if not filename.endswith(".safetensors"):
        raise WeightsError(f"{where}: filename must be a .safetensors file, not {filename!r}")
    sha256 = table.get("sha256")
    if sha256 is not None and not (isinstance(sha256, str) and SHA256_PATTERN.fullmatch(sha256)):
        raise WeightsError(f"{where}: sha256 must be 64 lowercase hex digits")
    size = table.get("size")
    if size is not None and not (isinstance(size, int) and not isinstance(size, bool) and size > 0):
        raise WeightsError(f"{where}: size must be a positive integer (bytes)")
    published = table.get("published", True)
    if not isinstance(published, bool):
        raise WeightsError(f"{where}: published must be true or false")
    text = {key: table.get(key, "") for key in ("license_note", "provenance", "description")}
    if not all(isinstance(value, str) for value in text.values()):
        raise WeightsError(f"{where}: license_note, provenance and description must be strings")
    return ModelEntry(
        name=name,
        repo_id=repo_id,
        filename=filename,
        revision=_require_str(table, "revision", where) if "revision" in table else "main",
        published=published,
        sha256=sha256,
        size=size,
        license=_require_str(table, "license", where) if "license" in table else "unknown",
        origin=origin,
        bundled=bundled,
        **text,
    )


def _require_str(table: dict, key: str, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value.strip():
        raise WeightsError(f"{where}: '{key}' must be a non-empty string")
    return value.strip()
