"""One run of the unlearn stage: the request's `UnlearnSpec` plus what the stage itself reads and
writes. `retrack run` builds it from the job spec, `retrack unlearn` from its options."""

from __future__ import annotations

from pydantic import Field

from retrack.config.spec import UnlearnSpec
from retrack.config.train import StrictModel


class UnlearnRun(StrictModel):
    spec: UnlearnSpec
    output_dir: str = Field(..., description="Where the unlearned model is written (diffusers layout).")
    checkpoint_root: str = Field(..., description="Checkpoint storage, a local directory or s3://bucket/prefix (endpoint: spec.storage.endpoint_url); the run is a folder below it.")
    neighbours_file: str | None = Field(
        None, description="JSON {forget id: [retained ids, nearest first]} from the index stage; computed exactly when absent."
    )
    run_name: str | None = Field(None, description="Override of the derived run name '<request id>-<config hash>'.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept in storage.")
