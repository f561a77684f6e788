"""Everything that can refuse a job, checked before its first expensive step; and what those
checks read (the corpus, the model, the forget ids), kept so that no stage reads them again."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from retrack.config.model_kind import ModelKind
from retrack.config.spec import JobSpec
from retrack.data.corpus import Corpus, read_corpus
from retrack.embedded.workspace import retrack_home
from retrack.errors import InputError
from retrack.storage.location import Location


@dataclass
class Preflight:
    corpus: Corpus
    corpus_dir: Path
    model_dir: Path
    forget_ids: list[str]  # as requested (the neighbours stage may add near-duplicates)
    holdout: Corpus | None = None  # evaluation.holdout_uri

    @cached_property
    def corpus_key(self) -> str:
        """The corpus's content digest (it names the corpus's index and its MLflow input)."""
        from retrack.digest import directory_digest

        return directory_digest(self.corpus_dir)[:16]


def preflight(spec: JobSpec) -> Preflight:
    """Every check that can refuse the job, before any index, training or registration."""
    from retrack.data.forget import check_forget_ids, requested_forget_ids
    from retrack.errors import CorpusError
    from retrack.lineage.store import check_tracking_server
    from retrack.models.pixel import check_pixel_model_dir, scheduler_timesteps
    from retrack.models.sd import check_sd_model_dir
    from retrack.training.loop import check_k

    check_tracking_server(spec.mlflow.tracking_uri)
    root = Location.parse(spec.storage.root, endpoint=spec.storage.endpoint_url)
    root.check_reachable()
    probe = root / ".retrack-write-probe"
    probe.write_text("ok")
    probe.remove()
    model_dir = _local_copy(spec.model.uri, spec.storage.endpoint_url)
    sd = spec.model.kind is ModelKind.STABLE_DIFFUSION
    (check_sd_model_dir if sd else check_pixel_model_dir)(model_dir)
    spec.method.check_schedule(scheduler_timesteps(model_dir))
    if spec.corpus.format != "parquet":
        raise InputError("corpus.format 'imagefolder' is indexed by `retrack index build`; `retrack run` reads parquet corpora")
    corpus_dir = _local_copy(spec.corpus.uri, spec.storage.endpoint_url)
    corpus = read_corpus(corpus_dir)
    holdout = read_corpus(_local_copy(spec.evaluation.holdout_uri, spec.storage.endpoint_url)) if spec.evaluation.holdout_uri else None
    if sd:  # each item is trained on, and its memorisation checked with, its own caption
        for what, c in (("corpus", corpus), ("evaluation.holdout_uri", holdout)):
            if c is not None and c.captions is None:
                raise CorpusError(f"{what}: a Stable Diffusion corpus needs a 'caption' column (each item is conditioned on its own caption)")
    forget_ids = requested_forget_ids(spec)
    check_forget_ids(forget_ids, corpus.ids)
    if spec.method.needs_neighbours:
        check_k(spec.method.k, len(corpus) - len(forget_ids))
    return Preflight(corpus=corpus, corpus_dir=corpus_dir, model_dir=model_dir, forget_ids=forget_ids, holdout=holdout)


def _local_copy(uri: str, endpoint: str | None) -> Path:
    """A model or corpus as a local directory (an s3:// one is copied to the cache once)."""
    from retrack.storage.cache import local_model_dir

    if endpoint and uri.startswith("s3://"):
        os.environ.setdefault("AWS_ENDPOINT_URL", endpoint)
    return local_model_dir(uri, retrack_home() / "cache")
