"""`tinysr weights list|download|verify|path|push|remove`: models on the Hugging Face Hub and in its cache."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from tinysr_cli.cli import console

_MODEL_HELP = "Registry name, owner/name\\[@revision]\\[/file.safetensors], hf:// URI or local file (default: the configured model)."


def _human(size: int | None) -> str:
    if size is None:
        return "-"
    if size < 1000:
        return f"{size} B"
    value = size / 1000
    for unit in ("KB", "MB"):
        if value < 1000:
            return f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def list_command(
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show the registered models, which are cached, their sizes, and other tinysr files in the cache."""
    from huggingface_hub import constants
    from rich.table import Table

    from tinysr_cli.errors import WeightsError
    from tinysr_cli.weights.hub import HubFile, cached_path, cached_weights
    from tinysr_cli.weights.registry import load_registry

    registry = load_registry()
    models = []
    for entry in registry.entries.values():
        path = entry.bundled_path() if entry.bundled else (cached_path(HubFile.from_entry(entry)) if entry.published else None)
        models.append({
            **{key: getattr(entry, key) for key in entry.__dataclass_fields__},
            "default": entry.name == registry.default,
            "cached_path": str(path) if path else None,
            "cached_size": path.stat().st_size if path else None,
        })
    registered = {(entry.repo_id, entry.filename) for entry in registry.entries.values()}
    others = [item for item in cached_weights() if (item.repo_id, item.filename) not in registered]
    if others:
        from tinysr_cli.weights.format import read_info

        def is_tinysr(path: Path) -> bool:
            try:
                read_info(path)
            except WeightsError:
                return False
            return True

        others = [item for item in others if is_tinysr(item.path)]
    other_rows = [
        {"uri": f"hf://{item.repo_id}@{item.commit}/{item.filename}", "refs": list(item.refs), "path": str(item.path), "size": item.size}
        for item in others
    ]
    if json_output:
        summary = {
            "default": registry.default,
            "default_from": registry.default_origin,
            "config": str(registry.config_path),
            "cache": constants.HF_HUB_CACHE,
            "models": models,
            "other_cached": other_rows,
        }
        console.stdout.print(json.dumps(summary, indent=2), markup=False)
        return
    table = Table(title=f"models (default: {registry.default}, from {registry.default_origin})")
    table.add_column("name", no_wrap=True)
    table.add_column("hub file", overflow="fold")
    table.add_column("status")
    table.add_column("size", justify="right", no_wrap=True)
    for model in models:
        status = "not published" if not model["published"] else ("cached" if model["cached_path"] else "not cached")
        size = model["cached_size"] if model["cached_path"] else model["size"]
        name = model["name"] + (" *" if model["default"] else "")
        table.add_row(name, f"hf://{model['repo_id']}@{model['revision']}/{model['filename']}", status, _human(size))
    for row in other_rows:
        table.add_row("", row["uri"], "cached" + (f" ({', '.join(row['refs'])})" if row["refs"] else ""), _human(row["size"]))
    console.stdout.print(table)
    console.note(f"cache: {constants.HF_HUB_CACHE}")


def download_command(
    model: Annotated[Optional[str], typer.Argument(help=_MODEL_HELP, show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Download a model into the Hugging Face cache (if needed), check it, and print its path."""
    from tinysr_cli.weights.hub import resolve_model

    console.stdout.print(str(resolve_model(model, progress=not quiet)), markup=False)


def verify_command(
    file: Annotated[Path, typer.Argument(help="A tinysr .safetensors file (for example a cached one).")],
    sha256: Annotated[Optional[str], typer.Option("--sha256", help="Expected sha256 (64 hex digits).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Check a weights file: tinysr format, then its sha256 against --sha256, the registry, or the Hub."""
    from tinysr_cli.errors import WeightsError
    from tinysr_cli.weights.format import SUPPORTED_DTYPES, read_info
    from tinysr_cli.weights.hub import HubFile, cached_path, measure
    from tinysr_cli.weights.registry import SHA256_PATTERN, load_registry

    if sha256 is not None and not SHA256_PATTERN.fullmatch(sha256.lower()):
        raise WeightsError(f"--sha256 must be 64 hex digits, not {sha256!r}")
    info = read_info(file)
    registry = load_registry()
    expected, expected_size, against = (sha256.lower() if sha256 else None), None, "--sha256"
    if expected is None:
        real = os.path.realpath(file)
        for entry in registry.entries.values():
            cached = cached_path(HubFile.from_entry(entry)) if entry.published and entry.sha256 else None
            if cached is not None and os.path.realpath(cached) == real:
                expected, expected_size, against = entry.sha256, entry.size, f"registry entry {entry.name}"
                break
    integrity = measure(file, expected_sha256=expected, expected_size=expected_size)
    if integrity.checked_against is None:
        against = "nothing (pass --sha256 to compare)"
    elif integrity.checked_against.startswith("hub-"):
        against = "the Hub's " + ("LFS sha256" if integrity.checked_against == "hub-lfs-sha256" else "git blob id")
    matches = [entry.name for entry in registry.find_by_sha256(integrity.sha256)]
    result = {
        "path": str(file),
        "format": "tinysr",
        "dtype": SUPPORTED_DTYPES[info.dtype],
        "color_fix": info.color_fix,
        "size": integrity.size,
        "sha256": integrity.sha256,
        "checked_against": against,
        "registry_matches": matches,
    }
    if json_output:
        console.stdout.print(json.dumps(result, indent=2), markup=False)
        return
    lines = [
        f"{file}: OK",
        f"  format   tinysr, {result['dtype']}, colour fix {info.color_fix}",
        f"  size     {integrity.size} bytes",
        f"  sha256   {integrity.sha256}",
        f"  checked  against {against}",
        f"  registry {', '.join(matches) if matches else 'no entry has this sha256'}",
    ]
    console.stdout.print("\n".join(lines), markup=False)


def path_command(
    model: Annotated[Optional[str], typer.Argument(help=_MODEL_HELP, show_default=False)] = None,
) -> None:
    """Print where a model is in the Hugging Face cache (no network); an error if it is not cached."""
    from tinysr_cli.errors import WeightsError
    from tinysr_cli.weights.hub import cached_path, parse_model_spec, require_published
    from tinysr_cli.weights.registry import load_registry

    registry = load_registry()
    spec = model if model is not None else registry.default
    source = parse_model_spec(spec, registry)
    if isinstance(source, Path):
        console.stdout.print(str(source.resolve()), markup=False)
        return
    require_published(source)
    path = cached_path(source)
    if path is None:
        raise WeightsError(f"{source.label} is not in the Hugging Face cache", hint=f"download it with `tinysr weights download {spec}`")
    console.stdout.print(str(path), markup=False)


def push_command(
    file: Annotated[Path, typer.Argument(help="A tinysr .safetensors file (for example from `import-official`).")],
    repo: Annotated[str, typer.Argument(help="Your Hub model repo, owner/name (created if needed).")],
    path_in_repo: Annotated[str, typer.Option("--path-in-repo", help="File name in the repo.")] = "model.safetensors",
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    license: Annotated[str, typer.Option("--license", help="Licence id for the model card.")] = "other",
    message: Annotated[Optional[str], typer.Option("--message", "-m", help="Commit message.")] = None,
) -> None:
    """Upload a weights file with a generated model card to your own Hub repo; prints the pinned --model."""
    from tinysr_cli.weights.hub import push_weights

    result = push_weights(file, repo, filename=path_in_repo, private=private, license=license, message=message)
    console.note(f"uploaded {result.filename} ({result.size} bytes, sha256 {result.sha256}) in {result.commit_url}")
    console.note(
        "to make it a named model for your team, add to the config file:\n"
        f'[models.NAME]\nrepo_id = "{result.repo_id}"\nfilename = "{result.filename}"\n'
        f'revision = "{result.commit}"\nsha256 = "{result.sha256}"\nsize = {result.size}'
    )
    console.stdout.print(result.pinned_spec, markup=False)


def remove_command(
    model: Annotated[str, typer.Argument(help="Registry name or owner/name\\[@revision]\\[/file.safetensors].")],
) -> None:
    """Delete a model's file (every cached revision) from the Hugging Face cache."""
    from tinysr_cli.errors import WeightsError
    from tinysr_cli.weights.hub import parse_model_spec, remove_cached

    source = parse_model_spec(model)
    if isinstance(source, Path):
        raise WeightsError(f"{source} is a local file, not a cached Hub model", hint="tinysr only removes files from the Hugging Face cache")
    removed, freed = remove_cached(source)
    if removed == 0:
        console.note(f"{source.label}: nothing cached")
        return
    console.note(f"{source.label}: removed {removed} cached cop{'y' if removed == 1 else 'ies'} of {source.filename}, freed {_human(freed)}")
