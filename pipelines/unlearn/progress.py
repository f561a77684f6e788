"""Progress of a run, from the metrics the workers report to the driver's `progress` callable.

Every `ray.train.report` carries the reporting worker's identity (rank, pid, the step it started
from) and, from rank 0, the step logs since its previous report. A Ray Train callback on the
controller turns them into events and puts them on a Ray queue; a driver thread hands them on.
Events come at report points (checkpoints, health reports, the end), never more often: a report
is a barrier that the controller drains only every couple of seconds.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Optional

from ray.train import Checkpoint, UserCallback
from ray.util.queue import Empty, Queue

Progress = Callable[[dict], None]
PROGRESS_KEY = "retrack_progress"


def progress_metrics(rank: int, start_step: int, steps: list[dict]) -> dict:
    """What a worker adds to every report's metrics."""
    return {PROGRESS_KEY: {"rank": rank, "pid": os.getpid(), "start_step": start_step, "steps": steps}}


class ProgressCallback(UserCallback):
    """On the controller: one 'worker' event per worker process, one 'step' event per update. It
    comes first among the run's callbacks and takes the progress out of the metrics, so that the
    others (Tune's report callback) see only the metrics."""

    def __init__(self, queue: Queue):
        self.queue = queue
        self.seen: set[tuple[int, int]] = set()

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Optional[Checkpoint]) -> None:
        events: list[dict] = []
        for reported in metrics:
            p = reported.pop(PROGRESS_KEY, None)
            if p is None:
                continue
            if (p["rank"], p["pid"]) not in self.seen:
                self.seen.add((p["rank"], p["pid"]))
                events.append({"event": "worker", "rank": p["rank"], "pid": p["pid"], "world_size": len(metrics), "start_step": p["start_step"]})
            events.extend({"event": "step", **step} for step in p["steps"])
        if events:
            self.queue.put_nowait_batch(events)


class ProgressRelay:
    """On the driver: a thread that hands every event to `progress` (and keeps them all)."""

    def __init__(self, progress: Progress | None):
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.progress = progress
        self.events: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def callback(self) -> ProgressCallback:
        return ProgressCallback(self.queue)

    def __enter__(self) -> "ProgressRelay":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        while not self.queue.empty():  # everything reported before fit() returned
            self._hand_on(self.queue.get_nowait())
        self.queue.shutdown()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._hand_on(self.queue.get(timeout=0.2))
            except Empty:
                continue

    def _hand_on(self, event: dict) -> None:
        self.events.append(event)
        if self.progress is not None:
            try:
                self.progress(event)
            except Exception:  # a broken progress callback must not kill the job
                pass

    def resumed_from(self) -> list[int]:
        """The step each resumed attempt of rank 0 started from."""
        starts = [e["start_step"] for e in self.events if e["event"] == "worker" and e["rank"] == 0]
        return [s for n, s in enumerate(starts) if n > 0 or s > 0]
