"""Image files <-> the engine's convention (float32 CPU tensors [C, H, W] in [0, 1]).

Reading applies EXIF orientation and splits alpha off; writing quantises by rounding and is atomic
(a temporary file in the target folder, renamed when complete).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from tinysr_cli.atomic import atomic_path
from tinysr_cli.errors import InputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"}
FORMATS = {"png": ".png", "jpg": ".jpg", "jpeg": ".jpg", "webp": ".webp", "tiff": ".tif", "tif": ".tif", "bmp": ".bmp"}
ALPHA_SUFFIXES = {".png", ".webp", ".tif", ".tiff"}
_PIL_FORMAT = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP"}


@dataclass
class LoadedImage:
    rgb: torch.Tensor  # [3, H, W] float32 in [0, 1]
    alpha: torch.Tensor | None = None  # [1, H, W] float32 in [0, 1], None when opaque
    metadata: dict = field(default_factory=dict)  # what is carried to the output (icc_profile, exif)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return tuple(self.rgb.shape[-2:])


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def load_image(path: Path) -> LoadedImage:
    """Read an image file; raise ``InputError`` with one clear line if it cannot be used."""
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory") from None
    except UnidentifiedImageError:
        raise InputError(f"{path}: not an image file (or a format Pillow cannot read)") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise InputError(f"{path}: cannot read image ({exc})") from None
    metadata = {key: image.info[key] for key in ("icc_profile",) if image.info.get(key)}
    has_alpha = image.mode in {"RGBA", "LA", "PA"} or (image.mode == "P" and "transparency" in image.info)
    image = image.convert("RGBA" if has_alpha else "RGB")
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    rgb, alpha = array[:3], array[3:] if has_alpha else None
    if alpha is not None and bool((alpha == 1).all()):
        alpha = None
    return LoadedImage(rgb, alpha, metadata)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[C, H, W] float in [0, 1] -> HxWxC uint8, rounded (not truncated)."""
    return image.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def save_image(
    path: Path,
    rgb: torch.Tensor,
    alpha: torch.Tensor | None = None,
    *,
    quality: int = 95,
    metadata: dict | None = None,
) -> None:
    """Write atomically: nothing appears under ``path`` until the file is complete."""
    suffix = path.suffix.lower()
    if suffix not in _PIL_FORMAT:
        raise InputError(f"{path}: unsupported output format {suffix!r}")
    pixels = to_uint8(torch.cat([rgb, alpha]) if alpha is not None else rgb)
    image = Image.fromarray(pixels, "RGBA" if alpha is not None else "RGB")
    options: dict = {}
    if suffix in {".jpg", ".jpeg", ".webp"}:
        options["quality"] = quality
    if metadata and metadata.get("icc_profile") and suffix != ".bmp":
        options["icc_profile"] = metadata["icc_profile"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        image.save(tmp, format=_PIL_FORMAT[suffix], **options)
