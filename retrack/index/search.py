"""Serving an index: neighbours for a deletion request, and near-duplicates of the forget items.

    index = open_index("s3://bucket/idx")            # retrack.index.serving; or VectorIndex.from_arrays(ids, vectors)
    nb = find_neighbours(index, forget_ids, k=8)      # K nearest retained items per forget item
    rep = find_duplicates(index, forget_ids, threshold=0.5, policy="add")
    forget_ids = rep.forget_ids                        # with policy "add": the copies join the set

Candidates come from the faiss index (exact for flat and IVF-Flat indexes, `exact_ivf`; approximate
for PQ codes and projected vectors); every forget id is dropped from
them, and the rest are re-ranked exactly on the full vectors (float64). Distances are Euclidean
in the model's space (pixels, or Stable Diffusion latents, flattened); an index of pooled latents
is searched on those and re-ranked on the full latents stored beside it (`VectorIndex.full`).

Forget ids are personal data: messages and logs carry counts and positions, never the ids.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Collection, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from retrack.errors import ForgetSetError, InputError
from retrack.index.exact_ivf import exact_search
from retrack.index.manifest import Manifest

log = logging.getLogger(__name__)
POLICIES = ("fail", "warn", "add")


def set_index_nprobe(index, nprobe: int | None) -> None:
    import faiss

    if nprobe is not None and hasattr(faiss, "extract_index_ivf"):
        try:
            faiss.extract_index_ivf(index).nprobe = int(nprobe)
        except RuntimeError:
            pass  # not an IVF index


class VectorIndex:
    """A faiss index over rows 0..n-1, the ids of those rows, and their full vectors."""

    def __init__(self, index, ids: pa.Array, dim: int, vectors: Callable[[np.ndarray], np.ndarray],
                 manifest: Manifest | None = None, threads: int | None = None, full: Callable[[np.ndarray], np.ndarray] | None = None):
        self.index = index
        self.ids = ids
        self.dim = dim
        self._vectors = vectors
        self.manifest = manifest
        self.threads = threads
        self.full = full  # an index of pooled latents: the full latents by row, for the re-rank
        self._search = None  # exact_search(index), made at the first search (after set_nprobe)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def from_arrays(cls, ids: Sequence[str], vectors: np.ndarray, threads: int | None = None) -> "VectorIndex":
        """An exact in-memory index (small corpora, tests): vectors NxD or NxCxHxW."""
        import faiss

        x = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32).reshape(len(vectors), -1))
        if len(set(ids)) != len(ids):
            raise InputError("ids must be unique")
        index = faiss.IndexFlatL2(x.shape[1])
        index.add(x)
        return cls(index, pa.array(list(ids), type=pa.string()), x.shape[1], lambda rows: x[rows], threads=threads)

    def set_nprobe(self, nprobe: int | None) -> None:
        set_index_nprobe(self.index, nprobe)
        self._search = None

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        return self._vectors(rows) if len(rows) else np.zeros((0, self.dim), np.float32)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        if self.threads:
            faiss.omp_set_num_threads(self.threads)
        if self._search is None:
            self._search = exact_search(self.index)
        return self._search(np.ascontiguousarray(q, dtype=np.float32), min(int(k), len(self)))

    def rows_of(self, forget_ids: Sequence[str]) -> np.ndarray:
        """Rows of the forget ids, in their order; refuses empty, repeated or unknown ids."""
        if not forget_ids:
            raise ForgetSetError("the forget set is empty: nothing to unlearn")
        counts = Counter(forget_ids)
        if len(counts) != len(forget_ids):
            entries = [n + 1 for n, v in enumerate(forget_ids) if counts[v] > 1]
            raise ForgetSetError(f"{len(forget_ids) - len(counts)} forget id(s) are listed more than once (entries {entries[:6]})")
        pos = self.positions(pa.array(list(forget_ids), type=pa.string()))
        if (pos < 0).any():
            entries = (np.flatnonzero(pos < 0) + 1).tolist()
            raise ForgetSetError(f"{int((pos < 0).sum())} of {len(forget_ids)} forget id(s) are not in the index (entries {entries[:6]})")
        return pos

    def positions(self, ids: pa.Array) -> np.ndarray:
        """The row of each id, -1 where the index lacks it."""
        return id_positions(ids, self.ids)

    def ids_of(self, rows: np.ndarray) -> list[str]:
        return self.ids.take(pa.array(np.asarray(rows, dtype=np.int64))).to_pylist()


def id_positions(ids: pa.Array, value_set: pa.Array) -> np.ndarray:
    return pc.fill_null(pc.index_in(ids, value_set=value_set), -1).to_numpy().astype(np.int64)


# --------------------------------------------------------------------------------------------
# Neighbours
# --------------------------------------------------------------------------------------------


@dataclass
class Neighbours:
    """For forget item i (in request order): its K nearest retained items, nearest first."""

    forget_ids: list[str]
    forget_vectors: np.ndarray  # [U, D]
    ids: list[list[str]]  # [U][K]
    rows: np.ndarray  # [U, K] rows in the index
    distances: np.ndarray  # [U, K] Euclidean, exact
    vectors: np.ndarray  # [U, K, D]

    @property
    def k(self) -> int:
        return self.rows.shape[1]


def exact_rerank(q: np.ndarray, cand_vectors: np.ndarray) -> np.ndarray:
    diff = cand_vectors.astype(np.float64) - q.astype(np.float64)[None, :]
    return np.sqrt(np.einsum("ij,ij->i", diff, diff))


def full_vectors(index: VectorIndex) -> Callable[[np.ndarray], np.ndarray]:
    """What the re-rank reads: the full latents stored beside an index of pooled ones, else the
    indexed vectors themselves."""
    if index.full is not None:
        return index.full
    if index.manifest is not None and index.manifest.latent_pool > 1:
        raise InputError(f"this index holds latents pooled by {index.manifest.latent_pool} and not the full latents "
                         "its candidates are re-ranked on")
    return index.vectors


def _candidates(index: VectorIndex, q: np.ndarray, exclude: np.ndarray, need: int, start: int) -> list[np.ndarray]:
    """Per query, at least `need` candidate rows not in `exclude` (searching wider until found)."""
    n = len(index)
    out: list[np.ndarray | None] = [None] * len(q)
    pending = np.arange(len(q))
    k = min(start, n)
    while len(pending):
        _, labels = index.search(q[pending], k)
        still = []
        for j, qi in enumerate(pending):
            lab = labels[j][labels[j] >= 0]
            lab = lab[~np.isin(lab, exclude)]
            if len(lab) >= need or k >= n:
                out[qi] = lab
            else:
                still.append(qi)
        pending = np.array(still, dtype=np.int64)
        k = min(2 * k, n)
    return out  # type: ignore[return-value]


def find_neighbours(index: VectorIndex, forget_ids: Sequence[str], k: int, margin: int | None = None) -> Neighbours:
    """K nearest retained items of every forget item, re-ranked exactly in the full space.

    Searches K + margin candidates (margin defaults to max(K, 16), max(4K, 64) when the index
    holds PQ codes and max(4K, 256) when it holds projected vectors, whose approximate distances
    need a deeper candidate list), widening the search
    for a query whose candidates are mostly forget items (e.g. many copies of it are being
    forgotten). The candidates are re-ranked on full vectors (`full_vectors`): for an index of
    pooled latents, whose distances rank them only roughly, the full latents stored beside it.
    """
    if k < 1:
        raise InputError(f"k must be at least 1, not {k}")
    vec = full_vectors(index)
    rows = index.rows_of(forget_ids)
    retained = len(index) - len(rows)
    if k > retained:
        raise InputError(f"k = {k} is larger than the retained set ({retained} items)")
    q = vec(rows)
    if margin is None:
        m = index.manifest
        if m is not None and m.index_params.pca is not None:
            margin = max(4 * k, 256)  # what the spec asks for too (config.spec.PROJECTED_MIN_MARGIN; importing it here costs torch)
        else:
            margin = max(4 * k, 64) if m is not None and m.index_type == "ivfpq" else max(k, 16)
    cands = _candidates(index, q if index.full is None else index.vectors(rows), rows, k, k + margin)
    out_rows = np.empty((len(rows), k), np.int64)
    out_dist = np.empty((len(rows), k), np.float64)
    out_vec = np.empty((len(rows), k, q.shape[1]), np.float32)
    for i, c in enumerate(cands):
        cv = vec(c)
        d = exact_rerank(q[i], cv)
        order = np.lexsort((c, d))[:k]  # ties broken by row, like a stable brute-force search
        out_rows[i], out_dist[i], out_vec[i] = c[order], d[order], cv[order]
    ids = [index.ids_of(r) for r in out_rows]
    return Neighbours(list(forget_ids), q, ids, out_rows, out_dist, out_vec)


# --------------------------------------------------------------------------------------------
# Near-duplicates
# --------------------------------------------------------------------------------------------


@dataclass
class DuplicateReport:
    """Retained items within `threshold` of some forget item, and the forget set after the policy."""

    threshold: float
    policy: str
    forget_ids: list[str]  # after the policy ("add": the request's ids, then the duplicates)
    duplicate_ids: list[str] = field(default_factory=list)
    matched: list[int] = field(default_factory=list)  # per duplicate: position of its forget item
    distances: list[float] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.duplicate_ids)

    def summary(self) -> dict:
        """What may be logged: counts and the threshold, never ids."""
        return {"threshold": self.threshold, "policy": self.policy, "duplicates": self.count,
                "forget_items_with_duplicates": len(set(self.matched)), "forget_set_size": len(self.forget_ids)}


class DuplicatesFound(ForgetSetError):
    code = "input.forget_set.duplicates"

    def __init__(self, report: DuplicateReport):
        self.report = report
        super().__init__(
            f"{report.count} retained item(s) lie within distance {report.threshold:g} of "
            f"{len(set(report.matched))} forget item(s): near-duplicates of data to forget. "
            "Add them to the forget set (duplicates policy 'add') or raise the threshold"
        )


def within(index: VectorIndex, q: np.ndarray, threshold: float, exclude: Collection[int] = frozenset(), start_k: int = 32,
           q_full: np.ndarray | None = None) -> list[tuple[int, float]]:
    """(row, exact distance) of every indexed item within Euclidean `threshold` of a query (`q` in
    the index's space, `q_full` in the full one if they differ): the search widens until it passes
    the threshold (the index's distances never exceed the full ones), rows in `exclude` left out,
    then the candidates are re-ranked exactly on full vectors."""
    vec = full_vectors(index)
    q_full = q if q_full is None else q_full
    n = len(index)
    # Approximate (PQ) distances may over-estimate: search a little wider than the threshold.
    slack = 1.0 if index.manifest is None or index.manifest.index_type != "ivfpq" else 1.5
    radius2 = (threshold * slack) ** 2
    k = min(start_k, n)
    while True:
        d2, labels = index.search(q[None, :], k)
        d2, labels = d2[0], labels[0]
        if k >= n or (len(d2) and (labels[-1] < 0 or d2[-1] > radius2)):
            break
        k = min(2 * k, n)
    cand = np.array([r for r, dd in zip(labels, d2) if r >= 0 and dd <= radius2 * (1 + 1e-6) and r not in exclude], dtype=np.int64)
    if len(cand) == 0:
        return []
    return [(int(r), float(d)) for r, d in zip(cand, exact_rerank(q_full, vec(cand))) if d <= threshold]


def find_duplicates(index: VectorIndex, forget_ids: Sequence[str], threshold: float, policy: str = "fail",
                    start_k: int = 32) -> DuplicateReport:
    """Every retained item within Euclidean `threshold` of a forget item (exact on full vectors)."""
    if policy not in POLICIES:
        raise InputError(f"duplicates policy must be one of {POLICIES}, not {policy!r}")
    if not threshold >= 0:
        raise InputError(f"the duplicate threshold must be >= 0, not {threshold}")
    rows = index.rows_of(forget_ids)
    q_index, q = index.vectors(rows), full_vectors(index)(rows)
    found: dict[int, tuple[int, float]] = {}
    forget_set = set(rows.tolist())
    for i in range(len(rows)):
        for r, dist in within(index, q_index[i], threshold, exclude=forget_set, start_k=start_k + len(rows), q_full=q[i]):
            if r not in found or dist < found[r][1]:
                found[r] = (i, dist)
    dup_rows = sorted(found)
    report = DuplicateReport(
        threshold=float(threshold),
        policy=policy,
        forget_ids=list(forget_ids),
        duplicate_ids=index.ids_of(np.array(dup_rows, dtype=np.int64)) if dup_rows else [],
        matched=[found[r][0] for r in dup_rows],
        distances=[found[r][1] for r in dup_rows],
    )
    if report.count:
        if policy == "fail":
            raise DuplicatesFound(report)
        if policy == "warn":
            log.warning("near-duplicates of the forget set are retained: %s", report.summary())
        else:
            report.forget_ids = list(forget_ids) + report.duplicate_ids
            log.info("near-duplicates added to the forget set: %s", report.summary())
    return report
