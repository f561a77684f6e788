"""Everything the unlearn stage checks and plans on the driver before any cluster work: the model
directory and its kind, the corpus ids, the forget set, the neighbours, the data plan and the
run key (the config hash that names the run and owns its checkpoints)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from retrack.config.hashing import recipe_hash
from retrack.config.model_kind import ModelKind
from retrack.config.train import MethodConfig, TrainConfig
from retrack.config.unlearn_run import UnlearnRun
from retrack.data.item_cache import ItemCache
from retrack.data.forget import check_forget_ids, requested_forget_ids
from retrack.digest import ids_digest, sha256_bytes
from retrack.data.id_table import IdTable
from retrack.data.source import CorpusPlan, ScanRunner
from retrack.errors import CorpusError, InputError, ModelLayoutError
from retrack.storage.location import Location, S3Options, is_s3
from retrack.methods import method_class
from retrack.training.neighbours import exact_neighbours, read_neighbours_file
from retrack.training.plan import DataPlan

if TYPE_CHECKING:
    from retrack.index.manifest import Manifest


@dataclass
class CorpusIndex:
    """The corpus's files (by URI) and where each file's rows start (the rows of file n are
    `starts[n]:starts[n + 1]`, files sorted by path), and its id table on storage: never the ids
    themselves, which grow with the corpus."""

    source: CorpusPlan
    starts: np.ndarray
    ids: IdTable

    @property
    def count(self) -> int:
        return int(self.starts[-1])

    @property
    def has_captions(self) -> bool:
        return self.source.has_captions

    @cached_property
    def _file_number(self) -> dict[str, int]:
        return {f.rel: n for n, f in enumerate(self.source.files)}

    def positions(self, ids: Sequence[str]) -> np.ndarray:
        """The corpus row of each of the given ids, -1 where the corpus lacks it: read from the
        buckets of the id table that hold them."""
        found = self.ids.find(ids).to_pydict()
        at = {i: int(self.starts[self._file_number[f]]) + r for i, f, r in zip(found["id"], found["file"], found["row"])}
        return np.array([at.get(i, -1) for i in ids], dtype=np.int64)

    def rows_of(self, ids: Sequence[str]) -> np.ndarray:
        """The corpus rows of the given (distinct, known) ids, in their order."""
        out = self.positions(ids)
        if (out < 0).any():
            raise CorpusError(f"{int((out < 0).sum())} of {len(ids)} id(s) are not in the corpus")
        return out

    def by_file(self, rows) -> list[tuple[int, np.ndarray]]:
        """The given corpus rows (ascending) grouped by the file that holds them: (file number,
        the rows' positions in that file)."""
        rows = np.asarray(rows, dtype=np.int64)
        file_of = np.searchsorted(self.starts, rows, side="right") - 1
        return [(int(n), rows[file_of == n] - self.starts[n]) for n in np.unique(file_of)]


def read_corpus_index(uri: str, format: str, endpoint: str | None, geometry: tuple[int, int, int], ids_root: Location,
                      runner: ScanRunner | None = None) -> CorpusIndex:
    """List the corpus (local path or s3://), read its ids into its id table under `ids_root` (a
    corpus of many files by `runner`: `retrack.data.source.scan_corpus_ids`); no image is read:
    every item is delivered at the model's `geometry`."""
    from retrack.data.source import scan_corpus_ids

    source, ids = scan_corpus_ids(uri, format, ids_root=ids_root, endpoint=endpoint, image_shape=geometry, runner=runner)
    return CorpusIndex(source=source, starts=np.cumsum([0] + [f.rows for f in source.files]), ids=ids)


@dataclass(frozen=True)
class RetainedRows:
    """Retain index -> corpus row (the corpus rows but the forgotten ones, in order), computed
    from the forgotten rows: no array as large as the corpus."""

    count: int  # corpus rows
    forget: np.ndarray  # the forgotten rows, ascending

    def __len__(self) -> int:
        return self.count - len(self.forget)

    @cached_property
    def _skipped_at(self) -> np.ndarray:
        # f_j - j: the retain index at which the j-th forgotten row is skipped.
        return self.forget - np.arange(len(self.forget))

    def __getitem__(self, index):
        # Retain index i is corpus row i + (forgotten rows at or before it), a sorted search.
        return np.asarray(index, dtype=np.int64) + np.searchsorted(self._skipped_at, index, side="right")

    def index_of(self, rows: np.ndarray) -> np.ndarray:
        """The retain index of each corpus row; -1 for a row that is missing (-1) or forgotten."""
        rows = np.asarray(rows, dtype=np.int64)
        out = rows - np.searchsorted(self.forget, rows)
        return np.where((rows < 0) | np.isin(rows, self.forget), -1, out)


def resolve_model(uri: str, expected: ModelKind, endpoint: str | None = None) -> Path:
    """The model's local directory after checking its layout; a kind other than the expected one is refused."""
    from retrack.models.pixel import check_pixel_model_dir
    from retrack.models.sd import check_sd_model_dir, model_kind
    from retrack.storage.cache import local_model_dir

    local = local_model_dir(uri, endpoint=endpoint)
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
    retain_rows: RetainedRows  # retain index -> corpus row
    plan: DataPlan
    config_hash: str
    run_name: str

    @property
    def output(self) -> Location:
        """Where the unlearned model goes."""
        return Location.parse(self.run.output_dir, endpoint=self.run.spec.storage.endpoint_url)

    @property
    def model_s3(self) -> S3Options | None:
        """The original model's S3 options as tasks and workers get them: resolved here (they may
        have started before the AWS_* variables were set); None for a local model."""
        return S3Options().resolved() if is_s3(self.run.spec.model.uri) else None


def item_cache(prep: "Prepared") -> ItemCache:
    """Where a Stable Diffusion run's item encodings are kept: keyed by digests of the corpus and
    the encoders, so built only when the run trains (not for a run whose output exists)."""
    run = prep.run
    return ItemCache.for_model(Location.parse(run.item_cache_root, endpoint=run.spec.storage.endpoint_url),
                               prep.plan.corpus_fingerprint, prep.model_dir, prep.plan.item_shape[0])


def latent_index(prep: "Prepared") -> "tuple[Location, Manifest] | None":
    """The run's index (`UnlearnRun.index`) as the source of its items' latents: refused unless it
    was built from this corpus with this model's VAE at its resolution (its latents are then the
    ones the VAE would give, by the one latent rule). Checked only when the run trains."""
    from retrack.index.serving import index_manifest
    from retrack.models.encoders import EncoderSpec

    run = prep.run
    if run.index is None:
        return None
    if prep.plan.kind is not ModelKind.STABLE_DIFFUSION:
        raise InputError("an index is read only by Stable Diffusion runs, for their items' latents: leave it out for a pixel DDPM")
    root, manifest = index_manifest(run.index, endpoint=run.spec.storage.endpoint_url)
    if manifest.corpus["digest"] != prep.plan.corpus_fingerprint:
        raise InputError(f"index {run.index} was built from another corpus than {run.spec.corpus.uri} (or before it changed): "
                         "give the index of this corpus, or none")
    spec = manifest.encoder["spec"]
    if spec.get("kind") != "vae" or manifest.encoder["digest"] != EncoderSpec(kind="vae", model_dir=str(prep.model_dir), pool=int(spec.get("pool") or 1)).digest():
        raise InputError(f"index {run.index} does not hold this model's latents (it was built with another encoder, VAE or "
                         "resolution): give the index built with this model's VAE, or none")
    return root, manifest


def prepare(run: UnlearnRun, corpus: CorpusIndex | None = None, runner: ScanRunner | None = None) -> Prepared:
    """All validation and planning that needs no cluster (`corpus`: the corpus's listing and id
    table, if read already; else read, a corpus of many files by `runner` when given)."""
    from retrack.data.source import require_captions
    from retrack.models.pixel import model_digest

    spec = run.spec
    kind, endpoint = spec.model.kind, spec.storage.endpoint_url
    model_dir = resolve_model(spec.model.uri, kind, endpoint)
    geometry = model_geometry(kind, model_dir)  # every item is brought to it as it is read (`fit_image`)
    corpus = corpus or read_corpus_index(spec.corpus.uri, spec.corpus.format, endpoint, geometry,
                                         Location.parse(run.corpus_ids_root, endpoint=endpoint), runner)
    forget_ids = requested_forget_ids(spec)
    forget_rows = check_forget_ids(forget_ids, corpus.positions)
    retain_rows = RetainedRows(corpus.count, np.sort(forget_rows))
    if len(retain_rows) == 0:
        raise InputError("the forget set covers the whole corpus: nothing is left to retain")
    if kind is ModelKind.STABLE_DIFFUSION:
        require_captions(corpus.source)
    needs = method_class(spec.method.name).requirements
    neighbours = None
    nbr_digest = None
    if needs.neighbours:
        from retrack.training.loop import check_k

        k = spec.method.k
        check_k(k, len(retain_rows))
        if run.neighbours_file:
            nb_file = Location.parse(run.neighbours_file, endpoint=endpoint)
            neighbours = read_neighbours_file(nb_file, forget_ids, k, lambda ids: retain_rows.index_of(corpus.positions(ids)))
            nbr_digest = sha256_bytes(nb_file.read_bytes())
        else:
            neighbours = exact_neighbours(kind, model_dir, corpus.source, forget_rows, retain_rows[np.arange(len(retain_rows))], k, geometry)
            nbr_digest = "exact:" + sha256_bytes(neighbours.tobytes())
    plan = DataPlan(
        kind=kind,
        n_retain=len(retain_rows),
        n_forget=len(forget_rows),
        needs=needs,
        neighbours=neighbours,
        item_shape=geometry,
        has_captions=corpus.has_captions,
        corpus_fingerprint=corpus.source.digest(),
        forget_digest=ids_digest(forget_ids),
        neighbours_digest=nbr_digest,
    )
    chash = run_key(spec.method, spec.train, plan, model_digest(model_dir))
    name = run.run_name or f"{spec.request_id}-{chash[:12]}"
    return Prepared(run, model_dir, corpus, forget_rows, retain_rows, plan, chash, name)

