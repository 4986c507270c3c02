"""Progress on stderr for the long steps, so that stdout carries only results."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

stderr = Console(stderr=True)


class Steps:
    """A bar over a fixed list of named steps: `with steps.step("Exporting"): ...`."""

    def __init__(self, progress: Progress, total: int) -> None:
        self._progress = progress
        self._task = progress.add_task("", total=total)

    @contextmanager
    def step(self, description: str) -> Iterator[None]:
        self._progress.update(self._task, description=description)
        yield
        self._progress.advance(self._task)


@contextmanager
def _bar(description: str, quiet: bool) -> Iterator[Progress]:
    columns = (SpinnerColumn(), TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    # Drawn on a terminal only: in a log or a pipe a bar is noise (and rich leaves blank lines there).
    progress = Progress(*columns, console=stderr, transient=True, disable=quiet or not stderr.is_terminal)
    if progress.disable:  # not started at all: rich before 15 writes a blank line when even a disabled bar stops
        yield progress
        return
    with progress:
        yield progress


@contextmanager
def steps(total: int, quiet: bool = False) -> Iterator[Steps]:
    with _bar("{task.description}", quiet) as progress:
        yield Steps(progress, total)


@contextmanager
def counter(description: str, quiet: bool = False) -> Iterator[Callable[[int, int], None]]:
    """A bar over a count that the work learns as it goes: the context gives `update(done, total)`."""
    with _bar(description, quiet) as progress:
        task = progress.add_task("", total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)
