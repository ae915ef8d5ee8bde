"""Output conventions: results on stdout, messages and progress on stderr."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

stderr = Console(stderr=True, highlight=False, soft_wrap=True)
stdout = Console(highlight=False, soft_wrap=True)


def error(message: str, hint: str | None = None) -> None:
    stderr.print(f"[bold red]Error:[/] {escape(message)}", markup=True, highlight=False)
    if hint:
        stderr.print(f"[dim]Hint: {escape(hint)}[/]", markup=True, highlight=False)


def warn(message: str) -> None:
    stderr.print(f"[yellow]Warning:[/] {escape(message)}", markup=True, highlight=False)


def note(message: str) -> None:
    stderr.print(message, markup=False, highlight=False)
