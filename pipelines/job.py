"""`retrack run JOB.yaml`: index -> neighbours -> unlearn -> evaluate -> register.

Every stage writes its outputs first and its completion marker last, both keyed by the spec's
config hash under `<storage root>/<request id>/<config hash>/`; a rerun skips every stage whose
marker is there (a killed job resumes where it stopped, and unlearning itself resumes from its
last checkpoint). Everything a stage can refuse is checked before the first expensive step.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from pipelines.progress import console
from retrack.data.corpus import Corpus, read_corpus, read_forget_ids
from retrack.digest import ids_digest
from retrack.errors import InputError, StorageError
from retrack.config.spec import JobSpec
from retrack.storage.location import Location, is_s3
from retrack.embedded.workspace import retrack_home

if TYPE_CHECKING:
    from pipelines.unlearn import UnlearnRequest
    from pipelines.evaluate import SdItems
    from retrack.evaluation.pixel import EvalReference

STAGES = ("index", "neighbours", "unlearn", "evaluate", "register")


@dataclass
class JobResult:
    request_id: str
    model_version: str
    verdict: str
    report_uri: str
    metrics: dict
    stages_run: list[str] = field(default_factory=list)
    stages_skipped: list[str] = field(default_factory=list)


class JobDir:
    """The job's storage prefix plus a local working copy (models and reports are built locally
    and mirrored to object storage when the root is s3://)."""

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.remote = Location.parse(spec.storage.root, endpoint=spec.storage.endpoint_url) / spec.request_id / spec.config_hash()
        self.local = Path(spec.storage.root) / spec.request_id / spec.config_hash() if not self.remote.is_s3 else retrack_home() / "jobs" / spec.run_name
        self.local.mkdir(parents=True, exist_ok=True)

    def marker(self, stage: str) -> Location:
        return self.remote / "stages" / f"{stage}.json"

    def done(self, stage: str) -> dict | None:
        m = self.marker(stage)
        if not m.exists():
            return None
        record = m.read_json()
        return record if record.get("config_hash") == self.spec.config_hash() else None

    def finish(self, stage: str, outputs: dict) -> None:
        self.marker(stage).write_json({"stage": stage, "config_hash": self.spec.config_hash(), "finished": time.time(), **outputs})

    def stage(self, name: str, fn: Callable[[], dict], on_stage: Callable[[str, str], None] | None = None) -> tuple[dict, bool]:
        """Run a stage unless its completion marker is there: (its record, whether it ran now)."""
        record = self.done(name)
        if record is not None:
            if on_stage:
                on_stage(name, "skip")
            return record, False
        if on_stage:
            on_stage(name, "run")
        console.rule(f"[bold]{name}")
        try:
            outputs = fn()
        except OSError as exc:  # disk full, quota, permission: a clear error, and no marker below
            raise StorageError(f"{name} stage: cannot write its outputs ({self.local}, {self.remote}): {exc}") from None
        self.finish(name, outputs)
        return {"config_hash": self.spec.config_hash(), **outputs}, True

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


def _local_dir(uri: str, endpoint: str | None) -> Path:
    from retrack.models.sd import local_model_dir

    if endpoint and uri.startswith("s3://"):
        import os

        os.environ.setdefault("AWS_ENDPOINT_URL", endpoint)
    return local_model_dir(uri, retrack_home() / "cache")


def load_forget_ids(spec: JobSpec) -> list[str]:
    if spec.forget.ids is not None:
        return list(spec.forget.ids)
    src = spec.forget.file
    if src.startswith("s3://"):
        text = Location.parse(src, endpoint=spec.storage.endpoint_url).read_text()
        return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return read_forget_ids(src)


@dataclass
class Preflight:
    corpus: Corpus
    corpus_dir: Path
    model_dir: Path
    forget_ids: list[str]
    holdout: Corpus | None = None  # evaluation.holdout_uri, read (and checked) once here

    def model_for_workers(self, spec: JobSpec) -> str:
        """The original model as Ray workers get it: an s3:// model as its URI (each node copies
        it), a local one as the driver's path."""
        return spec.model.uri if is_s3(spec.model.uri) else str(self.model_dir)


def preflight(spec: JobSpec) -> Preflight:
    """Every check that can refuse the job, before any index, training or registration."""
    from retrack.data.corpus import check_forget_ids
    from retrack.lineage.store import check_tracking_server
    from retrack.errors import CorpusError
    from retrack.models.pixel import check_pixel_model_dir, scheduler_timesteps
    from retrack.models.sd import check_sd_model_dir
    from retrack.training.loop import check_k

    check_tracking_server(spec.mlflow.tracking_uri)
    root = Location.parse(spec.storage.root, endpoint=spec.storage.endpoint_url)
    root.check_reachable()
    probe = root / ".retrack-write-probe"
    probe.write_text("ok")
    probe.remove()
    model_dir = _local_dir(spec.model.uri, spec.storage.endpoint_url)
    sd = spec.model.kind == "stable-diffusion"
    (check_sd_model_dir if sd else check_pixel_model_dir)(model_dir)
    spec.method.check_schedule(scheduler_timesteps(model_dir))
    if spec.corpus.format != "parquet":
        raise InputError("corpus.format 'imagefolder' is indexed by `retrack index build`; `retrack run` reads parquet corpora")
    corpus_dir = _local_dir(spec.corpus.uri, spec.storage.endpoint_url)
    corpus = read_corpus(corpus_dir)
    holdout = read_corpus(_local_dir(spec.evaluation.holdout_uri, spec.storage.endpoint_url)) if spec.evaluation.holdout_uri else None
    if sd:  # each item is trained on, and its memorisation checked with, its own caption
        for what, c in (("corpus", corpus), ("evaluation.holdout_uri", holdout)):
            if c is not None and c.captions is None:
                raise CorpusError(f"{what}: a Stable Diffusion corpus needs a 'caption' column (each item is conditioned on its own caption)")
    forget_ids = load_forget_ids(spec)
    check_forget_ids(forget_ids, corpus.ids)
    if spec.method.needs_neighbours:
        check_k(spec.method.k, len(corpus) - len(forget_ids))
    return Preflight(corpus=corpus, corpus_dir=corpus_dir, model_dir=model_dir, forget_ids=forget_ids, holdout=holdout)


def run_job(spec: JobSpec, address: str | None = None, on_stage: Callable[[str, str], None] | None = None) -> JobResult:
    """Run (or finish) one deletion request. `on_stage(stage, "run" | "skip")` is told of each stage."""
    import os

    from pipelines.runtime import ensure_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    pre = preflight(spec)
    job = JobDir(spec)
    ensure_ray(address)
    ran, skipped = [], []

    def stage(name: str, fn: Callable[[], dict]) -> dict:
        record, now = job.stage(name, fn, on_stage)
        (ran if now else skipped).append(name)
        return record

    from retrack.audit import audit_attempt

    with audit_attempt(spec, pre.forget_ids, ran, skipped) as audit:  # a failure is recorded too
        idx = stage("index", lambda: _index_stage(spec, pre))
        nb = stage("neighbours", lambda: _neighbours_stage(spec, pre, job, idx))
        un = stage("unlearn", lambda: _unlearn_stage(spec, pre, job, nb, address))
        ev = stage("evaluate", lambda: _evaluate_stage(spec, pre, job, nb, un, idx))
        reg = stage("register", lambda: _register_stage(spec, pre, job, idx, nb, un, ev))
        audit.succeeded(nb, un, ev, reg)
    return JobResult(
        request_id=spec.request_id,
        model_version=reg["model_version"],
        verdict=ev["verdict"],
        report_uri=str(job.remote / "report"),
        metrics=ev["metrics"],
        stages_run=ran,
        stages_skipped=skipped,
    )


def _index_stage(spec: JobSpec, pre: Preflight) -> dict:
    from pipelines.index import build
    from retrack.index import IndexParams

    key, encoder = _corpus_key(pre), None
    if spec.model.kind == "stable-diffusion":  # neighbours in the space SD denoises: its VAE's latents
        from retrack.index import EncoderSpec

        encoder = EncoderSpec(kind="vae", model_dir=str(pre.model_dir / "vae"), device="cuda" if spec.scaling.use_gpu else "cpu")
        key += "-vae-" + encoder.digest()[:12]  # one index per (corpus, VAE): a pixel index of the same corpus is kept
    out = Location.parse(spec.storage.root, endpoint=spec.storage.endpoint_url) / "indexes" / key
    params = IndexParams(type=spec.index.kind, flat_max=spec.index.flat_max_items)
    result = build(str(pre.corpus_dir), str(out), encoder=encoder, params=params, endpoint=spec.storage.endpoint_url)
    console.print(f"index {result.status}: {result.manifest.index_type}, {result.manifest.count} vectors")
    return {"index_uri": str(out), "manifest_digest": result.manifest.content_digest()}


def _corpus_key(pre: Preflight) -> str:
    from retrack.digest import directory_digest

    return directory_digest(pre.corpus_dir)[:16]


def _neighbours_stage(spec: JobSpec, pre: Preflight, job: JobDir, idx: dict) -> dict:
    from retrack.index import find_duplicates, find_neighbours, open_index

    index = open_index(idx["index_uri"], endpoint=spec.storage.endpoint_url, manifest_digest=idx["manifest_digest"])
    threshold = spec.forget.duplicate_threshold or _default_duplicate_threshold(pre, index if spec.model.kind == "stable-diffusion" else None)
    report = find_duplicates(index, pre.forget_ids, threshold, policy=spec.forget.duplicates)
    if report.count:
        console.print(f"near-duplicates of the forget set: {report.count} (policy {spec.forget.duplicates})")
    forget = report.forget_ids
    nb = find_neighbours(index, forget, spec.method.k, margin=spec.index.candidates_margin) if spec.method.needs_neighbours else None
    (job.local / "forget_ids.txt").write_text("\n".join(forget) + "\n")
    mapping = {} if nb is None else {fid: ids for fid, ids in zip(nb.forget_ids, nb.ids)}
    (job.local / "neighbours.json").write_text(json.dumps(mapping))
    job.publish("forget_ids.txt")
    job.publish("neighbours.json")
    return {"forget_count": len(forget), "duplicates_added": report.count if spec.forget.duplicates == "add" else 0, "forget_ids_digest": ids_digest(forget), "duplicate_threshold": threshold}


def _default_duplicate_threshold(pre: Preflight, index=None) -> float:
    """Model-space L2 under which two items are copies: a tenth of the typical nearest-neighbour
    distance between distinct retained items (exact copies sit at 0). With `index`, measured on
    its vectors (Stable Diffusion: VAE latents, the space duplicates are searched in)."""
    from retrack.index.exact import exact_knn

    rng = np.random.default_rng(0)
    if index is not None:
        rows = rng.choice(len(index), min(len(index), 512), replace=False)
        d2, _ = index.search(index.vectors(rows), 2)
        d = np.sqrt(np.maximum(d2, 0.0))
    else:
        sample = pre.corpus.images[rng.choice(len(pre.corpus), min(len(pre.corpus), 512), replace=False)]
        d, _ = exact_knn(sample, pre.corpus.images, 2)
    positive = d[:, 1][d[:, 1] > 1e-6]
    return float(0.1 * np.median(positive)) if len(positive) else 1e-3


def unlearn_request(spec: JobSpec, pre: Preflight, job: JobDir, output_dir: Path, run_name: str) -> "UnlearnRequest":
    """The unlearn stage's request for `spec`'s method and training settings (tuning trials vary them)."""
    from pipelines.unlearn import ScalingSettings, UnlearnRequest

    return UnlearnRequest(
        request_id=spec.request_id,
        model_dir=pre.model_for_workers(spec),
        model_kind="sd" if spec.model.kind == "stable-diffusion" else "pixel",
        corpus_dir=str(pre.corpus_dir),
        forget_ids_file=str(job.fetch("forget_ids.txt")),
        neighbours_file=str(job.fetch("neighbours.json")) if spec.method.needs_neighbours else None,
        method=spec.method,
        train=spec.train,
        scaling=ScalingSettings(num_workers=spec.scaling.num_workers, use_gpu=spec.scaling.use_gpu, cpus_per_worker=spec.scaling.cpus_per_worker),
        max_failures=spec.scaling.max_failures,
        storage_path=str(Location.parse(spec.storage.root, endpoint=spec.storage.endpoint_url) / "checkpoints"),
        output_dir=str(output_dir),
        run_name=run_name,
        storage_endpoint=spec.storage.endpoint_url,
    )


def _unlearn_stage(spec: JobSpec, pre: Preflight, job: JobDir, nb: dict, address: str | None) -> dict:
    from pipelines.unlearn import unlearn

    result = unlearn(unlearn_request(spec, pre, job, job.local / "model", spec.run_name), address=address)
    job.publish("model")
    return {"model_digest": result.digest, "wall_seconds": result.seconds, "steps": result.steps, "final_loss": result.history[-1]["loss"] if result.history else None,
            "resumed_from": result.resumed_from}


def evaluation_reference(spec: JobSpec, pre: Preflight, job: JobDir, forget: list[str]) -> tuple["EvalReference", float]:
    """What samples are scored against (retained data, the feature classifier trained on it,
    the copy threshold, held-out items), and the threshold used."""
    from retrack.evaluation.pixel import build_reference
    from retrack.evaluation.metrics import load_classifier, save_classifier, train_classifier

    corpus = pre.corpus
    if corpus.labels is None:
        raise InputError("the corpus has no labels: the Fréchet distance needs a classifier trained on labelled retained data")
    keep = np.setdiff1d(np.arange(len(corpus)), corpus.index_of(forget))
    clf_dir = job.local / "classifier"
    if not (clf_dir / "model.safetensors").is_file():
        clf, _ = train_classifier(corpus.images[keep], corpus.labels[keep], seed=spec.evaluation.seed)
        save_classifier(clf, clf_dir)
    threshold = spec.evaluation.forget_threshold or _default_forget_threshold(corpus, forget)
    return build_reference(corpus, forget, threshold, load_classifier(clf_dir), pre.holdout), threshold


def _evaluate_stage(spec: JobSpec, pre: Preflight, job: JobDir, nb: dict, un: dict, idx: dict) -> dict:
    from pipelines.evaluate import evaluate_request

    if spec.model.kind == "stable-diffusion":
        return _evaluate_sd_stage(spec, pre, job, un, idx)
    forget = read_forget_ids(job.fetch("forget_ids.txt"))
    ref, threshold = evaluation_reference(spec, pre, job, forget)
    context = {"model_digest": un["model_digest"], "config_hash": spec.config_hash(), "method": spec.method.name, "forget_count": len(forget), "samples_per_model": spec.evaluation.num_samples}
    ev = evaluate_request(
        pre.model_dir, job.fetch("model"), ref, spec.evaluation.num_samples, spec.evaluation.seed,
        spec.evaluation.max_frequency_ratio, spec.evaluation.membership_alpha, job.local / "report", spec.request_id, context,
    )
    job.publish("report")
    return {"verdict": ev.verdict.label, "metrics": ev.metrics, "forget_threshold": threshold}


def sd_evaluation_items(spec: JobSpec, pre: Preflight, forget: list[str], idx: dict) -> SdItems:
    """What the SD evaluation reads from the corpus: the forgotten items, their nearest retained
    items in the index (VAE latents: they calibrate each item's copy threshold), a seeded sample
    of retained captions that are not also a forgotten item's caption (integrity), the held-out items."""
    from pipelines.evaluate import SdItems
    from retrack.data.corpus import from_model_space
    from retrack.index import find_neighbours, open_index

    corpus = pre.corpus
    rows = corpus.index_of(forget)
    index = open_index(idx["index_uri"], endpoint=spec.storage.endpoint_url, manifest_digest=idx["manifest_digest"])
    k = min(spec.evaluation.stable_diffusion.candidates, len(corpus) - len(forget))
    nb = find_neighbours(index, forget, k, margin=spec.index.candidates_margin)
    forget_captions = [corpus.captions[r] for r in rows]
    banned = set(forget_captions)
    keep = [int(r) for r in np.setdiff1d(np.arange(len(corpus)), rows) if corpus.captions[r] not in banned]
    if not keep:
        raise InputError("no retained item has a caption other than the forgotten items': integrity needs retained captions")
    n = spec.evaluation.num_samples
    picked = np.random.default_rng(spec.evaluation.seed).choice(keep, n, replace=len(keep) < n)
    holdout = pre.holdout
    return SdItems(
        forget_images=from_model_space(corpus.images[rows]),
        forget_ids=list(forget),
        forget_captions=forget_captions,
        candidates=[(from_model_space(corpus.images[corpus.index_of(ids)]), list(ids)) for ids in nb.ids],
        integrity_captions=[corpus.captions[r] for r in picked],
        holdout_images=None if holdout is None else from_model_space(holdout.images),
        holdout_ids=None if holdout is None else holdout.ids,
        holdout_captions=None if holdout is None else holdout.captions,
    )


def _evaluate_sd_stage(spec: JobSpec, pre: Preflight, job: JobDir, un: dict, idx: dict) -> dict:
    from pipelines.evaluate import evaluate_sd_request

    forget = read_forget_ids(job.fetch("forget_ids.txt"))
    items = sd_evaluation_items(spec, pre, forget, idx)
    # s3:// models reach the Ray tasks as URIs (every node fetches them), local ones as their files.
    original = pre.model_for_workers(spec)
    unlearned = str(job.remote / "model") if job.remote.is_s3 else job.fetch("model")
    context = {"model_digest": un["model_digest"], "config_hash": spec.config_hash(), "method": spec.method.name, "forget_count": len(forget), "samples_per_model": spec.evaluation.num_samples}
    ev = evaluate_sd_request(
        original, unlearned, items, spec.evaluation, spec.evaluation.max_frequency_ratio, spec.evaluation.membership_alpha,
        job.local / "report", spec.request_id, context, endpoint=spec.storage.endpoint_url,
    )
    job.publish("report")
    return {"verdict": ev.verdict.label, "metrics": ev.metrics, "forget_threshold": spec.evaluation.forget_threshold}


def _default_forget_threshold(corpus: Corpus, forget: list[str]) -> float:
    """Half the [0,1]-pixel distance from the forget images to their nearest retained item (the
    rule the embedded benchmark uses), so a sample under it is closer to a forgotten image than
    to anything retained."""
    from retrack.data.corpus import to_unit_range
    from retrack.index.exact import exact_knn

    rows = corpus.index_of(forget)
    retained = np.delete(corpus.images, rows, axis=0)
    d, _ = exact_knn(to_unit_range(np.unique(corpus.images[rows], axis=0)), to_unit_range(retained), 1)
    return float(0.5 * d.min())


def _register_stage(spec: JobSpec, pre: Preflight, job: JobDir, idx: dict, nb: dict, un: dict, ev: dict) -> dict:
    from retrack.audit import flat_metrics
    from retrack.lineage.store import Lineage, LineageStore, code_version, mlflow_env_for_storage

    mlflow_env_for_storage(spec.storage.endpoint_url)
    store = LineageStore(spec.mlflow.tracking_uri)
    name = spec.model.registered_name or spec.mlflow.registered_model
    lineage = Lineage(
        request_id=spec.request_id,
        config_hash=spec.config_hash(),
        parent_model_uri=spec.model.uri,
        parent_model_version=spec.model.version or "",
        forget_ids_digest=nb["forget_ids_digest"],
        forget_count=nb["forget_count"],
        index_manifest_digest=idx["manifest_digest"],
        method=spec.method.name,
        method_params=json.dumps(spec.method.params, sort_keys=True),
        code_version=code_version(),
        model_digest=un["model_digest"],
    )
    run_id = store.request_run(spec.mlflow.experiment, spec.run_name, spec.request_id, spec.config_hash(), spec.mlflow.artifact_location)
    params = {f"method.{k}": v for k, v in spec.method.params.items()} | {f"train.{k}": v for k, v in spec.train.recorded().items()}
    params |= {"method": spec.method.name, "model.kind": spec.model.kind, "model.uri": spec.model.uri, "corpus.uri": spec.corpus.uri, "forget.count": nb["forget_count"], "workers": spec.scaling.num_workers}
    store.log_params(run_id, params)
    store.log_metrics(run_id, flat_metrics(ev["metrics"]) | {"unlearn.wall_seconds": un["wall_seconds"]})
    store.log_inputs(run_id, {
        "corpus": (spec.corpus.uri, _corpus_key(pre), len(pre.corpus)),
        "forget": (f"retrack://{spec.request_id}/forget-set", nb["forget_ids_digest"], nb["forget_count"]),
    })
    store.log_artifacts(run_id, job.fetch("report"), "report")
    version = store.register(name, run_id, job.fetch("model"), lineage, spec.mlflow.alias)
    store.finish_run(run_id)
    alias_version = store.alias_version(name, spec.mlflow.alias) if spec.mlflow.alias else None
    return {"model_version": version, "registered_model": name, "run_id": run_id, "alias_version": alias_version}
