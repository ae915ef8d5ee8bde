"""Output conventions: results on stdout, messages and progress on stderr."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

stderr = Console(stderr=True, highlight=False, soft_wrap=True)
stdout = Console(highlight=False, soft_wrap=True)


def one_line(text: str) -> str:
    """Control characters (a newline in a file name) shown escaped, so a message stays one line."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch == " " else ascii(ch)[1:-1] for ch in text)


def error(message: str, hint: str | None = None) -> None:
    message = one_line(message)
    stderr.print(f"[bold red]Error:[/] {escape(message)}", markup=True, highlight=False)
    if hint:
        stderr.print(f"[dim]Hint: {escape(hint)}[/]", markup=True, highlight=False)


def warn(message: str) -> None:
    message = one_line(message)
    stderr.print(f"[yellow]Warning:[/] {escape(message)}", markup=True, highlight=False)


def note(message: str) -> None:
    message = one_line(message)
    stderr.print(message, markup=False, highlight=False)
