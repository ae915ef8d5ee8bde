"""Image files <-> the engine's convention (float32 CPU tensors [C, H, W] in [0, 1]).

Reading checks a file before decoding it (a regular, non-empty file under a pixel limit), applies
the EXIF orientation, splits alpha off and records what the output must reproduce: the bit depth
(read from the file's header, never guessed from pixel values), whether it is grayscale, and the
metadata (ICC profile, EXIF with orientation reset to 1, XMP). Writing quantises by rounding and
is atomic (a temporary file in the target folder, renamed when complete).
"""

from __future__ import annotations

import io
import re
import stat
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps, PngImagePlugin, UnidentifiedImageError, features

from tinysr_cli.atomic import atomic_path, remove_stale_temporaries
from tinysr_cli.errors import InputError, TinySRError

try:  # AVIF/HEIC through the optional pillow-heif plugin (extra "heif")
    import pillow_heif

    pillow_heif.register_heif_opener()
    _HEIF = True
except ImportError:
    _HEIF = False

_PIL_FORMAT = {
    ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF",
    ".bmp": "BMP", ".gif": "GIF",
}
FORMATS = {"png": ".png", "jpg": ".jpg", "jpeg": ".jpg", "webp": ".webp", "tiff": ".tif", "tif": ".tif", "bmp": ".bmp", "gif": ".gif"}
if features.check("avif"):
    _PIL_FORMAT[".avif"] = "AVIF"
    FORMATS["avif"] = ".avif"
if _HEIF:
    _PIL_FORMAT.update({".heic": "HEIF", ".heif": "HEIF"})
    FORMATS.update({"heic": ".heic", "heif": ".heif"})
IMAGE_SUFFIXES = set(_PIL_FORMAT)
# The only decoders Pillow may use on an input, whatever its name says: those of the formats we list
# (JPEG's opener also returns a camera's multi-picture MPO). Others are never tried, in particular
# EPS, which Pillow hands to Ghostscript, an external interpreter.
DECODERS = tuple(sorted(set(_PIL_FORMAT.values())))
ALPHA_SUFFIXES = {".png", ".webp", ".tif", ".tiff", ".gif", ".avif", ".heic", ".heif"} & IMAGE_SUFFIXES
HIGH_DEPTH_SUFFIXES = {".png", ".tif", ".tiff"}  # where 16-bit samples are written as 16-bit
_QUALITY_SUFFIXES = {".jpg", ".jpeg", ".webp", ".avif", ".heic", ".heif"}
_EXIF_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".avif", ".heic", ".heif"}

DEFAULT_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3  # Pillow's own default guard: 89.5 megapixels
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
_ALPHA_MODES = {"LA", "La", "RGBA", "RGBa", "PA"}
_ORIENTATION = 0x0112
_XMP_TIFF_TAG = 700
# Pillow's exif_transpose operations as numpy views of an H x W x C array, by EXIF orientation.
_ORIENT_ARRAY = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: a.swapaxes(0, 1)[:, ::-1],
    7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],
    8: lambda a: a.swapaxes(0, 1)[::-1],
}
# TIFF tags that describe the file's layout (size, samples, strips, compression, resolution, ICC,
# XMP); the writer sets its own, so they are not carried over as metadata.
_TIFF_LAYOUT_TAGS = {
    254, 255, 256, 257, 258, 259, 262, 263, 266, 273, 277, 278, 279, 280, 281, 282, 283, 284, 296, 317, 318, 319,
    320, 322, 323, 324, 325, 338, 339, 340, 341, 530, 531, 532, _XMP_TIFF_TAG, 34675,
}
BT601 = (0.299, 0.587, 0.114)  # luma weights for grayscale output


@dataclass
class LoadedImage:
    rgb: torch.Tensor  # [3, H, W] float32 in [0, 1]; grayscale files have three equal channels
    alpha: torch.Tensor | None = None  # [1, H, W] float32 in [0, 1], None when opaque
    metadata: dict = field(default_factory=dict)  # carried to the output: icc_profile, exif, xmp (bytes)
    bit_depth: int = 8  # bits per sample in the file: 8 or 16, or 32 for floating-point samples
    grayscale: bool = False

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return tuple(self.rgb.shape[-2:])


@dataclass(frozen=True)
class ImageInfo:
    """What the header says, before any pixel is decoded."""

    width: int
    height: int
    frames: int


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


# --- reading ---------------------------------------------------------------------------------

_PILLOW_GUARD = threading.Lock()


@contextmanager
def open_image(path: Path, max_pixels: int) -> Iterator[Image.Image]:
    """Open ``path`` lazily with every failure turned into one ``InputError`` line.

    Pillow's global decompression-bomb guard is replaced by our own per-call ``max_pixels`` check,
    made on the header before any pixel is decoded; the lock keeps the global consistent between
    threads (decoding is serialised, upscaling is not).
    """
    path = Path(path)
    _check_regular_file(path)
    try:
        with _PILLOW_GUARD:
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                with Image.open(path, formats=DECODERS) as image:
                    width, height = image.size
                    if width * height > max_pixels:
                        raise InputError(
                            f"{path}: {width}x{height} is {width * height / 1e6:.1f} megapixels, over the limit of "
                            f"{max_pixels / 1e6:.1f} (a guard against decompression bombs)",
                            hint="raise the limit with {opt:max_pixels} if you trust this file",
                            option="max_pixels", path=path,
                        )
                    yield image
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except TinySRError:
        raise
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except UnidentifiedImageError:
        raise InputError(_unidentified(path)) from None
    except MemoryError:
        raise InputError(f"{path}: not enough memory to decode this image") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, cv2.error) as exc:
        raise InputError(f"{path}: cannot read image, truncated or corrupt data ({exc})") from None


def _unidentified(path: Path) -> str:
    """The message for a file Pillow cannot identify; float colour TIFFs get their own."""
    if path.suffix.lower() in {".tif", ".tiff"}:
        samples = opencv_decode(path)
        if samples is not None and samples.dtype.kind == "f":
            return f"{path}: floating-point colour TIFF is not supported (floating-point grayscale is)"
    return f"{path}: not an image file (or not one of the formats tinysr reads: {', '.join(sorted(IMAGE_SUFFIXES))})"


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_PIXEL_CHUNKS = frozenset({b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND"})
_OPENCV_LOG_GUARD = threading.Lock()


def opencv_decode(path: Path) -> np.ndarray | None:
    """``cv2.imdecode`` of ``path`` without the C libraries' chatter on the user's terminal.

    libpng prints its warnings about ancillary chunks (a damaged iCCP profile is common) straight
    to the process's stderr, so a PNG reaches OpenCV with only the chunks that carry pixels;
    Pillow has already read and checked its metadata. OpenCV's own log (libtiff's errors go
    there) is silenced for the call. Returns None when OpenCV cannot decode the file: the caller
    words that as one line naming the file.
    """
    data = path.read_bytes()
    if data.startswith(_PNG_SIGNATURE):
        data = png_pixel_chunks(data)
    with _OPENCV_LOG_GUARD:
        saved = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
        try:
            return cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        finally:
            cv2.utils.logging.setLogLevel(saved)


def png_pixel_chunks(data: bytes) -> bytes:
    """The PNG in ``data`` with only IHDR, PLTE, tRNS, IDAT and IEND (unchanged if it has no IEND)."""
    kept, offset = [_PNG_SIGNATURE], len(_PNG_SIGNATURE)
    while offset + 12 <= len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        end = offset + 12 + length
        if end > len(data):
            return data
        kind = data[offset + 4 : offset + 8]
        if kind in _PNG_PIXEL_CHUNKS:
            kept.append(data[offset:end])
        if kind == b"IEND":
            return b"".join(kept)
        offset = end
    return data


def _check_regular_file(path: Path) -> None:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    if stat.S_ISDIR(info.st_mode):
        raise InputError(f"{path}: is a directory")
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{path}: not a regular file (a pipe, socket or device)")
    if info.st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes)")


def probe_image(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Size and frame count from the header; raises ``InputError`` for unusable files."""
    with open_image(path, max_pixels) as image:
        width, height = image.size
        # EXIF orientations 5-8 swap the sides.
        if image.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8):
            width, height = height, width
        return ImageInfo(width, height, getattr(image, "n_frames", 1))


def load_image(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Read an image file (its first frame); raise ``InputError`` with one clear line if it cannot be used."""
    path = Path(path)
    with open_image(path, max_pixels) as image:
        bit_depth = _file_bit_depth(path, image)
        metadata = read_metadata(image)
        if bit_depth > 8:
            samples, grayscale = _decode_high_depth(path, image, bit_depth)
        else:
            samples, grayscale, metadata = _decode_8bit(path, image, metadata)
    return to_loaded_image(samples, grayscale=grayscale, bit_depth=bit_depth, metadata=metadata)


def to_loaded_image(samples: np.ndarray, *, grayscale: bool, bit_depth: int = 8, metadata: dict | None = None) -> LoadedImage:
    """H x W [x C] samples (uint8, uint16 or float32 in [0, 1]; C = 1 to 4) -> ``LoadedImage``."""
    if samples.ndim == 2:
        samples = samples[..., None]
    peak = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0, np.dtype(np.float32): 1.0}[samples.dtype]
    values = torch.from_numpy(np.require(samples, requirements=["C", "W"])).permute(2, 0, 1).float().div_(peak)
    colour_channels = 1 if values.shape[0] <= 2 else 3
    rgb = values[:colour_channels].expand(3, -1, -1) if colour_channels == 1 else values[:3]
    alpha = values[colour_channels:] if values.shape[0] in (2, 4) else None
    if alpha is not None and bool((alpha == 1).all()):
        alpha = None
    return LoadedImage(rgb.contiguous(), alpha, metadata or {}, bit_depth, grayscale)


def _file_bit_depth(path: Path, image: Image.Image) -> int:
    """Bits per sample declared by the file: PNG's IHDR, TIFF's BitsPerSample/SampleFormat tags."""
    if image.format == "PNG":
        with open(path, "rb") as handle:
            header = handle.read(26)  # signature, IHDR length and type, width, height, bit depth
        return 16 if header[24] == 16 else 8
    if image.format == "TIFF":
        bits = image.tag_v2.get(258, 8)
        sample_format = image.tag_v2.get(339, 1)
        bits = max(bits) if isinstance(bits, tuple) else bits
        sample_format = max(sample_format) if isinstance(sample_format, tuple) else sample_format
        if sample_format == 3:
            if bits != 32:
                raise InputError(f"{path}: {bits}-bit floating-point samples are not supported", hint="convert to 32-bit float or 16-bit integers")
            return 32
        if image.mode == "I" and bits > 16:
            raise InputError(f"{path}: {bits}-bit integer samples are not supported", hint="convert to 16 bits per sample")
        return 16 if bits > 8 else 8
    if image.mode == "F":
        return 32
    return 16 if image.mode.startswith("I;16") else 8


def _decode_8bit(path: Path, image: Image.Image, metadata: dict) -> tuple[np.ndarray, bool, dict]:
    """Pillow's decoders for everything with at most 8 bits per sample; orientation applied."""
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    has_alpha = mode in _ALPHA_MODES or "transparency" in image.info
    if mode == "CMYK":
        return _cmyk_to_rgb(image, metadata)
    if mode in {"I", "F"} or mode.startswith("I;16"):  # deeper than the file header said: not expected
        raise InputError(f"{path}: unsupported sample layout {mode!r}")
    grayscale = mode in _GRAY_MODES
    target = ("LA" if has_alpha else "L") if grayscale else ("RGBA" if has_alpha else "RGB")
    return np.asarray(image.convert(target)), grayscale, metadata


def _cmyk_to_rgb(image: Image.Image, metadata: dict) -> tuple[np.ndarray, bool, dict]:
    """CMYK through its embedded ICC profile to sRGB when there is one; the CMYK profile is not kept."""
    metadata = {key: value for key, value in metadata.items() if key != "icc_profile"}
    icc = image.info.get("icc_profile")
    if icc:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            rgb = ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
            return np.asarray(rgb), False, metadata
        except ImageCms.PyCMSError:
            pass  # a broken profile: fall back to the plain conversion below
    return np.asarray(image.convert("RGB")), False, metadata


def _decode_high_depth(path: Path, image: Image.Image, bit_depth: int) -> tuple[np.ndarray, bool]:
    """16-bit and float samples through OpenCV (Pillow truncates 16-bit colour to 8 bits)."""
    grayscale = _is_grayscale_file(path, image)
    samples = opencv_decode(path)
    if samples is None:
        raise InputError(f"{path}: cannot read image, OpenCV could not decode this {bit_depth}-bit file")
    if samples.ndim == 3:
        order = [2, 1, 0, 3][: samples.shape[2]]  # BGR(A) -> RGB(A)
        samples = samples[..., order]
    if samples.dtype == np.float32:
        if not np.isfinite(samples).all() or samples.min() < 0 or samples.max() > 1:
            raise InputError(
                f"{path}: floating-point samples outside [0, 1] (HDR or scientific data) are not supported",
                hint="tone-map or normalise it to [0, 1] first",
            )
    elif samples.dtype != np.uint16:
        raise InputError(f"{path}: unsupported sample type {samples.dtype} for a {bit_depth}-bit file")
    orientation = image.getexif().get(_ORIENTATION, 1)
    if orientation in _ORIENT_ARRAY:
        samples = np.ascontiguousarray(_ORIENT_ARRAY[orientation](samples))
    return samples, grayscale


def _is_grayscale_file(path: Path, image: Image.Image) -> bool:
    """From the header: PNG colour types 0 and 4, TIFF photometric 0 and 1; else Pillow's mode."""
    if image.format == "PNG":
        with open(path, "rb") as handle:
            return handle.read(26)[25] in (0, 4)
    if image.format == "TIFF":
        return image.tag_v2.get(262) in (0, 1)
    return image.mode in _GRAY_MODES


def read_metadata(image: Image.Image) -> dict:
    """ICC profile, EXIF (orientation reset to 1, since pixels are stored upright) and XMP, as bytes."""
    metadata: dict = {}
    icc = image.info.get("icc_profile")
    if icc:
        try:
            ImageCms.ImageCmsProfile(io.BytesIO(icc))
            metadata["icc_profile"] = icc
        except (ImageCms.PyCMSError, OSError, TypeError, ValueError):
            warnings.warn(f"its ICC profile ({len(icc)} bytes) is damaged and is not copied to the output", stacklevel=2)
    exif = Image.Exif()
    exif.load(image.getexif().tobytes())  # a copy: the image's own EXIF still drives exif_transpose
    if image.format == "TIFF":  # a TIFF's "EXIF" is its own IFD: keep the descriptive tags only
        for tag in [tag for tag in exif if tag in _TIFF_LAYOUT_TAGS]:
            del exif[tag]
    if len(exif):
        if _ORIENTATION in exif:
            exif[_ORIENTATION] = 1
        metadata["exif"] = exif.tobytes()
    xmp = image.info.get("xmp") or image.info.get("XML:com.adobe.xmp")
    if xmp:
        xmp = xmp.encode("utf-8") if isinstance(xmp, str) else bytes(xmp)
        xmp = re.sub(rb'tiff:Orientation="[0-9]"', b'tiff:Orientation="1"', xmp)
        metadata["xmp"] = re.sub(rb"<tiff:Orientation>[0-9]</tiff:Orientation>", b"<tiff:Orientation>1</tiff:Orientation>", xmp)
    return metadata


# --- pixels between reading and the engine ---------------------------------------------------


def bleed_transparent(rgb: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Give every fully transparent pixel the colour of the nearest visible one.

    The colour hidden under alpha = 0 is arbitrary (often black or a stray green); the model's
    receptive field would smear it into the visible edge as a fringe. Nearest-visible colour
    (OpenCV's exact Euclidean distance transform with labels) keeps edges clean.
    """
    hidden = (alpha[0] == 0).numpy()
    if not hidden.any() or hidden.all():
        return rgb
    # Each visible pixel (a zero of the input) gets its own label; hidden pixels get the nearest's.
    _, labels = cv2.distanceTransformWithLabels(
        hidden.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE, labelType=cv2.DIST_LABEL_PIXEL
    )
    visible = ~hidden
    colours = np.zeros((labels.max() + 1, 3), dtype=np.float32)
    colours[labels[visible]] = rgb.permute(1, 2, 0).numpy()[visible]
    return torch.from_numpy(colours[labels]).permute(2, 0, 1).contiguous()


def to_luma(rgb: torch.Tensor) -> torch.Tensor:
    """[3, H, W] -> [1, H, W], ITU-R BT.601 luma (Pillow's "L" weights), in float before quantising."""
    weights = torch.tensor(BT601, dtype=rgb.dtype).view(3, 1, 1)
    return (rgb * weights).sum(dim=0, keepdim=True)


# --- writing ---------------------------------------------------------------------------------


def plan_output(
    path: Path, *, alpha: bool, bit_depth: int, grayscale: bool = False, metadata: bool = False
) -> tuple[Path, list[str]]:
    """Where to write and what is lost on the way, as warnings.

    A format that cannot store transparency switches to .png; 16-bit samples written to an 8-bit
    format are reduced to 8 bits; a 16-bit colour TIFF (written by OpenCV) carries no metadata.
    """
    warnings = []
    suffix = path.suffix.lower()
    if alpha and suffix not in ALPHA_SUFFIXES:
        new = path.with_suffix(".png")
        warnings.append(f"{path.name}: {suffix} cannot store transparency, writing {new.name} instead")
        path, suffix = new, ".png"
    if bit_depth > 8 and suffix not in HIGH_DEPTH_SUFFIXES:
        warnings.append(f"{path.name}: {suffix} stores 8 bits per sample, the {bit_depth}-bit input is reduced to 8 bits")
    if bit_depth == 16 and suffix in {".tif", ".tiff"} and (alpha or not grayscale) and metadata:
        warnings.append(f"{path.name}: 16-bit colour TIFF is written without the ICC profile, EXIF and XMP")
    return path, warnings


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[C, H, W] float in [0, 1] -> HxWxC uint8, rounded (not truncated)."""
    return image.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def to_uint16(image: torch.Tensor) -> np.ndarray:
    """[C, H, W] float in [0, 1] -> HxWxC uint16, rounded."""
    return image.clamp(0, 1).mul(65535).round().to(torch.int32).permute(1, 2, 0).numpy().astype(np.uint16)


def save_image(
    path: Path,
    rgb: torch.Tensor,
    alpha: torch.Tensor | None = None,
    *,
    quality: int = 95,
    metadata: dict | None = None,
    bit_depth: int = 8,
    grayscale: bool = False,
) -> None:
    """Write atomically: nothing appears under ``path`` until the file is complete.

    ``grayscale`` writes the BT.601 luma of ``rgb``; ``bit_depth`` 16 (or 32, float) is kept where
    the format can hold it (PNG, TIFF) and reduced to 8 bits elsewhere.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _PIL_FORMAT:
        raise InputError(f"{path}: unsupported output format {suffix!r}")
    if alpha is not None and suffix not in ALPHA_SUFFIXES:
        raise InputError(f"{path}: {suffix} cannot store transparency")
    metadata = metadata or {}
    colour = to_luma(rgb) if grayscale else rgb
    channels = torch.cat([colour, alpha]) if alpha is not None else colour
    high = bit_depth > 8 and suffix in HIGH_DEPTH_SUFFIXES
    prepare_output_folder(path)
    try:
        with atomic_path(path) as tmp:
            if high and bit_depth == 32 and suffix != ".png" and channels.shape[0] == 1:
                Image.fromarray(channels[0].clamp(0, 1).numpy()).save(tmp, format="TIFF", **_pillow_metadata(suffix, metadata))
            elif high and suffix == ".png":
                tmp.write_bytes(encode_png16(to_uint16(channels), metadata))
            elif high and channels.shape[0] == 1:
                Image.fromarray(to_uint16(channels)[..., 0]).save(tmp, format="TIFF", **_pillow_metadata(suffix, metadata))
            elif high:
                _write_tiff16(tmp, to_uint16(channels))
            else:
                pixels = to_uint8(channels)
                image = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
                options = _pillow_metadata(suffix, metadata)
                if suffix in _QUALITY_SUFFIXES:
                    options["quality"] = quality
                image.save(tmp, format=_PIL_FORMAT[suffix], **options)
    except OSError as exc:
        raise TinySRError(f"{path}: cannot write ({exc.strerror or exc})") from None


def prepare_output_folder(path: Path) -> None:
    """Create the output folder; remove temporaries left there by runs that have ended (killed)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TinySRError(f"{path}: cannot create the output folder {path.parent} ({exc.strerror or exc})") from None
    remove_stale_temporaries(path.parent)


def _pillow_metadata(suffix: str, metadata: dict) -> dict:
    """Pillow save options that carry the ICC profile, EXIF and XMP where the format holds them."""
    options: dict = {}
    if metadata.get("icc_profile") and suffix not in {".bmp", ".gif"}:
        options["icc_profile"] = metadata["icc_profile"]
    exif, xmp = metadata.get("exif"), metadata.get("xmp")
    if suffix in {".tif", ".tiff"}:
        tags = Image.Exif()
        if exif:
            tags.load(exif)
        if xmp:
            tags[_XMP_TIFF_TAG] = xmp
        if len(tags):
            options["exif"] = tags
        return options
    if exif and suffix in _EXIF_SUFFIXES:
        options["exif"] = exif
    if xmp and suffix == ".png":
        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", xmp.decode("utf-8", "replace"))
        options["pnginfo"] = info
    elif xmp and suffix in _EXIF_SUFFIXES:
        options["xmp"] = xmp
    return options


def _write_tiff16(path: Path, samples: np.ndarray) -> None:
    """16-bit colour TIFF through OpenCV (Pillow has no 16-bit colour mode); metadata is not carried."""
    order = [2, 1, 0, 3][: samples.shape[2]]
    if samples.shape[2] == 2:  # gray + alpha: OpenCV writes it as colour with equal channels
        samples, order = samples[..., [0, 0, 0, 1]], [0, 1, 2, 3]
    ok, encoded = cv2.imencode(".tif", np.ascontiguousarray(samples[..., order]))
    if not ok:
        raise OSError("OpenCV could not encode a 16-bit TIFF")
    path.write_bytes(encoded.tobytes())


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png16(samples: np.ndarray, metadata: dict | None = None) -> bytes:
    """A 16-bit PNG (gray, gray+alpha, RGB or RGBA by channel count) with ICC, EXIF and XMP chunks.

    Our own small encoder because neither Pillow (no 16-bit colour) nor OpenCV (no metadata, no
    gray+alpha) covers every case. Rows use the "Up" filter, which suits photographs.
    """
    metadata = metadata or {}
    height, width, channels = samples.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = np.ascontiguousarray(samples.astype(">u2")).view(np.uint8).reshape(height, width * channels * 2)
    filtered = rows.copy()
    filtered[1:] -= rows[:-1]  # "Up": difference to the row above, modulo 256
    raw = np.concatenate([np.full((height, 1), 2, dtype=np.uint8), filtered], axis=1)
    chunks = [_png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0))]
    if metadata.get("icc_profile"):
        chunks.append(_png_chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(metadata["icc_profile"])))
    if metadata.get("exif"):
        exif = metadata["exif"]
        chunks.append(_png_chunk(b"eXIf", exif[6:] if exif.startswith(b"Exif\x00\x00") else exif))
    if metadata.get("xmp"):
        chunks.append(_png_chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + metadata["xmp"]))
    chunks.append(_png_chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)))
    chunks.append(_png_chunk(b"IEND", b""))
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)
