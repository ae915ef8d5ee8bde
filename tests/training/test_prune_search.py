"""Masked teachers, LoRA, the learnable search on planted teachers, the baselines and the prune stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft", reason="the search puts peft LoRA on the teacher")
diffusers = pytest.importorskip("diffusers", reason="the SD3 teacher is diffusers' SD3Transformer2DModel")

from tinysr_cli.errors import TinySRError  # noqa: E402
from tinysr_cli.models.transformer import ModulatedTransformer, TransformerConfig  # noqa: E402
from training.prune import baselines  # noqa: E402
from training.prune.decision import read_decision  # noqa: E402
from training.prune.lora import adapters_disabled, attach_lora, block_linear_names  # noqa: E402
from training.prune.search import MaskSearch, Objective, SearchSettings, run_search  # noqa: E402
from training.prune.space import GroupLayout, local_masks  # noqa: E402
from training.prune.stacks import ModulatedStack, SD3Stack, forward_kept, forward_masked  # noqa: E402
from training.prune.teachers import build_teacher  # noqa: E402
from training.stages import run_stage  # noqa: E402
from training.stages.common import read_metrics  # noqa: E402
from training.stages.recipe import RecipeError, load_recipe  # noqa: E402
from training.teacher import load_teacher, write_random_teacher  # noqa: E402

RECIPES = Path(__file__).resolve().parents[2] / "training" / "recipes"
TINY_RECIPE = Path(__file__).with_name("prune-synthetic-tiny.toml")  # in-process teacher, synthetic data
TINY_SD3 = dict(
    sample_size=32, patch_size=2, in_channels=16, num_layers=8, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32, out_channels=16, pos_embed_max_size=32,
)  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_sd3(seed: int = 0) -> SD3Stack:
    torch.manual_seed(seed)
    model = diffusers.SD3Transformer2DModel(**TINY_SD3).eval()
    return SD3Stack(model, torch.randn(1, 7, 32), torch.randn(1, 32))


def planted_teacher(identity: list[int], layers: int = 8, seed: int = 0) -> ModulatedStack:
    """A modulated transformer whose ``identity`` blocks have zero gates: block(h) == h exactly."""
    torch.manual_seed(seed)
    model = ModulatedTransformer(TransformerConfig(num_layers=layers, hidden_size=32, num_heads=2, pos_grid=4))
    with torch.no_grad():
        model.modulation.normal_(0, 0.5)
        model.modulation[:, 2] = 1.0  # gate_msa
        model.modulation[:, 5] = 1.0  # gate_mlp
        model.modulation[identity, 2] = 0.0
        model.modulation[identity, 5] = 0.0
        model.final_modulation.normal_(0, 0.1)
    return ModulatedStack(model)


def teacher_pool(stack, count: int = 4, batch: int = 4, size: int = 8, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    pool = []
    with torch.no_grad():
        for _ in range(count):
            latent = torch.randn(batch, 16, size, size, generator=generator)
            pool.append({"latent": latent, "target": forward_masked(stack, {"latent": latent})})
    return pool


# --- masked teachers ---------------------------------------------------------------------------


def _diffusers_restored(stack: SD3Stack, latent: torch.Tensor, skip: list[int] | None = None) -> torch.Tensor:
    size = latent.shape[0]
    v = stack.model(
        latent,
        stack.prompt_embeds.expand(size, -1, -1),
        stack.pooled_embeds.expand(size, -1),
        torch.full((size,), 1000.0),
        skip_layers=skip,
    ).sample
    return latent - v


@torch.no_grad()
def test_sd3_stack_equals_diffusers_forward_and_its_skip_layers() -> None:
    stack = tiny_sd3()
    latent = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    batch = {"latent": latent}
    assert torch.equal(forward_masked(stack, batch), _diffusers_restored(stack, latent))
    for skip in ([1, 2], [0, 7], [3, 5, 6, 7]):  # 7 is the last, context_pre_only block
        mask = torch.ones(8)
        mask[skip] = 0
        reference = _diffusers_restored(stack, latent, skip)
        assert torch.equal(forward_masked(stack, batch, mask), reference)
        assert torch.equal(forward_kept(stack, batch, [i for i in range(8) if i not in skip]), reference)
    # One mask per sample: each row matches its own skip_layers run.
    masks = torch.ones(2, 8)
    masks[0, [1, 4]] = 0
    masks[1, [6, 7]] = 0
    mixed = forward_masked(stack, batch, masks)
    for row, skip in enumerate(([1, 4], [6, 7])):
        assert torch.allclose(mixed[row], _diffusers_restored(stack, latent[row : row + 1], skip)[0], atol=1e-6)


@torch.no_grad()
def test_modulated_stack_equals_the_model_and_a_pruned_copy() -> None:
    stack = planted_teacher([], layers=6)
    model = stack.model
    latent = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(forward_masked(stack, {"latent": latent}), latent - model(latent))
    kept = [0, 2, 3, 5]
    small = ModulatedTransformer(TransformerConfig(num_layers=4, hidden_size=32, num_heads=2, pos_grid=4))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("blocks.") and k != "modulation"}
    for new, old in enumerate(kept):
        state |= {f"blocks.{new}.{k}": v for k, v in model.blocks[old].state_dict().items()}
    state["modulation"] = model.modulation[kept]
    small.load_state_dict(state)
    assert torch.allclose(forward_kept(stack, {"latent": latent}, kept), latent - small(latent), atol=1e-6)


def test_lora_starts_as_the_teacher_and_can_be_bypassed() -> None:
    stack = tiny_sd3()
    batch = {"latent": torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3))}
    with torch.no_grad():
        teacher = forward_masked(stack, batch)
    linear_count = sum(isinstance(m, torch.nn.Linear) for block in stack.blocks for m in block.modules())
    assert len(block_linear_names(stack)) == linear_count
    params = attach_lora(stack, rank=4, alpha=4.0)
    assert len(params) == 2 * linear_count  # lora_A and lora_B per Linear
    assert [n for n, p in stack.named_parameters() if p.requires_grad and "lora_" not in n] == []
    with torch.no_grad():
        assert torch.equal(forward_masked(stack, batch), teacher)  # B = 0 at start
        for name, param in stack.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
        assert not torch.allclose(forward_masked(stack, batch), teacher, atol=1e-3)
        with adapters_disabled(stack):
            assert torch.equal(forward_masked(stack, batch), teacher)
    assert all(p.requires_grad for p in params)


def test_lora_stays_float32_on_a_bf16_teacher() -> None:
    stack = tiny_sd3().to(torch.bfloat16)
    params = attach_lora(stack, rank=4, alpha=4.0)
    assert {p.dtype for p in params} == {torch.float32}
    assert {p.dtype for n, p in stack.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    masks = torch.tensor([[1.0, 0, 1, 1, 0, 1, 1, 0]], requires_grad=True)
    out = forward_masked(stack, {"latent": torch.randn(1, 16, 8, 8, dtype=torch.bfloat16)}, masks)
    out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16 and masks.grad is not None and masks.grad.dtype == torch.float32


def test_gradients_reach_every_logit_gate_and_lora_through_the_masked_teacher() -> None:
    stack = tiny_sd3()
    settings = SearchSettings(steps=10, lora_rank=4, lora_alpha=4.0)
    search = MaskSearch(stack, GroupLayout.uniform(8, 2, 4), settings, Objective(), seed=0)
    batch = teacher_pool(stack, count=1, batch=4)[0]
    masks = search.sampler.sample(4, tau=4.0, scale=100.0, generator=torch.Generator().manual_seed(0))
    out = forward_masked(stack, batch, masks)
    Objective()(out, batch, search.teacher_output(batch)).backward()
    for logits in search.sampler.group_logits:
        assert (logits.grad != 0).all()
    assert search.sampler.gate_logits.shape == (1, 3) and (search.sampler.gate_logits.grad != 0).all()
    # LoRA learns in every block some sample keeps, and not at all in a block every sample prunes.
    active = masks.detach().amax(0)
    assert 0 < active.sum() < 8  # both kinds occur with this seed
    for index in range(8):
        grads = [
            p.grad for n, p in stack.named_parameters() if f"transformer_blocks.{index}." in n and "lora_B" in n
        ]
        image_path = [
            p.grad for n, p in stack.named_parameters()
            if f"transformer_blocks.{index}." in n and "lora_B" in n and ("attn.to_q." in n or "ff.net.2." in n)
        ]  # fmt: skip
        if active[index]:
            assert all(g is not None and g.abs().sum() > 0 for g in image_path)
        else:
            assert all(g is None or g.abs().sum() == 0 for g in grads)


# --- the learnable search on planted teachers ------------------------------------------------------


def _search(stack, inter_block: bool, seed: int, steps: int = 100):
    settings = SearchSettings(
        steps=steps, gate_lr=1e-2, lora_lr=1e-3, lora_rank=4, lora_alpha=4.0, inter_block=inter_block
    )
    pool = teacher_pool(stack, seed=seed)
    search = MaskSearch(stack, GroupLayout.uniform(8, 2, 4), settings, Objective(), seed=seed)
    return run_search(search, lambda step: pool[step % len(pool)])


@torch.no_grad()
def test_planted_blocks_are_exact_identities() -> None:
    stack = planted_teacher([1, 6])
    h = torch.randn(2, 16, 32)
    for index in range(8):
        out = stack.block(index, (h,), None)[0]
        assert torch.equal(out, h) == (index in (1, 6))


@pytest.mark.parametrize("inter_block", [True, False])
def test_search_prunes_exactly_the_planted_identities(inter_block: bool) -> None:
    decision = _search(planted_teacher([1, 2, 4, 7], seed=3), inter_block, seed=3, steps=200)
    assert decision.kept_layers == [0, 3, 5, 6]


@pytest.mark.parametrize("seed", [0, 1])
def test_inter_block_activation_finds_an_unbalanced_plant(seed: int) -> None:
    # Three identities in the first group and one in the second: only "shrink first" reaches it.
    solution = (1, 0, 0, 0, 1, 1, 0, 1)
    assert solution not in local_masks(GroupLayout.uniform(8, 2, 4))  # out of TinyFusion's reach
    decision = _search(planted_teacher([1, 2, 3, 6], seed=seed), inter_block=True, seed=seed)
    assert tuple(decision.mask) == solution and decision.moves == ["shrink_first"]


# --- baselines -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unbalanced_plant():
    stack = planted_teacher([1, 2, 3, 6])
    return stack, teacher_pool(stack, count=2)


def test_similarity_and_metric_baselines_prune_the_planted_identities(unbalanced_plant) -> None:
    stack, batches = unbalanced_plant
    identity = [1, 2, 3, 6]
    loss = baselines.PrunedLoss(stack, batches, Objective())
    found = {
        "shortgpt": baselines.shortgpt(stack, batches, 4),
        "flux_lite": baselines.flux_lite(stack, batches, 4),
        "sensitivity": baselines.sensitivity(loss, 4),
        "snapfusion": baselines.snapfusion(loss, 4),
    }
    for name, decision in found.items():
        assert decision.method == name and decision.kept_layers == (0, 4, 5, 7), name
    mse = found["flux_lite"].details["block_mse"]
    increase = found["sensitivity"].details["loss_increase"]
    for index in range(8):
        assert (mse[index] == 0.0) == (index in identity)
        assert (increase[index] == 0.0) == (index in identity)
        assert (found["shortgpt"].details["block_influence"][index] < 1e-6) == (index in identity)
    first = found["snapfusion"].details["removals"][0]
    full = loss(list(range(8)))
    assert first["loss_increase_per_parameter"] * stack.block_cost(first["layer"]) == pytest.approx(first["loss"] - full)


def test_random_min_keeps_its_lowest_loss_candidate() -> None:
    stack = planted_teacher([1, 3], layers=4)
    loss = baselines.PrunedLoss(stack, teacher_pool(stack, count=1), Objective())
    decision = baselines.random_min(loss, 2, candidates=40, generator=torch.Generator().manual_seed(0))
    assert decision.kept_layers == (0, 2)
    assert min(c["loss"] for c in decision.details["candidates"]) == 0.0 == loss([0, 2])
    assert all(len(c["kept_layers"]) == 2 for c in decision.details["candidates"])


def test_bk_sdm_keeps_first_of_encoder_and_last_of_decoder_groups() -> None:
    assert baselines.bk_sdm(GroupLayout.uniform(24, 2, 4)).kept_layers == (0, 1, 4, 5, 8, 9, 14, 15, 18, 19, 22, 23)
    one_of_two = baselines.bk_sdm(GroupLayout.uniform(28, 1, 2)).kept_layers
    assert one_of_two == (*range(0, 14, 2), *range(15, 28, 2))


# --- recipes, teachers, data ---------------------------------------------------------------------


def test_paper_recipe_encodes_appendix_a() -> None:
    recipe = load_recipe(RECIPES / "prune.toml")
    prune = recipe.prune
    assert prune.method == "tinysr" and recipe.run.seed == 80 and recipe.run.mixed_precision == "no"
    search = prune.search
    assert (search.steps, search.lora_rank, search.lora_lr, search.inter_block) == (100_000, 64, 5e-5, True)
    assert (search.tau_start, search.tau_end, search.logit_scale) == (4.0, 0.1, 100.0)
    assert (prune.objective.task_weight, prune.objective.distill_weight) == (1.0, 1.0)
    assert prune.data.batch_size == 8 and prune.data.kind == "cache"
    layout = prune.space.layout(24)
    assert (len(layout.groups), layout.kept_count, len(layout.pairs)) == (6, 12, 3)
    assert recipe.teacher.sd3 == RECIPES / "checkpoints/stable-diffusion-3-medium-diffusers"
    assert recipe.teacher.transformer_lora == RECIPES / "checkpoints/tsdsr/transformer.safetensors"


def _recipe_copy(tmp_path: Path, replace: dict[str, str] | None = None, append: str = "") -> Path:
    text = TINY_RECIPE.read_text()
    for old, new in (replace or {}).items():
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "recipe.toml"
    path.write_text(text + append)
    return path


@pytest.mark.parametrize(
    ("replace", "append", "message"),
    [
        ({"lora_rank = 4": "lora_rnak = 4"}, "", r"unknown key\(s\) in \[search\]: lora_rnak"),
        ({"steps = 6": 'steps = "six"'}, "", "search.steps must be a int"),
        ({'method = "tinysr"': 'method = "magic"'}, "", "method is 'magic'"),
        ({}, "\n[extra]\nx = 1\n", r"unknown key\(s\) in \[recipe.toml\]: extra"),
        ({"keep = 2\n": "keep = 2\nratio = 0.5\n"}, "", "exactly one of"),
        ({"keep = 2\n": "ratio = 0.4\n", "group_size = 4\n": ""}, "", "no preset for pruning ratio 0.4"),
        ({'kind = "synthetic"': 'kind = "cache"'}, "", "data.path"),
        ({'task_weight = 1.0': 'task_loss = "l3"'}, "", "unknown loss 'l3'"),
        ({'kind = "tiny_sd3"': 'kind = "sd3"'}, "", "teacher.sd3 is required"),
        ({'dtype = "fp32"': 'dtype = "fp64"'}, "", "teacher.dtype is 'fp64'"),
        ({"log_every = 1": 'log_every = 1\nmixed_precision = "bf16"'}, "", 'run.mixed_precision must be "no" for the prune stage'),
        ({'stage = "prune"': 'stage = "vae"'}, "", "'tiny_sd3' .* is for the prune stage only"),
        ({'stage = "prune"': 'stage = "prun"'}, "", "stage = 'prun' is not one of prune, cache"),
    ],
)
def test_recipe_errors_name_the_culprit(tmp_path: Path, replace: dict, append: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe(_recipe_copy(tmp_path, replace, append))


def test_missing_recipe_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="cannot read the recipe"):
        load_recipe(tmp_path / "nope.toml")


# --- the stage entry point -----------------------------------------------------------------------


def _search_state(run_folder: Path) -> dict:
    """The search's state (sampler, LoRA, optimiser, RNG, step) in the run's newest checkpoint."""
    newest = sorted((run_folder / "checkpoints").iterdir())[-1]
    return torch.load(newest / "custom_checkpoint_1.pkl", weights_only=True)  # 0 is the run's step counter


def test_stage_writes_the_decision(tmp_path: Path) -> None:
    result = run_stage("prune", TINY_RECIPE, output=tmp_path / "run")
    assert result.output == tmp_path / "run" / "prune_decision.json" and result.finished and result.step == 6
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6] and rows[0]["tau"] == 4.0 and rows[-1]["tau"] == pytest.approx(0.1)
    assert all(row["loss"] == pytest.approx(row["task_loss"] + row["distill_loss"]) for row in rows)
    decision = read_decision(result.output)
    data = json.loads(result.output.read_text())
    assert decision.method == "tinysr" and decision.num_layers == 8 and len(decision.kept_layers) == 4
    assert sorted(data["kept_layers"] + data["pruned_layers"]) == list(range(8))
    groups, (pair,) = data["details"]["groups"], data["details"]["pairs"]
    assert [g["kept"] for g in groups][0] + [g["kept"] for g in groups][1] == data["kept_layers"]
    for group in groups:
        assert sum(group["probabilities"]) == pytest.approx(1.0) and len(group["patterns"]) == 6
    assert pair["move"] in pair["moves"] and sum(pair["probabilities"]) == pytest.approx(1.0)
    assert data["details"]["recipe"]["method"] == "tinysr" and data["details"]["steps"] == 6


def test_stop_at_step_and_resume_give_the_uninterrupted_search(tmp_path: Path) -> None:
    """Stop after step 3 (between checkpoints), resume: same metrics, decision and search state (tolerance 0)."""
    straight = run_stage("prune", TINY_RECIPE, output=tmp_path / "straight")
    stopped = run_stage("prune", TINY_RECIPE, output=tmp_path / "resumed", stop_at_step=3)
    assert not stopped.finished and stopped.step == 3 and not stopped.output.exists()
    assert _search_state(tmp_path / "resumed")["step"] == 3
    resumed = run_stage("prune", TINY_RECIPE, output=tmp_path / "resumed", resume=True)
    assert resumed.finished and resumed.step == 6
    assert read_metrics(tmp_path / "resumed" / "metrics.csv") == read_metrics(tmp_path / "straight" / "metrics.csv")
    assert json.loads(resumed.output.read_text()) == json.loads(straight.output.read_text())
    a, b = _search_state(tmp_path / "straight"), _search_state(tmp_path / "resumed")
    assert a["step"] == b["step"] == 6
    for part in ("sampler", "lora"):
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part])


def test_cli_stops_and_resumes_the_search(tmp_path: Path) -> None:
    from cli_helpers import run_cli

    args = ("train", "--stage", "prune", "--config", TINY_RECIPE, "-o", tmp_path / "cli")
    first = run_cli(*args, "--stop-at-step", "2")
    assert first.returncode == 0, first.stderr
    assert first.stdout == "" and "stopped at step 2; continue with --resume" in first.stderr
    assert not (tmp_path / "cli" / "prune_decision.json").exists()
    resumed = run_cli(*args, "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip() == str(tmp_path / "cli" / "prune_decision.json") and resumed.stderr == ""


def test_stage_refuses_to_overwrite_and_to_resume_another_recipe(tmp_path: Path) -> None:
    out = tmp_path / "run"
    path = run_stage("prune", TINY_RECIPE, output=out).output
    before = path.read_bytes()
    with pytest.raises(TinySRError, match="already holds a run") as error:
        run_stage("prune", TINY_RECIPE, output=out)
    assert "--resume" in error.value.hint and path.read_bytes() == before
    assert run_stage("prune", TINY_RECIPE, output=out, resume=True).output == path and path.read_bytes() == before
    changed = _recipe_copy(tmp_path, {"seed = 0": "seed = 1"})
    with pytest.raises(TinySRError, match="different recipe"):
        run_stage("prune", changed, output=out, resume=True)
    (out / "prune_decision.json").unlink()
    with pytest.raises(TinySRError, match="different recipe"):
        run_stage("prune", changed, output=out, resume=True)


@pytest.mark.parametrize(
    "method", ["tinyfusion", "random_min", "shortgpt", "flux_lite", "sensitivity", "snapfusion", "bk_sdm"]
)
def test_every_method_runs_through_the_stage(tmp_path: Path, method: str) -> None:
    recipe = _recipe_copy(tmp_path, {'method = "tinysr"': f'method = "{method}"'})
    decision = read_decision(run_stage("prune", recipe, output=tmp_path / "out").output)
    assert decision.method == method and decision.num_layers == 8 and len(decision.kept_layers) == 4
    if method == "tinyfusion":
        kept = set(decision.kept_layers)
        assert len(kept & {0, 1, 2, 3}) == 2 and decision.details["pairs"] == []


def test_a_baseline_refuses_stop_at_step(tmp_path: Path) -> None:
    recipe = _recipe_copy(tmp_path, {'method = "tinysr"': 'method = "shortgpt"'})
    with pytest.raises(TinySRError, match="'shortgpt' scores the teacher in one pass: it has no step to stop at"):
        run_stage("prune", recipe, output=tmp_path / "out", stop_at_step=1)
    assert not (tmp_path / "out").exists()


class NoisePairs:
    """A ``PairSource`` of random HQ images (64 px) and their 4x box-downscaled LQ; pair i seeded by i."""

    def identity(self) -> dict:
        return {"source": "noise pairs for the prune tests"}

    def pairs(self, indices, device):
        hq = torch.stack([torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in indices])
        return hq.to(device), torch.nn.functional.avg_pool2d(hq, 4).to(device)


def test_stage_on_the_shared_teacher_and_latent_cache(tmp_path: Path) -> None:
    from training.latent_cache import CacheSpec, LatentCache, build_shards, write_index

    spec = write_random_teacher(tmp_path / "teacher", num_layers=8)
    cache_spec = CacheSpec(dir=tmp_path / "cache", samples=4, shard_size=2, batch_size=2, dtype="fp32")
    folder, identity = tmp_path / "cache" / "key", {"test": "prune"}
    cpu = torch.device("cpu")
    build_shards(folder, cache_spec, identity, range(cache_spec.num_shards), lambda: load_teacher(spec), NoisePairs(), cpu)
    write_index(folder, cache_spec, identity)
    # Our stack over the shared teacher reproduces the teacher latents the cache holds.
    stack = build_teacher(spec, cpu, seed=0)
    sample = LatentCache(folder, ("z_lq", "z_teacher"))[1]
    with torch.no_grad():
        restored = forward_masked(stack, {"latent": sample["z_lq"][None]})[0]
    assert torch.allclose(restored, sample["z_teacher"], atol=1e-5)

    recipe = tmp_path / "prune.toml"
    recipe.write_text(
        f"""stage = "prune"
method = "tinysr"
[run]
output_dir = "out"
checkpoint_every = 1
log_every = 1
[teacher]
sd3 = "{spec.sd3}"
prompt_embeds = "{spec.prompt_embeds}"
pooled_embeds = "{spec.pooled_embeds}"
transformer_lora = "{spec.transformer_lora}"
dtype = "fp32"
[space]
keep = 2
group_size = 4
[search]
steps = 3
lora_rank = 4
lora_alpha = 4.0
[data]
kind = "cache"
path = "cache/key"
batch_size = 2
"""
    )
    decision = read_decision(run_stage("prune", recipe).output)
    assert len(decision.kept_layers) == 4 and decision.details["recipe"]["data"]["path"] == "cache/key"
    rows = read_metrics(tmp_path / "out" / "metrics.csv")
    assert len(rows) == 3 and all(row["distill_loss"] > 0 and row["task_loss"] > 0 for row in rows)
    shutil.rmtree(folder)
    with pytest.raises(TinySRError, match="not a complete latent cache"):
        run_stage("prune", recipe, output=tmp_path / "out2")
