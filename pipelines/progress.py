"""What a run shows on the console (stderr): each long stage's progress, the metrics tables and
the request's summary.

Progress goes through `stage_progress`. On an interactive console rich draws a bar per part of
the stage. Anywhere else (a pipe or a file: Kubernetes, CI) rich draws nothing until the end, so
each part writes plain lines instead: its first update, then at most one line every
RETRACK_PROGRESS_INTERVAL seconds (default 10), and its last, stamped like Ray's own log lines:

    2026-01-05 10:31:07,412 index encode: 30000/100000 (30%), 812/s, elapsed 0:00:37, ETA 0:01:26

Ray Data's own progress follows the same rule (`ray_data_progress`).
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from retrack.errors import InputError

console = Console(stderr=True)
console.soft_wrap = not console.is_interactive  # in a log, one message is one line

INTERVAL_ENV = "RETRACK_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 10.0

Report = Callable[..., None]  # (part, done, total, info="")


def progress_interval() -> float:
    """Seconds between two plain progress lines of one part (RETRACK_PROGRESS_INTERVAL)."""
    raw = os.environ.get(INTERVAL_ENV)
    if raw is None:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value >= 0 or math.isinf(value):
        raise InputError(f"{INTERVAL_ENV}={raw!r}: expected the seconds between two progress lines, a number >= 0")
    return value


@dataclass
class Throttle:
    """Whether an update is written: the first, then at most one every `every` seconds, and the
    last (done >= total); an update already written is not written again."""

    every: float
    written_at: float | None = None
    written: tuple[int, int] | None = None
    held: bool = False  # an update came that was not written

    def due(self, now: float, done: int, total: int) -> bool:
        if (done, total) == self.written:
            return False
        if self.written_at is None or done >= total or now - self.written_at >= self.every:
            self.written_at, self.written, self.held = now, (done, total), False
            return True
        self.held = True
        return False


def progress_line(label: str, done: int, total: int, seconds: float, rate: float | None, info: str = "") -> str:
    """One plain progress line: `label: done/total (pct), rate, elapsed, ETA[, info]`; `rate` in
    units per second, None while unknown."""
    pct = f"{100 * done / total:.0f}%" if total else "-"
    if done >= total:
        eta = _clock(0)
    else:
        eta = _clock((total - done) / rate) if rate else "-"
    line = f"{label}: {done}/{total} ({pct}), {_rate(rate)}, elapsed {_clock(seconds)}, ETA {eta}"
    return f"{line}, {info}" if info else line


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _rate(rate: float | None) -> str:
    if not rate:
        return "-/s"
    if rate >= 1:
        return f"{rate:.0f}/s" if rate >= 100 else f"{rate:.3g}/s"
    return f"{rate * 60:.3g}/min"


@dataclass
class _Part:
    label: str
    task: TaskID
    throttle: Throttle
    start: float  # the first update: its time and count (a resumed stage's earlier work is not its rate)
    start_done: int
    at: float = 0.0  # the latest update (monotonic, and wall clock for the stamp)
    at_wall: float = 0.0
    done: int = 0
    total: int = 0
    info: str = ""


class StageProgress:
    """One stage's progress, part by part (encode and shards; original and retrained; ...): call
    it as `progress(part, done, total, info="")`. Thread-safe (Ray relays call it from threads)."""

    def __init__(self, stage: str):
        self.stage = stage
        self.every = progress_interval()
        # A console that is not interactive gets the plain lines, not rich's final-frame bars.
        self.bars = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not console.is_interactive,
        )
        self.parts: dict[str, _Part] = {}
        self._lock = threading.Lock()

    def __call__(self, part: str, done: int, total: int, info: str = "") -> None:
        now, wall = time.monotonic(), time.time()
        with self._lock:
            p = self.parts.get(part)
            if p is None:
                label = f"{self.stage} {part}"
                task = self.bars.add_task(label, total=total, completed=done, info=info)
                p = self.parts[part] = _Part(label, task, Throttle(self.every), start=now, start_done=done)
            p.at, p.at_wall, p.done, p.total, p.info = now, wall, done, total, info
            self.bars.update(p.task, completed=done, total=total, info=info)
            if self.bars.disable and p.throttle.due(now, done, total):
                self._write(p)

    def start(self) -> None:
        self.bars.start()

    def close(self) -> None:
        """Stop the bars; in a log, write each part's latest update if it was held back."""
        with self._lock:
            self.bars.stop()
            for p in self.parts.values():
                if p.throttle.held:
                    p.throttle.held = False
                    self._write(p)

    def _write(self, p: _Part) -> None:
        rate = (p.done - p.start_done) / (p.at - p.start) if p.at > p.start and p.done > p.start_done else None
        stamp = datetime.fromtimestamp(p.at_wall).strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
        console.print(f"{stamp} {progress_line(p.label, p.done, p.total, p.at - p.start, rate, p.info)}",
                      markup=False, highlight=False, soft_wrap=True)


@contextmanager
def stage_progress(stage: str) -> Iterator[StageProgress]:
    """The progress of `stage` while the block runs (see the module's docstring)."""
    progress = StageProgress(stage)
    progress.start()
    try:
        yield progress
    finally:
        progress.close()


def ray_data_progress(ctx, bars: bool = False) -> bool:
    """Set Ray Data's progress display on `ctx` (a `ray.data.DataContext`); returns whether it
    shows any. On a terminal, its bars if `bars`. In a log, its own periodic lines (one block
    every RETRACK_PROGRESS_INTERVAL seconds, or RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL when set);
    Ray Data picks them only when stdout is not a terminal either, so with stdout on a terminal
    and stderr in a file it shows nothing (its bars would fill the file)."""
    shown = bars if console.is_interactive else not sys.stdout.isatty()
    if shown and not console.is_interactive:
        # Read once, when Ray Data first logs progress in this process.
        os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", str(max(1, round(progress_interval()))))
    ctx.enable_progress_bars = ctx.enable_operator_progress_bars = shown
    return shown


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
