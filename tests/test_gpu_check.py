"""benchmarks/gpu_check.py rehearsed on the CPU: every part runs its real code path with a minute
model and tiny sizes, so the check cannot be broken by the time a GPU session runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import gpu_check  # noqa: E402

PARTS = ["tests", "side_by_side", "large_image", "video", "roofline", "compiled"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_it_exits_at_once_with_one_line(tmp_path, capsys):
    assert gpu_check.main([str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA device" in err
    assert not (tmp_path / "out").exists()


def test_dry_run_rehearses_every_part(tmp_path, one_thread):
    out = tmp_path / "report"
    assert gpu_check.main([str(out), "--dry-run-cpu"]) == 0
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run_cpu"] and list(report["parts"]) == PARTS
    assert all(part["status"] == "ok" for part in report["parts"].values())

    tests = report["parts"]["tests"]["tests"]  # collected by pytest, skipped here for want of CUDA
    assert {"test_oom_back_off_under_a_real_memory_cap", "test_cpu_and_gpu_outputs_agree", "test_deterministic_run_to_run"} <= set(tests)
    assert {t["outcome"] for t in tests.values()} == ({"skipped"} if not torch.cuda.is_available() else {"passed"})

    rows = {row["pipeline"]: row for row in report["parts"]["side_by_side"]["rows"]}
    rows.update({row["pipeline"]: row for row in report["parts"]["compiled"]["rows"]})
    assert list(rows) == ["tinysr", "official-style", "tsdsr-architecture", "realesrgan-x4plus", "span-x4",
                          "tinysr+dynamo-eager", "tinysr+cudagraphs"]
    for name in ("tinysr", "official-style", "tsdsr-architecture", "tinysr+dynamo-eager"):
        assert rows[name]["status"] == "ok" and rows[name]["batch1_ms"] > 0 and rows[name]["best_images_per_s"] > 0
    assert rows["tinysr"]["best_batch"] in (1, 2) and rows["tinysr"]["batch1_vs_tinysr"] == 1.0
    assert rows["tinysr"]["paper_v100_ms"] == 26 and rows["tsdsr-architecture"]["paper_v100_ms"] == 147
    for name in ("realesrgan-x4plus", "span-x4"):  # ok once the peers module is merged, else recorded as absent
        assert rows[name]["status"] in {"ok", "not available"}
        assert rows[name]["status"] == "not available" or rows[name]["batch1_ms"] > 0
    assert rows["tinysr+cudagraphs"]["status"] == "skipped"
    assert rows["tinysr+dynamo-eager"]["batch1_vs_tinysr"] is not None

    large = report["parts"]["large_image"]
    assert large["output"] == "640x480" and large["wall_s"] > 0 and large["backbone_tiles"] > 1
    video = report["parts"]["video"]
    assert video["frames"] == 3 and video["output"] == "256x192" and video["frames_per_s"] > 0
    roofline = report["parts"]["roofline"]
    assert roofline["gflops_per_pass"] > 0 and roofline["achieved_tflops"] > 0 and roofline["peak_tflops"] == "unknown"

    text = (out / "gpu_check.md").read_text()
    assert all(f"## {part}: ok" in text for part in PARTS) and "TSD-SR 147 ms" in text
    assert (out / "cuda_tests.xml").exists()


def test_a_failing_or_late_part_is_recorded_and_the_report_written(tmp_path):
    report = gpu_check.Report(tmp_path, gpu_check.DRY, "cpu", "test")

    def broken(box):
        return {"status": "ok", "value": 1 // 0}

    def late(box):
        box.check("anything")
        return {"status": "ok"}

    gpu_check.run_part(report, "video", gpu_check.DRY, broken)
    written = json.loads((tmp_path / "gpu_check.json").read_text())
    assert written["parts"]["video"]["status"] == "failed" and "ZeroDivisionError" in written["parts"]["video"]["error"]
    boxes = dict(gpu_check.DRY.boxes, roofline=0)
    scale = gpu_check.Scale(**{**gpu_check.DRY.__dict__, "boxes": boxes})
    gpu_check.run_part(report, "roofline", scale, late)
    written = json.loads((tmp_path / "gpu_check.json").read_text())
    assert written["parts"]["roofline"]["status"] == "timed out" and "time box" in written["parts"]["roofline"]["error"]
    assert "## video: failed" in (tmp_path / "gpu_check.md").read_text()


def test_the_global_budget_stops_the_check_and_marks_the_part_it_stopped(tmp_path):
    out = tmp_path / "late"
    done = subprocess.run(
        [sys.executable, gpu_check.__file__, str(out), "--dry-run-cpu", "--parts", "side_by_side,roofline", "--budget-s", "1"],
        capture_output=True, text=True, timeout=120,
    )
    # side_by_side alone imports diffusers and peft and builds five pipelines: far more than a second.
    assert done.returncode == 1 and "stopped after 1 s" in done.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["aborted"] == "stopped after 1 s" and "roofline" not in report["parts"]
    late = report["parts"]["side_by_side"]
    assert late["status"] == "timed out" and "budget ran out" in late["error"]
    assert all(row["status"] in {"ok", "not available"} for row in late.get("rows", []))  # what it finished is kept
    assert "## side_by_side: timed out" in (out / "gpu_check.md").read_text()


def test_peak_table_by_device_name():
    assert gpu_check.device_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_check.device_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.device_peak_tflops("NVIDIA H200") == 989.0
    assert gpu_check.device_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_check.device_peak_tflops("Tesla V100-SXM2-16GB") == 125.0
    assert gpu_check.device_peak_tflops("NVIDIA GeForce RTX 4090") is None


def test_backbone_flops_agree_with_the_component_count():
    from tinysr_cli.counting import count_tinysr
    from tinysr_cli.models.tinysr import NAMED_CONFIGS

    config = NAMED_CONFIGS["full"]
    backbone_macs = sum(c.macs for c in count_tinysr(config, 512, 512).components if c.name.startswith("backbone"))
    assert gpu_check.backbone_flops(config.transformer, 1, 64) == 2 * backbone_macs
    assert gpu_check.backbone_flops(config.transformer, 4, 64) == 4 * gpu_check.backbone_flops(config.transformer, 1, 64)
