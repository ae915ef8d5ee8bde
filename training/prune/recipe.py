"""The prune stage's part of a recipe: ``method`` and the ``[space]``, ``[search]``, ``[loss]``,
``[data]`` and ``[baselines]`` tables, read by ``training.stages.recipe.load_recipe`` (the one recipe
reader) when ``stage = "prune"``.

``[run]`` and ``[teacher]`` are the other stages' tables; ``[teacher] kind = "tiny_sd3"`` with a
``[teacher.config]`` of ``SD3Transformer2DModel`` arguments is a random in-process teacher.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from training.prune.search import Objective, SearchSettings
from training.prune.space import GroupLayout, ratio_preset
from training.recipe_io import RecipeError, Table

LEARNED_METHODS = ("tinysr", "tinyfusion")
HEURISTIC_METHODS = ("random_min", "shortgpt", "flux_lite", "sensitivity", "snapfusion", "bk_sdm")
METHODS = LEARNED_METHODS + HEURISTIC_METHODS
DATA_KINDS = ("synthetic", "cache")
PRUNE_TABLES = ("space", "search", "loss", "baselines")


@dataclass(frozen=True)
class SpaceSpec:
    """Exactly one of: ``keep`` + ``group_size`` (uniform N:M), ``ratio`` (Table C.2), ``groups`` (hybrid)."""

    keep: int | None = None
    group_size: int | None = None
    ratio: float | None = None
    groups: tuple[tuple[int, int], ...] | None = None

    def layout(self, num_layers: int) -> GroupLayout:
        if self.groups is not None:
            layout = GroupLayout.from_nm(self.groups)
        elif self.ratio is not None:
            layout = GroupLayout.for_ratio(num_layers, self.ratio)
        else:
            layout = GroupLayout.uniform(num_layers, self.keep, self.group_size)
        if layout.num_layers != num_layers:
            raise ValueError(f"the groups cover {layout.num_layers} layers but the teacher has {num_layers}")
        return layout


@dataclass(frozen=True)
class DataSpec:
    kind: str
    batch_size: int = 8
    path: Path | None = None  # cache: a complete latent cache folder (the one holding index.json)
    recipe: Path | None = None  # cache: a vae/restore recipe whose cache to use (built when missing)
    latent_size: int = 64  # synthetic
    pool: int = 4  # synthetic: number of distinct batches


@dataclass(frozen=True)
class BaselineSpec:
    eval_batches: int = 4  # batches every heuristic baseline scores on
    candidates: int = 100  # random_min: masks tried


@dataclass(frozen=True)
class PruneSpec:
    method: str
    space: SpaceSpec
    search: SearchSettings
    objective: Objective
    data: DataSpec
    baselines: BaselineSpec

    @property
    def learned(self) -> bool:
        """A learned search has steps (and checkpoints); a heuristic baseline scores in one pass."""
        return self.method in LEARNED_METHODS


def _settings(cls: type, table: Table | None, **fixed):
    """A dataclass from a table's scalars (typed by each default) plus ``fixed`` fields."""
    values = dict(fixed)
    if table is not None:
        values |= {k: v for k, v in table.fields(cls).items() if k not in fixed}
        table.done()
    try:
        return cls(**values)
    except ValueError as error:
        raise RecipeError(f"[{table.name if table else cls.__name__}]: {error}") from None


def _space(table: Table | None) -> SpaceSpec:
    if table is None:
        raise RecipeError("a prune recipe needs a [space] table")
    groups = table.value("groups", None, list)
    if groups is not None:
        if not all(isinstance(g, list) and len(g) == 2 and all(isinstance(v, int) for v in g) for g in groups):
            raise RecipeError("space.groups must be a list of [N, M] integer pairs")
        groups = tuple((n, m) for n, m in groups)
    spec = SpaceSpec(
        keep=table.value("keep", None, int),
        group_size=table.value("group_size", None, int),
        ratio=table.value("ratio", None, float),
        groups=groups,
    )
    table.done()
    chosen = [spec.groups is not None, spec.ratio is not None, spec.keep is not None or spec.group_size is not None]
    if sum(chosen) != 1:
        raise RecipeError("[space] needs exactly one of: keep + group_size, ratio, groups")
    if chosen[2] and (spec.keep is None or spec.group_size is None):
        raise RecipeError("space.keep and space.group_size must both be integers")
    if chosen[1]:
        try:
            ratio_preset(spec.ratio)
        except ValueError as error:
            raise RecipeError(f"[space]: {error}") from None
    return spec


def _data(table: Table | None) -> DataSpec:
    if table is None:
        raise RecipeError("a prune recipe needs a [data] table (kind = 'synthetic' or 'cache')")
    kind = table.choice("kind", "", DATA_KINDS)
    path, recipe = table.path("path"), table.path("recipe")
    if kind == "cache" and (path is None) == (recipe is None):
        raise RecipeError(
            "kind = 'cache' needs one of data.recipe (a vae or restore recipe: its [teacher], [data] and [cache] "
            "name the latent cache, which is built if missing) and data.path (a complete cache folder, holding index.json)"
        )
    spec = _settings(DataSpec, table, kind=kind, path=path, recipe=recipe)
    if spec.batch_size < 1 or spec.pool < 1:
        raise RecipeError("data.batch_size and data.pool must be at least 1")
    return spec


def parse_prune(top: Table, data: Table | None) -> PruneSpec:
    """The prune settings of a ``stage = "prune"`` recipe (``top`` is the whole file, ``data`` its [data])."""
    method = top.choice("method", "tinysr", METHODS)
    tables = {name: top.sub(name) for name in PRUNE_TABLES}
    space = _space(tables["space"])
    search = _settings(SearchSettings, tables["search"], inter_block=method == "tinysr")
    objective = _settings(Objective, tables["loss"])
    baselines = _settings(BaselineSpec, tables["baselines"])
    if baselines.eval_batches < 1 or baselines.candidates < 1:
        raise RecipeError("baselines.eval_batches and baselines.candidates must be at least 1")
    return PruneSpec(method, space, search, objective, _data(data), baselines)
