"""A run's folder in checkpoint storage (local or s3://): who owns it, and whether it stopped.

The folder `<checkpoint root>/<run name>` holds the run marker (the config hash that owns it),
the checkpoints Ray Train writes, and, after a non-finite loss or a quality collapse, a stop
marker that makes every retry and relaunch of the same config stop at once.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from functools import cached_property

import pyarrow.fs as pafs

from retrack.errors import CheckpointMismatchError
from retrack.storage.location import Location, S3Options
from retrack.training.checkpoint import STATE_FILE, checkpoint_step

RUN_MARKER = "retrack_run.json"
DIVERGED_MARKER = "retrack_diverged.json"


@dataclass(frozen=True)
class RunStorage:
    root: str  # the checkpoint root: a local directory or s3://bucket/prefix
    run_name: str
    config_hash: str
    s3: S3Options | None = None  # resolved on the driver: workers started before AWS_* was set still reach the store

    @cached_property
    def location(self) -> Location:
        return Location.parse(self.root, s3=self.s3)

    @property
    def fs(self) -> pafs.FileSystem:
        return self.location.fs

    @property
    def base(self) -> str:
        """The checkpoint root as a path on `fs` (Ray Train's storage_path)."""
        return self.location.path.rstrip("/")

    @property
    def run_dir(self) -> str:
        return f"{self.base}/{self.run_name}"

    def _read(self, name: str) -> dict | None:
        return read_json(self.fs, f"{self.run_dir}/{name}")

    def check(self) -> dict | None:
        """Refuse a run folder that holds another config's run marker or checkpoints; returns the
        stop marker if this config already stopped there."""
        marker = self._read(RUN_MARKER)
        chash = self.config_hash
        if marker is not None and marker.get("config_hash") != chash:
            raise CheckpointMismatchError(
                f"run {self.run_name!r} in {self.root} belongs to config {marker.get('config_hash', '?')[:12]}, this job is {chash[:12]}: "
                "refusing to resume from another configuration's checkpoints (use another run name or storage path)"
            )
        for name, path in self.checkpoint_dirs():
            state = read_json(self.fs, f"{path}/{STATE_FILE}")
            if state is not None and state.get("config_hash") != chash:
                raise CheckpointMismatchError(
                    f"checkpoint {name} of run {self.run_name!r} was written by config {state.get('config_hash', '?')[:12]}, "
                    f"this job is {chash[:12]}: refusing to mix configurations"
                )
        return self.stop_marker()

    def claim(self, request_id: str) -> None:
        path = f"{self.run_dir}/{RUN_MARKER}"
        if read_json(self.fs, path) is None:
            write_json(self.fs, path, {"config_hash": self.config_hash, "request_id": request_id, "created": time.time()})

    def stop_marker(self) -> dict | None:
        """This config's stop marker (divergence or quality collapse), if the run stopped."""
        marker = self._read(DIVERGED_MARKER)
        return marker if marker is not None and marker.get("config_hash") == self.config_hash else None

    def stop(self, marker: dict) -> None:
        write_json(self.fs, f"{self.run_dir}/{DIVERGED_MARKER}", {**marker, "config_hash": self.config_hash})

    def checkpoint_dirs(self) -> list[tuple[str, str]]:
        """(name, path on fs) of every checkpoint folder of the run."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.run_dir, allow_not_found=True))
        except OSError:
            return []
        return [(i.base_name, i.path) for i in infos if i.type == pafs.FileType.Directory and checkpoint_step(i.base_name) is not None]


def read_json(fs: pafs.FileSystem, path: str) -> dict | None:
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def write_json(fs: pafs.FileSystem, path: str, obj: dict) -> None:
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True).encode())
    fs.move(tmp, path)
