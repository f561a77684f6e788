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
    item_cache: str | None = Field(None, description=(
        "Stable Diffusion: where items' latents and caption embeddings are cached (keyed by corpus and encoders, shared "
        "by every run that names it); default: '_item_cache' under checkpoint_root."))
    index: str | None = Field(None, description=(
        "Stable Diffusion: the corpus's index built with this model's VAE (a job's index stage; `retrack index build "
        "--encoder vae`), which holds every item's latent: the latents of items the item cache lacks are read from it, "
        "so no VAE runs, and only their captions are encoded."))
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept in storage.")

    @property
    def item_cache_root(self) -> str:
        return self.item_cache or f"{self.checkpoint_root.rstrip('/')}/_item_cache"

    @property
    def corpus_ids_root(self) -> str:
        """Where the corpus's id table is kept when the run reads the corpus itself (`retrack unlearn`)."""
        return f"{self.checkpoint_root.rstrip('/')}/_corpus_ids"
