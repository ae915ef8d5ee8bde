"""Training stages behind ``tinysr train --stage ...``: ``prune``, ``cache``, ``vae``, ``restore``,
``export``, ``distill`` (a small model from a pixel-space teacher, data to exported file in one run).

``run_stage`` reads the recipe and dispatches; each stage module can also be used on its own.
"""

from __future__ import annotations

from pathlib import Path

from tinysr_cli.errors import TinySRError
from training.stages.common import Reporter, SilentReporter, StageResult
from training.stages.recipe import STAGES, Recipe, RecipeError, load_recipe


def run_stage(
    stage: str,
    recipe_path: Path,
    output: Path | None = None,
    resume: bool = False,
    reporter: Reporter | None = None,
    stop_at_step: int | None = None,
    data: Path | None = None,
) -> StageResult:
    """Run one stage of a recipe. ``output`` overrides the run folder (the weights file for export);
    ``stop_at_step`` checkpoints and returns after that step (continue with ``resume``); ``data``
    (distill only) is a folder of the user's own photos that replaces the recipe's manifest."""
    if stage not in STAGES:
        raise TinySRError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    recipe = load_recipe(recipe_path)
    if recipe.stage is not None and recipe.stage != stage and not (stage == "cache" and recipe.stage in ("vae", "restore")):
        raise RecipeError(f"{Path(recipe_path).name} is a recipe for stage {recipe.stage!r}, not {stage!r}")
    reporter = reporter or SilentReporter()
    if stage == "export":
        from training.stages.export import run_export_stage

        return run_export_stage(recipe, output, reporter)
    if stage == "cache":
        from training.stages.cache import run_cache_stage

        return run_cache_stage(recipe, reporter)
    recipe.require("run")
    output_dir = Path(output) if output is not None else recipe.run.output_dir
    if stage == "prune":
        from training.stages.prune import run_prune_stage

        return run_prune_stage(recipe, output_dir, resume, reporter, stop_at_step)
    if stage == "distill":
        from training.stages.distill import run_distill_stage

        return run_distill_stage(recipe, output_dir, resume, reporter, stop_at_step, data)
    if stage == "vae":
        from training.stages.vae import run_vae_stage

        return run_vae_stage(recipe, output_dir, resume, reporter, stop_at_step)
    from training.stages.restore import run_restore_stage

    return run_restore_stage(recipe, output_dir, resume, reporter, stop_at_step)


__all__ = ["Recipe", "Reporter", "StageResult", "load_recipe", "run_stage"]
