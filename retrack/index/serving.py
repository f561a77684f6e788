"""Serving a built index: loaded whole into one process (`open_index`), or shard by shard where
each is loaded (`Shard`; `ShardedIndex` merges their answers; on a cluster one Ray actor per
shard, `pipelines.index.serve_index`). Either answers as a `VectorIndex`; the vectors (and a
pooled-latent index's full latents) are read by row from the shards' raw files."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow as pa

from retrack.errors import StorageError
from retrack.index.exact_ivf import exact_search, merge_top_k
from retrack.index.manifest import Manifest, ShardRecord
from retrack.index.search import VectorIndex, id_positions, set_index_nprobe
from retrack.index.shards import load_shard_ids, load_shard_index
from retrack.storage.location import Location


class Shard:
    """One shard of a built index (its faiss index and ids), served where it is loaded: on a
    cluster, one Ray actor per shard, so that no process holds the whole index."""

    def __init__(self, root: Location, rec: ShardRecord, nprobe: int | None = None):
        self.index, self.ids = load_shard_index(root, rec), load_shard_ids(root, rec)
        set_index_nprobe(self.index, nprobe)
        self._search = exact_search(self.index)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self._search(np.ascontiguousarray(q, dtype=np.float32), min(int(k), int(self.index.ntotal)))

    def positions(self, ids: pa.Array) -> np.ndarray:
        return id_positions(ids, self.ids)

    def ids_at(self, rows: np.ndarray) -> list[str]:
        return self.ids.take(pa.array(np.asarray(rows, dtype=np.int64))).to_pylist()


class ShardedIndex(VectorIndex):
    """An index whose shards are searched where they are served (`Shard`s, or handles whose calls
    `gather` resolves, e.g. Ray actors and `ray.get`); top-k merged across shards. The full
    vectors are read by row from the shards' vector files."""

    def __init__(self, shards: list, manifest: Manifest, vectors: Callable[[np.ndarray], np.ndarray],
                 gather: Callable[[list], list] = list, full: Callable[[np.ndarray], np.ndarray] | None = None):
        super().__init__(None, None, manifest.dim, vectors, manifest, full=full)
        self.shards, self.gather = shards, gather
        self.offsets = np.array(manifest.row_offsets())

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def set_nprobe(self, nprobe: int | None) -> None:
        raise NotImplementedError("a sharded index takes nprobe when its shards are loaded")

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(int(k), len(self))
        parts = self.gather([s.search(q, k) for s in self.shards])
        # A shard short of k results pads with -1, kept as -1 (not offset) so the merge skips it.
        return merge_top_k([(d, np.where(lab >= 0, lab + off, -1)) for (d, lab), off in zip(parts, self.offsets)], k)

    def positions(self, ids: pa.Array) -> np.ndarray:
        return _index_rows(zip(self.gather([s.positions(ids) for s in self.shards]), self.offsets), len(ids))

    def ids_of(self, rows: np.ndarray) -> list[str]:
        rows = np.asarray(rows, dtype=np.int64)
        shard_of = np.searchsorted(self.offsets, rows, side="right") - 1
        out: list[str] = [""] * len(rows)
        wanted = [np.flatnonzero(shard_of == n) for n in range(len(self.shards))]
        got = self.gather([s.ids_at(rows[w] - self.offsets[n]) for n, (s, w) in enumerate(zip(self.shards, wanted)) if len(w)])
        for w, ids in zip([w for w in wanted if len(w)], got):
            for j, i in zip(w, ids):
                out[j] = i
        return out


# --------------------------------------------------------------------------------------------
# Opening a built index
# --------------------------------------------------------------------------------------------


class _ShardVectors:
    """Vectors by row from the shards' raw files (memory-mapped locally, ranged reads on S3): the
    indexed vectors (.vec, float32), or a pooled-latent index's full latents (.lat, float16)."""

    def __init__(self, root: Location, manifest: Manifest, latents: bool = False):
        self.dim = manifest.dim * manifest.latent_pool**2 if latents else manifest.dim
        self.dtype = np.dtype(np.float16 if latents else np.float32)
        self.offsets = np.array(manifest.row_offsets())
        self.files = [root / (s.latents if latents else s.vectors).name for s in manifest.shards]
        self._open: dict[int, object] = {}

    def _reader(self, shard: int):
        if shard not in self._open:
            loc = self.files[shard]
            if loc.is_s3:
                self._open[shard] = loc.open_input()
            else:
                self._open[shard] = np.memmap(loc.path, dtype=self.dtype, mode="r").reshape(-1, self.dim)
        return self._open[shard]

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.dim), np.float32)
        shard_of = np.searchsorted(self.offsets, rows, side="right") - 1
        width = self.dim * self.dtype.itemsize
        for i, (row, s) in enumerate(zip(rows, shard_of)):
            local = int(row - self.offsets[s])
            r = self._reader(int(s))
            if isinstance(r, np.memmap):
                out[i] = r[local]
            else:
                out[i] = np.frombuffer(r.read_at(width, local * width), dtype=self.dtype)
        return out


def index_manifest(uri: "str | Location", endpoint: str | None = None, manifest_digest: str | None = None) -> tuple[Location, Manifest]:
    """A built index's root and manifest; with `manifest_digest` (what the job's index stage
    recorded), an index whose manifest changed since is refused."""
    root = Location.parse(uri, endpoint=endpoint)
    root.check_reachable()
    manifest = Manifest.read(root)
    if manifest is None:
        raise StorageError(f"no index at {root.uri} ({root.where()}): build it first (retrack index build)")
    if manifest_digest is not None and manifest.content_digest() != manifest_digest:
        raise StorageError(f"index manifest {root.uri}/manifest.json does not match the digest recorded when the job built it: rebuild the index (rerun the index stage)")
    return root, manifest


def shard_vectors(root: Location, manifest: Manifest) -> Callable[[np.ndarray], np.ndarray]:
    """The indexed vectors by row, read from the shards' vector files (ranged reads on S3)."""
    return _ShardVectors(root, manifest)


def shard_latents(root: Location, manifest: Manifest) -> Callable[[np.ndarray], np.ndarray] | None:
    """A pooled-latent index's full latents by row (what its candidates are re-ranked on); None
    for an index of full vectors."""
    if manifest.latent_pool == 1:
        return None
    if any(s.latents is None for s in manifest.shards):
        raise StorageError("this index holds pooled latents but not the full ones its neighbours are re-ranked on: rebuild it")
    return _ShardVectors(root, manifest, latents=True)


def stored_full_vectors(root: Location, manifest: Manifest) -> Callable[[np.ndarray], np.ndarray]:
    """Every item's full vector by row, as neighbours are re-ranked on it: a pooled-latent index's
    full latents, else the indexed vectors (for a Stable Diffusion index, the items' latents)."""
    return shard_latents(root, manifest) or shard_vectors(root, manifest)


def rows_in_shards(root: Location, manifest: Manifest, numbers: list[int], ids: pa.Array) -> np.ndarray:
    """The index row of each id held by one of the shards `numbers`, -1 for the others."""
    offsets = manifest.row_offsets()
    return _index_rows(((id_positions(ids, load_shard_ids(root, manifest.shards[n])), offsets[n]) for n in numbers), len(ids))


def _index_rows(found, n: int) -> np.ndarray:
    """Index rows from (a shard's positions of the ids, -1 where it lacks one; its row offset); -1
    where no shard holds the id."""
    out = np.full(n, -1, np.int64)
    for pos, off in found:
        out = np.where(pos >= 0, pos + off, out)
    return out


def open_index(uri: "str | Location", endpoint: str | None = None, nprobe: int | None = None,
               threads: int | None = None, serve: str = "merged", manifest_digest: str | None = None) -> VectorIndex:
    """Load a built index: every shard checked against its sha256, served as one faiss index.
    With `manifest_digest` (what the job's index stage recorded), an index whose manifest changed
    since is refused.

    serve="merged" merges the shards into one in-memory index (one search pass); "shards" keeps
    them apart behind a faiss IndexShards (the layout for shards served from several nodes).
    """
    import faiss

    root, manifest = index_manifest(uri, endpoint, manifest_digest)
    if threads:
        faiss.omp_set_num_threads(threads)
    subs = [load_shard_index(root, s) for s in manifest.shards]
    for rec, sub in zip(manifest.shards, subs):
        if sub.d != manifest.dim or rec.dim != manifest.dim:
            raise StorageError(f"index {root.uri}: shard {rec.number} holds {sub.d}-dimensional vectors, the manifest says {manifest.dim}: rebuild it")
    if serve == "shards":
        index = faiss.IndexShards(manifest.dim, False, True)
        for s in subs:
            index.add_shard(s)
    else:
        index = subs[0]
        for s in subs[1:]:
            # IVF lists take the shard's row offset; a flat index appends rows in order.
            index.merge_from(s, 0 if manifest.index_type == "flat" else index.ntotal)
    ids = pa.concat_arrays([load_shard_ids(root, s) for s in manifest.shards])
    if len(ids) != index.ntotal:
        raise StorageError(f"index {root.uri}: {index.ntotal} vectors but {len(ids)} ids; rebuild it")
    vi = VectorIndex(index, ids, manifest.dim, _ShardVectors(root, manifest), manifest, threads, full=shard_latents(root, manifest))
    vi._shards = subs  # the IndexShards refers to these without owning them
    vi.set_nprobe(nprobe if nprobe is not None else manifest.params.get("nprobe"))
    return vi
