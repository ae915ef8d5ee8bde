"""`tinysr weights import-official`: convert the authors' release into one tinysr weights file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tinysr_cli.cli import console


def import_official_command(
    release: Annotated[Path, typer.Argument(help="The unpacked official TinySR release folder.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the .safetensors file.")],
    dtype: Annotated[str, typer.Option(help="Stored dtype: fp32, fp16 or bf16 (the conversion itself runs in float32/64).")] = "fp32",
    pooled_embeds: Annotated[
        Optional[Path],
        typer.Option(help="TSD-SR's pool_embeds.pt (or .safetensors); default: RELEASE/default/pool_embeds.pt."),
    ] = None,
    transformer: Annotated[
        Optional[Path], typer.Option(help="Backbone folder (diffusers layout); default: RELEASE/tinybackbone/prune-12-merge-tinysr/transformer.")
    ] = None,
    lora: Annotated[Optional[Path], typer.Option(help="Backbone LoRA file; default: RELEASE/tinysr/transformer.safetensors.")] = None,
    vae: Annotated[Optional[Path], typer.Option(help="VAE folder; default: RELEASE/vae/separable.")] = None,
    lora_alpha: Annotated[
        Optional[float],
        typer.Option(help="LoRA alpha; default: adapter_config.json beside the LoRA, else the rank (scale 1, as the official script)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUTPUT if it exists.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress messages.")] = False,
) -> None:
    """Merge the LoRA, precompute and fold the t = 1000 modulation, and write one weights file."""
    from tinysr_cli.errors import TinySRError
    from tinysr_cli.weights.format import DTYPES_BY_NAME
    from tinysr_cli.weights.official import ReleaseLayout, import_release

    if dtype not in DTYPES_BY_NAME:
        raise TinySRError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES_BY_NAME)}")
    if output.suffix.lower() != ".safetensors":
        raise TinySRError(f"{output}: the output must be a .safetensors file")
    if output.exists() and not overwrite:
        raise TinySRError(f"{output} exists", hint="pass --overwrite to replace it")
    defaults = ReleaseLayout()
    # Paths given here are relative to the working directory, the defaults to RELEASE.
    layout = ReleaseLayout(
        transformer=transformer.resolve() if transformer else defaults.transformer,
        lora=lora.resolve() if lora else defaults.lora,
        vae=vae.resolve() if vae else defaults.vae,
        pooled_embeds=pooled_embeds.resolve() if pooled_embeds else defaults.pooled_embeds,
    )
    import_release(
        release, output, layout=layout, dtype=DTYPES_BY_NAME[dtype], lora_alpha=lora_alpha,
        progress=None if quiet else console.note,
    )
    console.stdout.print(str(output), markup=False)
