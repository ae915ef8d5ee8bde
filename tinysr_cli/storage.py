"""Inputs and outputs as URIs (``s3://``, ``gs://``, ``file://`` ...) through pyarrow filesystems.

The per-file code of `tinysr upscale` reads and writes local files; for a URI the worker copies the
input object to a private scratch folder, runs that code unchanged, and publishes the result:

- **atomic**: uploaded under a hidden temporary key beside the final one (``.tinysr-PID-RANDOM.part``,
  the local naming of ``tinysr_cli.atomic``), then moved onto the final key. On an object store a
  move is a server-side copy, which creates the final object whole or not at all, then a delete;
  an upload cut short (a killed worker, a network error) leaves at most the hidden temporary key,
  never a partial output under the final name. Writing the final key directly was not chosen:
  pyarrow completes a multipart upload when its stream is closed, also on an error path.
- **resumable**: an output that exists is skipped (``get_file_info``), before and after the work.
- names, failure records and messages are the local ones, with URIs in place of the scratch paths.

pyarrow comes with the ``ray`` extra (``pip install 'tinysr[ray]'``). Credentials and endpoints
are pyarrow's: the usual ``AWS_*`` variables (``AWS_ENDPOINT_URL`` for an S3-compatible server),
or options in the URI's query string (``s3://bucket/x?endpoint_override=...``), which are kept on
every URI planned from it.
"""

from __future__ import annotations

import fnmatch
import os
import re
import secrets
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tinysr_cli.atomic import TEMP_PREFIX, TEMP_SUFFIX
from tinysr_cli.errors import TinySRError
from tinysr_cli.io.images import FORMATS, IMAGE_SUFFIXES
from tinysr_cli.io.paths import DEFAULT_SUFFIX, Job, Plan, is_product_name

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class UriJob:
    """A job whose input or output (or both) is a URI; the other one may be a local path."""

    source: str
    output: str


def is_uri(text: str | Path | None) -> bool:
    """Whether ``text`` is a URI with a scheme (``s3://...``); a ``pathlib.Path`` never is."""
    return isinstance(text, str) and bool(_URI.match(text))


def job_for(source: str, output: str) -> Job | UriJob:
    """The job for a (source, output) row: a ``UriJob`` if either is a URI, else a local ``Job``."""
    if is_uri(source) or is_uri(output):
        return UriJob(source, output)
    return Job(Path(source), Path(output))


def _pyarrow_fs():
    try:
        import pyarrow.fs as pafs
    except ImportError:
        raise TinySRError("URIs need pyarrow", hint="pip install 'tinysr[ray]' (or pip install pyarrow)") from None
    return pafs


@dataclass(frozen=True)
class _Location:
    filesystem: object  # pyarrow.fs.FileSystem
    path: str  # the filesystem's path: "bucket/key" for S3, "/abs/path" for file://
    prefix: str  # what turns a path of this filesystem back into a URI: "s3://", "file://"
    query: str  # "?endpoint_override=..." or ""

    def uri(self, path: str) -> str:
        return f"{self.prefix}{path}{self.query}"


def _locate(uri: str) -> _Location:
    pafs = _pyarrow_fs()
    base, _, query = uri.partition("?")
    try:
        filesystem, path = pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as exc:  # ArrowInvalid is a ValueError
        raise TinySRError(f"{uri}: not a usable URI ({exc})", hint="spaces and other special characters are written %20 etc.") from None
    scheme_end = base.index("://") + 3
    authority = base[scheme_end:].split("/", 1)[0]
    prefix = base[:scheme_end] + (authority if path.startswith("/") else "")
    return _Location(filesystem, path.rstrip("/") or path, prefix, f"?{query}" if query else "")


def _file_type(location: _Location, path: str | None = None):
    return location.filesystem.get_file_info(path or location.path).type


def exists(location: str | Path) -> bool:
    """Whether a file (local path) or object (URI) exists."""
    if not is_uri(location):
        return Path(location).exists()
    pafs = _pyarrow_fs()
    found = _locate(str(location))
    return _file_type(found) != pafs.FileType.NotFound


def identity(location: str | Path) -> str:
    """A key equal for two spellings of one output (a resolved local path, a URI without options)."""
    if not is_uri(location):
        return str(Path(location).resolve())
    found = _locate(str(location))
    return found.prefix + found.path


def _sibling(location: str, name: str) -> str:
    """``location`` with its last component replaced by ``name`` (a URI's query string kept)."""
    if not is_uri(location):
        return str(Path(location).with_name(name))
    base, mark, query = location.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{name}{mark}{query}"


def _join(folder: str, relative: str) -> str:
    if not is_uri(folder):
        return str(Path(folder) / relative)
    base, mark, query = folder.partition("?")
    return f"{base.rstrip('/')}/{relative}{mark}{query}"


# ------------------------------------------------------------------------------------------ planning


def plan_uris(
    inputs: list[str],
    output: str | None,
    *,
    accept: Callable[[str], bool],
    suffix_for: Callable[[str], str | None] = lambda name: None,
    recursive: bool = False,
    suffix: str | None = None,
    output_format: str | None = None,
    default_suffix: str | None = None,
    skip_note: str = "not an image or video",
) -> Plan:
    """``plan_jobs`` for inputs and outputs that may be URIs; the same names, read from listings.

    An input URI names an object, a "folder" (a prefix: mirrored below ``output``, sub-folders with
    ``recursive``) or a glob (``s3://b/photos/*.jpg``, matched against the listing of the fixed
    part). Objects are accepted by ``accept(name)`` (by suffix: nothing is downloaded to plan),
    hidden names (a part starting with ".") and tinysr's own outputs found by a scan are left out,
    missing inputs are failures. Without ``output`` the outputs go beside their inputs with ``_x4``.
    Jobs are ``UriJob``s with string locations; local inputs may be mixed in.
    """
    if output_format is not None and output_format.lower() not in FORMATS:
        raise TinySRError(f"unknown format {output_format!r}", hint=f"choose from {', '.join(sorted(set(FORMATS)))}")
    default_suffix = default_suffix or DEFAULT_SUFFIX
    pafs = _pyarrow_fs()
    found: list[tuple[str, str | None]] = []  # (source URI or path, relative path below a listed folder)
    skipped: list[tuple[Path, str]] = []
    failed: list[tuple[Path, str]] = []
    output_id = identity(output) if output is not None else None

    def consider(source: str, relative: str | None, scanned: bool) -> None:
        name = PurePosixPath(source.partition("?")[0]).name
        if scanned and output_id is not None and identity(source).startswith(output_id.rstrip("/") + "/"):
            skipped.append((source, f"inside the output folder {output}"))
        elif scanned and is_product_name(Path(name), suffix or default_suffix):
            skipped.append((source, "named like an output of tinysr (name it explicitly to upscale it again)"))
        elif accept(name):
            found.append((source, relative))
        else:
            skipped.append((source, skip_note))

    for raw in inputs:
        if not is_uri(raw):
            path = Path(raw)
            if path.is_file():
                consider(raw, None, scanned=False)
            else:
                failed.append((raw, f"{raw}: mixing local folders or patterns with URIs is not supported (name files, or use file://)"))
            continue
        location = _locate(raw)
        kind = _file_type(location)
        pattern = None
        if kind == pafs.FileType.NotFound and _GLOB_CHARS & set(location.path):
            parts = location.path.split("/")
            fixed = parts[: next(i for i, part in enumerate(parts) if _GLOB_CHARS & set(part))]
            pattern, folder_path = location.path, "/".join(fixed)
            kind = _file_type(location, folder_path)
        else:
            folder_path = location.path
        if kind == pafs.FileType.File:
            consider(raw, None, scanned=False)
        elif kind == pafs.FileType.Directory:
            selector = pafs.FileSelector(folder_path, recursive=recursive or pattern is not None)
            entries = sorted(location.filesystem.get_file_info(selector), key=lambda info: info.path)
            matched = 0
            for info in entries:
                relative = info.path[len(folder_path):].lstrip("/")
                if info.type != pafs.FileType.File or any(part.startswith(".") for part in relative.split("/")):
                    continue
                if pattern is not None:
                    if not fnmatch.fnmatchcase(info.path, pattern):
                        continue
                    matched += 1
                    consider(location.uri(info.path), None, scanned=True)
                else:
                    consider(location.uri(info.path), relative, scanned=True)
            if pattern is not None and not matched:
                failed.append((raw, f"{raw}: the pattern matches no file"))
        elif pattern is not None:
            failed.append((raw, f"{raw}: the pattern matches no file"))
        else:
            failed.append((raw, f"{raw}: no such file or folder"))

    single = output is not None and len(inputs) == 1 and len(found) == 1 and found[0][1] is None and PurePosixPath(output.partition("?")[0]).suffix != ""
    if output is not None and not single and PurePosixPath(output.partition("?")[0]).suffix != "" and len(found) > 1:
        raise TinySRError(f"-o {output}: names a file, but there are several inputs", hint="give an output folder (one without a suffix)")
    jobs = []
    for source, relative in found:
        if single:
            target = output
        else:
            name = PurePosixPath(source.partition("?")[0]).name
            stem, extension = PurePosixPath(name).stem, PurePosixPath(name).suffix.lower()
            extension = suffix_for(name) or (FORMATS[output_format.lower()] if output_format else extension if extension in IMAGE_SUFFIXES else ".png")
            if output is None:
                target = _sibling(source, f"{stem}{suffix if suffix is not None else default_suffix}{extension}")
            else:
                below = str(PurePosixPath(relative).parent) if relative else "."
                folder = output if below == "." else _join(output, below)
                target = _join(folder, f"{stem}{suffix or ''}{extension}")
        jobs.append(UriJob(source, target))
    return Plan(jobs, skipped, failed)


# --------------------------------------------------------------------------------------- the worker


@contextmanager
def staged(job: UriJob) -> Iterator[Job]:
    """A local ``Job`` for ``job``: the input copied into a scratch folder (a local input used in
    place), the output in the scratch folder when it is a URI. The folder is removed on exit."""
    with tempfile.TemporaryDirectory(prefix="tinysr-stage-") as scratch:
        if is_uri(job.source):
            pafs = _pyarrow_fs()
            location = _locate(job.source)
            source = Path(scratch, "in", PurePosixPath(location.path).name)
            source.parent.mkdir()
            try:
                pafs.copy_files(location.path, str(source), source_filesystem=location.filesystem, destination_filesystem=pafs.LocalFileSystem())
            except (OSError, ValueError) as exc:
                raise TinySRError(f"{job.source}: cannot be read ({exc})") from None
        else:
            source = Path(job.source)
        if is_uri(job.output):
            output = Path(scratch, "out", PurePosixPath(job.output.partition("?")[0]).name)
            output.parent.mkdir()
        else:
            output = Path(job.output)
        yield Job(source, output)


def publish(written: Path, job: UriJob, overwrite: bool) -> str | None:
    """Put the finished local file ``written`` at ``job.output`` (or at the sibling its format switched
    to); returns where it went, or None if that sibling exists and ``overwrite`` is off."""
    if not is_uri(job.output):
        return str(written)
    final = _sibling(job.output, written.name)
    if final != job.output and exists(final) and not overwrite:
        return None
    pafs = _pyarrow_fs()
    location = _locate(final)
    folder = location.path.rsplit("/", 1)[0]
    temporary = f"{folder}/{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}"
    local = pafs.LocalFileSystem()
    try:
        if isinstance(location.filesystem, pafs.LocalFileSystem):  # object stores have no folders to make
            location.filesystem.create_dir(folder, recursive=True)
        pafs.copy_files(str(written), temporary, source_filesystem=local, destination_filesystem=location.filesystem)
        location.filesystem.move(temporary, location.path)
    except (OSError, ValueError) as exc:
        try:
            location.filesystem.delete_file(temporary)
        except (OSError, ValueError):
            pass
        raise TinySRError(f"{final}: cannot be written ({exc})") from None
    return final
