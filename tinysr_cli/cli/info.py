"""`tinysr info`: parameters and MACs per component, counted by an instrumented forward pass."""

from __future__ import annotations

import re
from typing import Annotated, Optional

import typer

from tinysr_cli.cli import console


def _parse_size(text: str) -> tuple[int, int]:
    """'512' -> (512, 512); '1024x768' (width x height) -> (768, 1024) as (height, width)."""
    from tinysr_cli.errors import TinySRError

    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", text)
    if match is None or int(match.group(1)) <= 0 or (match.group(2) is not None and int(match.group(2)) <= 0):
        raise TinySRError(f"invalid --size {text!r}", hint="use a side such as 512, or WIDTHxHEIGHT such as 1024x768")
    width = int(match.group(1))
    height = int(match.group(2) or width)
    return height, width


def info_command(
    model: Annotated[
        Optional[str], typer.Option(help="Weights to count: registry name, Hub file or local .safetensors (only the header is read).")
    ] = None,
    config: Annotated[str, typer.Option(help="Named architecture to count when no --model is given: 'full' or 'tiny'.")] = "full",
    size: Annotated[str, typer.Option(help="Output size: a side (512) or WIDTHxHEIGHT (1024x768).")] = "512",
    teacher: Annotated[bool, typer.Option("--teacher", help="Count TSD-SR's teacher (SD3-medium + its VAE) instead.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Print parameters and multiply-accumulates (MACs) per component for one output image."""
    import json

    from rich.table import Table

    from tinysr_cli.counting import count_teacher, count_tinysr
    from tinysr_cli.errors import TinySRError
    from tinysr_cli.models.tinysr import NAMED_CONFIGS

    height, width = _parse_size(size)
    if teacher:
        if model is not None:
            raise TinySRError("--teacher and --model are exclusive")
        count = count_teacher(height, width)
    elif model is not None:
        from tinysr_cli.weights.format import read_info
        from tinysr_cli.weights.hub import resolve_model

        path = resolve_model(model)
        count = count_tinysr(read_info(path).config, height, width, name=path.name)
    else:
        if config not in NAMED_CONFIGS:
            raise TinySRError(f"unknown config {config!r}; choose from {', '.join(NAMED_CONFIGS)}")
        count = count_tinysr(NAMED_CONFIGS[config], height, width, name=f"TinySR ({config} config)")

    if json_output:
        console.stdout.print(json.dumps(count.to_dict(), indent=2), markup=False)
        return
    tiles = f", {count.tiles} backbone tiles" if count.tiles > 1 else ""
    table = Table(title=f"{count.model}: one {count.width}x{count.height} output{tiles}")
    table.add_column("component")
    table.add_column("params (M)", justify="right")
    table.add_column("GMACs", justify="right")
    for component in count.components:
        table.add_row(component.name, f"{component.params / 1e6:.3f}", f"{component.macs / 1e9:.2f}")
    table.add_section()
    table.add_row("total", f"{count.params / 1e6:.3f}", f"{count.macs / 1e9:.2f}")
    table.add_row("total without attention matmuls", "", f"{(count.macs - count.attention_macs) / 1e9:.2f}")
    console.stdout.print(table)
    console.note("MACs = FLOPs / 2 from torch's FlopCounterMode on the meta device; per-module counters (thop, the paper) miss attention matmuls.")
