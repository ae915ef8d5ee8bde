"""Output conventions: results on stdout, messages and progress on stderr."""

from __future__ import annotations

import datetime

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

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


class _EtaColumn(ProgressColumn):
    """Time left: the batch's from the mean time per finished file; other rows' from Rich's estimate."""

    def render(self, task) -> Text:
        eta = task.fields["eta"] if "eta" in task.fields else task.time_remaining
        if eta is None:
            return Text("ETA -:--:--", style="progress.remaining")
        return Text(f"ETA {datetime.timedelta(seconds=int(eta))}", style="progress.remaining")


def progress_bar(disable: bool, *extra: ProgressColumn) -> Progress:
    """The progress display every command uses: on stderr, label, bar, count, elapsed, ETA (and ``extra``
    columns); gone when done."""
    return Progress(
        TextColumn("{task.description}", style="bold"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        _EtaColumn(),
        *extra,
        console=stderr,
        disable=disable,
        transient=True,
    )
