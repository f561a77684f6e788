"""[index] Ray Data streams the corpus, encodes it (pixels; for Stable Diffusion the VAE's
latents, the space it denoises) and builds the sharded faiss index and its manifest.

Needs the corpus listing (read by preflight); the tasks read the corpus files by URI. `pipelines.index.build` does the work; an index already
built for the same corpus and encoder is kept. Writes `<storage root>/indexes/<corpus key>[-vae-
<encoder digest>]`, shared by every job on that corpus; its record holds the manifest digest.
"""

from __future__ import annotations

from pipelines.job.context import JobContext
from pipelines.progress import console, stage_progress
from retrack.config.model_kind import ModelKind


def run(ctx: JobContext) -> dict:
    from pipelines.index import build
    from retrack.index import IndexParams

    spec = ctx.spec
    key, encoder = ctx.pre.corpus_key, None
    if spec.model.kind is ModelKind.STABLE_DIFFUSION:
        from retrack.index import EncoderSpec

        encoder = EncoderSpec(kind="vae", model_dir=spec.model.uri, device="cuda" if spec.scaling.use_gpu else "cpu",
                              pool=spec.index.latent_pool)
        key += "-vae-" + encoder.digest()[:12]  # one index per (corpus, VAE): a pixel index of the same corpus is kept
    out = ctx.storage / "indexes" / key
    params = IndexParams(type=spec.index.kind, flat_max=spec.index.flat_max_items, pca=spec.index.pca_dim)
    with stage_progress("index") as progress:
        # The corpus as preflight listed it: its files are not listed and read again.
        result = build(ctx.pre.corpus_index.source, str(out), encoder=encoder, params=params, endpoint=spec.storage.endpoint_url,
                       progress=progress)
    console.print(f"index {result.status}: {result.manifest.index_type}, {result.manifest.count} vectors")
    return {"index_uri": str(out), "manifest_digest": result.manifest.content_digest()}
