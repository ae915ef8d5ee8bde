"""`tinysr eval` end to end on real photos."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from cli_helpers import run_cli
from conftest import photo
from tinysr_cli import metrics


@pytest.fixture
def folders(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    for name, quality in (("astronaut", 30), ("coffee", 60)):
        image = photo(name, (128, 160))
        Image.fromarray(image).save(gt / f"{name}.png")
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        Image.open(buffer).save(pred / f"{name}.png")
    Image.fromarray(photo("chelsea", (128, 160))).save(pred / "orphan.png")
    return pred, gt


def test_eval_scores_match_the_library_and_report_unavailable_metrics(folders, tmp_path):
    pred, gt = folders
    report_path, csv_path = tmp_path / "r.json", tmp_path / "r.csv"
    result = run_cli("eval", "--pred", pred, "--gt", gt, "--metrics", "psnr,ssim,lpips", "--json", report_path, "--csv", csv_path)
    assert result.returncode == 0, result.stderr
    assert "orphan.png: no file with the same name on the other side" in result.stderr
    report = json.loads(report_path.read_text())
    assert [row["image"] for row in report["images"]] == ["astronaut", "coffee"]
    a = np.asarray(Image.open(pred / "astronaut.png").convert("RGB"))
    b = np.asarray(Image.open(gt / "astronaut.png").convert("RGB"))
    assert report["images"][0]["psnr"] == pytest.approx(metrics.psnr(a, b, 4))
    assert report["mean"]["ssim"] == pytest.approx(np.mean([r["ssim"] for r in report["images"]]))
    assert report["convention"] == "basicsr" and report["crop_border"] == 4
    if "lpips" in report["unavailable"]:
        assert "lpips: not computed:" in result.stderr
    rows = list(csv.DictReader(open(csv_path)))
    assert [r["image"] for r in rows] == ["astronaut", "coffee"]
    assert float(rows[1]["psnr"]) == pytest.approx(report["images"][1]["psnr"])
    assert "mean" in result.stdout


def test_dataset_layout_with_model(tmp_path, tiny_weights):
    root = tmp_path / "set"
    (root / "test_LR").mkdir(parents=True)
    (root / "test_HR").mkdir()
    hr = photo("astronaut", (512, 512))
    Image.fromarray(hr).save(root / "test_HR" / "a.png")
    Image.fromarray(hr).resize((128, 128), Image.BICUBIC).save(root / "test_LR" / "a.png")
    out = tmp_path / "sr"
    result = run_cli("eval", "--dataset", root, "--model", tiny_weights, "--pred", out, "--json", tmp_path / "d.json")
    assert result.returncode == 0, result.stderr
    assert Image.open(out / "a.png").size == (512, 512)
    assert json.loads((tmp_path / "d.json").read_text())["images"][0]["image"] == "a"


def test_errors(tmp_path, folders):
    pred, gt = folders
    assert run_cli("eval", "--pred", pred, "--gt", tmp_path / "none").returncode == 1
    bad = run_cli("eval", "--pred", pred, "--gt", gt, "--metrics", "psnr,bogus")
    assert bad.returncode == 1 and "unknown metric 'bogus'" in bad.stderr
    Image.fromarray(photo("coffee", (64, 64))).save(pred / "coffee.png")
    mismatch = run_cli("eval", "--pred", pred, "--gt", gt)
    assert mismatch.returncode == 1 and "coffee.png: sizes differ" in mismatch.stderr
