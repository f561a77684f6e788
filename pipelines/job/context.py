"""What every stage of a job takes: one `JobContext` (the spec, what preflight read and checked,
the job's storage prefix, the Ray address, the records of the stages finished so far)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from retrack.config.spec import JobSpec
from retrack.embedded.workspace import retrack_home
from retrack.storage.location import Location, is_s3

from pipelines.job.preflight import Preflight, preflight


class JobDir:
    """The job's storage prefix, `<storage root>/<request id>/<config hash>/`, plus a local
    working copy (models and reports are built locally and mirrored to object storage when the
    root is s3://). A stage's completion marker is `stages/<stage>.json`, written last."""

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.remote = Location.parse(spec.storage.root, endpoint=spec.storage.endpoint_url) / spec.request_id / spec.config_hash()
        self.local = Path(spec.storage.root) / spec.request_id / spec.config_hash() if not self.remote.is_s3 else retrack_home() / "jobs" / spec.run_name
        self.local.mkdir(parents=True, exist_ok=True)

    def marker(self, stage: str) -> Location:
        return self.remote / "stages" / f"{stage}.json"

    def done(self, stage: str) -> dict | None:
        """The stage's record if it finished under this config hash."""
        m = self.marker(stage)
        if not m.exists():
            return None
        record = m.read_json()
        return record if record.get("config_hash") == self.spec.config_hash() else None

    def finish(self, stage: str, outputs: dict) -> None:
        self.marker(stage).write_json({"stage": stage, "config_hash": self.spec.config_hash(), "finished": time.time(), **outputs})

    def publish(self, rel: str) -> None:
        """Mirror a local output (file or folder) to the remote prefix (no-op for local roots)."""
        if not self.remote.is_s3:
            return
        src = self.local / rel
        files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
        for f in files:
            (self.remote / f.relative_to(self.local).as_posix()).write_bytes(f.read_bytes())

    def fetch(self, rel: str) -> Path:
        """The local copy of an output, downloaded from the remote prefix if this machine lacks it."""
        dest = self.local / rel
        if dest.exists() or not self.remote.is_s3:
            return dest
        src = self.remote / rel
        entries = src.list(hidden=True) if src.is_dir() else [None]
        for e in entries:
            loc = src if e is None else e.location
            out = dest if e is None else dest / loc.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(loc.read_bytes())
        return dest


@dataclass
class JobContext:
    """One request's job as every stage takes it; each stage adds its record to `records`."""

    spec: JobSpec
    pre: Preflight
    jobdir: JobDir
    address: str | None = None  # the Ray cluster (None: RAY_ADDRESS or a local instance)
    records: dict[str, dict] = field(default_factory=dict)  # each finished stage's record, by stage
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    # The unlearned model when it was made outside the chain (the tuning trial chosen): the
    # evaluate and register stages take it instead of the unlearn stage's output.
    model: Path | None = None

    @classmethod
    def open(cls, spec: JobSpec, address: str | None = None) -> "JobContext":
        """Preflight `spec` (everything refusable, before any work), then open its job prefix."""
        pre = preflight(spec)
        return cls(spec=spec, pre=pre, jobdir=JobDir(spec), address=address)

    def for_spec(self, spec: JobSpec) -> "JobContext":
        """Another configuration of the same request (a tuned one): the same inputs, not read
        again, under that configuration's own job prefix."""
        return JobContext(spec=spec, pre=self.pre, jobdir=JobDir(spec), address=self.address)

    @property
    def storage(self) -> Location:
        return Location.parse(self.spec.storage.root, endpoint=self.spec.storage.endpoint_url)

    def original_for_workers(self) -> str:
        """The original model as Ray workers get it: an s3:// model as its URI (each node copies
        it), a local one as the driver's path."""
        return self.spec.model.uri if is_s3(self.spec.model.uri) else str(self.pre.model_dir)

    def forget_set(self) -> list[str]:
        """The ids to forget as the neighbours stage settled them (near-duplicates added)."""
        from retrack.data.forget import read_forget_ids

        return read_forget_ids(self.jobdir.fetch("forget_ids.txt"))

    def unlearned_model(self) -> Path:
        return self.model if self.model is not None else self.jobdir.fetch("model")
