"""`tinysr bench`'s baselines compute what they claim; the command reports every pipeline."""

from __future__ import annotations

import json

import torch

from cli_helpers import run_cli
from tinysr_cli import bench
from tinysr_cli.engine.upscaler import UpscaleOptions, Upscaler
from tinysr_cli.weights.format import init_weights


def test_official_style_baseline_computes_the_same_image():
    model = init_weights("tiny", seed=0)
    baseline = bench.official_style(model)
    # The baseline really runs the slow form: run-time modulation and unmerged LoRA layers.
    assert hasattr(baseline.transformer, "modulation")
    assert any("lora_A" in name for name, _ in baseline.transformer.named_parameters())
    assert model.transformer is not baseline.transformer and baseline.vae is model.vae
    image = torch.rand(3, 128, 160, generator=torch.Generator().manual_seed(1))
    ours = Upscaler(model).upscale(image)
    theirs = Upscaler(baseline, options=UpscaleOptions(batch_size=1)).upscale(image)
    assert (ours - theirs).abs().max() < 1e-5


def test_tsdsr_pipeline_runs_the_sd3_computation_at_small_size(capfd):
    transformer = dict(
        sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=16, pos_embed_max_size=32,
    )
    vae = dict(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
        scaling_factor=1.5305, use_quant_conv=False, use_post_quant_conv=False,
    )
    for dtype in (torch.float32, torch.bfloat16):
        run = bench.tsdsr_pipeline(torch.device("cpu"), dtype, transformer, vae, prompt_tokens=5)
        out = run(torch.rand(3, 16, 16)).float()
        assert out.shape == (1, 3, 64, 64) and out.min() >= -1 and out.max() <= 1
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""  # no library notice (diffusers' "kept in float32: []")


def test_bench_command_reports_each_pipeline_as_json():
    result = run_cli("bench", "--config", "tiny", "--no-tsdsr", "--size", "256", "--large", "0", "--runs", "1", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["device"] == "cpu" and report["precision"] == "float32"
    names = [row["pipeline"] for row in report["results"]]
    assert names == ["tinysr", "official-style"]
    assert all(row["latency_s"] > 0 and row["peak_host_mib"] > 0 for row in report["results"])
    assert report["results"][0]["latency_vs_tinysr"] == 1.0


def test_bench_without_peft_says_what_is_missing(tmp_path):
    """A plain install lacks peft: the official-style comparison names it instead of a ModuleNotFoundError."""
    blocker = tmp_path / "peft"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'peft'\", name='peft')\n")
    result = run_cli("bench", "--config", "tiny", "--size", "256", "--large", "0", "--runs", "1", env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 1
    assert "Error: the official-style comparison needs the peft package, which is not installed" in result.stderr
    assert 'Hint: pip install "tinysr[bench]", or pass --no-official' in result.stderr
    assert "Traceback" not in result.stderr and "TSD-SR" not in result.stderr  # the 2.1 B comparison is opt-in


def test_run_suite_is_a_library_call_yielding_each_pipeline_in_order():
    ours = Upscaler(init_weights("tiny", seed=0), device=torch.device("cpu"), dtype=torch.float32)
    heard: list[str] = []
    suite = bench.run_suite(ours, 64, 0, 1, official=True, span=True, step=heard.append)
    first = next(suite)  # a generator: what was measured before an interrupt is kept by the caller
    assert first.pipeline == "tinysr" and heard == ["timing our engine ..."]
    rest = list(suite)
    assert [m.pipeline for m in rest] == ["official-style", "span-x4"]
    assert heard == ["timing our engine ...", "timing the official-style pipeline ...", "timing span-x4 ..."]
    assert all(m.runs == 1 and m.latency_s > 0 and m.megapixels_per_s is None for m in (first, *rest))
