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


def test_the_default_model_is_bundled_trained_and_used_without_flags(tmp_path):
    """After the plain install `tinysr upscale photo -o out` works offline with the shipped model."""
    from tinysr_cli.weights.format import read_info
    from tinysr_cli.weights.hub import file_sha256, resolve_model
    from tinysr_cli.weights.registry import load_registry

    registry = load_registry()
    entry = registry.get(registry.default)
    assert entry.name == "tinysr-small-x4" and entry.bundled == "tinysr-small-x4.safetensors"
    path = resolve_model(None)
    assert path == entry.bundled_path() and file_sha256(path) == entry.sha256 and path.stat().st_size == entry.size
    assert path.stat().st_size <= 25 * 1024 * 1024
    info = read_info(path)
    assert info.provenance["source"] == "trained" and info.provenance["teacher"] == "realesrgan-x4plus"
    assert {"recipe", "data_manifest_sha256", "license"} <= set(info.provenance)

    Image.fromarray(photo(size=(72, 90))).save(tmp_path / "photo.png")
    env = {"HF_HUB_OFFLINE": "1", "TINYSR_MODEL": "", "XDG_CONFIG_HOME": str(tmp_path / "config")}
    first = run_cli("upscale", tmp_path / "photo.png", "-o", tmp_path / "a.png", env=env)
    assert first.returncode == 0, first.stderr
    assert "RANDOM" not in first.stderr
    again = run_cli("upscale", tmp_path / "photo.png", "-o", tmp_path / "b.png", env=env)
    assert again.returncode == 0
    out = np.asarray(Image.open(tmp_path / "a.png"))
    assert out.shape == (288, 360, 3)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()  # deterministic


def test_a_damaged_bundled_file_is_refused(monkeypatch, tmp_path):
    import dataclasses

    import pytest

    from tinysr_cli.errors import WeightsError
    from tinysr_cli.weights import hub
    from tinysr_cli.weights.registry import load_registry

    registry = load_registry()
    entry = dataclasses.replace(registry.get("tinysr-small-x4"), sha256="0" * 64)
    with pytest.raises(WeightsError, match="the bundled model 'tinysr-small-x4' is damaged"):
        hub._bundled_file(entry)


def test_the_configured_default_may_be_a_pixel_space_model(tmp_path):
    Image.fromarray(photo(size=(24, 30))).save(tmp_path / "in.png")
    by_env = run_cli("upscale", tmp_path / "in.png", "-o", tmp_path / "env.png", env={"TINYSR_MODEL": "bicubic"})
    by_flag = run_cli("upscale", tmp_path / "in.png", "-o", tmp_path / "flag.png", "--model", "bicubic")
    assert by_env.returncode == 0 and by_flag.returncode == 0, by_env.stderr
    assert (tmp_path / "env.png").read_bytes() == (tmp_path / "flag.png").read_bytes()
