"""Everything that can refuse a job, checked before its first expensive step; and what those
checks read (the corpus listing and its id table, the model, the forget ids), kept so that no
stage reads them again. No image is read here: the corpus stays in storage. A corpus of many
shards has its ids read by Ray tasks, a group of shards each, into its id table on storage
(`pipelines.corpus_ids`): the driver never holds them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.corpus_ids import RayScan
from pipelines.runtime import ensure_ray
from retrack.config.model_kind import ModelKind
from retrack.config.spec import JobSpec
from retrack.data.source import CorpusPlan
from retrack.digest import ids_digest
from retrack.errors import InputError
from retrack.storage.location import Location
from retrack.training.prepare import CorpusIndex, model_geometry, read_corpus_index

if TYPE_CHECKING:
    from retrack.data.corpus import Corpus
    from retrack.data.forget import ForgetImages


@dataclass
class Preflight:
    corpus_index: CorpusIndex  # the corpus's files (by URI) and id table
    model_dir: Path  # the driver's copy of the original model (checks, digests, pixel scoring)
    forget_ids: list[str]  # as requested (the neighbours stage may add near-duplicates); none by picture
    geometry: tuple[int, int, int]  # uint8 (H, W, C) every item is brought to on read (`fit_image`)
    holdout_source: CorpusPlan | None = None  # evaluation.holdout_uri's listing
    forget_images: "ForgetImages | None" = None  # a request by picture: resolved to ids by the neighbours stage

    @property
    def requested_forget(self) -> dict:
        """What the audit keeps of the request: digests and counts, never ids or pictures."""
        if self.forget_images is not None:
            return self.forget_images.summary()
        return {"digest": ids_digest(self.forget_ids), "count": len(self.forget_ids)}

    @property
    def corpus_key(self) -> str:
        """The corpus's listing digest (it names the corpus's index and its MLflow input)."""
        return self.corpus_index.source.digest()[:16]

    @cached_property
    def holdout(self) -> "Corpus | None":
        from retrack.data.corpus import read_corpus

        return None if self.holdout_source is None else read_corpus(self.holdout_source, shape=self.geometry)


def preflight(spec: JobSpec, address: str | None = None) -> Preflight:
    """Every check that can refuse the job, before any index, training or registration; `address`
    is the Ray cluster that reads a large corpus's ids (None: RAY_ADDRESS or a local instance)."""
    from retrack.data.forget import check_forget_ids, read_forget_images, requested_forget_ids
    from retrack.data.source import require_captions, require_labels, scan_corpus
    from retrack.lineage.store import check_tracking_server
    from retrack.models.pixel import check_pixel_model_dir, scheduler_timesteps
    from retrack.models.sd import check_sd_model_dir
    from retrack.storage.cache import local_model_dir
    from retrack.training.loop import check_k

    check_paths_reach_the_cluster(spec, address)
    endpoint = spec.storage.endpoint_url
    if endpoint:
        os.environ.setdefault("AWS_ENDPOINT_URL", endpoint)
    check_tracking_server(spec.mlflow.tracking_uri)
    root = Location.parse(spec.storage.root, endpoint=endpoint)
    root.check_reachable()
    probe = root / ".retrack-write-probe"
    probe.write_text("ok")
    probe.remove()
    model_dir = local_model_dir(spec.model.uri, endpoint=endpoint)
    sd = spec.model.kind is ModelKind.STABLE_DIFFUSION
    (check_sd_model_dir if sd else check_pixel_model_dir)(model_dir)
    spec.method.check_schedule(scheduler_timesteps(model_dir))
    # Items of any size are brought to the model's geometry as they are read (index, training,
    # evaluation): the corpus is delivered at it, and no image is read here.
    geometry = model_geometry(spec.model.kind, model_dir)
    fmt = spec.corpus.format
    corpus = read_corpus_index(spec.corpus.uri, fmt, endpoint, geometry, root / "corpus-ids", RayScan(address))
    holdout = scan_corpus(spec.evaluation.holdout_uri, fmt, endpoint=endpoint, image_shape=geometry) if spec.evaluation.holdout_uri else None
    if sd:  # each item is trained on, and its memorisation checked with, its own caption
        for what, source in (("corpus", corpus.source), ("evaluation.holdout_uri", holdout)):
            if source is not None:
                require_captions(source, what)
    else:
        require_labels(corpus.source)
    if spec.forget.images is not None:  # its ids (and K against the retained set) are known only after the index stage
        images = read_forget_images(spec.forget.images, endpoint, shape=geometry)
        return Preflight(corpus_index=corpus, model_dir=model_dir, forget_ids=[], geometry=geometry, holdout_source=holdout, forget_images=images)
    forget_ids = requested_forget_ids(spec)
    check_forget_ids(forget_ids, corpus.positions)
    if spec.method.needs_neighbours:
        check_k(spec.method.k, corpus.count - len(forget_ids))
    return Preflight(corpus_index=corpus, model_dir=model_dir, forget_ids=forget_ids, geometry=geometry, holdout_source=holdout)


def check_paths_reach_the_cluster(spec: JobSpec, address: str | None) -> None:
    """Refuse local paths that Ray workers would read or write when the job runs on a cluster of
    several nodes: each node (a pod) sees its own filesystem, so the job would fail in its first
    task, or write outputs no other node finds. A local instance, or a one-node cluster, shares
    the driver's files."""
    local = spec.worker_local_paths()
    if not local or not (address or os.environ.get("RAY_ADDRESS")):
        return
    nodes = sum(1 for n in ensure_ray(address).nodes() if n["Alive"])
    if nodes > 1:
        named = "; ".join(f"{k} = {v}" for k, v in local.items())
        raise InputError(f"the Ray cluster has {nodes} nodes, which share no filesystem with the driver, but the spec names "
                         f"local paths ({named}): put them on object storage and give s3:// URIs")
