"""Pixel-space models through the engine and the CLI: exact tiling, dtypes, bicubic, benchmarks.

The benchmark rows (Set5 x4, Y channel, 4 px border, BasicSR convention) are scored with the
existing ``tinysr eval``: MATLAB bicubic 28.42 / 0.8104 (we get 28.43 / 0.8113) and SPAN x4's
paper numbers 32.20 / 0.8953.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import run_cli
from conftest import photo
from tinysr_cli.engine.pixel import PixelUpscaler, from_descriptor, load_pixel_upscaler
from tinysr_cli.errors import TinySRError
from tinysr_cli.models.bicubic import imresize, resize_matrix
from tinysr_cli.weights.peers import load_peer

pytestmark = pytest.mark.usefixtures("one_thread")
SETS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sr-benchmarks"
SETS = SETS if SETS.is_dir() else Path("/work/shared/data/sr-benchmarks")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "peer-cache"))


def test_span_tiled_equals_untiled():
    descriptor = load_peer("span-x4")
    x = torch.from_numpy(photo("astronaut")[50:110, 120:190].copy()).permute(2, 0, 1).float().contiguous() / 255
    tiled = from_descriptor(descriptor, "span-x4", "cpu", torch.float32, tile=64)  # 16 LR px tiles, 21 px context
    assert tiled.context == 21
    with torch.no_grad():
        whole = descriptor.model(x[None])[0].clamp(0, 1)
    out = tiled.upscale(x)
    assert out.shape == (3, 240, 280)
    assert torch.equal(out, whole)  # measured max |diff| 0.0


def test_unsupported_dtype_is_refused():
    model = torch.nn.Upsample(scale_factor=4)
    with pytest.raises(TinySRError, match="does not support bfloat16"):
        PixelUpscaler(model, scale=4, name="m", dtype=torch.bfloat16, supported_dtypes=(torch.float32,))


def test_bicubic_weights_match_matlab():
    # MATLAB: imresize(eye(4), 2) rows 1 and 2 (cubic a = -0.5, symmetric edges)
    matrix = resize_matrix(4, 2)
    # output 1 sits at x = 0.75: taps at 0 and 1 both land on pixel 1, taps at -1 and 2 on pixel 2
    expected_first = [0.2265625 + 0.8671875, -0.0234375 - 0.0703125, 0.0, 0.0]
    assert matrix.shape == (8, 4)
    assert torch.allclose(matrix[0], torch.tensor(expected_first, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(matrix.sum(1), torch.ones(8, dtype=torch.float64))
    flat = torch.full((1, 5, 7), 0.3)
    assert torch.allclose(imresize(flat, 4), torch.full((1, 20, 28), 0.3, dtype=torch.float64))
    assert imresize(torch.rand(3, 17, 9), 0.25).shape == (3, 5, 3)  # ceil, antialiased


def _lr_folder(name: str, tmp_path: Path) -> Path:
    folder = tmp_path / f"{name}-lr"
    folder.mkdir()
    for path in sorted((SETS / name).glob("*_LR.png")):
        shutil.copy(path, folder / path.name.replace("_LR", "_HR"))  # outputs named like the ground truth
    return folder


def _score(model: str, tmp_path: Path) -> dict:
    lr = _lr_folder("Set5", tmp_path)
    out = tmp_path / f"pred-{model}"
    result = run_cli("upscale", str(lr), "-o", str(out), "--model", model, "-q")
    assert result.returncode == 0, result.stderr
    report = tmp_path / f"{model}.json"
    result = run_cli("eval", "--pred", str(out), "--gt", str(SETS / "Set5"), "--json", str(report), "-q")
    assert result.returncode == 0, result.stderr
    return json.loads(report.read_text())["mean"]


def test_bicubic_reproduces_set5_row(tmp_path):
    mean = _score("bicubic", tmp_path)
    assert mean["psnr"] == pytest.approx(28.42, abs=0.02)  # measured 28.4318
    assert mean["ssim"] == pytest.approx(0.8104, abs=0.001)  # measured 0.8113


def test_span_reproduces_paper_set5(tmp_path):
    mean = _score("span-x4", tmp_path)
    assert mean["psnr"] == pytest.approx(32.20, abs=0.1)
    assert mean["ssim"] == pytest.approx(0.8953, abs=0.002)


def test_local_spandrel_file_and_rgba_through_cli(tmp_path):
    from safetensors.torch import save_file

    from tinysr_cli.weights.ncnn import span_state_dict  # noqa: F401  (the converter the file came from)
    from tinysr_cli.weights.peers import peer_weights

    local = tmp_path / "4x-span.safetensors"
    shutil.copy(peer_weights("span-x4"), local)
    pth = tmp_path / "4x-span.pth"
    from safetensors.torch import load_file

    torch.save(load_file(local), pth)
    rgba = np.dstack([photo("astronaut", (24, 20)), np.full((24, 20), 200, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "in.png")
    outputs = []
    for model in (str(local), str(pth), "span-x4"):
        out = tmp_path / f"out-{len(outputs)}.png"
        result = run_cli("upscale", str(tmp_path / "in.png"), "-o", str(out), "--model", model, "-q")
        assert result.returncode == 0, result.stderr
        outputs.append(np.asarray(Image.open(out)))
    assert outputs[0].shape == (96, 80, 4)
    assert np.array_equal(outputs[0], outputs[1]) and np.array_equal(outputs[0], outputs[2])
    assert (outputs[0][..., 3] == 200).all()
    save_file({"x": torch.zeros(1)}, tmp_path / "odd.safetensors")
    result = run_cli("upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "x.png"), "--model", str(tmp_path / "odd.safetensors"))
    assert result.returncode == 1 and "odd.safetensors" in result.stderr


def test_bicubic_model_spec():
    upscaler = load_pixel_upscaler("bicubic", "cpu", torch.float32)
    out = upscaler.upscale(torch.full((3, 4, 5), 0.5))
    assert out.shape == (3, 16, 20) and torch.allclose(out, torch.full_like(out, 0.5))
