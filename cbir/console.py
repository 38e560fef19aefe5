"""Progress and messages for long steps: rich bars on a terminal, plain lines elsewhere, silence in tests."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cbir.errors import printable


class Task:
    def __init__(self, progress: Progress | None, task_id: TaskID | None) -> None:
        self._progress, self._id = progress, task_id

    def advance(self, n: int = 1) -> None:
        if self._progress is not None and self._id is not None:
            self._progress.advance(self._id, n)


class PlainTask(Task):
    """Progress as plain lines (`ingest rsna: 120/400`) at every tenth, for logs and pipes."""

    def __init__(self, console: Console, description: str, total: int | None) -> None:
        super().__init__(None, None)
        self._console, self._description, self._total = console, description, total
        self._done, self._shown = 0, 0

    def advance(self, n: int = 1) -> None:
        self._done += n
        if not self._total:
            return
        step = max(1, self._total // 10)
        if self._done // step > self._shown // step or self._done == self._total:
            self._shown = self._done
            self._console.print(f"{printable(self._description)}: {self._done}/{self._total}", markup=False,
                                soft_wrap=True)


class Reporter:
    """What library code calls to show progress and one-line messages (to stderr)."""

    def __init__(self, quiet: bool = False, console: Console | None = None) -> None:
        self.quiet = quiet
        self.console = console or Console(stderr=True, highlight=False)

    def log(self, message: str) -> None:
        if not self.quiet:
            self.console.print(printable(message), markup=False, soft_wrap=True)

    def warn(self, message: str) -> None:
        """Warnings are shown even when quiet (they name a bad file or a risk)."""
        self.console.print(f"warning: {printable(message)}", markup=False, soft_wrap=True, style="yellow")

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Task]:
        if self.quiet:
            yield Task(None, None)
            return
        if not self.console.is_terminal and not _force():
            yield PlainTask(self.console, description, total)
            return
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=False)
        with progress:
            yield Task(progress, progress.add_task(description, total=total))


def _force() -> bool:
    return "--progress" in sys.argv


QUIET = Reporter(quiet=True)
