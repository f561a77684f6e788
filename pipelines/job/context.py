"""What every stage of a job takes: one `JobContext` (the spec, what preflight read and checked,
the job's storage prefix, the Ray address, the records of the stages finished so far)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from retrack.config.spec import JobSpec
from retrack.embedded.workspace import retrack_home
from retrack.storage.location import Location

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
        from retrack.storage.tree import upload_tree

        if self.remote.is_s3:
            upload_tree(self.local / rel, self.remote / rel)

    def fetch(self, rel: str) -> Path:
        """The local copy of an output, downloaded from the remote prefix if this machine lacks it."""
        from retrack.storage.tree import download_tree

        dest = self.local / rel
        if dest.exists() or not self.remote.is_s3:
            return dest
        return download_tree(self.remote / rel, dest)


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
    # The unlearned model's URI when it was made outside the chain (the tuning trial chosen): the
    # evaluate and register stages take it instead of the unlearn stage's output.
    model: str | None = None

    @classmethod
    def open(cls, spec: JobSpec, address: str | None = None) -> "JobContext":
        """Preflight `spec` (everything refusable, before any work), then open its job prefix."""
        pre = preflight(spec, address)
        return cls(spec=spec, pre=pre, jobdir=JobDir(spec), address=address)

    def for_spec(self, spec: JobSpec) -> "JobContext":
        """Another configuration of the same request (a tuned one): the same inputs, not read
        again, under that configuration's own job prefix."""
        return JobContext(spec=spec, pre=self.pre, jobdir=JobDir(spec), address=self.address)

    @property
    def storage(self) -> Location:
        return Location.parse(self.spec.storage.root, endpoint=self.spec.storage.endpoint_url)

    def original_for_workers(self) -> str:
        """The original model as Ray tasks get it: its URI (an s3:// one is copied once per node)."""
        return self.spec.model.uri

    def forget_set(self) -> list[str]:
        """The ids to forget as the neighbours stage settled them (near-duplicates added)."""
        from retrack.data.forget import read_forget_ids

        return read_forget_ids(str(self.jobdir.remote / "forget_ids.txt"), self.spec.storage.endpoint_url)

    def unlearned_uri(self) -> str:
        """Where the unlearned model is (a task fetches it from there)."""
        return self.model or str(self.jobdir.remote / "model")

    def unlearned_model(self) -> Path:
        """The driver's local copy of the unlearned model."""
        from retrack.storage.cache import local_model_dir

        return local_model_dir(self.unlearned_uri(), endpoint=self.spec.storage.endpoint_url)
