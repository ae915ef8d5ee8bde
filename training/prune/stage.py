"""``--stage prune``: read a recipe, search (or score) the teacher's layers, write the decision JSON.

With ``[data] kind = "cache"`` the search reads the shared latent cache: ``recipe = "vae.toml"``
names it by that recipe's ``[teacher]``, ``[data]`` and ``[cache]`` (and builds it when missing, as
the other stages do), ``path`` by its folder.

The output folder holds ``prune_decision.json`` (the result) and, for the learned methods,
``prune_state.pt`` (a checkpoint every ``search.checkpoint_every`` steps and at the end). Both are
written atomically, so an interrupted run leaves either the previous complete file or none.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tinysr_cli.atomic import atomic_path
from tinysr_cli.engine.device import resolve_device
from tinysr_cli.errors import TinySRError
from training.prune import baselines
from training.prune.decision import PruneDecision, read_decision, write_decision
from training.prune.masks import MaskDecision
from training.prune.recipe import LEARNED_METHODS, PruneRecipe, RecipeError, load_recipe
from training.prune.search import MaskSearch, StepReport, run_search
from training.prune.sources import CachedLatents, TeacherTargets
from training.prune.space import GATE_MOVES, GroupLayout
from training.prune.stacks import Batch, ResidualStack
from training.prune.teachers import build_teacher

DECISION_NAME = "prune_decision.json"
STATE_NAME = "prune_state.pt"


def run_prune_stage(
    recipe_path: Path,
    output_dir: Path,
    resume: bool,
    on_progress: Callable[[StepReport], None] | None = None,
) -> Path:
    """Run the pruning stage of ``recipe_path`` into ``output_dir``; returns the decision file."""
    recipe = load_recipe(recipe_path)
    output_dir = Path(output_dir)
    decision_path, state_path = output_dir / DECISION_NAME, output_dir / STATE_NAME
    if not resume and (decision_path.exists() or state_path.exists()):
        raise TinySRError(
            f"{output_dir} already holds a pruning run", hint="pass --resume to continue it, or choose another output folder"
        )
    if resume and decision_path.exists():
        if read_decision(decision_path).details.get("recipe") != recipe.raw:
            raise TinySRError(f"{decision_path} was made with a different recipe", hint="use another output folder")
        return decision_path
    state = _load_state(state_path, recipe) if resume and state_path.exists() else None
    output_dir.mkdir(parents=True, exist_ok=True)

    device = resolve_device(recipe.device)
    stack = build_teacher(recipe.teacher, device, recipe.seed)
    try:
        layout = recipe.space.layout(stack.num_blocks)
        if recipe.method == "tinysr":
            layout.check_pairs_can_move()
    except ValueError as error:
        raise RecipeError(f"[space]: {error}") from None
    batches = _batch_source(recipe, stack, device)

    if recipe.method in LEARNED_METHODS:
        search = MaskSearch(stack, layout, recipe.search, recipe.objective, recipe.seed)
        if state is not None:
            search.load_state_dict(state["search"])

        def checkpoint(current: MaskSearch) -> None:
            _save_state(state_path, current, recipe)

        result = run_search(search, batches, on_progress, checkpoint, recipe.checkpoint_every)
        checkpoint(search)
        decision = PruneDecision(
            recipe.method, layout.num_layers, tuple(result.kept_layers), _search_details(layout, result, search.step)
        )
    else:
        decision = _baseline(recipe, stack, layout, batches)
    details = {**decision.details, "recipe": recipe.raw}
    decision = PruneDecision(decision.method, decision.num_layers, decision.kept_layers, details)
    write_decision(decision, decision_path)
    return decision_path


def _batch_source(recipe: PruneRecipe, stack: ResidualStack, device: torch.device) -> Callable[[int], Batch]:
    data = recipe.data
    if data.kind == "cache":
        folder = data.path if data.recipe is None else shared_cache(data.recipe, device)
        return CachedLatents(folder, data.batch_size, recipe.seed, device)
    return TeacherTargets(stack, data.pool, data.batch_size, data.latent_size, recipe.seed, device)


class _OneProcess:
    """The part of an ``accelerate.Accelerator`` that ``ensure_cache`` uses, for this single-process stage."""

    is_main_process, process_index, num_processes = True, 0, 1

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def wait_for_everyone(self) -> None:
        pass


def shared_cache(stage_recipe: Path, device: torch.device) -> Path:
    """The latent cache of a vae/restore recipe (its [teacher], [data], [cache]), built first if missing."""
    from training.stages.cache import ensure_cache
    from training.stages.common import SilentReporter
    from training.stages.recipe import load_recipe as load_stage_recipe

    if not stage_recipe.is_file():
        raise RecipeError(f"data.recipe: {stage_recipe} not found (a vae or restore recipe naming the latent cache)")
    recipe = load_stage_recipe(stage_recipe)
    cache = ensure_cache(_OneProcess(device), recipe, SilentReporter(), fields=("z_lq", "z_hq", "z_teacher"))
    return cache.folder


def _baseline(
    recipe: PruneRecipe, stack: ResidualStack, layout: GroupLayout, batches: Callable[[int], Batch]
) -> PruneDecision:
    if recipe.method == "bk_sdm":
        return baselines.bk_sdm(layout)
    evaluation = [batches(i) for i in range(recipe.baselines.eval_batches)]
    kept = layout.kept_count
    if recipe.method == "shortgpt":
        return baselines.shortgpt(stack, evaluation, kept)
    if recipe.method == "flux_lite":
        return baselines.flux_lite(stack, evaluation, kept)
    loss = baselines.PrunedLoss(stack, evaluation, recipe.objective)
    if recipe.method == "sensitivity":
        return baselines.sensitivity(loss, kept)
    if recipe.method == "snapfusion":
        return baselines.snapfusion(loss, kept)
    generator = torch.Generator().manual_seed(recipe.seed)
    return baselines.random_min(loss, kept, recipe.baselines.candidates, generator)


def _search_details(layout: GroupLayout, result: MaskDecision, steps: int) -> dict[str, Any]:
    groups = []
    for group, choice, probabilities in zip(layout.groups, result.patterns, result.pattern_probabilities):
        groups.append(
            {
                "layers": list(group.layers),
                "keep": group.keep,
                "patterns": [[group.start + p for p in pattern] for pattern in group.patterns],
                "probabilities": probabilities,
                "most_probable": [group.start + p for p in group.patterns[choice]],
                "kept": [i for i in group.layers if result.mask[i]],
            }
        )
    pairs = [
        {"groups": [a, b], "moves": list(GATE_MOVES), "probabilities": probabilities, "move": move}
        for (a, b), probabilities, move in zip(layout.pairs, result.gate_probabilities, result.moves)
    ]
    return {"steps": steps, "groups": groups, "pairs": pairs}


def _save_state(path: Path, search: MaskSearch, recipe: PruneRecipe) -> None:
    with atomic_path(path) as tmp:
        torch.save({"recipe": recipe.raw, "search": search.state_dict()}, tmp)


def _load_state(path: Path, recipe: PruneRecipe) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as error:
        raise TinySRError(f"cannot read the checkpoint {path}: {error}") from error
    if state.get("recipe") != recipe.raw:
        raise TinySRError(
            f"{path} was made with a different recipe", hint="resume with the same recipe, or use another output folder"
        )
    return state
