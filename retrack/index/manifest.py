"""The index manifest and the index parameters.

The manifest is written last, atomically: an index folder without one is unfinished. It records
what the index was built from (corpus digest, encoder spec and digest), what it holds (dimension,
count, shards with sizes and sha256 digests) and how (index type and parameters), and when.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from retrack.digest import config_digest
from retrack.errors import InputError, StorageError
from retrack.storage.location import Location

FORMAT = 1
MANIFEST = "manifest.json"
INDEX_TYPES = ("auto", "flat", "ivf", "ivfpq")


@dataclass(frozen=True)
class IndexParams:
    """How to index. `auto`: exact (flat) up to `flat_max` vectors, IVF above.

    nlist (IVF lists) defaults to ~sqrt(n) rounded to a power of two: building costs n × nlist
    (assignment) and ~50 × nlist² (k-means) distance computations, a query ~nprobe × n / nlist, and
    a deletion request asks thousands of queries of an index built for millions of items, so the
    build's side of the trade weighs more (at 1M: nlist 1024 trained in 9 s against 36 s for
    2048, and assigned in half the time; a query scans 2× as many vectors). The quantizer is trained on
    `train_size` sampled vectors (default 50 per list, at most 256k). nprobe (lists searched), unless
    given, is calibrated at build time: the smallest power of two whose recall@10 on held-out
    sample queries reaches `target_recall` against exact search; an IVF-Flat index starts its exact
    search there (`retrack.index.exact_ivf`) and probes further where a query needs it. ivfpq stores `pq_m` sub-quantizer
    codes of `pq_bits` bits per vector; neighbours are always re-ranked on the full vectors, so PQ
    only affects candidate recall. `pca` projects the vectors to that many dimensions (a faiss
    PCAMatrix trained with the index, on the same sample) before any of these: the index then
    holds `pca` floats, or PQ codes of them, per item; its distances are lower bounds of the full
    ones and rank candidates only roughly, so searches re-rank a deeper candidate list.
    """

    type: str = "auto"
    flat_max: int = 100_000
    nlist: int | None = None
    nprobe: int | None = None
    pq_m: int | None = None
    pq_bits: int = 8
    train_size: int | None = None
    target_recall: float = 0.99
    seed: int = 0
    calibrated_recall: float | None = None  # what the calibrated nprobe reached (recorded, not asked for)
    pca: int | None = None

    def __post_init__(self):
        if self.type not in INDEX_TYPES:
            raise InputError(f"index type {self.type!r} is not one of {INDEX_TYPES}")
        if self.pca is not None and self.pca < 1:
            raise InputError(f"index pca must be at least 1, not {self.pca}")

    @property
    def trained(self) -> bool:
        """Is the index trained on a sample before vectors are added (IVF lists, PQ codebooks, PCA)?"""
        return self.type != "flat" or self.pca is not None

    def resolve(self, n: int, dim: int) -> "IndexParams":
        """Concrete parameters for n vectors of dimension dim (what the manifest records)."""
        kind = self.type
        if kind == "auto":
            kind = "flat" if n <= self.flat_max else "ivf"
        if self.pca is not None and self.pca >= dim:
            raise InputError(f"index pca = {self.pca} must be below the vectors' dimension {dim}")
        if kind == "flat":
            train = None if self.pca is None else min(n, self.train_size or 20_000)
            return IndexParams(type="flat", flat_max=self.flat_max, seed=self.seed, pca=self.pca, train_size=train)
        dim = self.pca or dim  # what the IVF lists and PQ codes see
        nlist = self.nlist or max(16, 2 ** round(math.log2(max(math.sqrt(n), 1))))
        nlist = min(nlist, max(1, n // 39))  # faiss wants >= 39 training points per list
        nprobe = None if self.nprobe is None else min(nlist, self.nprobe)
        train = min(n, self.train_size or min(max(50 * nlist, 20_000), 256_000))
        pq_m = None
        if kind == "ivfpq":
            pq_m = self.pq_m or next(m for m in (64, 32, 16, 8, 4, 2, 1) if dim % m == 0 and m <= dim)
            if dim % pq_m:
                raise InputError(f"pq_m = {pq_m} does not divide the dimension {dim}")
        # PQ codebooks of 2**bits centroids want >= 39 training points each.
        pq_bits = min(self.pq_bits, max(1, int(math.log2(max(train // 39, 2))))) if kind == "ivfpq" else self.pq_bits
        return IndexParams(type=kind, flat_max=self.flat_max, nlist=nlist, nprobe=nprobe, pq_m=pq_m,
                           pq_bits=pq_bits, train_size=train, target_recall=self.target_recall, seed=self.seed, pca=self.pca)

    def build_digest(self) -> str:
        """What decides the stored shards (nprobe is a search-time setting and is left out)."""
        d = asdict(self)
        for search_only in ("nprobe", "flat_max", "target_recall", "calibrated_recall"):
            d.pop(search_only)
        if d["pca"] is None:  # indexes built before projection existed keep their digest
            del d["pca"]
        return config_digest(d)


@dataclass
class FileRecord:
    name: str  # relative to the index root
    size: int
    sha256: str

    @classmethod
    def of(cls, root: Location, name: str, data: bytes) -> "FileRecord":
        from retrack.digest import sha256_bytes

        return cls(name, len(data), sha256_bytes(data))

    def valid_size(self, root: Location) -> bool:
        loc = root / self.name
        try:
            return loc.is_file() and loc.size() == self.size
        except StorageError:
            return False


@dataclass
class ShardRecord:
    number: int
    chunk_key: str
    config: str  # digest of (index params, quantizer): a shard built otherwise is stale
    count: int
    dim: int
    faiss: FileRecord
    ids: FileRecord
    vectors: FileRecord
    latents: FileRecord | None = None  # pooled-latent indexes: the full latents (fp16), apart from the index

    def files(self) -> list[FileRecord]:
        return [self.faiss, self.ids, self.vectors, *([self.latents] if self.latents else [])]

    def valid(self, root: Location) -> bool:
        return all(f.valid_size(root) for f in self.files())

    @classmethod
    def from_dict(cls, d: dict) -> "ShardRecord":
        d = dict(d)
        for k in ("faiss", "ids", "vectors", "latents"):
            d[k] = FileRecord(**d[k]) if d.get(k) else None
        return cls(**d)


@dataclass
class Manifest:
    corpus: dict  # uri, kind, digest, files, rows, image_shape
    encoder: dict  # spec, digest
    dim: int
    count: int
    skipped: int
    index_type: str
    params: dict
    quantizer: FileRecord | None
    shards: list[ShardRecord]
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    build_seconds: float = 0.0
    format: int = FORMAT

    def key(self) -> dict:
        return {"corpus": self.corpus["digest"], "encoder": self.encoder["digest"], "build": IndexParams(**self.params).build_digest()}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def content_digest(self) -> str:
        """Digest of what the index holds and how it was built, not when or how fast: a rebuild of
        the same inputs (another job's, say) has the same one, a tampered manifest does not."""
        d = self.to_dict()
        d.pop("created_at")
        d.pop("build_seconds")
        return config_digest(d)

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        d = dict(d)
        if d.get("format") != FORMAT:
            raise StorageError(f"index manifest format {d.get('format')} is not {FORMAT}: rebuild the index")
        d["quantizer"] = FileRecord(**d["quantizer"]) if d.get("quantizer") else None
        d["shards"] = [ShardRecord.from_dict(s) for s in d["shards"]]
        return cls(**d)

    @property
    def latent_pool(self) -> int:
        """> 1: the index holds pooled latents, and neighbours are re-ranked on full ones."""
        return int(self.encoder["spec"].get("pool") or 1)

    def row_offsets(self) -> list[int]:
        """Where each shard's rows start among the index's rows (the last: the item count)."""
        return list(itertools.accumulate((s.count for s in self.shards), initial=0))

    @property
    def index_params(self) -> IndexParams:
        return IndexParams(**self.params)

    def write(self, root: Location) -> None:
        (root / MANIFEST).write_json(self.to_dict())

    @classmethod
    def read(cls, root: Location) -> "Manifest | None":
        loc = root / MANIFEST
        if not loc.exists():
            return None
        try:
            return cls.from_dict(loc.read_json())
        except (ValueError, TypeError, KeyError) as exc:
            raise StorageError(f"index manifest {loc.uri} is unreadable ({exc}): delete it or rebuild") from None


def with_nprobe(params: IndexParams, nprobe: int | None) -> IndexParams:
    return params if nprobe is None else replace(params, nprobe=nprobe)
