"""Model weights from the Hugging Face Hub: ``--model`` specs, download, cache and integrity checks.

A model spec is one of (first match wins):

* ``hf://owner/name[@revision][/path.safetensors]`` or a ``https://huggingface.co/...`` file URL:
  a Hub file, in huggingface_hub's own URI syntax (``parse_hf_uri``);
* an existing local path (a ``.safetensors`` file in tinysr's format);
* a registry name (``tinysr-x4``, or one added in the user's config file);
* ``owner/name[@revision][/path.safetensors]``: the same as with ``hf://``. Without a path the
  file is ``model.safetensors``; without a revision it is ``main``. A spec that ends in a weights
  suffix and has no ``@`` (``models/x.safetensors``) is read as a local path.

Files are stored in huggingface_hub's own cache (``HF_HOME`` / ``HF_HUB_CACHE``), downloaded with
``hf_hub_download`` (which honours ``HF_ENDPOINT``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE``), and
checked before use: the registry's sha256 and size when known, else the Hub's own content hash
(the cache names each blob by its ETag: the LFS sha256, or the git blob sha1 for small files),
then tinysr's format header, on every resolution (hashing runs at about 2 GB/s, a fraction of
the model's load time). A file that fails the hash is removed from the cache. Where the cache
cannot use symlinks (some Windows setups) it keeps no ETag, and only a registry sha256 can be
checked. Pickled checkpoints are refused; nothing here unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tinysr_cli import __version__
from tinysr_cli.errors import WeightsError
from tinysr_cli.weights.registry import ModelEntry, Registry, config_path, load_registry

if TYPE_CHECKING:
    from tinysr_cli.weights.format import WeightsInfo

DEFAULT_FILENAME = "model.safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
_LOCAL_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_GIT_SHA1 = re.compile(r"[0-9a-f]{40}")
_CHUNK = 8 << 20

IMPORT_HINT = "convert the authors' release with `tinysr weights import-official DIR -o model.safetensors`"


def ways_out() -> str:
    """What a user can do when the default model cannot be had from the Hub."""
    return (
        "TinySR's authors publish on Google Drive, not the Hub: download their release (linked from "
        "github.com/Microtreei/TinySR; a Drive folder can be fetched with e.g. `gdown --folder URL`), convert it with "
        "`tinysr weights import-official DIR -o model.safetensors` and pass `--model model.safetensors` (or make it "
        f"the default with TINYSR_MODEL or `model = \"...\"` in {config_path()}); "
        "or pass `--model owner/name` for tinysr weights hosted on the Hub"
    )


@dataclass(frozen=True)
class HubFile:
    """One file of one Hub model repo at one revision, with what the registry knows about it."""

    repo_id: str
    filename: str = DEFAULT_FILENAME
    revision: str = "main"
    sha256: str | None = None
    size: int | None = None
    entry: ModelEntry | None = None

    @property
    def uri(self) -> str:
        return f"hf://{self.repo_id}@{self.revision}/{self.filename}"

    @property
    def label(self) -> str:
        return self.entry.name if self.entry is not None else self.uri

    @classmethod
    def from_entry(cls, entry: ModelEntry) -> HubFile:
        return cls(entry.repo_id, entry.filename, entry.revision, entry.sha256, entry.size, entry)


@dataclass(frozen=True)
class Integrity:
    """The result of checking a file: its digest and what it was compared with (None: nothing known)."""

    path: Path
    sha256: str
    size: int
    checked_against: str | None


def parse_model_spec(spec: str, registry: Registry | None = None) -> Path | HubFile:
    """Turn a ``--model`` value into a local path or a Hub file (no network; file contents are not read)."""
    text = spec.strip()
    if not text:
        raise WeightsError("empty model name", hint="pass a registry name, owner/name or a .safetensors file")
    if text.startswith(("hf://", "http://", "https://")):
        return _hub_file_from_uri(text, spec)
    path = Path(text).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise WeightsError(f"{spec}: pickled checkpoints are not loaded (they can run code)", hint=IMPORT_HINT)
    if path.exists():
        return path
    registry = registry if registry is not None else load_registry()
    entry = registry.get(text)
    if entry is not None and entry.bundled is not None:
        return _bundled_file(entry)
    if entry is not None:
        return HubFile.from_entry(entry)
    looks_local = text.startswith((".", "~", os.sep, "/")) or (text.lower().endswith(_LOCAL_SUFFIXES) and "@" not in text)
    if looks_local:
        raise WeightsError(
            f"{spec}: no such file",
            hint="for a file in a Hub repo write hf://owner/name/FILE or owner/name@REVISION/FILE",
        )
    if "/" in text:
        return _hub_file_from_uri("hf://" + text, spec)
    names = ", ".join(sorted(registry.entries)) or "none"
    raise WeightsError(
        f"unknown model {spec!r} (registered: {names})",
        hint="pass a registry name, a Hub repo as owner/name[@revision][/file.safetensors], or a local .safetensors file",
    )


def _bundled_file(entry: ModelEntry) -> Path:
    """The weights file shipped inside the package, checked against the registry's sha256."""
    path = entry.bundled_path()
    if not path.is_file():
        raise WeightsError(
            f"the bundled model {entry.name!r} is missing from this installation ({path})",
            hint="reinstall tinysr (pip install --force-reinstall tinysr)",
        )
    if entry.sha256 is not None and file_sha256(path) != entry.sha256:
        raise WeightsError(f"{path}: the bundled model {entry.name!r} is damaged (sha256 differs from the registry)", hint="reinstall tinysr")
    return path


def _hub_file_from_uri(uri: str, spec: str) -> HubFile:
    from huggingface_hub import constants
    from huggingface_hub.errors import HfUriError
    from huggingface_hub.utils import parse_hf_uri

    try:
        parsed = parse_hf_uri(uri, endpoint=constants.ENDPOINT)
    except HfUriError as exc:
        raise WeightsError(
            f"{spec}: not a Hub model ({str(exc).strip()})",
            hint="download files from elsewhere yourself and pass the local path",
        ) from None
    if parsed.type != "model":
        raise WeightsError(f"{spec}: only model repos hold weights, this names a {parsed.type}")
    filename = parsed.path_in_repo or DEFAULT_FILENAME
    if filename.lower().endswith(PICKLE_SUFFIXES):
        raise WeightsError(f"{spec}: pickled checkpoints are not loaded (they can run code)", hint=IMPORT_HINT)
    if not filename.endswith(".safetensors"):
        raise WeightsError(f"{spec}: {filename} is not a .safetensors file")
    return HubFile(parsed.id, filename, parsed.revision or "main")


def resolve_model(spec: str | None, *, progress: bool = True) -> Path:
    """A verified local ``.safetensors`` path for a model spec (``None``: the configured default).

    Local files are checked for tinysr's format. Hub files come from the cache or are downloaded
    (with a progress bar on stderr when ``progress``), then hash- and format-checked.
    """
    registry = load_registry()
    source = parse_model_spec(spec if spec is not None else registry.default, registry)
    if isinstance(source, Path):
        if source.is_dir():
            raise WeightsError(f"{source} is a folder, not a weights file", hint=IMPORT_HINT + " if it is the official release")
        _check_format(source)
        return source
    return fetch(source, progress=progress)


def fetch(source: HubFile, *, progress: bool = True) -> Path:
    """Cache or download ``source`` and return its path once hash and format are checked.

    A file pinned to a commit and already cached is used without calling into huggingface_hub's
    download code at all: that code builds request headers first, and building them may fetch
    a registry from the Hub (its agent detection), which would be a network request.
    """
    require_published(source)
    path = cached_path(source) if _GIT_SHA1.fullmatch(source.revision) else None
    if path is None:
        path = _download(source, progress)
    check_integrity(path, source)
    _check_format(path)
    return path


def require_published(source: HubFile) -> None:
    """Refuse registry entries whose file is not on the Hub yet (their repo id is only intended)."""
    if source.entry is not None and not source.entry.published:
        raise WeightsError(
            f"model {source.entry.name!r} is not published on the Hugging Face Hub yet (intended repo: {source.entry.repo_id})",
            hint=ways_out(),
        )


def _check_format(path: Path) -> None:
    from tinysr_cli.weights.format import read_info

    read_info(path)


def _download(source: HubFile, progress: bool) -> Path:
    import httpx2
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import silent_tqdm

    label, repo = source.label, source.repo_id
    hint = ways_out() if source.entry is not None else "check the repo id and revision. Otherwise: " + ways_out()
    try:
        return Path(
            hf_hub_download(
                repo,
                source.filename,
                revision=source.revision,
                library_name="tinysr",
                library_version=__version__,
                tqdm_class=None if progress else silent_tqdm,
            )
        )
    except GatedRepoError:
        raise WeightsError(
            f"{label}: the Hub repo {repo} is gated",
            hint="accept its conditions on the Hub and log in (`hf auth login` or HF_TOKEN); " + ways_out(),
        ) from None
    except RepositoryNotFoundError:
        raise WeightsError(f"{label}: Hub repo {repo} not found (or private and not shared with you)", hint=hint) from None
    except RevisionNotFoundError:
        raise WeightsError(f"{label}: revision {source.revision!r} not found in {repo}", hint=hint) from None
    except RemoteEntryNotFoundError:
        raise WeightsError(f"{label}: {repo} has no file {source.filename!r} at revision {source.revision!r}", hint=hint) from None
    except LocalEntryNotFoundError:
        if constants.is_offline_mode():
            message = f"{label} is not in the Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it"
        else:
            message = f"{label}: cannot reach the Hub at {constants.ENDPOINT} and the file is not in the cache"
        raise WeightsError(message, hint=ways_out()) from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "an error"
        raise WeightsError(f"{label}: the Hub answered HTTP {status} for {repo}", hint=hint) from None
    except (OSError, httpx2.HTTPError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(
            f"{label}: the download did not complete ({reason}); nothing was kept",
            hint="run the command again to retry; " + ways_out(),
        ) from None


def cached_path(source: HubFile) -> Path | None:
    """The cached copy of ``source`` at its revision (branches and tags through the cache's refs), no network."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(source.repo_id, source.filename, revision=source.revision)
    return Path(found) if isinstance(found, str) else None


def _hash_file(path: Path, digest: hashlib._Hash) -> str:
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    return _hash_file(path, hashlib.sha256())


def _git_blob_sha1(path: Path, size: int) -> str:
    """Git's object id of a file: what the Hub uses as the ETag of files not stored with LFS."""
    return _hash_file(path, hashlib.sha1(f"blob {size}\0".encode()))


def hub_etag(path: Path) -> str | None:
    """The Hub ETag a cached file was stored under (its blob's name), or None outside the cache."""
    if not Path(path).is_symlink():
        return None
    blob = Path(os.path.realpath(path))
    if blob.parent.name != "blobs":
        return None
    return blob.name if _SHA256.fullmatch(blob.name) or _GIT_SHA1.fullmatch(blob.name) else None


def measure(path: Path, *, expected_sha256: str | None = None, expected_size: int | None = None) -> Integrity:
    """Hash ``path`` and compare with what is expected, else with the Hub's hash when it is a cached file.

    Raises WeightsError on a mismatch; ``checked_against`` is None when there was nothing to compare with.
    """
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        raise WeightsError(f"{path}: {size} bytes, expected {expected_size}")
    digest = file_sha256(path)
    if expected_sha256 is not None:
        if digest != expected_sha256:
            raise WeightsError(f"{path}: sha256 {digest} does not match the expected {expected_sha256}")
        return Integrity(path, digest, size, "sha256")
    etag = hub_etag(path)
    if etag is None:
        return Integrity(path, digest, size, None)
    if len(etag) == 64:
        if digest != etag:
            raise WeightsError(f"{path}: sha256 {digest} does not match the Hub's LFS sha256 {etag}")
        return Integrity(path, digest, size, "hub-lfs-sha256")
    actual = _git_blob_sha1(path, size)
    if actual != etag:
        raise WeightsError(f"{path}: git blob id {actual} does not match the Hub's ETag {etag}")
    return Integrity(path, digest, size, "hub-git-sha1")


def check_integrity(path: Path, source: HubFile) -> Integrity:
    """Check a cached Hub file; on a mismatch remove it from the cache, so nothing usable is left."""
    try:
        return measure(path, expected_sha256=source.sha256, expected_size=source.size)
    except WeightsError as exc:
        _evict(path)
        raise WeightsError(
            f"{source.label}: integrity check failed, the cached file was removed ({exc})",
            hint="run again to download a fresh copy; if it fails again the Hub file differs from the registry's pin "
            "(check the revision and sha256 in the registry or your config)",
        ) from None


def _evict(path: Path) -> None:
    """Delete one cached file and its blob with huggingface_hub's cache utilities."""
    cache = _scan_cache()
    selected = [
        file
        for repo in (cache.repos if cache is not None else ())
        for revision in repo.revisions
        for file in revision.files
        if file.file_path == Path(path)
    ]
    if cache is not None and selected:
        cache.delete_files(*selected).execute()
        return
    blob = Path(os.path.realpath(path))  # the scan skipped a corrupted repo: unlink directly
    Path(path).unlink(missing_ok=True)
    blob.unlink(missing_ok=True)


def _scan_cache():
    """huggingface_hub's view of its cache (``HFCacheInfo``), or None when there is no cache yet."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        return scan_cache_dir()
    except CacheNotFound:
        return None


@dataclass(frozen=True)
class CachedWeights:
    """A ``.safetensors`` file in the Hugging Face cache."""

    repo_id: str
    commit: str
    refs: tuple[str, ...]
    filename: str
    path: Path
    size: int


def cached_weights() -> list[CachedWeights]:
    """Every cached ``.safetensors`` file of every model repo, sorted by repo and file."""
    cache = _scan_cache()
    found = []
    for repo in cache.repos if cache is not None else ():
        if repo.repo_type != "model":
            continue
        for revision in repo.revisions:
            for file in revision.files:
                relative = file.file_path.relative_to(revision.snapshot_path).as_posix()
                if relative.endswith(".safetensors"):
                    refs = tuple(sorted(revision.refs))
                    found.append(CachedWeights(repo.repo_id, revision.commit_hash, refs, relative, file.file_path, file.size_on_disk))
    return sorted(found, key=lambda item: (item.repo_id, item.filename, item.commit))


def remove_cached(source: HubFile) -> tuple[int, int]:
    """Delete every cached revision of ``source``'s file; returns (files removed, bytes freed).

    When nothing else of the repo is cached, the repo's whole cache folder goes (refs included).
    """
    info = _scan_cache()
    for repo in info.repos if info is not None else ():
        if repo.repo_type != "model" or repo.repo_id != source.repo_id:
            continue
        selected = [
            file
            for revision in repo.revisions
            for file in revision.files
            if file.file_path.relative_to(revision.snapshot_path).as_posix() == source.filename
        ]
        if not selected:
            return 0, 0
        everything = {file for revision in repo.revisions for file in revision.files}
        if everything == set(selected):
            strategy = info.delete_revisions(*(revision.commit_hash for revision in repo.revisions))
        else:
            strategy = info.delete_files(*selected)
        freed = strategy.expected_freed_size
        strategy.execute()
        return len(selected), freed
    return 0, 0


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    filename: str
    commit: str
    commit_url: str
    sha256: str
    size: int

    @property
    def pinned_spec(self) -> str:
        suffix = "" if self.filename == DEFAULT_FILENAME else f"/{self.filename}"
        return f"{self.repo_id}@{self.commit}{suffix}"


def model_card(info: WeightsInfo, repo_id: str, filename: str, sha256: str, size: int, license: str) -> str:
    """A README.md for a Hub repo holding one tinysr weights file."""
    from tinysr_cli.weights.format import SUPPORTED_DTYPES

    name = repo_id.split("/")[1]
    model_arg = repo_id if filename == DEFAULT_FILENAME else f"{repo_id}@main/{filename}"
    return f"""---
license: {license}
library_name: tinysr
pipeline_tag: image-to-image
tags:
- super-resolution
- tinysr
---

# {name}

TinySR 4x super-resolution weights in the single-file safetensors format of the `tinysr`
command-line tool.

| | |
|---|---|
| file | `{filename}` |
| sha256 | `{sha256}` |
| size | {size} bytes |
| dtype | {SUPPORTED_DTYPES[info.dtype]} |
| colour fix | {info.color_fix} |

## Use

```bash
tinysr upscale photo.jpg -o photo_x4.png --model {model_arg}
```

Pin a commit for reproducible results (`--model {repo_id}@COMMIT`). A team can register the
file in `~/.config/tinysr/config.toml`:

```toml
[models.{name}]
repo_id = "{repo_id}"
filename = "{filename}"
revision = "COMMIT"
sha256 = "{sha256}"
size = {size}
```

## Architecture

```json
{json.dumps(info.config.to_dict(), indent=2)}
```

## Provenance

```json
{json.dumps(info.provenance, indent=2)}
```

TinySR is the work of the authors of github.com/Microtreei/TinySR (code under Apache-2.0).
Weights converted from their release are pruned and distilled from Stable Diffusion 3 Medium:
check which licence applies to the weights you upload.
"""


def push_weights(
    path: Path,
    repo_id: str,
    *,
    filename: str = DEFAULT_FILENAME,
    private: bool = False,
    license: str = "other",
    message: str | None = None,
) -> PushResult:
    """Upload a tinysr weights file and a generated model card to ``repo_id`` in one commit.

    The repo is created if needed (``HfApi.create_repo``); authentication is huggingface_hub's
    (``hf auth login`` or ``HF_TOKEN``).
    """
    import httpx2
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    from tinysr_cli.weights.format import read_info

    if not filename.endswith(".safetensors"):
        raise WeightsError(f"the file in the repo must be a .safetensors file, not {filename!r}")
    info = read_info(path)
    size, digest = path.stat().st_size, file_sha256(path)
    card = model_card(info, repo_id, filename, digest, size, license)
    api = HfApi(library_name="tinysr", library_version=__version__)
    try:
        api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        commit = api.create_commit(
            repo_id,
            operations=[CommitOperationAdd(filename, str(path)), CommitOperationAdd("README.md", card.encode())],
            commit_message=message or f"Upload {filename} with tinysr {__version__}",
        )
    except HFValidationError as exc:
        raise WeightsError(f"{repo_id}: {exc}") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise WeightsError(
                f"the Hub refused to write to {repo_id} (HTTP {status})",
                hint="log in with a write token (`hf auth login` or HF_TOKEN) and check you may write to that namespace",
            ) from None
        raise WeightsError(f"upload to {repo_id} failed: HTTP {status}: {str(exc).strip().splitlines()[0]}") from None
    except (OSError, httpx2.HTTPError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(f"upload to {repo_id} failed: {reason}", hint="check the connection (and that HF_HUB_OFFLINE is not set)") from None
    return PushResult(repo_id, filename, commit.oid, commit.commit_url, digest, size)
