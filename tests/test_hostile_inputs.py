"""Every kind of image a user throws at `tinysr upscale`, through the real CLI.

One batch runs a corpus of 40 inputs written by Pillow and OpenCV (plus hand-made hostile ones): the
exit code, one error line per bad file, the outputs' sizes, modes and bit depths, inputs unchanged
byte for byte, and no temporary or partial file left. Further runs cover format switches, metadata
stripping, resuming, interruption by SIGINT/SIGKILL and unusable output folders.
"""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageCms, features

from cli_helpers import file_modes_prefix, read_only_folder, run_cli, tree_digest
from conftest import photo

SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
XMP = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description tiff:Orientation="6" dc:creator="corpus"/></rdf:RDF></x:xmpmeta>'
UNICODE_NAME = "фото с пробелом ✓.png"
MAX_PIXELS = 500_000_000


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_zero_png(path: Path, width: int, height: int) -> None:
    """A valid 1-bit grayscale PNG of zeros, compressed row by row: huge image, tiny file."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed pixels
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b""))


def _save_animation(path: Path, loop: int | None) -> None:
    frames = [Image.fromarray(photo(name, (36, 44))) for name in ("astronaut", "coffee", "chelsea")]
    options = {} if loop is None else {"loop": loop}
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=[100, 200, 150], **options)


def _exif6() -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "corpus"
    return exif


def build_corpus(folder: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """Write the corpus. Returns ({input name: expectations for its output}, {input name: error text})."""
    (folder / "sub").mkdir(parents=True)
    rgb = photo("astronaut", (30, 40))
    u16 = np.random.default_rng(0).integers(0, 65536, size=(30, 40, 4), dtype=np.uint16)
    gray = photo("camera", (30, 40))[..., 0]
    ok: dict[str, dict] = {}

    def image(name: str, pil: Image.Image, size=(40, 30), **save) -> None:
        pil.save(folder / name, **save)
        ok[name] = {"size": (size[0] * 4, size[1] * 4)}

    image("photo.png", Image.fromarray(rgb))
    image("photo.jpg", Image.fromarray(rgb), quality=90)
    image("photo.webp", Image.fromarray(rgb), quality=90)
    image("photo.bmp", Image.fromarray(rgb))
    image("photo.tif", Image.fromarray(rgb), compression="tiff_lzw")
    if features.check("avif"):
        image("photo.avif", Image.fromarray(rgb), quality=90)
    image("sub/nested.png", Image.fromarray(rgb))
    image(UNICODE_NAME, Image.fromarray(rgb))
    Image.fromarray(rgb).save(folder / "png_named.jpg", format="PNG")  # content sniffed, not the name
    ok["png_named.jpg"] = {"size": (160, 120)}
    image("one_pixel.png", Image.fromarray(rgb[:1, :1]), size=(1, 1))

    # Alpha: a red disc on fully transparent green, and a constant half transparency.
    yy, xx = np.mgrid[:40, :40]
    disc = np.hypot(yy - 19.5, xx - 19.5) < 12
    fringe = np.zeros((40, 40, 4), np.uint8)
    fringe[..., 1] = 255  # green hidden under alpha = 0
    fringe[disc] = (220, 30, 30, 255)
    image("fringe.png", Image.fromarray(fringe), size=(40, 40))
    ok["fringe.png"]["mode"] = "RGBA"
    image("half_alpha.png", Image.fromarray(np.dstack([rgb, np.full((30, 40), 128, np.uint8)])))
    ok["half_alpha.png"]["mode"] = "RGBA"
    image("alpha.webp", Image.fromarray(np.dstack([rgb, np.tile(np.linspace(0, 255, 40).astype(np.uint8), (30, 1))])), lossless=True)
    ok["alpha.webp"]["mode"] = "RGBA"

    # 16-bit through OpenCV (BGR order), and 16-bit grayscale through Pillow.
    for name, array in [("rgb16.png", u16[..., :3]), ("rgba16.png", u16), ("rgb16.tif", u16[..., :3])]:
        cv2.imwrite(str(folder / name), array)
        ok[name] = {"size": (160, 120), "depth": 16}
    cv2.imwrite(str(folder / "глубокий 16 bit ✓.png"), u16[..., :3])  # the OpenCV decoding path, unicode name
    ok["глубокий 16 bit ✓.png"] = {"size": (160, 120), "depth": 16}
    image("gray16.png", Image.fromarray(u16[..., 0]))
    image("gray16.tif", Image.fromarray(u16[..., 0]))
    ok["gray16.png"]["mode"] = ok["gray16.tif"]["mode"] = "I;16"

    # Grayscale, palette, CMYK, 1-bit.
    image("gray.png", Image.fromarray(gray))
    ok["gray.png"]["mode"] = "L"
    image("gray_alpha.png", Image.fromarray(np.dstack([gray, gray[::-1]])))
    ok["gray_alpha.png"]["mode"] = "LA"
    palette = Image.fromarray(rgb).quantize(16)
    image("palette.png", palette, transparency=0)
    ok["palette.png"]["mode"] = "RGBA"
    image("palette.gif", palette, transparency=0)
    image("cmyk.jpg", Image.fromarray(rgb).convert("CMYK"), quality=90)
    ok["cmyk.jpg"]["mode"] = "RGB"
    image("bilevel.png", Image.fromarray(gray).convert("1"))
    image("bilevel.tif", Image.fromarray(gray).convert("1"), compression="group4")
    ok["bilevel.png"]["mode"] = ok["bilevel.tif"]["mode"] = "L"
    floats = (gray.astype(np.float32) / 255)
    image("float.tif", Image.fromarray(floats))
    ok["float.tif"]["mode"] = "F"

    # EXIF orientation 6 with an ICC profile and XMP: upright output, metadata kept, orientation 1.
    image("oriented.jpg", Image.fromarray(rgb), size=(30, 40), exif=_exif6(), icc_profile=SRGB, xmp=XMP, quality=90)
    ok["oriented.jpg"]["metadata"] = True

    # Animations: durations and loop kept.
    for name, loop in [("anim.gif", 0), ("anim.webp", 2), ("anim.png", 0)]:
        _save_animation(folder / name, loop)
        ok[name] = {"size": (176, 144), "frames": 3, "loop": loop}

    # Hostile files.
    failing = {}
    (folder / "empty.png").write_bytes(b"")
    failing["empty.png"] = "empty file (0 bytes)"
    Image.fromarray(rgb).save(folder / "whole.png")
    data = (folder / "whole.png").read_bytes()
    (folder / "whole.png").unlink()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    failing["truncated.png"] = "cannot read image, truncated or corrupt data"
    Image.fromarray(rgb).save(folder / "whole.jpg", quality=90)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "whole.jpg").unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    failing["truncated.jpg"] = "cannot read image, truncated or corrupt data"
    (folder / "text.png").write_text("this is a text file, not a picture\n")
    failing["text.png"] = "not an image file"
    write_zero_png(folder / "bomb.png", 30000, 30000)
    failing["bomb.png"] = "30000x30000 is 900.0 megapixels, over the limit of 500.0 (a guard against decompression bombs)"
    write_zero_png(folder / "huge.png", 20000, 20000)
    failing["huge.png"] = "20000x20000 needs about"
    Image.fromarray(floats * 3 - 1).save(folder / "hdr.tif")
    failing["hdr.tif"] = "floating-point samples outside [0, 1]"
    cv2.imwrite(str(folder / "rgbfloat.tif"), np.dstack([floats] * 3))
    failing["rgbfloat.tif"] = "floating-point colour TIFF is not supported"
    if file_modes_prefix()[0] is not None:  # root runs the CLI without its file-mode override
        Image.fromarray(rgb).save(folder / "unreadable.png")
        (folder / "unreadable.png").chmod(0)
        failing["unreadable.png"] = "permission denied"
    (folder / "notes.txt").write_text("skipped with a note")
    return ok, failing


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_weights):
    root = tmp_path_factory.mktemp("corpus")
    inputs, out = root / "in", root / "out"
    ok, failing = build_corpus(inputs)
    fifo = root / "pipe.png"
    os.mkfifo(fifo)  # opening it would block forever: it must be refused before that
    before = tree_digest(inputs)
    result = run_cli(
        "upscale", inputs, fifo, "-o", out, "--recursive", "--max-pixels", MAX_PIXELS, "--model", tiny_weights,
        prefix=file_modes_prefix()[0] or (),
    )
    return {"root": root, "inputs": inputs, "out": out, "ok": ok, "failing": failing, "fifo": fifo, "before": before, "result": result}


def test_corpus_is_large_enough(corpus):
    assert len(corpus["ok"]) + len(corpus["failing"]) + 1 >= 30  # + the FIFO


def test_corpus_has_the_unreadable_file(corpus):
    """As root (CI) the corpus runs the CLI without CAP_DAC_OVERRIDE, so mode 0 is refused there too
    (its message is checked with the others below)."""
    prefix, reason = file_modes_prefix()
    if prefix is None:
        pytest.skip(f"cannot test an unreadable input: {reason}")
    assert corpus["failing"]["unreadable.png"] == "permission denied"


def test_corpus_exit_code_messages_and_summary(corpus):
    result, inputs = corpus["result"], corpus["inputs"]
    assert result.returncode == 1  # some inputs failed, the others were done
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    expected = {str(inputs / name): text for name, text in corpus["failing"].items()}
    expected[str(corpus["fifo"])] = "not a regular file (a pipe, socket or device)"
    assert len(errors) == len(expected)
    for path, text in expected.items():
        assert any(line.startswith(f"Error: {path}: ") and text in line for line in errors), (path, text, errors)
    assert f"{len(corpus['ok'])} upscaled, 0 skipped, {len(expected)} failed" in result.stderr
    assert f"skipped {inputs / 'notes.txt'}: not an image" in result.stderr


def test_corpus_memory_refusal_says_how_much(corpus):
    line = next(line for line in corpus["result"].stderr.splitlines() if "huge.png" in line and line.startswith("Error:"))
    assert "needs about 614.4 GB of memory to upscale" in line and "GB is available" in line


def test_corpus_outputs_have_exact_sizes_modes_and_depths(corpus):
    out = corpus["out"]
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted(corpus["ok"])
    assert sorted(corpus["result"].stdout.splitlines()) == sorted(str(out / name) for name in corpus["ok"])
    for name, expect in corpus["ok"].items():
        with Image.open(out / name) as image:
            assert image.size == expect["size"], name
            if "mode" in expect:
                assert image.mode == expect["mode"], name
            if "frames" in expect:
                durations = []
                for index in range(image.n_frames):
                    image.seek(index)
                    image.load()
                    durations.append(int(image.info["duration"]))
                assert image.n_frames == 3 and durations == [100, 200, 150], name
                assert image.info.get("loop") == expect["loop"], name
        if "depth" in expect:
            assert cv2.imread(str(out / name), cv2.IMREAD_UNCHANGED).dtype == np.uint16, name


def test_corpus_pixels_alpha_and_metadata(corpus):
    out = corpus["out"]
    # No fringe: where the output is visible, green stays near the disc's 30 (the hidden green was 255).
    fringe = np.asarray(Image.open(out / "fringe.png")).astype(int)
    visible = fringe[..., 3] > 0
    assert visible.any() and fringe[..., 1][visible].max() < 80
    assert (fringe[..., 3][~visible] == 0).all()
    # Constant alpha is refilled, not resampled.
    assert (np.asarray(Image.open(out / "half_alpha.png"))[..., 3] == 128).all()
    # The one-pixel image is exactly 4x4 with the pixel's colour (a flat image stays flat).
    one = np.asarray(Image.open(out / "one_pixel.png")).astype(int)
    assert np.abs(one - photo("astronaut", (1, 1))[0, 0]).max() <= 2
    # Metadata: ICC, EXIF (orientation 1) and XMP copied; the pixels upright (160 wide, 120 tall -> 120x160).
    oriented = Image.open(out / "oriented.jpg")
    assert oriented.info["icc_profile"] == SRGB
    assert oriented.getexif()[0x0112] == 1 and oriented.getexif()[0x010F] == "corpus"
    assert b'tiff:Orientation="1"' in oriented.info["xmp"] and b'dc:creator="corpus"' in oriented.info["xmp"]
    # Grayscale output is grayscale; the palette GIF keeps its transparency.
    assert Image.open(out / "palette.gif").info.get("transparency") is not None


def test_corpus_inputs_unchanged_and_nothing_partial_left(corpus):
    assert tree_digest(corpus["inputs"]) == corpus["before"]
    leftovers = [p for p in corpus["root"].rglob("*") if p.name.startswith(".") or p.name.endswith(".part")]
    assert leftovers == []


def test_format_switches_strip_metadata_and_resume(tmp_path, tiny_weights):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    rgb = photo("coffee", (30, 40))
    Image.fromarray(np.dstack([rgb, np.tile(np.linspace(0, 255, 40).astype(np.uint8), (30, 1))])).save(inputs / "rgba.png")
    Image.fromarray(rgb).save(inputs / "meta.jpg", exif=_exif6(), icc_profile=SRGB, xmp=XMP)
    cv2.imwrite(str(inputs / "deep.png"), np.random.default_rng(1).integers(0, 65536, (30, 40, 3), dtype=np.uint16))
    _save_animation(inputs / "anim.gif", None)
    before = tree_digest(inputs)
    result = run_cli("upscale", inputs, "-o", out, "--format", "jpg", "--strip-metadata", "--model", tiny_weights)
    assert result.returncode == 0, result.stderr
    assert "Warning: rgba.jpg: .jpg cannot store transparency, writing rgba.png instead" in result.stderr
    assert "Warning: deep.jpg: .jpg stores 8 bits per sample, the 16-bit input is reduced to 8 bits" in result.stderr
    assert "Warning: anim.jpg: .jpg cannot store an animation, writing anim.png (APNG) instead" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["anim.png", "deep.jpg", "meta.jpg", "rgba.png"]
    assert Image.open(out / "rgba.png").mode == "RGBA"
    apng = Image.open(out / "anim.png")
    assert apng.n_frames == 3 and apng.info.get("loop") == 1  # a GIF without a loop plays once
    meta = Image.open(out / "meta.jpg")
    assert "icc_profile" not in meta.info and "xmp" not in meta.info and len(meta.getexif()) == 0
    assert meta.size == (120, 160)  # orientation still applied to the pixels
    # A re-run resumes: the switched names count as existing outputs too.
    outputs = tree_digest(out)
    again = run_cli("upscale", inputs, "-o", out, "--format", "jpg", "--model", tiny_weights)
    assert again.returncode == 0 and "0 upscaled, 4 skipped, 0 failed" in again.stderr
    assert tree_digest(out) == outputs and tree_digest(inputs) == before
    # --overwrite replaces outputs only, never an input: rgba.png -> .jpg -> .png beside itself is refused.
    same = run_cli("upscale", inputs / "rgba.png", "--suffix", "", "--format", "jpg", "--overwrite", "--model", tiny_weights)
    assert same.returncode == 1 and "the output path is the input file (after switching to .png)" in same.stderr
    assert tree_digest(inputs) == before


def test_max_pixels_default_refuses_a_bomb_and_the_flag_raises_it(tmp_path, tiny_weights):
    write_zero_png(tmp_path / "big.png", 10000, 9000)  # 90 megapixels: just over Pillow's 89.5
    refused = run_cli("upscale", tmp_path / "big.png", "-o", tmp_path / "o.png", "--model", tiny_weights)
    assert refused.returncode == 1
    assert f"Error: {tmp_path / 'big.png'}: 10000x9000 is 90.0 megapixels, over the limit of 89.5" in refused.stderr
    assert "Hint: raise the limit with --max-pixels" in refused.stderr
    raised = run_cli("upscale", tmp_path / "big.png", "-o", tmp_path / "o.png", "--max-pixels", "100000000", "--model", tiny_weights)
    assert "needs about" in raised.stderr and "megapixels" not in raised.stderr  # past the guard, refused for memory
    assert not (tmp_path / "o.png").exists()


def test_unusable_output_folders(tmp_path, tiny_weights):
    Image.fromarray(photo("astronaut", (30, 40))).save(tmp_path / "a.png")
    (tmp_path / "blocker").write_text("a file where a folder should be")
    result = run_cli("upscale", tmp_path / "a.png", "-o", tmp_path / "blocker" / "out" / "a.png", "--model", tiny_weights)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"Error: {tmp_path / 'blocker' / 'out' / 'a.png'}: cannot create the output folder" in result.stderr
    # A missing output folder (several levels) is created.
    nested = tmp_path / "new" / "deeper" / "a.png"
    assert run_cli("upscale", tmp_path / "a.png", "-o", nested, "--model", tiny_weights).returncode == 0
    assert Image.open(nested).size == (160, 120)


def test_read_only_output_folder(tmp_path, tiny_weights):
    Image.fromarray(photo("astronaut", (30, 40))).save(tmp_path / "a.png")
    locked = tmp_path / "locked"
    locked.mkdir()
    with read_only_folder(locked) as how:  # as root (CI): a read-only bind mount or chattr +i
        if how is None:
            pytest.skip("running as root, and neither a read-only bind mount nor chattr +i is possible here")
        result = run_cli("upscale", tmp_path / "a.png", "-o", locked / "a.png", "--model", tiny_weights)
        assert result.returncode == 1 and f"Error: {locked / 'a.png'}: cannot write" in result.stderr, (how, result.stderr)
        assert list(locked.iterdir()) == []


def _interrupted_batch(tmp_path: Path, tiny_weights: Path, sig: int) -> tuple[Path, Path, int, int, str]:
    """Start a batch of 4 images, send ``sig`` while it is held after its second output, wait for the exit.

    No timing: the batch's stdout is a pipe the test fills until only the first result line fits,
    so the batch blocks writing its second line (two files complete) until the test reads.
    """
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for index, name in enumerate(["astronaut", "coffee", "chelsea", "rocket"]):
        Image.fromarray(photo(name, (128, 128 + index))).save(inputs / f"{index}.png")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    read_end, write_end = os.pipe()
    capacity = fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ)
    first_line = f"{out / '0.png'}\n".encode()
    filler = b"#" * (capacity - len(first_line) - 1) + b"\n"
    os.write(write_end, filler)
    process = subprocess.Popen(
        [sys.executable, "-m", "tinysr_cli", "upscale", str(inputs), "-o", str(out), "--model", str(tiny_weights)],
        stdout=write_end, stderr=subprocess.PIPE, text=True, env=env,
        # A test runner started in the background of a non-interactive shell inherits SIGINT ignored,
        # and so would the batch (as POSIX wants for background jobs): give it the terminal default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    os.close(write_end)
    while not (out / "1.png").exists() and process.poll() is None:  # a wait for an event, not a timed assertion
        time.sleep(0.05)
    process.send_signal(sig)
    with os.fdopen(read_end, "rb") as reader:  # unblocks the batch's pending write
        stdout = reader.read()[len(filler):].decode()
    _, stderr = process.communicate(timeout=600)
    assert stdout.splitlines()[0] == str(out / "0.png")
    return inputs, out, process.returncode, len([p for p in out.iterdir() if not p.name.startswith(".")]), stderr


def _assert_complete_outputs(out: Path) -> None:
    for path in out.iterdir():
        if path.name.startswith("."):
            continue
        with Image.open(path) as image:
            image.load()  # a truncated file would fail here
            assert image.size == (4 * (128 + int(path.stem)), 512)


@pytest.mark.parametrize(
    "sig, code",
    [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGKILL, -signal.SIGKILL)],
)
def test_interrupted_batch_leaves_only_complete_files_and_resumes(tmp_path, tiny_weights, sig, code):
    inputs, out, returncode, done, stderr = _interrupted_batch(tmp_path, tiny_weights, sig)
    before = tree_digest(inputs)
    assert returncode == code, stderr
    assert done == 2
    _assert_complete_outputs(out)
    if sig != signal.SIGKILL:  # a clean interrupt removes its temporary file and says how far it got; a kill cannot
        assert [p for p in out.iterdir() if p.name.startswith(".")] == []
        assert "interrupted: 2 done, 2 left; run the same command to resume" in stderr
        assert "2 upscaled, 0 skipped, 0 failed" in stderr
    resumed = run_cli("upscale", inputs, "-o", out, "--model", tiny_weights)
    assert resumed.returncode == 0
    assert f"{4 - done} upscaled, {done} skipped, 0 failed" in resumed.stderr
    _assert_complete_outputs(out)
    assert sorted(p.name for p in out.iterdir()) == [f"{i}.png" for i in range(4)]  # no stale temporaries
    assert tree_digest(inputs) == before


def test_interrupted_video_with_keep_partial_says_where_the_part_is_and_a_rerun_removes_it(tmp_path, tiny_weights):
    av = pytest.importorskip("av")
    from test_video import make_clip

    source, out = tmp_path / "clip.mkv", tmp_path / "out"
    make_clip(source, frames=240, size=(32, 24), audio=None)
    out.mkdir()
    command = ["upscale", str(source), "-o", str(out / "clip_x4.mkv"), "--model", str(tiny_weights), "--keep-partial"]
    process = subprocess.Popen(
        [sys.executable, "-m", "tinysr_cli", *command],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # Interrupted once the encoder has written frames (an event, not a delay): the temporary file grows.
    while process.poll() is None and not any(p.name.startswith(".") and p.stat().st_size > 4096 for p in out.iterdir()):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=600)
    partial = out / "clip_x4.partial.mkv"
    assert process.returncode == 130, stderr
    assert f"kept the part written so far in {partial}" in stderr
    assert "interrupted: 0 done, 1 left; run the same command to resume" in stderr
    with av.open(str(partial)) as container:
        kept = sum(1 for _ in container.decode(video=0))
    assert 0 < kept < 240, kept
    resumed = run_cli(*command[:-2], "bicubic", "--keep-partial")  # any successful run of that video: a quick model
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(p.name for p in out.iterdir()) == ["clip_x4.mkv"]  # the old part is gone with the whole video here
