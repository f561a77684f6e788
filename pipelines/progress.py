"""What a run shows on the console: one rich progress bar per stage, the metrics tables and the
request's summary."""

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


def print_metrics(title: str, rows: dict[str, dict]) -> None:
    from rich.table import Table

    cols = ["forget_frequency", "frechet_distance", "integrity", "forget_loss"]
    table = Table(title=title)
    table.add_column("model")
    for c in cols:
        table.add_column(c, justify="right")
    for name, m in rows.items():
        table.add_row(name, *(f"{m[c]:.4g}" if c in m else "-" for c in cols))
    console.print(table)


def print_summary(result) -> None:
    """The metrics, the verdict, the version and whether it was promoted (and why not)."""
    print_metrics(f"request {result.request_id}", result.metrics)
    promoted = "yes" if result.promoted else f"no ({result.outcome.replace('_', ' ')})"
    console.print(f"verdict: [bold]{result.verdict}[/bold]\nmodel version: {result.model_version}\npromoted: [bold]{promoted}[/bold]\nreport: {result.report_uri}")
    for reason in result.reasons if not result.promoted else ():
        console.print(f"  - {reason}")
