"""The training stages end to end on real photos and a tiny random teacher, with the shipped tiny recipes.

A module-scoped workspace holds the teacher, four photos and copies of ``training/recipes/*-tiny.toml``;
the pipeline cache -> prune -> vae -> restore phase 1 -> restore phase 2 -> export runs once, as the
``tinysr train`` lines of docs/training.md write it, and the tests inspect it.
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from cli_helpers import run_cli
from conftest import photo
from tinysr_cli.errors import TinySRError

pytest.importorskip("accelerate")
pytest.importorskip("peft")

from training.latent_cache import LatentCache, bicubic_input, cache_folder, cache_identity  # noqa: E402
from training.stages import run_stage  # noqa: E402
from training.stages.common import StepBatches, read_metrics  # noqa: E402
from training.stages.pairs import make_pair_source  # noqa: E402
from training.stages.recipe import RecipeError, load_recipe  # noqa: E402
from training.teacher import load_teacher, write_random_teacher  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "training" / "recipes"
TINY = ("prune-tiny", "vae-tiny", "restore-stage1-tiny", "restore-stage2-tiny", "export-tiny")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    write_random_teacher(root / "teacher", seed=5)
    (root / "photos").mkdir()
    for name in PHOTOS:
        Image.fromarray(photo(name)).save(root / "photos" / f"{name}.png")
    for name in TINY:
        shutil.copy(RECIPES / f"{name}.toml", root / f"{name}.toml")
    return root


def documented_tiny_commands() -> list[list[str]]:
    """The ``tinysr train`` lines of docs/training.md's section on the tiny recipes, in order."""
    text = (ROOT / "docs" / "training.md").read_text()
    section = text[text.index("## Trying it without the real weights") :]
    block = section[section.index("```bash\n") + 8 :]
    block = block[: block.index("```")]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.startswith("tinysr train ")]


@pytest.fixture(scope="module")
def pipeline(workspace) -> dict[str, Path]:
    """Every stage once, in the order and with the arguments docs/training.md gives (in-process CLI)."""
    from tinysr_cli.cli.main import app

    commands = documented_tiny_commands()
    assert [c[c.index("--config") + 1] for c in commands] == [
        "vae-tiny.toml", "prune-tiny.toml", "vae-tiny.toml", "restore-stage1-tiny.toml", "restore-stage2-tiny.toml", "export-tiny.toml"
    ]
    before = Path.cwd()
    os.chdir(workspace)  # the doc runs them from the recipes' folder
    try:
        for command in commands:
            app(args=[*command[1:], "--quiet"], standalone_mode=False)
    finally:
        os.chdir(before)
    outputs = {
        "prune-tiny": workspace / "runs/prune/prune_decision.json",
        "vae-tiny": workspace / "runs/vae/vae.safetensors",
        "restore-stage1-tiny": workspace / "runs/restore-stage1/student.safetensors",
        "restore-stage2-tiny": workspace / "runs/restore-stage2/student.safetensors",
        "export-tiny": workspace / "runs/tinysr-tiny.safetensors",
    }
    assert all(path.is_file() for path in outputs.values())
    return outputs


def _variant(workspace: Path, recipe: str, name: str, replacements: dict[str, str]) -> Path:
    """A copy of a tiny recipe with some text replaced (old -> new)."""
    text = (workspace / f"{recipe}.toml").read_text()
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    path = workspace / f"{name}.toml"
    path.write_text(text)
    return path


def test_cache_holds_the_teachers_latents_of_real_pairs(workspace, pipeline):
    recipe = load_recipe(workspace / "vae-tiny.toml")
    source = make_pair_source(recipe.data, workspace)
    folder = cache_folder(recipe.cache, cache_identity(recipe.cache, recipe.teacher, source))
    assert sorted(p.name for p in folder.iterdir()) == ["identity.json", "index.json", "shard-00000.safetensors", "shard-00001.safetensors"]
    cache = LatentCache(folder)
    assert len(cache) == 8
    sample = cache[5]
    assert sample["lq"].dtype == torch.uint8 and sample["lq"].shape == (3, 16, 16) and sample["hq"].shape == (3, 64, 64)
    assert all(sample[k].shape == (16, 8, 8) for k in ("z_lq", "z_hq", "z_teacher"))
    # The stored pair is pair 5 of the source, and the latents are the teacher's, recomputed here.
    hq, lq = source.pairs([5], torch.device("cpu"))
    assert torch.equal(sample["hq"], (hq[0] * 255).round().to(torch.uint8))
    teacher = load_teacher(recipe.teacher)
    with torch.no_grad():
        z_lq = teacher.encode(bicubic_input(sample["lq"][None].float() / 255, (64, 64)))
        z_hq = teacher.encode(sample["hq"][None].float() / 255 * 2 - 1)
        z_teacher = teacher.restore(z_lq)
    for name, expected in (("z_lq", z_lq), ("z_hq", z_hq), ("z_teacher", z_teacher)):
        torch.testing.assert_close(sample[name], expected[0], atol=1e-5, rtol=1e-5)
    # --stage cache finds the complete cache and rebuilds nothing.
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert run_stage("cache", workspace / "vae-tiny.toml").output == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    # The key follows everything the samples depend on: another data seed is another cache.
    other = make_pair_source({**recipe.data, "seed": 81}, workspace)
    assert cache_folder(recipe.cache, cache_identity(recipe.cache, recipe.teacher, other)) != folder


def test_exported_weights_upscale_a_photo_in_the_cli(workspace, pipeline):
    from tinysr_cli.weights.format import load_weights

    exported = pipeline["export-tiny"]
    model, info = load_weights(exported)
    assert info.provenance["source"] == "tinysr train"
    from training.prune import read_decision

    decision = read_decision(pipeline["prune-tiny"])
    assert decision.num_layers == 4 and info.provenance["kept_layers"] == list(decision.kept_layers)
    assert decision.details["recipe"]["data"]["recipe"] == "vae-tiny.toml"  # the shared cache, no placeholder
    assert info.provenance["student"]["step"] == 4 and info.provenance["student"]["phase"] == 2
    assert info.provenance["vae"]["step"] == 6
    assert info.provenance["recipe"]["export"]["dtype"] == "fp32"
    assert model.config.transformer.num_layers == 2 and model.config.vae.decoder_separable is False

    small = workspace / "small.png"
    Image.fromarray(photo("coffee")).resize((80, 60)).save(small)
    result = run_cli("upscale", small, "-o", workspace / "big.png", "--model", exported)
    assert result.returncode == 0, result.stderr
    with Image.open(workspace / "big.png") as big:
        assert big.size == (320, 240)


def test_export_refuses_to_replace_a_file(workspace, pipeline):
    with pytest.raises(TinySRError, match="exists"):
        run_stage("export", workspace / "export-tiny.toml")


@pytest.mark.parametrize(
    "recipe, overrides, limits",
    [
        # A cache of 4 samples and a batch of 4: every step sees the same batch.
        ("restore-stage1-tiny", {"steps = 6": "steps = 30", "lr = 1e-3": "lr = 3e-3"}, {"latent_loss": 0.5}),
        (
            "vae-tiny",
            {"encoder_steps = 6": "encoder_steps = 30", "decoder_steps = 6": "decoder_steps = 30", "encoder_lr = 1e-3": "encoder_lr = 1e-2", "decoder_lr = 1e-3": "decoder_lr = 1e-2"},
            {"pixel_loss": 0.5, "encoder_loss": 0.9},  # the tiny encoder learns the teacher's latents slowly
        ),
    ],
)
def test_loss_falls_on_a_fixed_batch(workspace, pipeline, recipe, overrides, limits):
    replacements = {"samples = 8": "samples = 4", **overrides, 'output_dir = "runs/': 'output_dir = "runs/overfit-'}
    path = _variant(workspace, recipe, f"{recipe}-overfit", replacements)
    result = run_stage(load_recipe(path).stage, path)
    rows = read_metrics(result.output.parent / "metrics.csv")
    assert len(rows) == 30
    for metric, ratio in limits.items():
        first, last = rows[0][metric], sum(row[metric] for row in rows[-3:]) / 3
        assert last < ratio * first, (metric, first, last)


@pytest.mark.parametrize("stage, recipe", [("vae", "vae-tiny"), ("restore", "restore-stage2-tiny")])
def test_resume_gives_the_same_losses_and_weights_as_an_uninterrupted_run(workspace, pipeline, stage, recipe):
    """Stop after step 2 (a checkpoint), resume, compare every later loss exactly (tolerance 0)."""
    from safetensors.torch import load_file

    path = workspace / f"{recipe}.toml"
    straight = run_stage(stage, path, output=workspace / "straight" / recipe)
    stopped = run_stage(stage, path, output=workspace / "stopped" / recipe, stop_at_step=2)
    assert not stopped.finished and stopped.step == 2 and not stopped.output.exists()
    resumed = run_stage(stage, path, output=workspace / "stopped" / recipe, resume=True)
    assert resumed.finished
    rows_straight = read_metrics(workspace / "straight" / recipe / "metrics.csv")
    rows_resumed = read_metrics(workspace / "stopped" / recipe / "metrics.csv")
    assert len(rows_straight) == len(rows_resumed) and "discriminator_loss" in rows_straight[-1]
    assert rows_resumed == rows_straight
    a, b = load_file(straight.output), load_file(resumed.output)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_resume_is_exact_in_mixed_precision(workspace, precision):
    """The fp32 resume test above, with autocast on: bf16 runs on the CPU; fp16 needs CUDA, and then the
    GradScaler's state (scale, growth tracker) must come back from the checkpoint too.

    Without the pipeline fixture the first run here builds the latent cache, so this also checks that
    the initial weights do not depend on what building the cache drew from the global RNG.
    """
    from safetensors.torch import load_file

    if precision == "fp16" and not torch.cuda.is_available():
        pytest.skip("fp16 autocast with a GradScaler needs CUDA (on the CPU the recipe falls back to float32)")
    recipe = "vae-tiny"
    path = _variant(workspace, recipe, f"{recipe}-{precision}", {'mixed_precision = "no"': f'mixed_precision = "{precision}"'})
    straight = run_stage("vae", path, output=workspace / f"straight-{precision}")
    stopped = run_stage("vae", path, output=workspace / f"stopped-{precision}", stop_at_step=2)
    assert not stopped.finished and stopped.step == 2
    if precision == "fp16":
        checkpoint = workspace / f"stopped-{precision}" / "checkpoints" / "step-2"
        assert (checkpoint / "scaler.pt").is_file(), sorted(p.name for p in checkpoint.iterdir())
    resumed = run_stage("vae", path, output=workspace / f"stopped-{precision}", resume=True)
    assert resumed.finished
    rows_straight = read_metrics(workspace / f"straight-{precision}" / "metrics.csv")
    assert rows_straight and read_metrics(workspace / f"stopped-{precision}" / "metrics.csv") == rows_straight
    a, b = load_file(straight.output), load_file(resumed.output)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_run_folders_are_protected(workspace, pipeline):
    recipe = workspace / "restore-stage1-tiny.toml"
    with pytest.raises(TinySRError, match="already holds a run"):
        run_stage("restore", recipe)
    changed = _variant(workspace, "restore-stage1-tiny", "changed", {"lr = 1e-3": "lr = 2e-3"})
    with pytest.raises(TinySRError, match="different recipe"):
        run_stage("restore", changed, output=workspace / "runs" / "restore-stage1", resume=True)
    with pytest.raises(RecipeError, match="stage 'restore', not 'vae'"):
        run_stage("vae", recipe)


def test_cli_train_stops_resumes_and_prints_the_result(workspace, pipeline):
    args = ("train", "--stage", "restore", "--config", workspace / "restore-stage1-tiny.toml", "-o", workspace / "cli-run")
    first = run_cli(*args, "--stop-at-step", "3")
    assert first.returncode == 0, first.stderr
    assert first.stdout == "" and "stopped at step 3; continue with --resume" in first.stderr
    again = run_cli(*args)
    assert again.returncode == 1 and "Error: " in again.stderr and "already holds a run" in again.stderr
    resumed = run_cli(*args, "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip() == str(workspace / "cli-run" / "student.safetensors") and resumed.stderr == ""
    bad = run_cli("train", "--stage", "nope", "--config", workspace / "vae-tiny.toml")
    assert bad.returncode == 1 and "unknown stage 'nope'" in bad.stderr


def test_restore_reads_the_pruning_decision(workspace, pipeline):
    from training.prune import PruneDecision, write_decision
    from training.student import load_student

    write_decision(PruneDecision("tinysr", 4, (1, 3)), workspace / "decision.json")
    replacements = {'kept_layers = "runs/prune/prune_decision.json"': 'kept_layers = "decision.json"', "steps = 6": "steps = 1", 'output_dir = "runs/': 'output_dir = "runs/decided-'}
    result = run_stage("restore", _variant(workspace, "restore-stage1-tiny", "decided", replacements))
    _, info = load_student(result.output)
    assert info.kept_layers == (1, 3) and info.config.num_layers == 2
    write_decision(PruneDecision("tinysr", 24, (1, 3)), workspace / "decision.json")
    with pytest.raises(TinySRError, match="prunes a 24-block model; the teacher has 4 blocks"):
        run_stage("restore", workspace / "decided.toml", output=workspace / "runs" / "decided-again")


# ----------------------------------------------------------------------------- pieces


def test_step_batches_resume_and_split_across_processes():
    full = StepBatches(10, 4, seed=80, start_step=0)
    steps = [full.batch_indices(s) for s in range(5)]
    # Five steps of 4 = two full epochs: each is a permutation of the 10 samples.
    flat = [i for batch in steps for i in batch]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]
    resumed = iter(StepBatches(10, 4, seed=80, start_step=3))
    assert [next(resumed), next(resumed)] == steps[3:5]
    halves = [StepBatches(10, 4, seed=80, start_step=0, rank=r, world=2) for r in (0, 1)]
    assert [halves[0].batch_indices(s) + halves[1].batch_indices(s) for s in range(5)] == steps
    with pytest.raises(TinySRError, match="does not divide"):
        StepBatches(10, 5, seed=80, start_step=0, rank=0, world=2)


def test_shipped_recipes_encode_the_papers_settings():
    vae = load_recipe(RECIPES / "vae.toml")
    assert (vae.vae.batch_size, vae.vae.encoder_steps, vae.vae.encoder_lr) == (64, 100_000, 3e-4)
    assert (vae.vae.decoder_steps, vae.vae.decoder_lr, vae.vae.discriminator_lr) == (200_000, 5e-4, 1e-5)
    assert (vae.vae.perceptual, vae.vae.perceptual_weight, vae.vae.gan_weight) == ("lpips", 3.0, 1.0)
    assert vae.discriminator.type == "projected" and vae.discriminator.blocks == (2, 5, 8, 11)
    stage1 = load_recipe(RECIPES / "restore-stage1.toml").restore
    assert (stage1.phase, stage1.batch_size, stage1.lr, stage1.steps, stage1.lora.rank) == (1, 128, 1e-4, 150_000, 64)
    stage2 = load_recipe(RECIPES / "restore-stage2.toml").restore
    assert (stage2.batch_size, stage2.lr, stage2.discriminator_lr, stage2.steps) == (96, 1e-6, 5e-6, 50_000)
    assert (stage2.latent_weight, stage2.perceptual_weight, stage2.gan_weight) == (5.0, 1.0, 0.3)
    for name in ("vae", "restore-stage1", "restore-stage2"):
        recipe = load_recipe(RECIPES / f"{name}.toml")
        assert (recipe.run.seed, recipe.run.mixed_precision) == (80, "fp16")
        assert recipe.teacher.latent_scale == 1.5305 and recipe.teacher.timestep == 1000.0
    assert load_recipe(RECIPES / "export.toml").export.dtype == "fp16"


def test_recipe_mistakes_are_named(tmp_path):
    text = (RECIPES / "vae-tiny.toml").read_text()
    cases = {
        text.replace("encoder_lr = 1e-3", "encoder_lr = 1e-3\nencoder_rl = 1"): "unknown key.*encoder_rl",
        text.replace("batch_size = 4\nencoder_steps", 'batch_size = "4"\nencoder_steps'): "vae.batch_size must be a int",
        text.replace('perceptual = "none"', 'perceptual = "ssim"'): "vae.perceptual is 'ssim'",
        text.replace('mixed_precision = "no"', 'mixed_precision = "fp8"'): "run.mixed_precision",
        text.replace('[student.vae]\n', '[student.vae]\nencoder_blocks = [1, 1, 1]\n', 1).replace("encoder_blocks = [1, 1, 1, 1]\n", ""): "same length",
    }
    for content, message in cases.items():
        path = tmp_path / "recipe.toml"
        path.write_text(content)
        with pytest.raises(RecipeError, match=message):
            load_recipe(path)


def test_data_table_mistakes_are_named(workspace):
    good = {"hr_folders": ["photos"], "hr_size": 64, "scale": 4, "seed": 1, "degradation": "mild"}
    assert make_pair_source(good, workspace).degradation.stage2.blur_prob == 0.5  # the MILD preset
    cases = {
        "unknown key.*crop": {**good, "crop": 3},
        "degradation is 'jpeg'": {**good, "degradation": "jpeg"},
        "multiple of the scale 4": {**good, "hr_size": 66},
        "hr_folders must list": {**good, "hr_folders": "photos"},
    }
    for message, data in cases.items():
        with pytest.raises(TinySRError, match=message):
            make_pair_source(data, workspace)


def test_lpips_without_weights_is_a_clear_error():
    from training.losses import build_perceptual

    try:
        loss = build_perceptual("lpips")
    except TinySRError as error:
        assert "perceptual = 'lpips' is unavailable" in str(error)
        assert 'perceptual = "none"' in error.hint
    else:
        pytest.skip(f"LPIPS with pretrained weights is available here ({type(loss.network).__name__})")
    assert build_perceptual("none") is None


def test_projected_discriminator_loads_dino_layout_weights(tmp_path):
    from training.discriminator import DinoViT, ViTConfig, build_discriminator, DiscriminatorSpec

    config = ViTConfig(patch_size=8, embed_dim=32, depth=4, num_heads=2, image_size=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vit = DinoViT(config)
    # DINO's release nests the backbone under "teacher" with "backbone." prefixes and a projection head.
    state = {f"backbone.{k}": v for k, v in vit.state_dict().items()} | {"head.last_layer.weight": torch.zeros(3, 3)}
    torch.save({"teacher": state}, tmp_path / "dino.pth")
    spec = DiscriminatorSpec(type="projected", weights=tmp_path / "dino.pth", blocks=(1, 3), num_heads=2)
    discriminator = build_discriminator(spec)
    assert discriminator.backbone.config == config
    assert all(not p.requires_grad for p in discriminator.backbone.parameters())
    assert all(p.requires_grad for p in discriminator.heads.parameters())
    image = torch.rand(2, 3, 48, 48) * 2 - 1
    logits = discriminator(image)
    assert logits.shape == (2, 2 * (1 + 16))  # two hooked blocks, 1 + (32/8)^2 tokens each
    x = ((image + 1) / 2 - discriminator.mean) / discriminator.std
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        torch.testing.assert_close(discriminator.backbone.features(x, [1])[0], vit.features(x, [1])[0], atol=1e-6, rtol=1e-6)
    with pytest.raises(TinySRError, match="needs DINO ViT weights") as error:
        build_discriminator(DiscriminatorSpec(type="projected", weights=tmp_path / "missing.pth"))
    assert 'type = "patch"' in error.value.hint
