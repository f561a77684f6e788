"""Progress display shared by the stages: one rich progress bar per stage."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)


@contextmanager
def stage_bar(description: str, total: int) -> Iterator:
    """Yields `advance(done, **fields)` that sets the bar to `done` of `total`."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task(description, total=total, info="")

        def advance(done: int, info: str = "") -> None:
            progress.update(task, completed=done, info=info)

        yield advance
