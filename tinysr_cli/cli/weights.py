"""`tinysr weights init` and `tinysr weights info`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tinysr_cli.cli import console


def init_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the .safetensors file.")],
    config: Annotated[str, typer.Option(help="Named architecture: 'full' (the release) or 'tiny'.")] = "full",
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same file.")] = 0,
    dtype: Annotated[str, typer.Option(help="Stored dtype: fp32, fp16 or bf16.")] = "fp32",
    overwrite: Annotated[bool, typer.Option(help="Replace OUTPUT if it exists.")] = False,
) -> None:
    """Write randomly initialised weights of a named config (for tests, demos and benchmarks)."""
    from tinysr_cli.errors import TinySRError
    from tinysr_cli.weights.format import DTYPES_BY_NAME, RANDOM_INIT, RANDOM_INIT_WARNING, init_weights, save_weights

    if dtype not in DTYPES_BY_NAME:
        raise TinySRError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES_BY_NAME)}")
    if output.exists() and not overwrite:
        raise TinySRError(f"{output} exists", hint="pass --overwrite to replace it")
    model = init_weights(config, seed)
    provenance = {"source": RANDOM_INIT, "config": config, "seed": seed}
    save_weights(model, output, dtype=DTYPES_BY_NAME[dtype], provenance=provenance)
    console.warn(RANDOM_INIT_WARNING.format(path=output) + "; use it for tests and benchmarks only")
    console.stdout.print(str(output))


def info_command(
    path: Annotated[Path, typer.Argument(help="A tinysr .safetensors file.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show a weights file's config, parameter counts per component, dtype and provenance."""
    import json

    from rich.table import Table

    from tinysr_cli.weights.format import RANDOM_INIT_WARNING, SUPPORTED_DTYPES, load_weights

    model, info = load_weights(path)
    if info.random_init:
        console.warn(RANDOM_INIT_WARNING.format(path=path))
    counts = {
        "transformer": sum(p.numel() for p in model.transformer.parameters()),
        "vae.encoder": sum(p.numel() for p in model.vae.encoder.parameters()),
        "vae.decoder": sum(p.numel() for p in model.vae.decoder.parameters()),
    }
    summary = {
        "path": str(info.path),
        "dtype": SUPPORTED_DTYPES[info.dtype],
        "color_fix": info.color_fix,
        "parameters": counts,
        "config": info.config.to_dict(),
        "provenance": info.provenance,
    }
    if json_output:
        console.stdout.print(json.dumps(summary, indent=2), markup=False)
        return
    table = Table(title=str(info.path), show_header=False)
    table.add_row("dtype", summary["dtype"])
    table.add_row("colour fix", info.color_fix)
    for name, count in counts.items():
        table.add_row(f"params {name}", f"{count / 1e6:.3f} M")
    table.add_row("transformer", json.dumps(summary["config"]["transformer"]))
    table.add_row("vae", json.dumps(summary["config"]["vae"]))
    table.add_row("provenance", json.dumps(info.provenance))
    console.stdout.print(table)
