"""Image I/O on real files written by Pillow and OpenCV: depths, modes, orientation, metadata, animations."""

from __future__ import annotations


import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageCms, features

from conftest import photo
from tinysr_cli.errors import InputError
from tinysr_cli.io import images
from tinysr_cli.io.animated import load_animation, save_animation
from tinysr_cli.io.images import (
    bleed_transparent,
    encode_png16,
    png_pixel_chunks,
    load_image,
    plan_output,
    probe_image,
    save_image,
    to_luma,
)

SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
XMP = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description tiff:Orientation="6" dc:creator="tinysr-test"/></rdf:RDF></x:xmpmeta>'


def _u16(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 65536, size=shape, dtype=np.uint16)


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "tinysr-test"  # Make
    return exif


# --- bit depth --------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("channels", [3, 4])
def test_16bit_colour_round_trip_is_exact(tmp_path, suffix, channels):
    rgb = _u16((33, 47, channels))
    src = tmp_path / f"in{suffix}"
    cv2.imwrite(str(src), rgb[..., [2, 1, 0, 3][:channels]])  # OpenCV stores BGR(A)
    image = load_image(src)
    assert image.bit_depth == 16 and not image.grayscale
    assert np.array_equal((image.rgb * 65535).round().permute(1, 2, 0).numpy().astype(np.uint16), rgb[..., :3])
    if channels == 4:
        assert np.array_equal((image.alpha[0] * 65535).round().numpy().astype(np.uint16), rgb[..., 3])
    out = tmp_path / f"out{suffix}"
    save_image(out, image.rgb, image.alpha, bit_depth=image.bit_depth)
    back = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16 and np.array_equal(back[..., [2, 1, 0, 3][:channels]], rgb)


def test_bit_depth_comes_from_the_file_not_the_values(tmp_path):
    low = np.random.default_rng(1).integers(0, 256, size=(20, 30, 3), dtype=np.uint16)  # 16-bit file, 8-bit values
    cv2.imwrite(str(tmp_path / "low16.png"), low)
    Image.fromarray(np.full((20, 30, 3), 255, np.uint8)).save(tmp_path / "full8.png")
    assert load_image(tmp_path / "low16.png").bit_depth == 16
    assert load_image(tmp_path / "full8.png").bit_depth == 8
    image = load_image(tmp_path / "low16.png")
    save_image(tmp_path / "o.png", image.rgb, bit_depth=image.bit_depth)
    back = cv2.imread(str(tmp_path / "o.png"), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16 and back.max() <= 255  # still 16-bit, values not stretched


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_grayscale_stays_16bit_grayscale(tmp_path, suffix):
    gray = _u16((25, 31), seed=2)
    Image.fromarray(gray).save(tmp_path / f"g{suffix}")  # Pillow mode I;16
    image = load_image(tmp_path / f"g{suffix}")
    assert image.grayscale and image.bit_depth == 16
    save_image(tmp_path / f"o{suffix}", image.rgb, bit_depth=16, grayscale=True)
    back = Image.open(tmp_path / f"o{suffix}")
    assert back.mode == "I;16"
    assert np.array_equal(np.asarray(back), gray)  # equal channels: the luma is the value itself


def test_16bit_gray_alpha_png_from_our_encoder(tmp_path):
    la = _u16((9, 11, 2), seed=3)
    (tmp_path / "la16.png").write_bytes(encode_png16(la))
    image = load_image(tmp_path / "la16.png")
    assert image.grayscale and image.bit_depth == 16
    assert np.array_equal((image.alpha[0] * 65535).round().numpy().astype(np.uint16), la[..., 1])
    assert np.array_equal((image.rgb[1] * 65535).round().numpy().astype(np.uint16), la[..., 0])


def test_float_tiff_is_handled_in_range_and_refused_outside(tmp_path):
    values = np.random.default_rng(4).random((14, 18)).astype(np.float32)
    Image.fromarray(values).save(tmp_path / "f.tif")
    image = load_image(tmp_path / "f.tif")
    assert image.bit_depth == 32 and image.grayscale
    assert torch.equal(image.rgb[0], torch.from_numpy(values))
    save_image(tmp_path / "o.tif", image.rgb, bit_depth=32, grayscale=True)
    back = Image.open(tmp_path / "o.tif")
    assert back.mode == "F" and np.allclose(np.asarray(back), values, atol=1e-6)
    Image.fromarray(values * 4 - 1).save(tmp_path / "hdr.tif")
    with pytest.raises(InputError, match=r"floating-point samples outside \[0, 1\]"):
        load_image(tmp_path / "hdr.tif")
    cv2.imwrite(str(tmp_path / "rgbf.tif"), np.dstack([values] * 3))
    with pytest.raises(InputError, match="floating-point colour TIFF is not supported"):
        load_image(tmp_path / "rgbf.tif")


# --- modes --------------------------------------------------------------------------------------


def test_grayscale_output_is_bt601_luma():
    rgb = torch.rand(3, 16, 20)
    expected = 0.299 * rgb[0].double() + 0.587 * rgb[1].double() + 0.114 * rgb[2].double()
    assert (to_luma(rgb)[0].double() - expected).abs().max() < 1e-6


def test_luma_matches_pillow_conversion_within_one_level(tmp_path):
    rgb = photo("coffee", (40, 60))
    save_image(tmp_path / "l.png", torch.from_numpy(rgb).permute(2, 0, 1).float() / 255, grayscale=True)
    ours = np.asarray(Image.open(tmp_path / "l.png")).astype(int)
    pillow = np.asarray(Image.fromarray(rgb).convert("L")).astype(int)  # ITU-R 601-2, integer arithmetic
    assert Image.open(tmp_path / "l.png").mode == "L"
    assert np.abs(ours - pillow).max() <= 1


@pytest.mark.parametrize("mode", ["L", "LA", "1"])
def test_grayscale_modes_load_as_grayscale(tmp_path, mode):
    gray = photo("camera", (30, 40))[..., 0]
    source = Image.fromarray(gray)
    if mode == "LA":
        source = Image.fromarray(np.dstack([gray, gray[::-1]]))
    elif mode == "1":
        source = source.convert("1")
    source.save(tmp_path / "g.png")
    image = load_image(tmp_path / "g.png")
    assert image.grayscale and image.bit_depth == 8
    assert torch.equal(image.rgb[0], image.rgb[1]) and torch.equal(image.rgb[1], image.rgb[2])
    expected = np.asarray(source.convert("L"), dtype=np.float32) / 255
    assert np.array_equal(image.rgb[0].numpy(), expected)
    assert (image.alpha is not None) == (mode == "LA")


def test_palette_with_transparency_gets_alpha(tmp_path):
    indices = np.random.default_rng(5).integers(0, 4, size=(12, 16), dtype=np.uint8)
    palette = Image.fromarray(indices, "L").convert("P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9])
    palette.save(tmp_path / "p.png", transparency=3)
    image = load_image(tmp_path / "p.png")
    assert not image.grayscale and image.alpha is not None
    assert torch.equal(image.alpha[0] == 0, torch.from_numpy(indices == 3))
    assert torch.equal(image.rgb[:, indices == 1].T, torch.tensor([[0.0, 1.0, 0.0]]).expand(int((indices == 1).sum()), 3))


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    Image.fromarray(photo("astronaut", (40, 48))).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    image = load_image(tmp_path / "c.jpg")
    reference = np.asarray(Image.open(tmp_path / "c.jpg").convert("RGB"), dtype=np.float32) / 255
    assert np.array_equal(image.rgb.permute(1, 2, 0).numpy(), reference)
    assert "icc_profile" not in image.metadata  # a CMYK profile must not be attached to RGB pixels


def test_rgba_to_a_format_without_alpha_switches_to_png(tmp_path):
    assert plan_output(tmp_path / "a.jpg", alpha=True, bit_depth=8) == (
        tmp_path / "a.png",
        ["a.jpg: .jpg cannot store transparency, writing a.png instead"],
    )
    assert plan_output(tmp_path / "a.webp", alpha=True, bit_depth=8) == (tmp_path / "a.webp", [])
    path, warnings = plan_output(tmp_path / "a.jpg", alpha=False, bit_depth=16)
    assert path == tmp_path / "a.jpg" and warnings == ["a.jpg: .jpg stores 8 bits per sample, the 16-bit input is reduced to 8 bits"]
    assert plan_output(tmp_path / "a.tif", alpha=False, bit_depth=16, metadata=True)[1] == [
        "a.tif: 16-bit colour TIFF is written without the ICC profile, EXIF and XMP"
    ]
    assert plan_output(tmp_path / "a.tif", alpha=False, bit_depth=16, grayscale=True, metadata=True)[1] == []


def test_bleed_gives_hidden_pixels_the_nearest_visible_colour():
    rng = np.random.default_rng(6)
    rgb = torch.from_numpy(rng.random((3, 13, 17)).astype(np.float32))
    alpha = torch.from_numpy((rng.random((1, 13, 17)) > 0.8).astype(np.float32) * rng.random((1, 13, 17)).astype(np.float32))
    bled = bleed_transparent(rgb, alpha)
    visible = np.argwhere(alpha[0].numpy() > 0)
    assert torch.equal(bled[:, alpha[0] > 0], rgb[:, alpha[0] > 0])  # visible pixels untouched
    for y, x in np.argwhere(alpha[0].numpy() == 0):  # brute force: one of the equally nearest colours
        distances = ((visible - [y, x]) ** 2).sum(axis=1)
        nearest = visible[distances == distances.min()]
        assert any(torch.equal(bled[:, y, x], rgb[:, ny, nx]) for ny, nx in nearest)


# --- orientation and metadata ------------------------------------------------------------------


def test_exif_orientation_is_applied_on_8bit_and_16bit_paths(tmp_path):
    rgb8 = photo("astronaut", (20, 30))
    Image.fromarray(rgb8).save(tmp_path / "o8.png", exif=_exif(6))
    rgb16 = _u16((20, 30, 3), seed=7)
    (tmp_path / "o16.png").write_bytes(encode_png16(rgb16, {"exif": _exif(6).tobytes()}))
    upright8 = np.asarray(Image.fromarray(rgb8).transpose(Image.Transpose.ROTATE_270))  # Pillow's own rule for 6
    assert probe_image(tmp_path / "o8.png").width == 20
    assert np.array_equal((load_image(tmp_path / "o8.png").rgb * 255).round().byte().permute(1, 2, 0).numpy(), upright8)
    loaded16 = (load_image(tmp_path / "o16.png").rgb * 65535).round().permute(1, 2, 0).numpy().astype(np.uint16)
    assert np.array_equal(loaded16, np.rot90(rgb16, k=-1))  # 6: rotate 90 degrees clockwise


@pytest.mark.parametrize("suffix, depth", [(".png", 8), (".jpg", 8), (".webp", 8), (".tif", 8), (".png", 16), (".tif", 16)])
def test_metadata_is_copied_with_orientation_reset(tmp_path, suffix, depth):
    Image.fromarray(photo("chelsea", (24, 32))).save(tmp_path / "src.jpg", exif=_exif(6), icc_profile=SRGB, xmp=XMP)
    image = load_image(tmp_path / "src.jpg")
    assert set(image.metadata) == {"icc_profile", "exif", "xmp"}
    if depth == 16 and suffix == ".tif":  # gray only: Pillow writes 16-bit grayscale TIFF with tags
        save_image(tmp_path / f"out{suffix}", image.rgb, metadata=image.metadata, bit_depth=16, grayscale=True)
    else:
        save_image(tmp_path / f"out{suffix}", image.rgb, metadata=image.metadata, bit_depth=depth)
    out = Image.open(tmp_path / f"out{suffix}")
    assert out.info.get("icc_profile") == SRGB
    exif = out.getexif()
    assert exif.get(0x010F) == "tinysr-test" and exif.get(0x0112) == 1
    xmp = out.info.get("xmp")
    xmp = xmp.encode() if isinstance(xmp, str) else xmp
    assert b'dc:creator="tinysr-test"' in xmp and b'tiff:Orientation="1"' in xmp
    assert np.asarray(out).shape[:2] == (32, 24)  # upright: the stored orientation is 1


# --- formats --------------------------------------------------------------------------------------


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow build has no AVIF support")
def test_avif_round_trip(tmp_path):
    Image.fromarray(photo("coffee", (32, 40))).save(tmp_path / "a.avif", quality=90)
    image = load_image(tmp_path / "a.avif")
    save_image(tmp_path / "b.avif", image.rgb, quality=90)
    assert Image.open(tmp_path / "b.avif").size == (40, 32)


def test_heic_through_pillow_heif(tmp_path):
    pytest.importorskip("pillow_heif", reason="pillow-heif (the 'heif' extra) is not installed")
    Image.fromarray(photo("coffee", (32, 40))).save(tmp_path / "a.heic", quality=90)
    image = load_image(tmp_path / "a.heic")
    assert image.size == (32, 40) and ".heic" in images.IMAGE_SUFFIXES
    reference = np.asarray(Image.open(tmp_path / "a.heic").convert("RGB"), dtype=np.float32) / 255
    assert np.array_equal(image.rgb.permute(1, 2, 0).numpy(), reference)
    save_image(tmp_path / "b.heic", image.rgb, quality=90)
    assert Image.open(tmp_path / "b.heic").size == (40, 32)


@pytest.mark.parametrize("suffix, loop", [(".gif", 0), (".gif", None), (".webp", 3), (".png", 0)])
def test_animation_round_trip_keeps_frames_durations_and_loop(tmp_path, suffix, loop):
    frames = [photo(name, (24, 30)) for name in ("astronaut", "coffee", "chelsea")]
    options = {"loop": loop} if loop is not None else {}
    Image.fromarray(frames[0]).save(
        tmp_path / f"a{suffix}", save_all=True, append_images=[Image.fromarray(f) for f in frames[1:]], duration=[100, 200, 150], **options
    )
    animation = load_animation(tmp_path / f"a{suffix}")
    assert len(animation.frames) == 3 and animation.durations == [100, 200, 150] and animation.loop == loop
    canvases = [np.asarray(Image.fromarray(f).resize((60, 48))) for f in frames]
    save_animation(tmp_path / f"b{suffix}", canvases, animation.durations, animation.loop)
    out = Image.open(tmp_path / f"b{suffix}")
    assert out.n_frames == 3 and out.size == (60, 48) and out.info.get("loop") == loop
    durations = []
    for index in range(3):
        out.seek(index)
        out.load()
        durations.append(int(out.info["duration"]))
    assert durations == [100, 200, 150]


def test_animated_transparency_is_kept(tmp_path):
    rgba = [np.dstack([photo("astronaut", (20, 20)), np.where(np.arange(20) < i * 5, 0, 255).astype(np.uint8)[None].repeat(20, 0)]) for i in (1, 2)]
    Image.fromarray(rgba[0]).save(tmp_path / "t.png", save_all=True, append_images=[Image.fromarray(rgba[1])], duration=[50, 60])
    animation = load_animation(tmp_path / "t.png")
    assert [f.alpha is not None for f in animation.frames] == [True, True]
    assert torch.equal(animation.frames[1].alpha[0, 0] == 0, torch.arange(20) < 10)


def test_png_pixel_chunks_keep_the_pixels_and_drop_the_metadata():
    samples = (photo("coffee", (20, 28)).astype(np.uint16) * 257)
    metadata = {"icc_profile": b"\x00" * 300, "exif": b"Exif\x00\x00II*\x00", "xmp": b"<x/>"}
    full = encode_png16(samples, metadata)
    pixels_only = png_pixel_chunks(full)
    assert len(pixels_only) < len(full) and b"iCCP" not in pixels_only and b"eXIf" not in pixels_only
    decoded = cv2.imdecode(np.frombuffer(pixels_only, np.uint8), cv2.IMREAD_UNCHANGED)[..., ::-1]
    assert np.array_equal(decoded, samples)
    assert png_pixel_chunks(full + b"trailing") == pixels_only  # bytes after IEND are not pixels
    assert png_pixel_chunks(full[:40]) == full[:40]  # truncated: handed on unchanged, OpenCV words the error
