"""Terminal output: one console, progress bars with ETA for every stage longer than a few seconds."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def progress(disable: bool = False) -> Progress:
    """`disable` on the non-main processes of a multi-process run: one bar, not one per process."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                    console=console, transient=False, disable=disable)
