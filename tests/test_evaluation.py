"""tinysr_cli.evaluation from Python, without Typer: the numbers `tinysr eval` writes, and errors that name arguments."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageFilter
from typer.testing import CliRunner

from conftest import photo
from tinysr_cli import metrics
from tinysr_cli.cli.main import app
from tinysr_cli.errors import TinySRError
from tinysr_cli.evaluation import Evaluator, evaluate


@pytest.fixture
def folders(tmp_path):
    """gt/: three photos; pred/: a blurred copy of two, an identical copy of one, and an orphan."""
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    for name in ("astronaut", "coffee", "camera"):
        image = photo(name, (96, 120))
        Image.fromarray(image).save(gt / f"{name}.png")
        kept = image if name == "camera" else np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1.0)))
        Image.fromarray(kept).save(pred / f"{name}_x4.png")
    Image.fromarray(photo("rocket", (96, 120))).save(pred / "orphan_x4.png")
    return pred, gt


def test_python_report_equals_what_the_cli_writes(folders, tmp_path):
    pred, gt = folders
    report = evaluate(pred, gt, ["psnr", "ssim"], pred_suffix="_x4")

    json_path, csv_path = tmp_path / "cli.json", tmp_path / "cli.csv"
    result = CliRunner().invoke(
        app, ["eval", "--pred", str(pred), "--gt", str(gt), "-m", "psnr,ssim", "--pred-suffix", "_x4",
              "--json", str(json_path), "--csv", str(csv_path)],
    )
    assert result.exit_code == 0, result.output
    from_cli = json.loads(json_path.read_text())
    assert report.to_json() == json_path.read_text()  # the same schema and the same numbers, digit for digit
    assert report.to_csv() == csv_path.read_text()
    assert [row["name"] for row in from_cli["images"]] == ["astronaut", "camera", "coffee"]

    # And the numbers are the metrics' own, not only the CLI's.
    for row in report.images:
        a = np.asarray(Image.open(pred / row["pred"]).convert("RGB"))
        b = np.asarray(Image.open(gt / row["gt"]).convert("RGB"))
        assert row["psnr"] == metrics.psnr(a, b, crop_border=4)
        assert row["ssim"] == metrics.ssim(a, b, crop_border=4)
    assert report.images[1]["psnr"] == float("inf") and from_cli["images"][1]["psnr"] == "inf"
    assert report.mean["psnr"] == float("inf")
    assert report.mean["ssim"] == pytest.approx(np.mean([row["ssim"] for row in report.images]), abs=1e-15)
    assert report.pred_only == [pred / "orphan_x4.png"] and report.gt_only == [] and report.failed == []


def test_an_evaluator_scores_several_folders_and_reports_bad_pairs(folders, tmp_path):
    pred, gt = folders
    Image.fromarray(photo("coffee", (64, 80))).save(pred / "coffee_x4.png")  # wrong size
    errors: list[str] = []
    seen: list[tuple[str, int, int]] = []
    evaluator = Evaluator(["ssim"], convention="pyiqa")
    report = evaluator.evaluate(pred, gt, pred_suffix="_x4", on_error=errors.append, progress=lambda *a: seen.append(a))
    assert [row["name"] for row in report.images] == ["astronaut", "camera"]
    assert report.failed == [{"name": "coffee", "error": "coffee: sizes differ: coffee_x4.png is 80x64, coffee.png is 120x96"}]
    assert errors == [report.failed[0]["error"]]
    assert seen == [("astronaut", 0, 3), ("camera", 1, 3), ("coffee", 2, 3), ("", 3, 3)]
    assert report.settings.crop_border == 0 and report.metrics == ["ssim"]

    single = evaluator.evaluate(pred / "camera_x4.png", gt / "camera.png")
    assert single.images == [{"name": "camera_x4", "pred": "camera_x4.png", "gt": "camera.png", "ssim": 1.0}]


def test_errors_name_python_arguments_not_flags(folders, tmp_path):
    pred, gt = folders
    with pytest.raises(TinySRError) as caught:
        evaluate(pred, gt, ["psnr,bogus"])
    assert caught.value.option == "metrics" and "unknown metric 'bogus'" in str(caught.value)
    with pytest.raises(TinySRError) as caught:
        evaluate(pred, tmp_path / "nowhere")
    assert str(caught.value) == f"{tmp_path / 'nowhere'}: no such file or folder (gt)"
    assert caught.value.option == "gt" and caught.value.path == tmp_path / "nowhere"
    with pytest.raises(TinySRError, match="'matlab' is not one of basicsr, pyiqa"):
        Evaluator(convention="matlab")

    nothing = evaluate(pred, gt)  # no suffix given: no name pairs, nothing is scored
    assert nothing.images == [] and nothing.failed == [] and len(nothing.pred_only) == 4
