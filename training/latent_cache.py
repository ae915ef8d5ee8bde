"""Pre-encoded training pairs: LQ/HQ images and the teacher's latents, computed once, read many times.

The paper pre-encodes the low-quality input, the high-quality target and the teacher's restored
output into latents so that training never runs the 2B-parameter teacher. A cache lives in
``<dir>/<key>/``: ``identity.json`` (what it was made from), ``shard-NNNNN.safetensors`` files of
``shard_size`` samples each, and ``index.json``, written last, listing the shards. Per sample:

- ``lq`` uint8 [3, h, w] and ``hq`` uint8 [3, H, W] (the degraded input and its ground truth);
- ``z_lq`` = teacher-encode(bicubic x4 of ``lq``), ``z_hq`` = teacher-encode(``hq``),
  ``z_teacher`` = ``z_lq - v_teacher(z_lq)``, each [C, H/8, W/8], scaled latents.

The key hashes the teacher's files and settings, the data source's identity (file list and
degradation config) and the cache's own settings (sample count included), so any change makes a new
cache. Sample ``i`` is a deterministic function of the key and ``i``, so shards can be built by
several processes and an interrupted build resumes with the missing shards.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from tinysr_cli.atomic import atomic_path
from tinysr_cli.errors import TinySRError
from training.teacher import Teacher, TeacherSpec

CACHE_FORMAT = "tinysr-latent-cache"
CACHE_VERSION = 1
IMAGE_FIELDS = ("lq", "hq")
LATENT_FIELDS = ("z_lq", "z_hq", "z_teacher")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class PairSource(Protocol):
    """Where training pairs come from; pair ``i`` must depend on ``i`` only (not on call order)."""

    def identity(self) -> dict:
        """JSON-able description of everything that shapes the pairs (file list, crop, degradations)."""
        ...

    def pairs(self, indices: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(HQ [B, 3, H, W], LQ [B, 3, H/s, W/s]), floats in [0, 1] on ``device``."""
        ...


@dataclass(frozen=True)
class CacheSpec:
    """The ``[cache]`` table of a recipe."""

    dir: Path
    samples: int
    shard_size: int = 256
    batch_size: int = 8  # teacher batch while building
    dtype: str = "fp16"  # storage dtype of the latents

    def __post_init__(self) -> None:
        if self.samples < 1 or self.shard_size < 1 or self.batch_size < 1:
            raise TinySRError("[cache] samples, shard_size and batch_size must be at least 1")
        if self.dtype not in _DTYPES:
            raise TinySRError(f"[cache] dtype must be one of {', '.join(_DTYPES)}, not {self.dtype!r}")

    @property
    def num_shards(self) -> int:
        return math.ceil(self.samples / self.shard_size)


def bicubic_input(lq: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """LQ in [0, 1] -> the model's input: torch bicubic (a = -0.75) to ``size``, mapped to [-1, 1], unclamped.

    The same preprocessing as inference (``tinysr_cli.engine``), so training sees what the CLI feeds.
    """
    return F.interpolate(lq.float(), size=size, mode="bicubic", align_corners=False) * 2 - 1


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


# ----------------------------------------------------------------------------- identity


def file_digest(path: Path, memo: dict[str, dict]) -> str:
    """sha256 of a file's bytes, reusing ``memo`` while the file's size and mtime are unchanged."""
    stat = path.stat()
    key = str(path.resolve())
    entry = memo.get(key)
    if entry and entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns:
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    memo[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
    return memo[key]["sha256"]


def cache_identity(spec: CacheSpec, teacher: TeacherSpec, source: PairSource) -> dict:
    """Everything a cached sample depends on; file hashes are memoised in ``<dir>/file-hashes.json``."""
    memo_path = spec.dir / "file-hashes.json"
    memo = json.loads(memo_path.read_text()) if memo_path.is_file() else {}
    files = {}
    for path in teacher.weight_files():
        if not path.is_file():
            raise TinySRError(f"{path}: teacher file not found")
        files[f"{path.parent.name}/{path.name}"] = file_digest(path, memo)
    spec.dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(memo_path) as tmp:
        tmp.write_text(json.dumps(memo, indent=1))
    return {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "teacher_files": files,
        "teacher_settings": teacher.settings(),
        "data": source.identity(),
        "samples": spec.samples,
        "shard_size": spec.shard_size,
        "dtype": spec.dtype,
    }


def cache_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def cache_folder(spec: CacheSpec, identity: dict) -> Path:
    return spec.dir / cache_key(identity)[:20]


# ----------------------------------------------------------------------------- building


def _shard_path(folder: Path, shard: int) -> Path:
    return folder / f"shard-{shard:05d}.safetensors"


def _shard_is_complete(path: Path, key: str, count: int) -> bool:
    from safetensors import safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception:  # a truncated or foreign file: rebuild it
        return False
    return metadata.get("key") == key and metadata.get("count") == str(count)


def shard_counts(spec: CacheSpec) -> list[int]:
    return [min(spec.shard_size, spec.samples - s * spec.shard_size) for s in range(spec.num_shards)]


def missing_shards(folder: Path, spec: CacheSpec, identity: dict) -> list[int]:
    key = cache_key(identity)
    return [s for s, count in enumerate(shard_counts(spec)) if not _shard_is_complete(_shard_path(folder, s), key, count)]


@torch.no_grad()
def encode_pairs(teacher: Teacher, hq: torch.Tensor, lq: torch.Tensor) -> dict[str, torch.Tensor]:
    """One batch of cache fields from HQ/LQ in [0, 1] (quantised to 8 bits first, as stored)."""
    hq8, lq8 = to_uint8(hq), to_uint8(lq)
    device = next(teacher.parameters()).device
    hq_in = hq8.to(device).float() / 255 * 2 - 1
    lq_in = bicubic_input(lq8.to(device).float() / 255, tuple(hq8.shape[-2:]))
    z_lq = teacher.encode(lq_in).float()
    z_hq = teacher.encode(hq_in).float()
    z_teacher = teacher.restore(z_lq).float()
    return {"lq": lq8.cpu(), "hq": hq8.cpu(), "z_lq": z_lq.cpu(), "z_hq": z_hq.cpu(), "z_teacher": z_teacher.cpu()}


def build_shards(
    folder: Path,
    spec: CacheSpec,
    identity: dict,
    shards: Sequence[int],
    load_teacher: Callable[[], Teacher],
    source: PairSource,
    device: torch.device,
    on_shard: Callable[[int], None] | None = None,
) -> None:
    """Build the given shard numbers (skipping complete ones); the teacher is loaded only if needed."""
    from safetensors.torch import save_file

    key = cache_key(identity)
    counts = shard_counts(spec)
    todo = [s for s in shards if not _shard_is_complete(_shard_path(folder, s), key, counts[s])]
    if not todo:
        return
    folder.mkdir(parents=True, exist_ok=True)
    teacher = load_teacher()
    store = _DTYPES[spec.dtype]
    for shard in todo:
        first = shard * spec.shard_size
        parts: dict[str, list[torch.Tensor]] = {}
        for start in range(first, first + counts[shard], spec.batch_size):
            indices = list(range(start, min(start + spec.batch_size, first + counts[shard])))
            hq, lq = source.pairs(indices, device)
            for name, value in encode_pairs(teacher, hq, lq).items():
                parts.setdefault(name, []).append(value if name in IMAGE_FIELDS else value.to(store))
        tensors = {name: torch.cat(values).contiguous() for name, values in parts.items()}
        metadata = {"key": key, "first": str(first), "count": str(counts[shard])}
        with atomic_path(_shard_path(folder, shard)) as tmp:
            save_file(tensors, tmp, metadata=metadata)
        if on_shard is not None:
            on_shard(shard)


def write_index(folder: Path, spec: CacheSpec, identity: dict) -> Path:
    """Check every shard and write ``index.json`` (the marker of a complete cache)."""
    missing = missing_shards(folder, spec, identity)
    if missing:
        raise TinySRError(f"{folder}: shards {missing[:5]} are missing or incomplete")
    with atomic_path(folder / "identity.json") as tmp:
        tmp.write_text(json.dumps(identity, indent=1, sort_keys=True))
    index = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "key": cache_key(identity),
        "samples": spec.samples,
        "shards": [{"file": _shard_path(folder, s).name, "count": c} for s, c in enumerate(shard_counts(spec))],
    }
    with atomic_path(folder / "index.json") as tmp:
        tmp.write_text(json.dumps(index, indent=1))
    return folder / "index.json"


# ----------------------------------------------------------------------------- reading


class LatentCache(torch.utils.data.Dataset):
    """A complete cache as a map-style dataset: ``cache[i]`` -> dict of the requested fields.

    Images stay uint8; latents are returned as float32. Shards are memory-mapped on first use
    (per DataLoader worker).
    """

    def __init__(self, folder: Path, fields: Sequence[str] = IMAGE_FIELDS + LATENT_FIELDS) -> None:
        self.folder = Path(folder)
        index_path = self.folder / "index.json"
        if not index_path.is_file():
            raise TinySRError(f"{self.folder}: not a complete latent cache (no index.json)", hint="build it with the stage's [cache] settings")
        index = json.loads(index_path.read_text())
        if index.get("format") != CACHE_FORMAT or index.get("version") != CACHE_VERSION:
            raise TinySRError(f"{index_path}: not a tinysr latent cache of version {CACHE_VERSION}")
        unknown = set(fields) - set(IMAGE_FIELDS + LATENT_FIELDS)
        if unknown:
            raise ValueError(f"unknown cache fields {sorted(unknown)}")
        self.fields = tuple(fields)
        self.files = [self.folder / shard["file"] for shard in index["shards"]]
        self.starts = []
        total = 0
        for shard in index["shards"]:
            self.starts.append(total)
            total += shard["count"]
        self.length = total
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return self.length

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}  # open shards are not picklable; workers reopen them

    def _handle(self, shard: int):
        from safetensors import safe_open

        if shard not in self._handles:
            self._handles[shard] = safe_open(self.files[shard], framework="pt")
        return self._handles[shard]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        shard = bisect.bisect_right(self.starts, index) - 1
        row = index - self.starts[shard]
        handle = self._handle(shard)
        out = {}
        for name in self.fields:
            value = handle.get_slice(name)[row : row + 1][0]
            out[name] = value if name in IMAGE_FIELDS else value.float()
        return out
