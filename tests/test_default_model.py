"""Random weights are announced loudly wherever they are used."""

from __future__ import annotations

import numpy as np
from PIL import Image

from cli_helpers import run_cli
from conftest import photo

WARNING = "holds RANDOM, untrained weights (provenance: random-init)"


def test_weights_init_and_info_warn_about_random_weights(tmp_path):
    path = tmp_path / "random.safetensors"
    made = run_cli("weights", "init", "--config", "tiny", "-o", path)
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip() == str(path)
    assert WARNING in made.stderr and "for tests and benchmarks only" in made.stderr
    shown = run_cli("weights", "info", path)
    assert shown.returncode == 0 and WARNING in shown.stderr


def test_upscale_with_random_weights_warns_but_a_trained_file_does_not(tmp_path, tiny_weights):
    Image.fromarray(photo(size=(40, 48))).save(tmp_path / "in.png")
    random_file = tmp_path / "random.safetensors"
    assert run_cli("weights", "init", "--config", "tiny", "-o", random_file).returncode == 0
    result = run_cli("upscale", tmp_path / "in.png", "-o", tmp_path / "a.png", "--model", random_file)
    assert result.returncode == 0, result.stderr
    assert f"{random_file} {WARNING}" in result.stderr
    assert np.asarray(Image.open(tmp_path / "a.png")).shape == (160, 192, 3)
    quiet = run_cli("upscale", tmp_path / "in.png", "-o", tmp_path / "b.png", "--model", tiny_weights)  # provenance "test"
    assert quiet.returncode == 0 and "RANDOM" not in quiet.stderr
