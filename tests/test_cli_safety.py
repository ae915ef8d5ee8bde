"""`tinysr upscale` never writes onto its inputs, never re-reads its own outputs, and shares folders safely."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cli_helpers import run_cli, tree_digest
from conftest import photo
from tinysr_cli.io.images import encode_png16


def _small(path, name="astronaut", size=(30, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo(name, size)).save(path)


def test_overwrite_never_replaces_another_input(tmp_path, tiny_weights):
    folder = tmp_path / "in"
    _small(folder / "a.jpg")
    _small(folder / "a.png", "coffee")
    before = tree_digest(folder)
    result = run_cli("upscale", folder, "--suffix", "", "--format", "png", "--overwrite", "--model", tiny_weights)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [
        f"Error: {folder / 'a.jpg'}: the output {folder / 'a.png'} is an input of this run",
        f"Error: {folder / 'a.png'}: the output path is the input file",
    ]
    assert "0 upscaled, 0 skipped, 2 failed" in result.stderr
    assert tree_digest(folder) == before


def test_format_switch_never_replaces_another_input(tmp_path, tiny_weights):
    """rgba.jpg would be written as rgba.png (JPEG holds no alpha): that name is another input."""
    folder = tmp_path / "in"
    folder.mkdir()
    rgba = np.dstack([photo("astronaut", (30, 40)), np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (30, 1))])
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.webp", lossless=True)
    _small(folder / "rgba.png")
    before = tree_digest(folder)
    same = run_cli("upscale", folder / "rgba.webp", folder / "rgba.png", "--suffix", "", "--format", "jpg", "--overwrite",
                   "--model", tiny_weights)
    assert same.returncode == 1
    assert f"Error: {folder / 'rgba.webp'}: the output {folder / 'rgba.png'} is an input of this run (after switching to .png)" in same.stderr
    assert tree_digest(folder) == before


def test_reruns_resume_instead_of_upscaling_their_own_outputs(tmp_path, tiny_weights):
    folder = tmp_path / "in"
    _small(folder / "a.png")
    first = run_cli("upscale", folder, "--model", tiny_weights)
    assert first.returncode == 0, first.stderr
    outputs = tree_digest(folder)
    again = run_cli("upscale", folder, "--model", tiny_weights)
    assert again.returncode == 0, again.stderr
    assert "0 upscaled, 1 skipped, 0 failed" in again.stderr
    assert f"skipped {folder / 'a_x4.png'}: named like an output of tinysr" in again.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", "a_x4.png"]
    assert tree_digest(folder) == outputs
    # Named explicitly, an output is an input like any other.
    named = run_cli("upscale", folder / "a_x4.png", "--model", tiny_weights)
    assert named.returncode == 0 and Image.open(folder / "a_x4_x4.png").size == (640, 480)


def test_output_folder_inside_the_input_folder_is_not_scanned(tmp_path, tiny_weights):
    folder = tmp_path / "in"
    _small(folder / "a.png")
    for _ in range(2):
        result = run_cli("upscale", folder, "-r", "-o", folder / "up", "--model", tiny_weights)
        assert result.returncode == 0, result.stderr
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == ["a.png", "up", "up/a.png"]
    assert "0 upscaled, 1 skipped, 0 failed" in result.stderr
    # The same through a pattern.
    pattern = run_cli("upscale", f"{folder}/**/*.png", "-o", folder / "up", "--model", tiny_weights)
    assert pattern.returncode == 0 and "0 upscaled, 1 skipped, 0 failed" in pattern.stderr


def test_scaled_outputs_are_named_by_their_scale(tmp_path, tiny_weights):
    _small(tmp_path / "a.png")
    assert run_cli("upscale", tmp_path / "a.png", "-s", "2", "--model", tiny_weights).returncode == 0
    assert run_cli("upscale", tmp_path / "a.png", "--width", "100", "--model", tiny_weights).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a_w100.png", "a_x2.png"]
    assert Image.open(tmp_path / "a_x2.png").size == (80, 60)


def test_temporaries_of_a_live_run_are_left_alone_and_a_dead_runs_removed(tmp_path, tiny_weights):
    _small(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    live = out / f".tinysr-{os.getppid()}-0123abcd.part"  # pytest's parent: alive while this test runs
    live.write_bytes(b"another run's work in progress")
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = out / f".tinysr-{int(ended.stdout)}-0123abcd.part"
    dead.write_bytes(b"left by a killed run")
    result = run_cli("upscale", tmp_path / "a.png", "-o", out, "--model", tiny_weights)
    assert result.returncode == 0, result.stderr
    assert live.read_bytes() == b"another run's work in progress"
    assert not dead.exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(["a.png", live.name])


def test_a_255_byte_output_name_is_writable(tmp_path, tiny_weights):
    name = "n" * 251 + ".png"  # 255 bytes: NAME_MAX on Linux
    _small(tmp_path / "in" / name)
    result = run_cli("upscale", tmp_path / "in" / name, "-o", tmp_path / "out", "--model", tiny_weights)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == [name]


EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 40 30
newpath 0 0 moveto 40 30 lineto stroke
showpage
%%EOF
"""


def test_postscript_named_png_is_refused_without_running_ghostscript(tmp_path, tiny_weights):
    """Pillow hands EPS to Ghostscript; tinysr decodes only the formats it lists and never runs a program."""
    bin_dir, marker = tmp_path / "bin", tmp_path / "ghostscript-ran"
    bin_dir.mkdir()
    fake_gs = bin_dir / "gs"
    fake_gs.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    fake_gs.chmod(0o755)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "drawing.png").write_bytes(EPS)
    _small(folder / "photo.png")
    result = run_cli("upscale", folder, "-o", tmp_path / "out", "--model", tiny_weights,
                     env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert result.returncode == 1
    assert f"Error: {folder / 'drawing.png'}: not an image file" in result.stderr
    assert "1 upscaled, 0 skipped, 1 failed" in result.stderr
    assert not marker.exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["photo.png"]


def test_nan_weights_in_the_vae_decoder_fail_the_item_instead_of_writing_black(tmp_path):
    import torch

    from tinysr_cli.weights.format import init_weights, save_weights

    model = init_weights("tiny", seed=0)
    with torch.no_grad():
        next(model.vae.decoder.parameters()).fill_(float("nan"))
    weights = save_weights(model, tmp_path / "nan.safetensors")
    _small(tmp_path / "a.png")
    result = run_cli("upscale", tmp_path / "a.png", "-o", tmp_path / "out.png", "--model", weights)
    assert result.returncode == 1
    assert f"Error: {tmp_path / 'a.png'}: the model's VAE decoder produced NaN/inf values even in fp32" in result.stderr
    assert not (tmp_path / "out.png").exists()


def test_missing_inputs_and_dangling_links_fail_alone(tmp_path, tiny_weights):
    folder = tmp_path / "in"
    _small(folder / "a.png")
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "loose.png").symlink_to(tmp_path / "nowhere.png")
    out = tmp_path / "out"
    result = run_cli("upscale", tmp_path / "missing.png", folder, f"{tmp_path}/loose*.png", "-o", out, "--model", tiny_weights)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [
        f"Error: {tmp_path / 'missing.png'}: no such file or folder",
        f"Error: {folder / 'gone.png'}: a link to a missing file",
        f"Error: {tmp_path / 'loose.png'}: a link to a missing file",
    ]
    assert "1 upscaled, 0 skipped, 3 failed" in result.stderr
    assert [p.name for p in out.iterdir()] == ["a.png"]


def test_empty_input_set_says_so(tmp_path, tiny_weights):
    (tmp_path / "empty").mkdir()
    result = run_cli("upscale", tmp_path / "empty", "--model", tiny_weights)
    assert result.returncode == 1
    assert result.stderr == "Error: nothing to upscale: no image or video among the inputs\n"
    assert result.stdout == ""


def test_options_are_checked_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """In process (the entry point and its error boundary, not a subprocess each: 12 cases)."""
    from tinysr_cli.cli.main import main

    def upscale(*args) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["tinysr", "upscale", *map(str, args)])
        with pytest.raises(SystemExit) as exit_:
            main()
        return exit_.value.code, capsys.readouterr().err

    _small(tmp_path / "a.png")
    _small(tmp_path / "b.png")
    absent = tmp_path / "absent.safetensors"  # never reached: the options are refused first
    cases = [
        (["-s", "-2"], "Error: --scale -2: must be above 0 and at most 16"),
        (["--scale", "0"], "Error: --scale 0: must be above 0 and at most 16"),
        (["--scale", "inf"], "Error: --scale inf: must be above 0 and at most 16"),
        (["--width", "-100"], "Error: --width -100: must be between 1 and 65535 pixels"),
        (["--width", "0"], "Error: --width 0: must be between 1 and 65535 pixels"),
        (["-t", "-1"], "Error: --tile -1: must be 0 (the model's own) or a positive number of latent pixels"),
        (["--tile", "16", "--tile-overlap", "16"], "Error: --tile-overlap 16: must be smaller than --tile 16"),
        (["-f", "gif"], "Error: --format gif: unknown output format"),
        (["-o", tmp_path / "x.png", "--format", "webp"], f"Error: -o {tmp_path / 'x.png'} and --format webp disagree"),
    ]
    for args, message in cases:
        code, err = upscale(tmp_path / "a.png", *args, "-m", absent)
        assert code == 1 and err.splitlines()[0] == message, (args, err)
    code, err = upscale(tmp_path / "a.png", tmp_path / "b.png", "-o", tmp_path / "out.png", "-m", absent)
    assert code == 1
    assert err.splitlines()[0] == f"Error: -o {tmp_path / 'out.png'}: names a file, but there are several inputs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]
    code, err = upscale(tmp_path / "a.png", "-t", "30", "-o", tmp_path / "t.png", "-m", absent)
    assert code == 1 and "absent.safetensors: no such" in err  # valid by itself; the model decides the rest


def test_thin_images_are_estimated_at_the_size_really_processed(tmp_path, tiny_weights):
    """Inputs under 128 px on the short side are enlarged first: a 20000 x 1 strip costs as much as 2560000 x 128."""
    from test_hostile_inputs import write_zero_png

    write_zero_png(tmp_path / "strip.png", 20000, 1)
    result = run_cli("upscale", tmp_path / "strip.png", "-o", tmp_path / "out.png", "--model", tiny_weights)
    assert result.returncode == 1
    assert (
        f"Error: {tmp_path / 'strip.png'}: 20000x1 needs about 503.3 GB of memory to upscale "
        "(its short side is under 128 px, so it is enlarged to 2560000x128 first)"
    ) in result.stderr
    assert not (tmp_path / "out.png").exists()


def test_library_noise_is_one_line_naming_the_file(tmp_path, tiny_weights):
    folder = tmp_path / "in"
    folder.mkdir()
    flat = np.zeros((30, 40, 3), np.uint8)
    Image.fromarray(flat).save(folder / "exif.jpg", exif=b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x05\x00\x0f\x01\x02\x00")
    Image.fromarray(flat).save(folder / "icc.png", icc_profile=bytes(range(256)) + b"x" * 44)
    (folder / "bad\nname.png").write_text("not a picture")
    # libpng (inside OpenCV, which decodes 16-bit files) and libtiff print from C, past Python's warnings
    deep = (photo("coffee", (24, 32)).astype(np.uint16) * 257)
    (folder / "icc16.png").write_bytes(encode_png16(deep, {"icc_profile": b"\x00" * 300}))
    (folder / "bad.tif").write_bytes(b"II*\x00\x08\x00\x00\x00" + b"\xff" * 200)
    out = tmp_path / "out"
    result = run_cli("upscale", folder, "-o", out, "--model", tiny_weights)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert f"Warning: {folder / 'exif.jpg'}: Corrupt EXIF data. Expecting to read 12 bytes but only got 4." in lines
    assert f"Warning: {folder / 'icc.png'}: its ICC profile (300 bytes) is damaged and is not copied to the output" in lines
    assert any(line.startswith(f"Error: {folder}/bad\\nname.png: not an image file") for line in lines), lines
    assert f"Warning: {folder / 'icc16.png'}: its ICC profile (300 bytes) is damaged and is not copied to the output" in lines
    assert any(line.startswith(f"Error: {folder / 'bad.tif'}: not an image file") for line in lines), lines
    assert "UserWarning" not in result.stderr and "warnings.warn" not in result.stderr
    assert "libpng" not in result.stderr and "TIFF" not in result.stderr, result.stderr
    assert "icc_profile" not in Image.open(out / "icc.png").info
    assert np.asarray(Image.open(out / "icc16.png")).shape[:2] == (96, 128)


def test_a_config_file_that_is_not_utf8_is_named(tmp_path, tiny_weights):
    config = tmp_path / "config" / "tinysr" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_bytes(b'model = "caf\xe9"\n')
    _small(tmp_path / "a.png")
    result = run_cli("upscale", tmp_path / "a.png", "-o", tmp_path / "o.png", env={"XDG_CONFIG_HOME": str(tmp_path / "config")})
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == f"Error: {config}: not UTF-8 text (byte 12), TOML files must be UTF-8"


def test_unreachable_hub_is_one_line(tmp_path):
    _small(tmp_path / "a.png")
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    result = run_cli("upscale", tmp_path / "a.png", "-o", tmp_path / "o.png", "-m", "someone/model", env=env)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0] == (
        "Error: hf://someone/model@main/model.safetensors: cannot reach the Hub at http://127.0.0.1:9 and the file is not in the cache"
    )
    assert len(lines) == 2 and lines[1].startswith("Hint: "), lines  # no retry lines from huggingface_hub


def test_progress_on_a_terminal_fits_80_columns_and_results_do_not_tear_it(tmp_path, tiny_weights):
    import pty
    import re

    folder = tmp_path / "in"
    _small(folder / ("a_long_holiday_photo_name_" * 3 + ".png"))
    _small(folder / "b.png", "coffee")
    controller, terminal = pty.openpty()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "80", "LINES": "24", "TERM": "xterm"}
    process = subprocess.Popen(
        [sys.executable, "-m", "tinysr_cli", "upscale", str(folder), "-o", str(tmp_path / "out"), "--model", str(tiny_weights)],
        stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal, env=env,
    )
    os.close(terminal)
    chunks = []
    while True:
        try:
            data = os.read(controller, 65536)
        except OSError:  # EIO: the program closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert process.wait(timeout=600) == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode())
    lines = [line for line in re.split(r"[\r\n]", text) if line.strip()]
    bars = [line for line in lines if "ETA" in line]
    assert bars and all(len(line) <= 80 for line in bars), [line for line in bars if len(line) > 80]
    for name in ("a_long_holiday_photo_name_" * 3 + ".png", "b.png"):
        assert str(tmp_path / "out" / name) in lines  # whole lines, not torn by a bar redraw
    assert any(line.startswith("encode (VAE)") or line.startswith("backbone tiles") for line in lines)
    assert any("ETA 0:" in line and line.startswith("files") for line in lines)
    assert "2 upscaled, 0 skipped, 0 failed" in lines
