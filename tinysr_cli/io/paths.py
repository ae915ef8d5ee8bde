"""Turn the user's INPUT arguments and ``-o`` into (input, output) jobs, without touching any file."""

from __future__ import annotations

import glob
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tinysr_cli.errors import TinySRError
from tinysr_cli.io.images import FORMATS, IMAGE_SUFFIXES

DEFAULT_SUFFIX = "_x4"
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Job:
    source: Path
    output: Path


@dataclass(frozen=True)
class Plan:
    jobs: list[Job]
    skipped: list[tuple[Path, str]]  # (path, reason): not images, found while scanning folders


def _scan_folder(
    folder: Path, recursive: bool, accept, skip_note: str = "not an image"
) -> tuple[list[tuple[Path, Path]], list[tuple[Path, str]]]:
    """(file, path relative to folder) for accepted files; the rest as skipped notes. Sorted."""
    found, skipped = [], []
    entries = folder.rglob("*") if recursive else folder.iterdir()
    for path in sorted(entries):
        if not path.is_file() or path.name.startswith("."):
            continue
        if accept(path):
            found.append((path, path.relative_to(folder)))
        else:
            skipped.append((path, skip_note))
    return found, skipped


def plan_jobs(
    inputs: list[str],
    output: Path | None,
    *,
    recursive: bool = False,
    suffix: str | None = None,
    output_format: str | None = None,
    accept=lambda path: path.suffix.lower() in IMAGE_SUFFIXES,
    suffix_for: Callable[[Path], str | None] = lambda path: None,
    skip_note: str = "not an image",
) -> Plan:
    """Resolve inputs (files, folders, globs) and output names.

    - one input file and ``-o`` naming a file (it has a suffix and is not an existing folder): that file;
    - otherwise ``-o`` is a folder; a folder input is mirrored below it (sub-folders with ``recursive``);
    - without ``-o`` outputs go next to their inputs.
    ``suffix`` defaults to ``_x4`` when an output would land in its input's folder, else to none.
    The extension is ``suffix_for(input)`` if it gives one (videos keep a container), else
    ``output_format``'s, else the input's (unwritable ones become ``.png``). Files ``accept``
    refuses while scanning are listed as skipped with ``skip_note``.
    """
    if output_format is not None and output_format.lower() not in FORMATS:
        raise TinySRError(f"unknown format {output_format!r}", hint=f"choose from {', '.join(sorted(set(FORMATS)))}")
    sources: list[tuple[Path, Path | None]] = []  # (file, relative path below a scanned folder)
    skipped: list[tuple[Path, str]] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found, notes = _scan_folder(path, recursive, accept, skip_note)
            sources.extend(found)
            skipped.extend(notes)
        elif path.exists():
            sources.append((path, None))
        elif _GLOB_CHARS & set(raw):
            matches = sorted(Path(p) for p in glob.glob(raw, recursive=True))
            if not matches:
                raise TinySRError(f"{raw}: the pattern matches no file")
            for match in matches:
                if match.is_file():
                    (sources.append((match, None)) if accept(match) else skipped.append((match, skip_note)))
        else:
            raise TinySRError(f"{raw}: no such file or folder")

    single_file_output = (
        output is not None
        and len(inputs) == 1
        and len(sources) == 1
        and sources[0][1] is None
        and output.suffix != ""
        and not output.is_dir()
    )
    jobs = []
    for source, relative in sources:
        if single_file_output:
            target = output
        else:
            folder = source.parent if output is None else output / (relative.parent if relative else Path())
            extension = suffix_for(source) or (FORMATS[output_format.lower()] if output_format else _writable_suffix(source))
            own_folder = folder.resolve() == source.parent.resolve()
            stem_suffix = suffix if suffix is not None else (DEFAULT_SUFFIX if own_folder else "")
            target = folder / f"{source.stem}{stem_suffix}{extension}"
        jobs.append(Job(source, target))
    return Plan(jobs, skipped)


def _writable_suffix(source: Path) -> str:
    suffix = source.suffix.lower()
    return suffix if suffix in IMAGE_SUFFIXES else ".png"
