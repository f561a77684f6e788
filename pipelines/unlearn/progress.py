"""Progress of a run, from the workers to the driver's `progress` callable, through a Ray queue
that a driver thread drains.

- 'step' events: rank 0 puts its step logs on the queue itself, about once a second and before
  every report (`hand_on_steps`), so progress flows between checkpoints too (a report is a
  barrier, and with `checkpoint_every` 0 the only one is at the end).
- 'worker' events: every `ray.train.report` carries the reporting worker's identity (rank, pid,
  the step it started from); a Ray Train callback on the controller turns a new one into an event.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Optional

from ray.train import Checkpoint, UserCallback
from ray.util.queue import Empty, Queue

Progress = Callable[[dict], None]
PROGRESS_KEY = "retrack_progress"


def progress_metrics(rank: int, start_step: int) -> dict:
    """What a worker adds to every report's metrics."""
    return {PROGRESS_KEY: {"rank": rank, "pid": os.getpid(), "start_step": start_step}}


def hand_on_steps(queue: Queue, steps: list[dict]) -> None:
    """On rank 0: its step logs as 'step' events, in order (one caller's puts run in order)."""
    queue.put_nowait_batch([{"event": "step", **step} for step in steps])


def step_progress(report: Callable[..., None]) -> Progress:
    """A `progress` for `unlearn` that hands each update on to a stage's progress as
    `report("steps", step, steps, its logs)`, and says where a resumed run starts."""
    from pipelines.progress import console

    def on_event(event: dict) -> None:
        if event["event"] == "step":
            logs = ", ".join(f"{k} {event[k]:.4g}" for k in ("loss", "loss_knn", "loss_retain", "loss_corr", "grad_norm") if k in event)
            report("steps", event["step"], event["steps"], logs)
        elif event["event"] == "worker" and event["rank"] == 0 and event["start_step"]:
            console.print(f"resuming from the checkpoint at step {event['start_step']}")

    return on_event


class ProgressCallback(UserCallback):
    """On the controller: one 'worker' event per worker process. It comes first among the run's
    callbacks and takes the progress out of the metrics, so that the others (Tune's report
    callback) see only the metrics."""

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
        if events:
            self.queue.put_nowait_batch(events)


class ProgressRelay:
    """On the driver: a thread that hands every event to `progress` (and keeps them all)."""

    def __init__(self, progress: Progress | None):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On the driver's node: losing a worker node (which training survives) must not lose the queue.
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
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
