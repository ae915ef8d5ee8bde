"""Parameter and MAC counts: closed forms, an independent hook-based count, the paper's figures, the CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from cli_helpers import run_cli
from tinysr_cli.counting import count_teacher, count_tinysr
from tinysr_cli.models.tinysr import NAMED_CONFIGS, TinySR

FULL = NAMED_CONFIGS["full"]
# The paper's VAE: separable convs in the encoder only.
PAPER = replace(FULL, vae=replace(FULL.vae, decoder_separable=False))


def _by_name(count) -> dict:
    return {c.name: c for c in count.components}


def _backbone_params(count) -> int:
    return sum(c.params for c in count.components if c.name.startswith("backbone"))


def test_full_config_backbone_has_340m_parameters():
    count = count_tinysr(FULL)
    assert _backbone_params(count) == pytest.approx(340e6, rel=0.01)


def test_backbone_macs_equal_the_closed_form_at_512():
    """One 64x64 latent tile: N = 1024 tokens of D = 1536, 12 blocks."""
    parts = _by_name(count_tinysr(FULL))
    n, d, layers, patch_in = 1024, 1536, 12, 16 * 2 * 2
    assert parts["backbone: patch embed"].macs == n * d * patch_in
    assert parts["backbone: blocks, linear layers"].macs == layers * n * (4 * d * d + 2 * d * 4 * d)
    assert parts["backbone: blocks, attention matmuls"].macs == layers * 2 * n * n * d
    assert parts["backbone: final layer"].macs == n * d * patch_in


def _conv_macs_by_hooks(module: nn.Module, run) -> int:
    """An independent count: out pixels x out channels x (in channels / groups) x k x k per conv."""
    total = 0

    def hook(conv, args, out):
        nonlocal total
        total += out.numel() * (conv.in_channels // conv.groups) * conv.kernel_size[0] * conv.kernel_size[1]

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return total


@pytest.mark.parametrize("config", [FULL, PAPER], ids=["separable", "plain-decoder"])
def test_vae_macs_equal_an_independent_hook_count(config):
    model = TinySR(replace(config, transformer=NAMED_CONFIGS["tiny"].transformer)).eval()
    image, latent = torch.zeros(1, 3, 128, 96), torch.zeros(1, 16, 16, 12)
    parts = _by_name(count_tinysr(config, 128, 96))
    assert parts["VAE encoder"].macs == _conv_macs_by_hooks(model.vae.encoder, lambda: model.vae.encode(image))
    assert parts["VAE decoder"].macs == _conv_macs_by_hooks(model.vae.decoder, lambda: model.vae.decode(latent))
    assert parts["VAE encoder"].params == sum(p.numel() for p in model.vae.encoder.parameters())


def test_tiled_size_counts_every_tile():
    """1024x768 output: a 96x128 latent in 2 x 3 tiles; the VAE scales with the pixel count."""
    single, tiled = count_tinysr(FULL, 512, 512), count_tinysr(FULL, 768, 1024)
    assert (tiled.tiles, tiled.height, tiled.width) == (6, 768, 1024)
    one, six = _by_name(single), _by_name(tiled)
    for name in ("backbone: patch embed", "backbone: blocks, linear layers", "backbone: blocks, attention matmuls"):
        assert six[name].macs == 6 * one[name].macs
    assert six["VAE decoder"].macs == 3 * one["VAE decoder"].macs
    assert count_tinysr(FULL, 500, 500).height == 512  # padded as the engine pads


def test_paper_figures_are_reproduced_by_the_thop_style_total():
    """The paper's 427 G / 341 M: separable encoder, plain decoder, attention matmuls not counted."""
    paper = count_tinysr(PAPER)
    assert (paper.macs - paper.attention_macs) / 1e9 == pytest.approx(427, rel=0.005)
    assert paper.params / 1e6 == pytest.approx(341, rel=0.005)
    vae = _by_name(paper)
    assert (vae["VAE encoder"].macs + vae["VAE decoder"].macs) / 1e9 == pytest.approx(78.48, rel=0.005)


def test_teacher_matches_the_paper():
    teacher = count_teacher()
    parts = _by_name(teacher)
    assert teacher.params / 1e6 == pytest.approx(2112, rel=0.01)
    assert _backbone_params(teacher) / 1e6 == pytest.approx(2028, rel=0.01)
    assert (teacher.macs - teacher.attention_macs) / 1e9 == pytest.approx(2700, rel=0.01)
    vae = parts["VAE encoder"], parts["VAE decoder"]
    assert sum(c.macs - c.attention_macs for c in vae) / 1e9 == pytest.approx(1781.91, rel=0.005)
    # joint attention over 1024 image + 333 text tokens in 24 blocks
    assert parts["backbone: blocks, attention matmuls"].macs == 24 * 2 * (1024 + 333) ** 2 * 1536


def test_cli_info_json_and_table(tiny_weights):
    result = run_cli("info", "--size", "1024x768", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["width"], data["height"], data["tiles"]) == (1024, 768, 6)
    assert data["macs"] == sum(c["macs"] for c in data["components"])

    table = run_cli("info", "--model", tiny_weights, "--size", "512")
    assert table.returncode == 0, table.stderr
    assert "tiny.safetensors: one 512x512 output" in table.stdout
    assert "backbone: blocks, attention matmuls" in table.stdout and "VAE decoder" in table.stdout

    teacher = run_cli("info", "--teacher", "--json")
    assert json.loads(teacher.stdout)["params"] == pytest.approx(2112e6, rel=0.01)


def test_cli_info_rejects_a_bad_size():
    result = run_cli("info", "--size", "big")
    assert result.returncode == 1
    assert "Error: invalid --size 'big'" in result.stderr


def test_cli_info_teacher_without_diffusers_names_the_extra(tmp_path):
    """diffusers is not a dependency of inference: a plain install counts TinySR, and says what --teacher needs."""
    blocker = tmp_path / "diffusers"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'diffusers'\", name='diffusers')\n")
    result = run_cli("info", "--teacher", env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "Error: counting the teacher needs the diffusers package, which is not installed",
        'Hint: pip install "tinysr[bench]"',
    ]
    plain = run_cli("info", "--size", "256", "--json", env={"PYTHONPATH": str(tmp_path)})
    assert plain.returncode == 0 and json.loads(plain.stdout)["width"] == 256
