"""The ``--stage prune`` recipe: a TOML file read with tomllib into frozen settings.

Top-level keys ``method``, ``seed``, ``device``; tables ``[teacher]``, ``[space]``, ``[search]``,
``[loss]``, ``[data]``, ``[baselines]``. ``[teacher]`` is the other stages' table (TSD-SR's files,
``training.teacher.TeacherSpec``), or ``kind = "tiny_sd3"`` with a ``[teacher.config]`` of
``SD3Transformer2DModel`` arguments for a random in-process teacher. Unknown keys are errors (a typo
must not silently fall back to a default). Relative paths are resolved against the recipe's folder.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.recipe_io import RecipeError, read_toml
from training.prune.search import Objective, SearchSettings
from training.prune.space import GroupLayout, ratio_preset
from training.prune.teachers import TEACHER_KINDS, TinyTeacherSpec
from training.teacher import TeacherSpec


LEARNED_METHODS = ("tinysr", "tinyfusion")
HEURISTIC_METHODS = ("random_min", "shortgpt", "flux_lite", "sensitivity", "snapfusion", "bk_sdm")
METHODS = LEARNED_METHODS + HEURISTIC_METHODS
DATA_KINDS = ("synthetic", "cache")
TEACHER_DTYPES = ("fp16", "bf16", "fp32")  # the run dtype on accelerators; the CPU always runs fp32


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
class PruneRecipe:
    method: str
    seed: int
    device: str
    teacher: TeacherSpec | TinyTeacherSpec
    space: SpaceSpec
    search: SearchSettings
    objective: Objective
    data: DataSpec
    baselines: BaselineSpec
    checkpoint_every: int
    raw: dict[str, Any]  # the parsed TOML (JSON-safe), stored with checkpoints and decisions


def _check_type(value: Any, default: Any, where: str) -> Any:
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise RecipeError(f"{where} must be a {type(default).__name__}, got {value!r}")
    return value


def _table(data: dict[str, Any], name: str) -> dict[str, Any]:
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise RecipeError(f"[{name}] must be a table")
    return dict(table)


def _reject_unknown(table: dict[str, Any], name: str) -> None:
    if table:
        raise RecipeError(f"unknown key(s) in [{name}]: {', '.join(sorted(table))}")


def _settings(cls: type, table: dict[str, Any], name: str, fixed: dict[str, Any] | None = None) -> Any:
    """Build a dataclass from a table of scalars (checked against each default's type) plus ``fixed`` fields."""
    values = dict(fixed or {})
    for item in dataclasses.fields(cls):
        if item.name in values or item.name not in table:
            continue
        values[item.name] = _check_type(table.pop(item.name), item.default, f"{name}.{item.name}")
    _reject_unknown(table, name)
    try:
        return cls(**values)
    except ValueError as error:
        raise RecipeError(f"[{name}]: {error}") from None


def _path(table: dict[str, Any], key: str, name: str, base: Path) -> Path | None:
    value = table.pop(key, None)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise RecipeError(f"{name}.{key} must be a path string")
    return (base / Path(value).expanduser()).resolve()


def _choice(value: Any, choices: tuple[str, ...], where: str) -> str:
    if value not in choices:
        raise RecipeError(f"{where} is {value!r}; choose one of {', '.join(choices)}")
    return value


def _teacher(table: dict[str, Any], base: Path) -> TeacherSpec | TinyTeacherSpec:
    kind = _choice(table.pop("kind", "sd3"), TEACHER_KINDS, "teacher.kind")
    if kind == "tiny_sd3":
        config = table.pop("config", None)
        if not isinstance(config, dict) or not config:
            raise RecipeError("a tiny_sd3 teacher needs a [teacher.config] table of SD3Transformer2DModel arguments")
        spec = _settings(TinyTeacherSpec, table, "teacher", fixed={"config": config})
    else:
        paths = {
            key: _path(table, key, "teacher", base)
            for key in ("sd3", "prompt_embeds", "pooled_embeds", "transformer_lora", "vae_lora")
        }
        missing = [key for key in ("sd3", "prompt_embeds", "pooled_embeds") if paths[key] is None]
        if missing:
            raise RecipeError(f"[teacher] needs {', '.join(missing)} (or kind = 'tiny_sd3')")
        alpha = table.pop("lora_alpha", None)
        alpha = None if alpha is None else _check_type(alpha, 1.0, "teacher.lora_alpha")
        spec = _settings(TeacherSpec, table, "teacher", fixed={**paths, "lora_alpha": alpha})
    _choice(spec.dtype, TEACHER_DTYPES, "teacher.dtype")
    return spec


def _space(table: dict[str, Any]) -> SpaceSpec:
    groups = table.pop("groups", None)
    if groups is not None:
        if not isinstance(groups, list) or not all(
            isinstance(g, list) and len(g) == 2 and all(isinstance(v, int) for v in g) for g in groups
        ):
            raise RecipeError("space.groups must be a list of [N, M] integer pairs")
        groups = tuple((n, m) for n, m in groups)
    spec = SpaceSpec(
        keep=table.pop("keep", None),
        group_size=table.pop("group_size", None),
        ratio=table.pop("ratio", None),
        groups=groups,
    )
    _reject_unknown(table, "space")
    chosen = [spec.groups is not None, spec.ratio is not None, spec.keep is not None or spec.group_size is not None]
    if sum(chosen) != 1:
        raise RecipeError("[space] needs exactly one of: keep + group_size, ratio, groups")
    if chosen[2] and not (isinstance(spec.keep, int) and isinstance(spec.group_size, int)):
        raise RecipeError("space.keep and space.group_size must both be integers")
    if chosen[1]:
        if not isinstance(spec.ratio, (int, float)):
            raise RecipeError("space.ratio must be a number")
        try:
            ratio_preset(spec.ratio)
        except ValueError as error:
            raise RecipeError(f"[space]: {error}") from None
    return spec


def _data(table: dict[str, Any], base: Path) -> DataSpec:
    kind = _choice(table.pop("kind", None), DATA_KINDS, "data.kind")
    path = _path(table, "path", "data", base)
    recipe = _path(table, "recipe", "data", base)
    if kind == "cache" and (path is None) == (recipe is None):
        raise RecipeError(
            "kind = 'cache' needs one of data.recipe (a vae or restore recipe: its [teacher], [data] and [cache] "
            "name the latent cache, which is built if missing) and data.path (a complete cache folder, holding index.json)"
        )
    return _settings(DataSpec, table, "data", fixed={"kind": kind, "path": path, "recipe": recipe})


def load_recipe(path: Path) -> PruneRecipe:
    path = Path(path)
    raw = read_toml(path)
    raw = json.loads(json.dumps(raw, default=str))  # JSON-safe: stored in checkpoints and the decision
    data = {key: (dict(value) if isinstance(value, dict) else value) for key, value in raw.items()}
    base = path.resolve().parent
    method = _choice(data.pop("method", "tinysr"), METHODS, "method")
    seed = _check_type(data.pop("seed", 0), 0, "seed")
    device = _check_type(data.pop("device", "auto"), "", "device")
    data.pop("stage", None)  # informative only
    teacher = _teacher(_table(data, "teacher"), base)
    data.pop("teacher", None)
    space = _space(_table(data, "space"))
    data.pop("space", None)
    search_table = _table(data, "search")
    checkpoint_every = _check_type(search_table.pop("checkpoint_every", 1000), 0, "search.checkpoint_every")
    search = _settings(SearchSettings, search_table, "search", fixed={"inter_block": method == "tinysr"})
    objective = _settings(Objective, _table(data, "loss"), "loss")
    data_spec = _data(_table(data, "data"), base)
    baselines = _settings(BaselineSpec, _table(data, "baselines"), "baselines")
    for name in ("search", "loss", "data", "baselines"):
        data.pop(name, None)
    if data:
        raise RecipeError(f"unknown top-level key(s) in {path.name}: {', '.join(sorted(data))}")
    if data_spec.batch_size < 1 or data_spec.pool < 1 or baselines.eval_batches < 1 or baselines.candidates < 1:
        raise RecipeError("data.batch_size, data.pool, baselines.eval_batches and baselines.candidates must be at least 1")
    return PruneRecipe(
        method, seed, device, teacher, space, search, objective, data_spec, baselines, checkpoint_every, raw
    )
