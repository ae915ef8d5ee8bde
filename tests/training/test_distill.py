"""The distill stage: photos from a .deb by manifest, cached teacher pairs, three phases, export.

A tiny Debian package is built with dpkg-deb from scikit-image's photos, so the real preparation
path (extract, sha256 check, 2x downscale) runs without a network.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tinysr_cli.engine.upscaler import Upscaler
from tinysr_cli.errors import TinySRError
from tinysr_cli.weights.format import load_weights
from training.photos import prepare_photos, read_manifest
from training.stages import run_stage

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb to build a test package")

PACKAGE, VERSION = "tinysr-test-photos", "1.0-1"


def _build_deb(folder: Path) -> tuple[Path, dict[str, str]]:
    """A .deb holding two JPEG photos and one PNG; returns its folder and member -> sha256."""
    from skimage import data

    root = folder / "pkg"
    pics = root / "usr/share/pics"
    pics.mkdir(parents=True)
    (root / "DEBIAN").mkdir()
    (root / "DEBIAN/control").write_text(
        f"Package: {PACKAGE}\nVersion: {VERSION}\nArchitecture: all\nMaintainer: t <t@example.org>\nDescription: test\n"
    )
    Image.fromarray(data.astronaut()[:320, :320]).save(pics / "astronaut.jpg", quality=95)
    Image.fromarray(data.coffee()[:300, :320]).save(pics / "coffee.jpg", quality=95)
    Image.fromarray(data.chelsea()[:160, :160]).save(pics / "chelsea.png")
    digests = {f"usr/share/pics/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest() for p in pics.iterdir()}
    debs = folder / "debs"
    debs.mkdir()
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(root), str(debs / f"{PACKAGE}_{VERSION}_all.deb")], check=True, capture_output=True)
    return debs, digests


def _manifest(folder: Path, digests: dict[str, str], wrong: str | None = None) -> Path:
    lines = [f"[packages.{PACKAGE}]", f'version = "{VERSION}"', 'license = "BSD-3-Clause"', ""]
    for member, digest in sorted(digests.items()):
        name = Path(member).stem
        split = "validation" if name == "chelsea" else "train"
        lines += [
            "[[photos]]", f'name = "{name}"', f'package = "{PACKAGE}"', f'member = "{member}"',
            f'sha256 = "{"0" * 64 if name == wrong else digest}"', f"downscale = {2 if member.endswith('.jpg') else 1}", f'split = "{split}"', "",
        ]
    path = folder / "photos.toml"
    path.write_text("\n".join(lines))
    return path


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    return _build_deb(tmp_path_factory.mktemp("deb"))


def test_photos_are_extracted_checked_and_downscaled(tmp_path, package):
    debs, digests = package
    manifest = read_manifest(_manifest(tmp_path, digests))
    photos = prepare_photos(manifest, tmp_path / "photos", debs)
    assert sorted(p.name for p in photos["train"]) == ["astronaut.png", "coffee.png"]
    assert [p.name for p in photos["validation"]] == ["chelsea.png"]
    assert Image.open(photos["train"][0]).size == (160, 160)  # 320x320 JPEG halved
    assert Image.open(photos["train"][1]).size == (160, 150)
    with Image.open(photos["validation"][0]) as png:  # lossless PNG kept as it is
        from skimage import data

        assert np.array_equal(np.asarray(png), data.chelsea()[:160, :160])
    before = {p: p.stat().st_mtime_ns for p in photos["train"]}
    prepare_photos(manifest, tmp_path / "photos", debs)  # a second call rewrites nothing
    assert {p: p.stat().st_mtime_ns for p in photos["train"]} == before
    assert "BSD-3-Clause" in (tmp_path / "photos/LICENSES.txt").read_text()


def test_a_photo_with_another_digest_is_refused(tmp_path, package):
    debs, digests = package
    manifest = read_manifest(_manifest(tmp_path, digests, wrong="coffee"))
    with pytest.raises(TinySRError, match=r"coffee.jpg .* has sha256 [0-9a-f]{64}, the manifest says 0{64}"):
        prepare_photos(manifest, tmp_path / "photos", debs)
    assert not (tmp_path / "photos/train/coffee.png").exists()


def test_a_missing_package_names_the_download(tmp_path, package):
    _, digests = package
    manifest = read_manifest(_manifest(tmp_path, digests))
    empty = tmp_path / "none"
    empty.mkdir()
    with pytest.raises(TinySRError, match=f"no {PACKAGE} {VERSION} .deb") as info:
        prepare_photos(manifest, tmp_path / "photos", empty)
    assert f"apt-get download {PACKAGE}={VERSION}" in info.value.hint


RECIPE = """
stage = "distill"

[run]
output_dir = "runs/distill"
seed = 7
mixed_precision = "no"
checkpoint_every = 2
keep_checkpoints = 2
log_every = 1
num_workers = 0

[data]
manifest = "photos.toml"
debs_dir = "{debs}"
photos_dir = "data/photos"
hr_size = 64
seed = 7

[distill]
teacher = "{teacher}"
samples = 6
validation_samples = 2
batch_size = 2
autoencoder_steps = 2
latent_steps = 2
pixel_steps = 2
lr = 1e-3
warmup_steps = 1
perceptual = "none"
perceptual_weight = 0.0
validate_every = 3
color_fix = "none"
export_dtype = "fp32"

[distill.transformer]
num_layers = 1
hidden_size = 32
num_heads = 2
patch_size = 2
latent_channels = 8
pos_grid = 8

[distill.vae]
latent_channels = 8
encoder_channels = [8, 8, 8]
encoder_blocks = [0, 1, 1]
decoder_channels = [8, 8, 8]
decoder_blocks = [1, 1, 0]
encoder_separable = false
decoder_separable = false
"""


def _recipe(folder: Path, package, teacher: str = "hr") -> Path:
    debs, digests = package
    folder.mkdir(parents=True, exist_ok=True)
    _manifest(folder, digests)
    path = folder / "recipe.toml"
    path.write_text(RECIPE.format(debs=debs, teacher=teacher))
    return path


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def test_distill_runs_end_to_end_and_exports_a_working_model(tmp_path, package, one_thread):
    recipe = _recipe(tmp_path / "a", package)
    result = run_stage("distill", recipe)
    assert result.finished and result.step == 6
    model, info = load_weights(result.output)
    assert info.provenance["source"] == "trained" and not info.random_init
    assert info.provenance["teacher"] == "hr"
    assert info.provenance["data_manifest_sha256"] == read_manifest(tmp_path / "a/photos.toml").digest
    assert info.color_fix == "none"
    upscaler = Upscaler(model, default_color_fix=info.color_fix)
    out = upscaler.upscale(torch.rand(3, 23, 37))
    assert out.shape == (3, 92, 148) and bool(torch.isfinite(out).all())
    metrics = (tmp_path / "a/runs/distill/metrics.csv").read_text().splitlines()
    assert metrics[0].split(",")[0] == "step" and len(metrics) == 7
    assert "val_psnr" in metrics[0]
    # Validation crops: LQ (nearest x4) | ours | target | ground truth, side by side.
    crop = Image.open(tmp_path / "a/runs/distill/validation/step-000003/0.png")
    assert crop.size == (4 * 64, 64)


def test_two_fresh_runs_are_bitwise_identical_and_resuming_changes_nothing(tmp_path, package, one_thread):
    first = run_stage("distill", _recipe(tmp_path / "a", package))
    # The second run finds the pair cache of the first one's folder layout empty: it builds its own.
    second_recipe = _recipe(tmp_path / "b", package)
    stopped = run_stage("distill", second_recipe, stop_at_step=3)
    assert not stopped.finished and stopped.step == 3
    resumed = run_stage("distill", second_recipe, resume=True)
    assert resumed.finished
    a, b = _tensors(first.output), _tensors(resumed.output)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pairs_hold_the_teachers_output(tmp_path, package, one_thread):
    """With a real pixel-space teacher the cached target is its rounded output on the cached LQ."""
    peers = pytest.importorskip("tinysr_cli.weights.peers")
    recipe = _recipe(tmp_path / "a", package, teacher="span-x4")
    run_stage("distill", recipe, stop_at_step=1)
    shards = sorted((tmp_path / "a/data/pairs").glob("*/shard-*.safetensors"))
    pairs = load_file(shards[0])
    teacher = peers.load_peer_model("span-x4").float().eval()
    with torch.no_grad():
        expected = (teacher(pairs["lq"][:2].float() / 255).clamp(0, 1) * 255).round().to(torch.uint8)
    difference = (expected.int() - pairs["target"][:2].int()).abs().max()
    assert int(difference) <= 1  # one level: batched and single-image convolutions round differently


def test_recipe_errors_name_the_key(tmp_path, package):
    recipe = _recipe(tmp_path / "a", package)
    recipe.write_text(recipe.read_text().replace("batch_size = 2", "batch_size = 2\nbatchsize = 3"))
    with pytest.raises(TinySRError, match=r"unknown key\(s\) in \[distill\]: batchsize"):
        run_stage("distill", recipe)
    recipe.write_text(recipe.read_text().replace("hr_size = 64", "hr_size = 60").replace("batchsize = 3\n", ""))
    with pytest.raises(TinySRError, match=r"hr_size 60 must be a multiple of 32"):
        run_stage("distill", recipe)


def test_own_photos_replace_the_manifest(tmp_path, package, one_thread):
    """`tinysr train --stage distill --data DIR`: every image of DIR trains, DIR/validation validates."""
    from skimage import data

    photos = tmp_path / "mine"
    (photos / "trip" ).mkdir(parents=True)
    (photos / "validation").mkdir()
    Image.fromarray(data.rocket()[:200, :200]).save(photos / "trip" / "rocket.png")
    Image.fromarray(data.coffee()[:200, :200]).save(photos / "coffee.jpg", quality=95)
    Image.fromarray(data.chelsea()[:100, :100]).save(photos / "validation" / "cat.png")
    recipe = _recipe(tmp_path / "a", package)
    result = run_stage("distill", recipe, data=photos)
    _, info = load_weights(result.output)
    assert info.provenance["data"] == str(photos) and info.provenance["data_files"] == 2
    assert "data_manifest" not in info.provenance
    assert not (tmp_path / "a/data/photos").exists()  # the manifest's photos were never prepared
    assert (tmp_path / "a/runs/distill/validation/step-000003/0.png").is_file()
