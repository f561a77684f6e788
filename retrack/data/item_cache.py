"""The item cache of Stable Diffusion runs: each item's latent (`retrack.models.latents`' rule) and
caption embedding, in fp16, computed once and kept on storage under a key of everything that
decides them: the corpus's identity (its listing), the VAE's and the text encoder's weights with
the tokenizer, and the resolution. A run reads the items it trains on from here and encodes only
those no earlier run encoded (adding them), so a second run on the same corpus and model encodes
nothing, and training workers need no VAE or text encoder at all.

Items a run forgets are never kept: they are encoded for that run alone, and the run removes them
from every part that held them (as another run's neighbours or retained rows) before it reads. A
run that reads a part another run removes at that moment fails with a StorageError naming it; run
again, it reads the part that replaced it.

Layout: `<root>/<key>/<part>.parquet`, rows (id, latent, cond), each part one atomic object that is
never rewritten, so a reader never meets a partial part. Two runs encoding the same item at once
both add it; the copies are equal (an item's latent is seeded by its id) and either serves.
"""

from __future__ import annotations

import io
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Collection

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from retrack.digest import config_digest, directory_digest
from retrack.storage.location import Location

PART_SUFFIX = ".parquet"
RULE = "sd-latent/centre-crop; clip-last-hidden-state; fp16"


@dataclass(frozen=True)
class ItemCache:
    root: Location  # the key's folder
    latent_shape: tuple[int, int, int]
    cond_shape: tuple[int, int]

    @classmethod
    def for_model(cls, cache_root: Location, corpus_digest: str, model_dir: str | Path, resolution: int) -> "ItemCache":
        """The cache of the items of the corpus with digest `corpus_digest` as the Stable Diffusion
        model at `model_dir` (a local diffusers folder) encodes them at `resolution`."""
        model_dir = Path(model_dir)
        vae = json.loads((model_dir / "vae" / "config.json").read_text())
        text = json.loads((model_dir / "text_encoder" / "config.json").read_text())
        side = resolution // 2 ** (len(vae["block_out_channels"]) - 1)
        key = config_digest({
            "rule": RULE, "corpus": corpus_digest, "resolution": resolution,
            **{part: directory_digest(model_dir / part) for part in ("vae", "text_encoder", "tokenizer")},
        })[:24]
        return cls(cache_root / key, (vae["latent_channels"], side, side), (text["max_position_embeddings"], text["hidden_size"]))

    def parts(self) -> list[Location]:
        return [e.location for e in self.root.list(suffixes=(PART_SUFFIX,), recursive=False)]

    def ids_in(self, part: Location) -> list[str]:
        """The ids a part holds (its id column alone is read: ranged GETs on S3)."""
        with part.open_input() as f:
            return pq.read_table(f, columns=["id"]).column("id").to_pylist()

    def drop(self, part: Location, ids: Collection[str]) -> Location | None:
        """Remove the given ids from the cache's part: the rest is written as a new part before the
        old one is deleted (None: nothing was left)."""
        table = pq.read_table(io.BytesIO(part.read_bytes()))
        table = table.filter(pc.invert(_among(table, ids)))
        new = self._put(table) if table.num_rows else None
        part.remove()
        return new

    def write(self, ids: list[str], latents: np.ndarray, conds: np.ndarray) -> Location:
        """Add encoded items as a new part."""
        if latents.shape != (len(ids), *self.latent_shape) or conds.shape != (len(ids), *self.cond_shape):
            raise ValueError(f"{len(ids)} ids with latents {latents.shape} and conditions {conds.shape} do not fit "
                             f"the cache's {self.latent_shape} and {self.cond_shape}")
        return self._put(pa.table({
            "id": pa.array(ids, pa.string()),
            "latent": _blobs(latents.astype(np.float16)),
            "cond": _blobs(conds.astype(np.float16)),
        }))

    def _put(self, table: pa.Table) -> Location:
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="none")  # fp16 noise-like values do not compress
        part = self.root / f"{uuid.uuid4().hex}{PART_SUFFIX}"
        part.write_bytes(sink.getvalue())
        return part

    def read(self, part: Location, ids: Collection[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
        """The given ids' (held by the part) latents and conditions, fp16, in the part's order."""
        table = pq.read_table(io.BytesIO(part.read_bytes()))
        table = table.filter(_among(table, ids))
        return (table.column("id").to_pylist(), _arrays(table.column("latent"), self.latent_shape),
                _arrays(table.column("cond"), self.cond_shape))


def _among(table: pa.Table, ids: Collection[str]) -> pa.ChunkedArray:
    return pc.is_in(table.column("id"), value_set=pa.array(list(ids), pa.string()))


def _blobs(values: np.ndarray) -> pa.Array:
    width = int(np.prod(values.shape[1:])) * values.itemsize
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(values), [None, pa.py_buffer(np.ascontiguousarray(values).tobytes())])


def _arrays(column: pa.ChunkedArray, shape: tuple[int, ...]) -> np.ndarray:
    data = b"".join(column.to_pylist())
    return np.frombuffer(data, dtype=np.float16).reshape(len(column), *shape).copy()
