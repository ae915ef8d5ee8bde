"""``--stage prune``: search (or score) the teacher's layers and write the decision JSON.

The stage runs in the loop every stage shares (``training.stages.common.Run``): the run folder holds
``recipe.toml``, ``checkpoints/step-N`` (the search's gates, LoRA, optimiser, sampling RNG and step)
and ``metrics.csv`` (loss, task_loss, distill_loss, tau); the result, ``prune_decision.json``, is
written atomically when the search ends. A learned search (tinysr, tinyfusion) stops at
``--stop-at-step`` and resumes exactly; a heuristic baseline scores the teacher in one pass, which is
the run's single step.

With ``[data] kind = "cache"`` the search reads the shared latent cache: ``recipe = "vae.toml"``
names it by that recipe's ``[teacher]``, ``[data]`` and ``[cache]`` (and builds it when missing, as
the other stages do), ``path`` by its folder.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tinysr_cli.errors import TinySRError
from training.prune import baselines
from training.prune.decision import PruneDecision, write_decision
from training.prune.masks import MaskDecision
from training.prune.recipe import PruneSpec
from training.prune.search import MaskSearch
from training.prune.sources import CachedLatents, TeacherTargets
from training.prune.space import GATE_MOVES, GroupLayout
from training.prune.stacks import Batch, ResidualStack
from training.prune.teachers import build_teacher
from training.recipe_io import RecipeError
from training.stages.common import LaunchError, Reporter, Run, StageResult
from training.stages.recipe import Recipe

DECISION_NAME = "prune_decision.json"


def run_prune_stage(
    recipe: Recipe, output_dir: Path, resume: bool, reporter: Reporter, stop_at_step: int | None = None
) -> StageResult:
    """Run the pruning stage of ``recipe`` into ``output_dir``; the result's output is the decision file."""
    if recipe.prune is None:
        raise RecipeError(f'{recipe.path.name} is not a prune recipe (it has no stage = "prune")')
    recipe.require("run", "teacher")
    spec = recipe.prune
    if stop_at_step is not None and not spec.learned:
        raise TinySRError(
            f"method {spec.method!r} scores the teacher in one pass: it has no step to stop at and resume from",
            hint="run it without --stop-at-step",
        )
    run = Run(recipe, output_dir, resume, reporter)
    if run.accelerator.num_processes > 1:
        raise LaunchError("the prune stage runs in one process; start it without accelerate launch or torchrun")
    stack = build_teacher(recipe.teacher, run.device, run.spec.seed)
    try:
        layout = spec.space.layout(stack.num_blocks)
        if spec.method == "tinysr":
            layout.check_pairs_can_move()
    except ValueError as error:
        raise RecipeError(f"[space]: {error}") from None
    batches = _batch_source(run, recipe, stack)

    if spec.learned:
        search = MaskSearch(stack, layout, spec.search, spec.objective, run.spec.seed)
        run.accelerator.register_for_checkpointing(search)
        run.restore_checkpoint()

        def search_step(batch: Batch, index: int) -> dict[str, float]:
            report = search.train_step(batch)
            return {
                "loss": report.loss,
                "task_loss": report.task_loss,
                "distill_loss": report.distill_loss,
                "tau": report.tau,
                "skipped": float(report.skipped),
            }

        stream = (batches(step) for step in itertools.count(run.step))
        finished = run.train(spec.search.steps, stream, search_step, stop_at_step, task="prune")
        result = search.decision()
        decision = PruneDecision(spec.method, layout.num_layers, tuple(result.kept_layers), _search_details(layout, result, search.step))
    else:
        scored: list[PruneDecision] = []

        def score(batch: Batch, index: int) -> dict[str, float]:
            scored.append(_baseline(spec, stack, layout, batches, run.spec.seed))
            return {}

        run.restore_checkpoint()
        finished = run.train(1, itertools.repeat({}), score, task=f"prune ({spec.method})")
        # A resumed finished run scores again: the baselines are deterministic.
        decision = scored[0] if scored else _baseline(spec, stack, layout, batches, run.spec.seed)

    output = run.output_dir / DECISION_NAME
    if finished and run.is_main:
        details = {**decision.details, "recipe": json.loads(json.dumps(recipe.raw, default=str))}
        write_decision(PruneDecision(decision.method, decision.num_layers, decision.kept_layers, details), output)
        reporter.note(f"wrote {output}")
    return StageResult(output, run.step, finished)


def _batch_source(run: Run, recipe: Recipe, stack: ResidualStack) -> Callable[[int], Batch]:
    data = recipe.prune.data
    if data.kind == "cache":
        folder = data.path if data.recipe is None else shared_cache(run, data.recipe)
        return CachedLatents(folder, data.batch_size, run.spec.seed, run.device)
    return TeacherTargets(stack, data.pool, data.batch_size, data.latent_size, run.spec.seed, run.device)


def shared_cache(run: Run, stage_recipe: Path) -> Path:
    """The latent cache of a vae/restore recipe (its [teacher], [data], [cache]), built first if missing."""
    from training.stages.cache import ensure_cache
    from training.stages.recipe import load_recipe

    if not stage_recipe.is_file():
        raise RecipeError(f"data.recipe: {stage_recipe} not found (a vae or restore recipe naming the latent cache)")
    cache = ensure_cache(run.accelerator, load_recipe(stage_recipe), run.reporter, fields=("z_lq", "z_hq", "z_teacher"))
    return cache.folder


def _baseline(spec: PruneSpec, stack: ResidualStack, layout: GroupLayout, batches: Callable[[int], Batch], seed: int) -> PruneDecision:
    if spec.method == "bk_sdm":
        return baselines.bk_sdm(layout)
    evaluation = [batches(i) for i in range(spec.baselines.eval_batches)]
    kept = layout.kept_count
    if spec.method == "shortgpt":
        return baselines.shortgpt(stack, evaluation, kept)
    if spec.method == "flux_lite":
        return baselines.flux_lite(stack, evaluation, kept)
    loss = baselines.PrunedLoss(stack, evaluation, spec.objective)
    if spec.method == "sensitivity":
        return baselines.sensitivity(loss, kept)
    if spec.method == "snapfusion":
        return baselines.snapfusion(loss, kept)
    generator = torch.Generator().manual_seed(seed)
    return baselines.random_min(loss, kept, spec.baselines.candidates, generator)


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
