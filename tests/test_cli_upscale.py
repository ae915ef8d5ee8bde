"""`tinysr upscale` end to end: files, folders, recursion, resuming, bad files, exit codes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cli_helpers import run_cli, tree_digest
from conftest import photo


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(photo("astronaut", (131, 150))).save(folder / "a.png")
    Image.fromarray(photo("coffee", (100, 90))).save(folder / "sub" / "b.jpg", quality=90)
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return folder


def test_single_file_to_file_is_exactly_4x(tmp_path, inputs, tiny_weights):
    out = tmp_path / "out.png"
    result = run_cli("upscale", inputs / "a.png", "-o", out, "--model", tiny_weights)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert Image.open(out).size == (600, 524)
    assert "1 upscaled, 0 skipped, 0 failed" in result.stderr


def test_folder_recursive_mirrors_the_tree_and_reports_the_bad_file(tmp_path, inputs, tiny_weights):
    before = tree_digest(inputs)
    out = tmp_path / "out"
    result = run_cli("upscale", inputs, "-o", out, "--recursive", "--model", tiny_weights)
    assert result.returncode == 1  # one input failed
    assert "broken.png: cannot read image" in result.stderr or "broken.png: not an image file" in result.stderr
    assert "skipped " + str(inputs / "notes.txt") + ": not an image" in result.stderr
    assert "2 upscaled, 0 skipped, 1 failed" in result.stderr
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == ["a.png", "sub/b.jpg"]
    assert Image.open(out / "sub" / "b.jpg").size == (360, 400)
    assert tree_digest(inputs) == before  # inputs untouched
    assert not [p for p in out.rglob(".*")]  # no temporary files left

    # A re-run skips what exists (resume) and touches nothing.
    outputs = tree_digest(out)
    again = run_cli("upscale", inputs, "-o", out, "--recursive", "--model", tiny_weights)
    assert again.returncode == 1
    assert "0 upscaled, 2 skipped, 1 failed" in again.stderr
    assert tree_digest(out) == outputs


def test_non_recursive_folder_and_default_names_beside_input(inputs, tiny_weights):
    result = run_cli("upscale", inputs / "sub" / "b.jpg", "--model", tiny_weights, "--scale", "2", "--format", "png")
    assert result.returncode == 0, result.stderr
    out = inputs / "sub" / "b_x2.png"  # named by the scale it has
    assert Image.open(out).size == (180, 200)  # --scale 2 resamples the 4x result


def test_width_keeps_aspect_and_overwrite(tmp_path, inputs, tiny_weights):
    out = tmp_path / "w.png"
    assert run_cli("upscale", inputs / "a.png", "-o", out, "--model", tiny_weights, "--width", "300").returncode == 0
    assert Image.open(out).size == (300, 262)
    skipped = run_cli("upscale", inputs / "a.png", "-o", out, "--model", tiny_weights)
    assert "exists (use --overwrite)" in skipped.stderr and Image.open(out).size == (300, 262)
    replaced = run_cli("upscale", inputs / "a.png", "-o", out, "--model", tiny_weights, "--overwrite")
    assert replaced.returncode == 0 and Image.open(out).size == (600, 524)


def test_rgba_keeps_alpha(tmp_path, tiny_weights):
    rgba = np.dstack([photo("astronaut", (128, 140)), np.tile(np.linspace(0, 255, 140, dtype=np.uint8), (128, 1))])
    src = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(src)
    out = tmp_path / "rgba_out.png"
    result = run_cli("upscale", src, "-o", out, "--model", tiny_weights)
    assert result.returncode == 0, result.stderr
    img = Image.open(out)
    assert img.mode == "RGBA" and img.size == (560, 512)
    alpha = np.asarray(img)[..., 3].astype(int)
    assert abs(alpha[:, 0].mean() - 0) <= 2 and abs(alpha[:, -1].mean() - 255) <= 2


def test_clear_errors(tmp_path, inputs, tiny_weights):
    missing = run_cli("upscale", tmp_path / "nope.png", "--model", tiny_weights)
    assert missing.returncode == 1 and "nope.png: no such file or folder" in missing.stderr
    assert "Traceback" not in missing.stderr
    no_model = run_cli("upscale", inputs / "a.png", "-o", tmp_path / "x.png", "--model", tmp_path / "absent.safetensors")
    assert no_model.returncode == 1 and "absent.safetensors: no such file" in no_model.stderr
    same = run_cli("upscale", inputs / "a.png", "-o", inputs / "a.png", "--model", tiny_weights, "--overwrite")
    assert same.returncode == 1 and "the output path is the input file" in same.stderr
    fp16 = run_cli("upscale", inputs / "a.png", "-o", tmp_path / "y.png", "--model", tiny_weights, "--device", "cpu", "--precision", "fp16")
    assert fp16.returncode == 1 and "fp16 is not supported on the CPU" in fp16.stderr
    assert not (tmp_path / "y.png").exists()


def test_deterministic_files(tmp_path, inputs, tiny_weights):
    a, b = tmp_path / "1.png", tmp_path / "2.png"
    run_cli("upscale", inputs / "a.png", "-o", a, "--model", tiny_weights)
    run_cli("upscale", inputs / "a.png", "-o", b, "--model", tiny_weights)
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_version_and_help():
    assert run_cli("--version").stdout.startswith("tinysr ")
    assert "upscale" in run_cli("-h").stdout
