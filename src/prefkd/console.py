"""Terminal output: one console, progress bars with ETA for every stage longer than a few seconds.

Where the output is read later (CI logs, `prefkd compare 2>&1 | tee run.log`, a notebook) there is no terminal to
redraw on, so the console switches to log mode: lines and tables at their natural width (a 80-column default cut
the results table's cells to "teach…") and, instead of progress bars, one line per stage when it ends.
"""

from __future__ import annotations

import os
from typing import Any

from rich.console import Console, ConsoleDimensions
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# The width of a log: wide enough that no table is cut or wrapped; text is not padded to it, so nothing gets longer.
LOG_WIDTH = 10_000


class LogAwareConsole(Console):
    """A rich Console that is as wide as its content when it writes to something other than a terminal.

    Decided at every print, not at import: the same process may write to a terminal and later to a redirected file
    descriptor (jobs.py points a worker's stdout/stderr at its log file)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # rich sets a width of its own in a notebook (115); only one asked for here, or COLUMNS, is kept in a log.
        self._asked_width = kwargs.get("width")

    @property
    def log_mode(self) -> bool:
        """True where rich cannot redraw: a pipe or file, a notebook, a dumb terminal."""
        return not self.is_terminal or self.is_dumb_terminal or self.is_jupyter

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)  # type: ignore[attr-defined]
        # An explicit width (Console(width=...), COLUMNS, JUPYTER_COLUMNS) wins.
        asked = (self._asked_width or os.environ.get("COLUMNS")
                 or (self.is_jupyter and os.environ.get("JUPYTER_COLUMNS")))
        if self.log_mode and not asked:
            return ConsoleDimensions(LOG_WIDTH, size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


console = LogAwareConsole(stderr=True)


def _seconds(s: float) -> str:
    m, s = divmod(s, 60)
    h, m = divmod(int(m), 60)
    return f"{h}:{m:02d}:{s:04.1f}" if h else f"{m}:{s:04.1f}" if m else f"{s:.1f} s"


class LineProgress(Progress):
    """Progress for a log: no bar (rich would print every bar once, at the end, cut to the width), one line per task
    when it finishes or when the stage ends without finishing it (an error, an early stop), with its time."""

    def __init__(self, *columns: str | ProgressColumn, **kwargs: Any) -> None:
        super().__init__(*columns, **{**kwargs, "disable": True})
        self._start: dict[TaskID, float] = {}
        self._reported: set[TaskID] = set()

    def add_task(self, description: str, start: bool = True, total: float | None = 100.0, completed: int = 0,
                 visible: bool = True, **fields: Any) -> TaskID:
        task = super().add_task(description, start, total, completed, visible, **fields)
        self._start[task] = completed
        return task

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._report(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._report(task_id)

    def stop(self) -> None:
        for task_id in list(self._tasks):
            self._report(task_id, ended=True)
        super().stop()

    def _report(self, task_id: TaskID, ended: bool = False) -> None:
        task = self._tasks[task_id]
        if task_id in self._reported or not (task.finished or ended) or not task.visible:
            return
        self._reported.add(task_id)
        total = f"/{task.total:g}" if task.total is not None else ""
        state = "done" if task.finished else "stopped at"
        resumed = f" (from {self._start[task_id]:g})" if self._start.get(task_id) else ""
        info = f", {task.fields['info']}" if task.fields.get("info") else ""
        elapsed = task.finished_time if task.finished_time is not None else (task.elapsed or 0.0)
        self.console.print(f"{task.description}: {state} {task.completed:g}{total}{resumed} in "
                           f"{_seconds(elapsed)}{info}", markup=False, highlight=False)


def progress(disable: bool = False) -> Progress:
    """`disable` on the non-main processes of a multi-process run: one bar, not one per process."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    if console.log_mode and not disable:
        return LineProgress(*columns, console=console, transient=False)
    return Progress(*columns, console=console, transient=False, disable=disable)
