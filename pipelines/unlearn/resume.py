"""Which checkpoint a run continues from: the newest one that verifies."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from retrack.training.checkpoint import checkpoint_step, verified_state
from retrack.training.run_storage import CheckpointMismatchError, RunStorage


def resume(storage: RunStorage, registered, load: Callable[[str, dict], None]) -> dict | None:
    """Load the newest verified checkpoint of this run (`load(directory, state)`) and return its
    state: the one Ray registered (`get_checkpoint`, `Result.checkpoint`) or a newer complete one
    in the run's storage. Ray registers a checkpoint when its controller next polls the workers
    (every 2 s); a worker killed in between loses the registration, not the uploaded files, so
    the storage is scanned too."""
    from ray.train import Checkpoint

    candidates: list[tuple[int, Checkpoint]] = []
    if registered is not None:
        step = checkpoint_step(Path(str(registered.path)).name)
        candidates.append((-1 if step is None else step, registered))
    for name, path in storage.checkpoint_dirs():
        candidates.append((checkpoint_step(name), Checkpoint(path, filesystem=storage.fs)))
    for _, ckpt in sorted(candidates, key=lambda c: c[0], reverse=True):
        try:
            with ckpt.as_directory() as d:
                state = verified_state(d)
                if state is None:
                    continue
                if state.get("config_hash") != storage.config_hash:
                    raise CheckpointMismatchError(
                        f"checkpoint at step {state.get('step')} belongs to config {str(state.get('config_hash'))[:12]}, not {storage.config_hash[:12]}"
                    )
                load(d, state)
                return state
        except OSError:  # deleted by checkpoint rotation meanwhile
            continue
    return None
