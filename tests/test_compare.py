"""`tinysr compare` on real photos: the page's crops line up, its scores are eval's, bad pairs fail alone."""

from __future__ import annotations

import base64
import html
import io
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from conftest import photo
from tinysr_cli import metrics, report
from tinysr_cli.cli.main import app, main

SIZE = (96, 128)  # HR (height, width); LR is 24 x 32
CROP = 32
IMG = re.compile(r'<img class="crop"[^>]*data-image="([^"]*)" data-crop="(\d+)" data-column="([^"]*)" '
                 r'data-box="(\d+),(\d+),(\d+)"[^>]*src="data:image/png;base64,([^"]+)"')


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def upscale(lr: np.ndarray, mode: str) -> np.ndarray:
    x = torch.from_numpy(np.array(lr)).permute(2, 0, 1)[None].float() / 255
    kwargs = {"align_corners": False} if mode == "bicubic" else {}
    y = F.interpolate(x, scale_factor=4, mode=mode, **kwargs).clamp(0, 1)
    return y[0].permute(1, 2, 0).mul(255).round().to(torch.uint8).numpy()


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def decode(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def tables(page: str) -> dict[str, dict[str, dict[str, tuple[str, str]]]]:
    """table name -> method -> metric -> (shown text, full value in the title)."""
    found = {}
    for name, body in re.findall(r'<table data-table="([^"]*)">(.*?)</table>', page):
        rows = {}
        for method, cells in re.findall(r"<tr><th>([^<]*)</th>(<td.*?)</tr>", body):
            rows[html.unescape(method)] = {
                metric: (shown, value)
                for metric, value, shown in re.findall(r'data-metric="(\w+)" title="([^"]*)">(.*?)</td>', cells)
            }
        found[html.unescape(name)] = rows
    return found


@pytest.fixture
def folders(tmp_path):
    """gt/, lr/ (a quarter the size), and bicubic/ and nearest/ upscales of lr/, for two photos."""
    paths = {name: tmp_path / name for name in ("gt", "lr", "bicubic", "nearest")}
    for path in paths.values():
        path.mkdir()
    for name in ("astronaut", "coffee"):
        hr = photo(name, SIZE)
        lr = np.asarray(Image.fromarray(hr).resize((SIZE[1] // 4, SIZE[0] // 4), Image.Resampling.BICUBIC))
        Image.fromarray(hr).save(paths["gt"] / f"{name}.png")
        Image.fromarray(lr).save(paths["lr"] / f"{name}.png")
        Image.fromarray(upscale(lr, "bicubic")).save(paths["bicubic"] / f"{name}.png")
        Image.fromarray(upscale(lr, "nearest")).save(paths["nearest"] / f"{name}.png")
    return paths


def test_page_crops_line_up_and_scores_are_evals(folders, tmp_path):
    out = tmp_path / "out" / "report.html"
    result = invoke("compare", "--lr", folders["lr"], "--gt", folders["gt"], "--pred", f"bicubic={folders['bicubic']}",
                    "--pred", f"nearest={folders['nearest']}", "--crop-size", CROP, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert "wrote" in result.stderr and "2 image(s) compared, 0 failed" in result.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.html"]  # no temporaries left
    page = out.read_text(encoding="utf-8")
    assert "<script" not in page and "http" not in page  # self-contained
    assert set(re.findall(r'src="([a-z]+):', page)) == {"data"}

    images = IMG.findall(page)
    assert len(images) == 2 * 2 * 4 == page.count('<img class="crop"')  # image x crop x column
    columns = ["LR", "bicubic", "nearest", "GT"]
    assert [c for n, i, c, *_ in images if (n, i) == ("astronaut", "0")] == columns
    for name, _, column, x, y, size, data in images:
        x, y, size = int(x), int(y), int(size)
        assert size == CROP and x % 4 == 0 and y % 4 == 0
        tile = decode(data)
        assert tile.shape == (CROP, CROP, 3)
        if column == "LR":
            lr_box = pixels(folders["lr"] / f"{name}.png")[y // 4 : (y + size) // 4, x // 4 : (x + size) // 4]
            assert np.array_equal(tile, lr_box.repeat(4, axis=0).repeat(4, axis=1))
        else:
            source = folders["gt" if column == "GT" else column] / f"{name}.png"
            assert np.array_equal(tile, pixels(source)[y : y + size, x : x + size])
    boxes = {(n, i): (int(x), int(y)) for n, i, c, x, y, *_ in images}
    assert boxes[("astronaut", "0")] != boxes[("astronaut", "1")]
    gt = pixels(folders["gt"] / "astronaut.png")
    energy = [report.gradient_energy(Box.cut(gt)).sum() for Box in
              (report.Box(*boxes[("astronaut", "0")], CROP), report.Box(*boxes[("astronaut", "1")], CROP))]
    assert energy[0] >= energy[1]  # most detailed first

    scores = tables(page)
    assert set(scores) == {"mean", "astronaut", "coffee"}
    means = {"bicubic": [], "nearest": []}
    for name in ("astronaut", "coffee"):
        gt = pixels(folders["gt"] / f"{name}.png")
        for method in means:
            pred = pixels(folders[method] / f"{name}.png")
            psnr = metrics.psnr(pred, gt, crop_border=4)
            ssim = metrics.ssim(pred, gt, crop_border=4)
            means[method].append(psnr)
            shown, value = scores[name][method]["psnr"]
            assert float(value) == psnr and re.sub("</?b>", "", shown) == f"{psnr:.4f}"
            assert float(scores[name][method]["ssim"][1]) == ssim
        best = max(("bicubic", "nearest"), key=lambda m: float(scores[name][m]["psnr"][1]))
        assert scores[name][best]["psnr"][0].startswith("<b>")
        assert not scores[name][{"bicubic": "nearest", "nearest": "bicubic"}[best]]["psnr"][0].startswith("<b>")
    for method, values in means.items():
        assert float(scores["mean"][method]["psnr"][1]) == pytest.approx(np.mean(values), abs=1e-12)
    assert "PSNR" in result.stdout and "bicubic" in result.stdout  # the mean table


def test_select_boxes_finds_the_detail():
    flat = np.full((128, 128, 3), 120, np.uint8)
    flat[40:72, 64:96] = photo("astronaut", (32, 32))  # the only detail: a 32 x 32 patch at x 64, y 40
    boxes = report.select_boxes(flat, 2, 32, grid=4)
    assert boxes[0] == report.Box(64, 40, 32)
    assert boxes == report.select_boxes(flat, 2, 32, grid=4)  # deterministic
    second = boxes[1]
    assert abs(second.x - 64) >= 32 or abs(second.y - 40) >= 32  # not overlapping the first
    assert report.select_boxes(flat[:20, :20], 3, 32, grid=4) == [report.Box(0, 0, 20)]  # shrinks to the image


def test_without_ground_truth_crops_follow_the_first_method(folders, tmp_path):
    out = tmp_path / "page.html"
    result = invoke("compare", "--lr", folders["lr"], "--pred", f"nearest={folders['nearest']}",
                    "--pred", f"bicubic={folders['bicubic']}", "--crops", 1, "--crop-size", CROP, "-o", out, "-q")
    assert result.exit_code == 0, result.stderr
    page = out.read_text()
    images = IMG.findall(page)
    assert len(images) == 2 * 1 * 3 and {c for _, _, c, *_ in images} == {"LR", "nearest", "bicubic"}
    for name, _, _, x, y, size, _ in images:
        expected = report.select_boxes(pixels(folders["nearest"] / f"{name}.png"), 1, CROP, grid=4)[0]
        assert (int(x), int(y), int(size)) == (expected.x, expected.y, expected.size)
    assert "psnr: not computed: needs the ground truth (--gt)" in page and "<table" not in page


def test_learned_metrics_bold_the_lowest_and_unavailable_ones_are_noted(folders, tmp_path, monkeypatch):
    class MeanAbsolute:  # a stand-in for pyiqa's LPIPS: lower is better
        needs_reference = True
        implementation = "a stand-in for the test"

        def score(self, pred, gt):
            return float((pred - gt).abs().mean())

    def load(name, device):
        if name == "lpips":
            return MeanAbsolute()
        raise metrics.MetricUnavailable("its weights are not cached")

    monkeypatch.setattr(metrics, "load_metric", load)
    out = tmp_path / "page.html"
    result = invoke("compare", "--gt", folders["gt"], "--pred", f"bicubic={folders['bicubic']}", "--pred",
                    f"nearest={folders['nearest']}", "-m", "psnr,lpips,niqe", "--device", "cpu", "--crop-size", CROP, "-o", out)
    assert result.exit_code == 0, result.stderr
    page = out.read_text()
    assert "niqe: not computed: its weights are not cached" in page
    mean = tables(page)["mean"]
    lpips = {method: float(mean[method]["lpips"][1]) for method in mean}
    best = min(lpips, key=lpips.get)
    assert mean[best]["lpips"][0].startswith("<b>") and "LPIPS ↓" in page
    assert len(IMG.findall(page)) == 2 * 2 * 3


def test_a_bad_size_fails_alone(folders, tmp_path):
    Image.open(folders["nearest"] / "coffee.png").resize((120, 96)).save(folders["nearest"] / "coffee.png")
    Image.open(folders["lr"] / "astronaut.png").resize((31, 24)).save(folders["lr"] / "astronaut.png")
    Image.fromarray(photo("rocket", SIZE)).save(folders["gt"] / "lonely.png")
    out = tmp_path / "page.html"
    result = invoke("compare", "--lr", folders["lr"], "--gt", folders["gt"], "--pred", f"bicubic={folders['bicubic']}",
                    "--pred", f"nearest={folders['nearest']}", "--crop-size", CROP, "-o", out)
    assert result.exit_code == 1
    assert "coffee: sizes differ: coffee.png (nearest) is 120x96, coffee.png (GT) is 128x96" in result.stderr
    assert "astronaut: astronaut.png (LR) is 31x24, times 4 is 124x96, but astronaut.png (GT) is 128x96" in result.stderr
    assert f"{folders['gt'] / 'lonely.png'}: no file of the same name for LR, bicubic, nearest; left out" in result.stderr
    page = out.read_text()
    assert "coffee: sizes differ" in page and IMG.findall(page) == []  # both failed: listed, no crops

    Image.fromarray(photo("astronaut", SIZE)).resize((32, 24), Image.Resampling.BICUBIC).save(folders["lr"] / "astronaut.png")
    again = invoke("compare", "--lr", folders["lr"], "--gt", folders["gt"], "--pred", f"bicubic={folders['bicubic']}",
                   "--pred", f"nearest={folders['nearest']}", "--crop-size", CROP, "-o", out)
    assert again.exit_code == 1 and "1 image(s) compared, 1 failed" in again.stderr
    page = out.read_text()
    assert {n for n, *_ in IMG.findall(page)} == {"astronaut"} and "coffee: sizes differ" in page
    assert set(tables(page)) == {"mean", "astronaut"}


def test_usage_errors(folders, tmp_path):
    result = invoke("compare", "--pred", str(folders["bicubic"]), "-o", tmp_path / "x.html")
    assert result.exit_code == 2 and "--pred" in result.output and "is not NAME=DIR" in result.output
    twice = invoke("compare", "--pred", f"a={folders['bicubic']}", "--pred", f"a={folders['nearest']}", "-o", tmp_path / "x.html")
    assert twice.exit_code == 2 and "used twice" in twice.output
    odd = invoke("compare", "--lr", folders["lr"], "--pred", f"a={folders['bicubic']}", "--crop-size", 30, "-o", tmp_path / "x.html")
    assert odd.exit_code == 2 and "not a multiple of --scale 4" in odd.output
    assert not (tmp_path / "x.html").exists()


def test_a_missing_folder_is_one_line(folders, tmp_path, monkeypatch, capsys):
    # The real entry point and its error boundary, in-process (a subprocess spends seconds importing torch).
    args = ["compare", "--gt", folders["gt"], "--pred", f"ours={tmp_path / 'nowhere'}", "-o", tmp_path / "x.html"]
    monkeypatch.setattr(sys, "argv", ["tinysr", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 1
    assert capsys.readouterr().err.strip() == f"Error: {tmp_path / 'nowhere'}: no such file or folder (--pred ours)"
    assert not (tmp_path / "x.html").exists()


def test_single_files_pair_whatever_their_names(folders, tmp_path):
    out = tmp_path / "page.html"
    result = invoke("compare", "--gt", folders["gt"] / "coffee.png", "--lr", folders["lr"] / "coffee.png",
                    "--pred", f"ours={folders['bicubic'] / 'coffee.png'}", "--crops", 1, "--crop-size", CROP, "-o", out, "-q")
    assert result.exit_code == 0, result.stderr
    assert [(n, c) for n, _, c, *_ in IMG.findall(out.read_text())] == [("coffee", "LR"), ("coffee", "ours"), ("coffee", "GT")]
