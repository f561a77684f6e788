"""Which checkpoint a run continues from: the newest one that verifies, fetched once per node."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import pyarrow.fs as pafs

from retrack.training.checkpoint import checkpoint_step, verified_state
from retrack.training.run_storage import CheckpointMismatchError, RunStorage

CHOSEN = "chosen.json"


def resume(storage: RunStorage, registered, load: Callable[[str, dict], None], local_rank: int = 0,
           barrier: Callable[[], None] = lambda: None) -> dict | None:
    """Load the newest verified checkpoint of this run (`load(directory, state)`) and return its
    state: the one Ray registered (`get_checkpoint`, `Result.checkpoint`) or a newer complete one
    in the run's storage. Ray registers a checkpoint when its controller next polls the workers
    (every 2 s); a worker killed in between loses the registration, not the uploaded files, so
    the storage is scanned too.

    Only the node's local rank 0 (each node's, called with every rank's `barrier`) chooses,
    fetches and verifies it, into the node's own disk; its other workers load that copy. A
    restart of W workers on N nodes reads the checkpoint N times from storage, not W times."""
    spot = Path(tempfile.gettempdir()) / "retrack-resume" / storage.config_hash
    if local_rank == 0:
        shutil.rmtree(spot, ignore_errors=True)
        spot.mkdir(parents=True)
        found = _fetch_newest(storage, registered, spot)
        (spot / CHOSEN).write_text(json.dumps(found and {"directory": found[0], "state": found[1]}))
    barrier()
    chosen = json.loads((spot / CHOSEN).read_text())
    if chosen is not None:
        load(chosen["directory"], chosen["state"])
    barrier()  # every local rank has loaded: the node's copy can go
    if local_rank == 0:
        shutil.rmtree(spot, ignore_errors=True)
    return None if chosen is None else chosen["state"]


def _fetch_newest(storage: RunStorage, registered, spot: Path) -> tuple[str, dict] | None:
    """(a local directory holding it, its state) of the newest verified checkpoint: a local
    checkpoint is read where it is, a remote one is downloaded under `spot`."""
    from ray.train import Checkpoint

    candidates: list[tuple[int, Checkpoint]] = []
    if registered is not None:
        step = checkpoint_step(Path(str(registered.path)).name)
        candidates.append((-1 if step is None else step, registered))
    for name, path in storage.checkpoint_dirs():
        candidates.append((checkpoint_step(name), Checkpoint(path, filesystem=storage.fs)))
    for n, (_, ckpt) in enumerate(sorted(candidates, key=lambda c: c[0], reverse=True)):
        try:
            if isinstance(ckpt.filesystem, pafs.LocalFileSystem):
                directory = str(ckpt.path)
            else:
                directory = ckpt.to_directory(str(spot / str(n)))
            state = verified_state(directory)
            if state is None:
                continue
            if state.get("config_hash") != storage.config_hash:
                raise CheckpointMismatchError(
                    f"checkpoint at step {state.get('step')} belongs to config {str(state.get('config_hash'))[:12]}, not {storage.config_hash[:12]}"
                )
            return directory, state
        except OSError:  # deleted by checkpoint rotation meanwhile
            continue
    return None
