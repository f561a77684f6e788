"""Everything the unlearn stage checks and plans on the driver before any cluster work: the model
directory and its kind, the corpus ids, the forget set, the neighbours, the data plan and the
run key (the config hash that names the run and owns its checkpoints)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrack.config.hashing import recipe_hash
from retrack.config.model_kind import ModelKind
from retrack.config.train import MethodConfig, TrainConfig
from retrack.config.unlearn_run import UnlearnRun
from retrack.data.corpus import decode_image
from retrack.data.forget import check_forget_ids, requested_forget_ids
from retrack.digest import config_digest, ids_digest, sha256_bytes
from retrack.errors import CorpusError, InputError, ModelLayoutError
from retrack.methods import method_class
from retrack.training.checkpoint import file_sha256
from retrack.training.neighbours import exact_neighbours, read_neighbours_file
from retrack.training.plan import DataPlan


@dataclass
class CorpusIndex:
    """The corpus ids in corpus order (shards sorted by name, then row order), without images."""

    ids: list[str]
    shards: list[Path]
    has_captions: bool


def read_corpus_index(corpus_dir: str | Path) -> CorpusIndex:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from retrack.data.corpus import shard_paths

    shards = shard_paths(corpus_dir)
    ids: list[str] = []
    has_captions = True
    for shard in shards:
        try:
            pf = pq.ParquetFile(shard)
        except (pa.ArrowInvalid, OSError) as exc:
            raise CorpusError(f"shard {shard.name} cannot be read as parquet: {exc}") from None
        names = pf.schema_arrow.names
        if "id" not in names or "image" not in names:
            raise CorpusError(f"shard {shard.name} lacks column(s) {sorted({'id', 'image'} - set(names))}; a corpus needs 'id' and 'image'")
        has_captions &= "caption" in names
        ids.extend(pf.read(columns=["id"]).column("id").to_pylist())
    if any(not i for i in ids):
        raise CorpusError("the corpus has empty ids")
    if len(set(ids)) != len(ids):
        raise CorpusError("ids occur more than once in the corpus")
    return CorpusIndex(ids=ids, shards=shards, has_captions=has_captions)


def corpus_fingerprint(index: CorpusIndex) -> str:
    """Cheap content key of a corpus: shard names and sizes plus the ordered ids."""
    parts = [(p.name, p.stat().st_size) for p in index.shards]
    return config_digest({"shards": parts, "ids": sha256_bytes("\n".join(index.ids).encode())})


def resolve_model(uri: str, expected: ModelKind) -> Path:
    """The model's local directory after checking its layout; a kind other than the expected one is refused."""
    from retrack.models.pixel import check_pixel_model_dir
    from retrack.models.sd import check_sd_model_dir, model_kind
    from retrack.storage.cache import local_model_dir

    local = local_model_dir(uri)
    found = model_kind(local)
    if found is not expected:
        raise ModelLayoutError(f"{uri} holds {found.description}, but model kind {expected.value!r} was requested")
    if found is ModelKind.PIXEL_DDPM:
        check_pixel_model_dir(local)
    else:
        check_sd_model_dir(local)
    return local


def detect_model_kind(uri: str) -> ModelKind:
    """The kind of model a directory holds (for callers that leave it to the layout)."""
    from retrack.models.sd import model_kind
    from retrack.storage.cache import local_model_dir

    return model_kind(local_model_dir(uri))


def model_geometry(kind: ModelKind, model_dir: Path) -> tuple[int, int, int]:
    """uint8 (H, W, C) every item is delivered in."""
    cfg = json.loads((model_dir / "unet" / "config.json").read_text())
    size = cfg["sample_size"] if isinstance(cfg["sample_size"], int) else cfg["sample_size"][0]
    if kind is ModelKind.PIXEL_DDPM:
        return (size, size, int(cfg["in_channels"]))
    from retrack.models.sd import pipeline_resolution

    res = pipeline_resolution(model_dir)
    return (res, res, 3)


def run_key(method: MethodConfig, train: TrainConfig, plan: DataPlan, model_sha: str) -> str:
    """The unlearn run's config hash: everything that determines the result (not where or on how
    many workers it runs). The kind is recorded by its short name, as it always was."""
    return recipe_hash(
        method, train,
        model=model_sha, model_kind=plan.kind.short, corpus=plan.corpus_fingerprint,
        forget=plan.forget_digest, neighbours=plan.neighbours_digest,
    )


@dataclass
class Prepared:
    run: UnlearnRun
    model_dir: Path
    corpus: CorpusIndex
    forget_rows: np.ndarray  # corpus rows, in forget-list order
    retain_rows: np.ndarray  # corpus rows of the retained set, ascending (retain index -> corpus row)
    plan: DataPlan
    config_hash: str
    run_name: str


def prepare(run: UnlearnRun) -> Prepared:
    """All validation and planning that needs no cluster."""
    from retrack.models.pixel import model_digest

    spec = run.spec
    kind = spec.model.kind
    model_dir = resolve_model(spec.model.uri, kind)
    corpus = read_corpus_index(spec.corpus.uri)
    forget_ids = requested_forget_ids(spec)
    check_forget_ids(forget_ids, corpus.ids)
    pos = {i: n for n, i in enumerate(corpus.ids)}
    forget_rows = np.array([pos[i] for i in forget_ids], dtype=np.int64)
    retain_rows = np.setdiff1d(np.arange(len(corpus.ids)), forget_rows)
    if len(retain_rows) == 0:
        raise InputError("the forget set covers the whole corpus: nothing is left to retain")
    if kind is ModelKind.STABLE_DIFFUSION and not corpus.has_captions:
        raise CorpusError("a Stable Diffusion corpus needs a 'caption' column (each item is conditioned on its own caption)")
    geometry = model_geometry(kind, model_dir)
    if kind is ModelKind.PIXEL_DDPM:
        first = decode_image(_first_image(corpus), "first item")
        if first.shape != geometry:
            raise CorpusError(f"corpus images are {first.shape[1]}x{first.shape[0]}x{first.shape[2]} but the model denoises {geometry[1]}x{geometry[0]}x{geometry[2]}")
    needs = method_class(spec.method.name).requirements
    neighbours = None
    nbr_digest = None
    if needs.neighbours:
        from retrack.training.loop import check_k

        k = spec.method.k
        check_k(k, len(retain_rows))
        if run.neighbours_file:
            retain_pos = {corpus.ids[r]: n for n, r in enumerate(retain_rows)}
            neighbours = read_neighbours_file(run.neighbours_file, forget_ids, retain_pos, k)
            nbr_digest = file_sha256(run.neighbours_file)
        else:
            neighbours = exact_neighbours(kind, model_dir, Path(spec.corpus.uri), forget_rows, retain_rows, k, geometry[0])
            nbr_digest = "exact:" + sha256_bytes(neighbours.tobytes())
    plan = DataPlan(
        kind=kind,
        n_retain=len(retain_rows),
        n_forget=len(forget_rows),
        needs=needs,
        neighbours=neighbours,
        item_shape=geometry,
        has_captions=corpus.has_captions,
        corpus_fingerprint=corpus_fingerprint(corpus),
        forget_digest=ids_digest(forget_ids),
        neighbours_digest=nbr_digest,
    )
    chash = run_key(spec.method, spec.train, plan, model_digest(model_dir))
    name = run.run_name or f"{spec.request_id}-{chash[:12]}"
    return Prepared(run, model_dir, corpus, forget_rows, retain_rows, plan, chash, name)


def _first_image(corpus: CorpusIndex) -> bytes:
    import pyarrow.parquet as pq

    return pq.ParquetFile(corpus.shards[0]).read_row_group(0, columns=["image"]).column("image")[0].as_py()
