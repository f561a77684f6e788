"""IVF-Flat search that returns exactly what a flat search would.

A calibrated nprobe reaches its recall on queries like the corpus's own items. A deletion request's
items are often not like them: a planted or rare picture lies far from every list's centroid, and
its nearest retained items are spread over lists that nprobe never reaches (at 1M items, nlist
1,024 and nprobe 16, a planted image's 10 neighbours had recall 0.2). Here each query probes its
lists in order of a lower bound of its distance to any vector the list can hold, and stops once its
k-th distance found is within the bound of every list left: then no vector of an unprobed list can
be nearer. A vector of list c is nearer to c's centroid than to the query's nearest centroid c*, so
it lies beyond their bisecting hyperplane, at a distance from the query of at least
(|q - c|² - |q - c*|²) / (2 |c - c*|). A query like the corpus's items stops at about the calibrated
nprobe; an outlier probes more lists, up to all of them.
"""

from __future__ import annotations

import numpy as np

# Slack on the bound: faiss assigns vectors to lists in float32, so a vector on a bisector may sit in
# either list; the bound is relaxed by more than that error.
_RELATIVE_SLACK = 1e-5


class ExactIVF:
    """An IVF-Flat index (L2) searched exactly (see the module's docstring)."""

    def __init__(self, index):
        self.index = index
        self.centroids = index.quantizer.reconstruct_n(0, index.nlist).astype(np.float64)
        self.norms = np.einsum("ij,ij->i", self.centroids, self.centroids)
        self.empty = np.array([index.invlists.list_size(i) == 0 for i in range(index.nlist)])
        self.lists = int((~self.empty).sum())
        self.start = max(1, int(index.nprobe))

    @staticmethod
    def applies(index) -> bool:
        """Whether `index` is an IVF-Flat L2 index on the vectors themselves (no projection, no codes)."""
        import faiss

        return isinstance(index, faiss.IndexIVFFlat) and index.metric_type == faiss.METRIC_L2

    def bounds(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per query and list: the squared distance to the list's centroid, and a lower bound of the
        distance to any vector of the list (inf for an empty list)."""
        q = q.astype(np.float64)
        d2 = np.maximum(np.einsum("ij,ij->i", q, q)[:, None] + self.norms[None, :] - 2 * q @ self.centroids.T, 0.0)
        near = np.argmin(d2, axis=1)
        c = self.centroids[near]
        gap2 = np.maximum(self.norms[near][:, None] + self.norms[None, :] - 2 * c @ self.centroids.T, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            bound = (d2 - d2[np.arange(len(q)), near][:, None]) / (2 * np.sqrt(gap2))
        bound = np.where(gap2 > 0, np.maximum(bound, 0.0), 0.0)
        return d2, np.where(self.empty[None, :], np.inf, bound)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest vectors of each query (squared distances, labels), as a flat search finds them."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        k = min(int(k), int(self.index.ntotal))
        d2, bound = self.bounds(q)
        order = np.argsort(bound, axis=1, kind="stable")
        dist, labels = np.full((len(q), k), np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        # Each round probes only the lists it adds (twice as many as before) and merges them in.
        todo, probed, probe = np.arange(len(q)), 0, min(self.start, self.lists)
        try:
            while len(todo):
                assign = np.ascontiguousarray(order[todo, probed:probe])
                self.index.nprobe = probe - probed  # faiss reads `nprobe` lists of the given assignment
                d, lab = self.index.search_preassigned(q[todo], k, assign, np.take_along_axis(d2[todo], assign, 1).astype(np.float32))
                d, lab = merge_top_k([(dist[todo], labels[todo]), (d, lab)], k)
                dist[todo], labels[todo] = d, lab
                if probe >= self.lists:
                    break
                left = bound[todo, order[todo, probe]] * (1 - _RELATIVE_SLACK)
                done = (lab[:, -1] >= 0) & (np.sqrt(np.maximum(d[:, -1], 0.0)) <= left)
                todo, probed, probe = todo[~done], probe, min(2 * probe, self.lists)
        finally:
            self.index.nprobe = self.start
        return dist, labels


def merge_top_k(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the k nearest of result sets (squared distances, labels) over disjoint vectors;
    a missing result has label -1 and counts as infinitely far."""
    labels = np.concatenate([lab for _, lab in parts], axis=1)
    d = np.where(labels >= 0, np.concatenate([d for d, _ in parts], axis=1), np.inf).astype(np.float32)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), np.take_along_axis(labels, order, 1)


def exact_search(index):
    """`index.search`, made exact for an IVF-Flat index (`ExactIVF`); others search as faiss does."""
    return ExactIVF(index).search if ExactIVF.applies(index) else index.search
