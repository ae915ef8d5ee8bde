"""The latent cache as a stage: build it (sharded over processes) or find it, then open it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tinysr_cli.errors import TinySRError
from training.latent_cache import LatentCache, build_shards, cache_folder, cache_identity, cache_key, write_index
from training.stages.common import Reporter, SilentReporter, StageResult, check_launch
from training.stages.pairs import make_pair_source
from training.stages.recipe import Recipe
from training.teacher import load_teacher

if TYPE_CHECKING:
    from accelerate import Accelerator


def ensure_cache(accelerator: Accelerator, recipe: Recipe, reporter: Reporter, fields: Sequence[str]) -> LatentCache:
    """Open the recipe's cache, building the missing shards first (each process builds every n-th)."""
    recipe.require("teacher", "cache")
    if recipe.data is None:
        recipe.require("data")
    spec, teacher = recipe.cache, recipe.teacher
    source = make_pair_source(recipe.data, recipe.path.parent)
    # The main process hashes the teacher files first; the others then find the hashes memoised.
    identity = cache_identity(spec, teacher, source) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    if identity is None:
        identity = cache_identity(spec, teacher, source)
    folder = cache_folder(spec, identity)
    if not (folder / "index.json").is_file():
        rank, world = accelerator.process_index, accelerator.num_processes
        mine = [s for s in range(spec.num_shards) if s % world == rank]
        reporter.note(f"building the latent cache in {folder} ({spec.samples} samples, {spec.num_shards} shards)")
        done = 0

        def on_shard(_shard: int) -> None:
            nonlocal done
            done += 1
            reporter.progress("cache", done, len(mine), {})

        build_shards(folder, spec, identity, mine, lambda: load_teacher(teacher, accelerator.device), source, accelerator.device, on_shard)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_index(folder, spec, identity)
        accelerator.wait_for_everyone()
    cache = LatentCache(folder, fields)
    if cache.length != spec.samples or _index_key(folder) != cache_key(identity):
        raise TinySRError(f"{folder}: the cache index does not match the recipe", hint="delete the folder to rebuild it")
    return cache


def _index_key(folder: Path) -> str:
    return json.loads((folder / "index.json").read_text())["key"]


def run_cache_stage(recipe: Recipe, reporter: Reporter | None = None) -> StageResult:
    """``--stage cache``: build the cache without training (useful on a separate, larger job)."""
    from accelerate import Accelerator

    reporter = reporter or SilentReporter()
    accelerator = Accelerator()
    check_launch(accelerator)
    cache = ensure_cache(accelerator, recipe, reporter, fields=("z_lq",))
    reporter.note(f"latent cache ready: {cache.folder} ({len(cache)} samples)")
    return StageResult(cache.folder, len(cache), True)
