"""Nearest-neighbour index of a corpus in the space the model denoises (no Ray in here).

Build (streaming, sharded, cached by a manifest) with `build_index`; the Ray stage in
`pipelines.index` runs the same plan with a Ray Data encode and parallel shard tasks. Serve with
`open_index` (or `VectorIndex.from_arrays` for an in-memory corpus; `ShardedIndex` over `Shard`s
served where they are loaded, as `pipelines.index.serve_index` does with one Ray actor each), then ask for a deletion
request's neighbours (`find_neighbours`) and for near-duplicates of the forget items
(`find_duplicates`, policy fail | warn | add).
"""

from retrack.index.build import BuildResult, LocalExecutor, build_index
from retrack.models.encoders import EncoderSpec, PixelEncoder, build_encoder
from retrack.index.manifest import IndexParams, Manifest
from retrack.index.search import (
    DuplicateReport,
    DuplicatesFound,
    Neighbours,
    VectorIndex,
    find_duplicates,
    find_neighbours,
)
from retrack.index.serving import Shard, ShardedIndex, index_manifest, open_index, shard_latents, shard_vectors
from retrack.data.source import CorpusPlan, scan_corpus

__all__ = [
    "BuildResult", "CorpusPlan", "DuplicateReport", "DuplicatesFound", "EncoderSpec", "IndexParams", "LocalExecutor",
    "Manifest", "Neighbours", "PixelEncoder", "Shard", "ShardedIndex", "VectorIndex", "build_encoder", "build_index",
    "find_duplicates", "find_neighbours", "index_manifest", "open_index", "scan_corpus", "shard_latents", "shard_vectors",
]
