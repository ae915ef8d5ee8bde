"""Turn the user's INPUT arguments and ``-o`` into (input, output) jobs, without touching any file."""

from __future__ import annotations

import glob
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tinysr_cli.errors import TinySRError
from tinysr_cli.io.images import FORMATS, IMAGE_SUFFIXES

DEFAULT_SUFFIX = "_x4"
_GLOB_CHARS = set("*?[")
# Names tinysr gives its outputs beside their inputs: NAME_x4, NAME_x2.5, NAME_w1920, NAME_h1080,
# NAME_1920x1080, and the kept start of a video, NAME_x4.partial.
_PRODUCT_NAME = re.compile(r"_(?:x\d+(?:\.\d+)?|[wh]\d+|\d+x\d+)(?:\.partial)?$")


@dataclass(frozen=True)
class Job:
    source: Path
    output: Path


@dataclass(frozen=True)
class Plan:
    jobs: list[Job]
    skipped: list[tuple[Path, str]]  # (path, reason): not images, found while scanning folders
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (path, one-line message): missing, dangling links


def is_product_name(path: Path, suffix: str | None = None) -> bool:
    """Whether ``path`` is named like an output of tinysr (``_x4`` and the like, or ``suffix``)."""
    stem = path.stem.removesuffix(".partial")
    return bool(_PRODUCT_NAME.search(path.stem)) or bool(suffix and stem.endswith(suffix))


def _inside(path: Path, folder: Path | None) -> bool:
    if folder is None:
        return False
    try:
        path.resolve().relative_to(folder)
        return True
    except (ValueError, OSError, RuntimeError):
        return False


def _scan_folder(
    folder: Path, recursive: bool, accept, skip_note: str = "not an image", exclude: Callable[[Path], str | None] = lambda p: None
) -> tuple[list[tuple[Path, Path]], list[tuple[Path, str]], list[tuple[Path, str]]]:
    """(file, path relative to folder) for accepted files; the rest as skipped notes; dangling
    links as failures. Sorted. ``exclude`` gives a reason to leave a file out (our own outputs)."""
    found, skipped, failed = [], [], []
    entries = folder.rglob("*") if recursive else folder.iterdir()
    for path in sorted(entries):
        if path.name.startswith("."):
            continue
        if path.is_symlink() and not path.exists():
            failed.append((path, f"{path}: a link to a missing file"))
            continue
        if not path.is_file():
            continue
        reason = exclude(path)
        if reason:
            skipped.append((path, reason))
        elif accept(path):
            found.append((path, path.relative_to(folder)))
        else:
            skipped.append((path, skip_note))
    return found, skipped, failed


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
    default_suffix: str | None = None,
    exclude_products: bool = False,
) -> Plan:
    """Resolve inputs (files, folders, globs) and output names.

    - one input file and ``-o`` naming a file (it has a suffix and is not an existing folder): that file;
    - otherwise ``-o`` is a folder; a folder input is mirrored below it (sub-folders with ``recursive``);
    - without ``-o`` outputs go next to their inputs.
    ``suffix`` defaults to ``_x4`` when an output would land in its input's folder, else to none.
    The extension is ``suffix_for(input)`` if it gives one (videos keep a container), else
    ``output_format``'s, else the input's (unwritable ones become ``.png``). Files ``accept``
    refuses while scanning are listed as skipped with ``skip_note``; so are tinysr's own outputs
    (named like them, or inside the output folder) found by a scan or a pattern, with
    ``exclude_products``. Missing inputs and
    dangling links are listed as failed; the other inputs still make jobs.
    """
    if output_format is not None and output_format.lower() not in FORMATS:
        raise TinySRError(f"unknown format {output_format!r}", hint=f"choose from {', '.join(sorted(set(FORMATS)))}")
    output_root = output.resolve() if output is not None else None
    default_suffix = default_suffix or DEFAULT_SUFFIX

    def exclude(path: Path, root: Path) -> str | None:
        """Our own outputs are never found by a scan or a pattern below ``root`` (named ones are processed)."""
        if not exclude_products:
            return None
        if output_root is not None and output_root.is_dir() and _inside(path, output_root) and not _inside(root, output_root):
            return f"inside the output folder {output}"
        if is_product_name(path, suffix or default_suffix):
            return "named like an output of tinysr (name it explicitly to upscale it again)"
        return None

    sources: list[tuple[Path, Path | None]] = []  # (file, relative path below a scanned folder)
    skipped: list[tuple[Path, str]] = []
    failed: list[tuple[Path, str]] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found, notes, broken = _scan_folder(path, recursive, accept, skip_note, lambda p, root=path: exclude(p, root))
            sources.extend(found)
            skipped.extend(notes)
            failed.extend(broken)
        elif path.exists():
            sources.append((path, None))
        elif path.is_symlink():
            failed.append((path, f"{raw}: a link to a missing file"))
        elif _GLOB_CHARS & set(raw):
            matches = sorted(Path(p) for p in glob.glob(raw, recursive=True))
            fixed = [part for part in path.parts[: next(i for i, part in enumerate(path.parts) if _GLOB_CHARS & set(part))]]
            root = Path(*fixed) if fixed else Path()
            if not matches:
                failed.append((path, f"{raw}: the pattern matches no file"))
            for match in matches:
                if match.is_symlink() and not match.exists():
                    failed.append((match, f"{match}: a link to a missing file"))
                elif match.is_file():
                    reason = exclude(match, root)
                    if reason:
                        skipped.append((match, reason))
                    elif accept(match):
                        sources.append((match, None))
                    else:
                        skipped.append((match, skip_note))
        else:
            failed.append((path, f"{raw}: no such file or folder"))

    output_is_file = output is not None and output.suffix != "" and not output.is_dir()
    if output_is_file and (len(sources) > 1 or any(relative is not None for _, relative in sources) or len(inputs) > 1):
        raise TinySRError(
            f"-o {output}: names a file, but there are several inputs",
            hint="give an output folder (one without a suffix, or an existing folder)",
        )
    if (
        output_is_file
        and output_format is not None
        and sources
        and suffix_for(sources[0][0]) is None
        and FORMATS.get(output.suffix.lower()[1:]) != FORMATS[output_format.lower()]
    ):
        raise TinySRError(
            f"{{opt:output}} {output} and {{opt:output_format}} {output_format} disagree",
            hint="give one of them, or matching ones", option="output_format",
        )
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
            stem_suffix = suffix if suffix is not None else (default_suffix if own_folder else "")
            target = folder / f"{source.stem}{stem_suffix}{extension}"
        jobs.append(Job(source, target))
    return Plan(jobs, skipped, failed)


def _writable_suffix(source: Path) -> str:
    suffix = source.suffix.lower()
    return suffix if suffix in IMAGE_SUFFIXES else ".png"
