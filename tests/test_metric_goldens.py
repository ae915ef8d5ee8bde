"""PSNR/SSIM against values that BasicSR 1.4.2's and pyiqa 0.1.16's own code computed.

The pairs (tests/data/metric_*_pred.png / *_gt.png, 48 x 64, from scikit-image photos with noise,
4x blocks, a shift with a colour cast, and a contrast-reversed half) and the numbers in
tests/data/metric_goldens.json were made by

    pip download --no-deps --no-build-isolation --no-binary :all: basicsr==1.4.2 -d /tmp/bsr
    pip download --no-deps pyiqa==0.1.16 -d /tmp/bsr
    tar xzf /tmp/bsr/basicsr-1.4.2.tar.gz -C /tmp/bsr
    (cd /tmp/bsr && mkdir pyiqa-0.1.16 && cd pyiqa-0.1.16 && unzip -q ../pyiqa-0.1.16-py3-none-any.whl)
    python tests/data/make_metric_goldens.py /tmp/bsr/basicsr-1.4.2 /tmp/bsr/pyiqa-0.1.16

which calls BasicSR's ``calculate_psnr``/``calculate_ssim`` (crop_border=4, test_y_channel=True,
BGR uint8 input as cv2.imread gives) and pyiqa's ``PSNR``/``SSIM`` (test_y_channel=True,
color_space='ycbcr', as ``pyiqa.create_metric`` builds them for the papers' scripts), from the
released files, with nothing of tinysr imported.

Measured: the ``basicsr`` convention equals BasicSR exactly (difference 0.0) on every pair; the
``pyiqa`` convention's PSNR equals pyiqa exactly and its SSIM within 4e-14 (pyiqa filters with a
float64 torch convolution, we with cv2.filter2D). The tolerance below, 1e-12, is far under what the
float32 steps of either original change: computing BasicSR's Y in float64 instead moves PSNR by
1.5e-7 to 3.2e-7 dB and SSIM by 6e-9 to 1.6e-8 on these pairs (all 8 basicsr cases fail), and
pyiqa's colour conversion in float64 moves its PSNR by 2e-7 to 1.5e-6 dB (all 4 pyiqa PSNR cases fail;
its SSIM rounds Y to integer levels first, so it does not move).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tinysr_cli import metrics

DATA = Path(__file__).parent / "data"
GOLDENS = json.loads((DATA / "metric_goldens.json").read_text())
TOLERANCE = 1e-12


def read(name: str, role: str) -> np.ndarray:
    return np.asarray(Image.open(DATA / f"metric_{name}_{role}.png").convert("RGB"))


@pytest.mark.parametrize("name", sorted(GOLDENS["pairs"]))
@pytest.mark.parametrize("metric", ["psnr", "ssim"])
def test_basicsr_convention_equals_basicsr_1_4_2(name, metric):
    expected = GOLDENS["pairs"][name]["basicsr"][metric]
    ours = getattr(metrics, metric)(read(name, "pred"), read(name, "gt"), crop_border=4, convention="basicsr")
    assert abs(ours - expected) <= TOLERANCE, f"{name} {metric}: {ours!r} vs BasicSR {expected!r}"


@pytest.mark.parametrize("name", sorted(GOLDENS["pairs"]))
@pytest.mark.parametrize("metric", ["psnr", "ssim"])
def test_pyiqa_convention_equals_pyiqa_0_1_16(name, metric):
    expected = GOLDENS["pairs"][name]["pyiqa"][metric]
    ours = getattr(metrics, metric)(read(name, "pred"), read(name, "gt"), crop_border=0, convention="pyiqa")
    assert abs(ours - expected) <= TOLERANCE, f"{name} {metric}: {ours!r} vs pyiqa {expected!r}"


def test_the_goldens_cover_what_the_conventions_differ_on():
    """The pairs are not trivial: the two conventions disagree on each, and the reversed pair has
    negative contrast-structure terms, where pyiqa's clamp changes SSIM."""
    for name, values in GOLDENS["pairs"].items():
        assert abs(values["basicsr"]["psnr"] - values["pyiqa"]["psnr"]) > 1e-3, name
        assert 10 < values["basicsr"]["psnr"] < 40 and 0.5 < values["basicsr"]["ssim"] < 0.99, name
    pred, gt = read("reversed", "pred"), read("reversed", "gt")
    a, b = (metrics.pyiqa_y(x).double().numpy()[0, 0] * 255 for x in (pred, gt))
    unclamped = metrics._ssim(np.round(a), np.round(b), pyiqa=False)
    assert unclamped < GOLDENS["pairs"]["reversed"]["pyiqa"]["ssim"] - 1e-3
