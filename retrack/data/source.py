"""The corpus as the index stage sees it: a list of files, checked before anything is encoded.

A corpus is either parquet shards (columns `id`, `image` [, `label`, `caption`]) or a folder of
image files (id = the path relative to the folder, without its suffix), on a local path or S3.
`scan_corpus` lists it, reads every parquet footer and the `id` column only (never the images),
and refuses bad input before the expensive encode: unreadable shards, missing columns, empty or
missing ids, duplicate ids. Its digest (paths, sizes, modification times) keys the cache: a
rewritten or added file changes it. Files are grouped into chunks of about `rows_per_chunk` rows;
a chunk is the unit of encoding, resumption and index sharding.

`decode_batch` is the per-batch work both the Ray stage and the single-process loop run: decode,
check the image size against the corpus's, normalise and encode.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrack.data.corpus import decode_image
from retrack.digest import config_digest
from retrack.errors import CorpusError
from retrack.storage.location import FileEntry, Location

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
ON_BAD = ("fail", "skip")


@dataclass(frozen=True)
class SourceFile:
    uri: str
    rel: str
    size: int
    mtime_ns: int
    rows: int


@dataclass(frozen=True)
class Chunk:
    number: int
    files: tuple[SourceFile, ...]

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    def digest(self) -> str:
        return config_digest([(f.rel, f.size, f.mtime_ns) for f in self.files])


@dataclass
class CorpusPlan:
    root: Location
    kind: str  # parquet | images
    files: list[SourceFile]
    image_shape: tuple[int, int, int]  # H, W, C of the first item: every item must match
    chunks: list[Chunk] = field(default_factory=list)
    has_captions: bool = False  # every item has a caption

    @property
    def count(self) -> int:
        return sum(f.rows for f in self.files)

    def digest(self) -> str:
        return config_digest({"kind": self.kind, "files": [(f.rel, f.size, f.mtime_ns) for f in self.files]})

    def location_of(self, f: SourceFile) -> Location:
        return Location(f.uri, self.root.s3)


def _id_hash(ids: Sequence[str]) -> np.ndarray:
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little", signed=True) for i in ids),
        dtype=np.int64,
        count=len(ids),
    )


def image_id(rel: str) -> str:
    return posixpath.splitext(rel)[0]


def _read_parquet_ids(loc: Location, rel: str) -> tuple[int, list[str]]:
    try:
        with loc.open_input() as f:
            pf = pq.ParquetFile(f)
            names = set(pf.schema_arrow.names)
            missing = {"id", "image"} - names
            if missing:
                raise CorpusError(f"shard {rel} lacks column(s) {sorted(missing)}; a corpus needs 'id' and 'image'")
            ids = pf.read(columns=["id"]).column("id")
    except CorpusError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise CorpusError(f"shard {rel} cannot be read as parquet: {str(exc).splitlines()[0]}") from None
    if ids.null_count:
        raise CorpusError(f"shard {rel}: {ids.null_count} row(s) have no id")
    values = ids.to_pylist()
    empty = sum(1 for v in values if not v)
    if empty:
        raise CorpusError(f"shard {rel}: {empty} row(s) have an empty id")
    return len(values), values


def _has_captions(loc: Location) -> bool:
    with loc.open_input() as fh:
        return "caption" in pq.ParquetFile(fh).schema_arrow.names


def file_ids(plan: CorpusPlan, f: SourceFile) -> list[str]:
    """The ids of one corpus file, in row order (no image is read)."""
    return _read_parquet_ids(plan.location_of(f), f.rel)[1] if plan.kind == "parquet" else [image_id(f.rel)]


def _first_image_shape(plan_root: Location, kind: str, first: SourceFile) -> tuple[int, int, int]:
    loc = Location(first.uri, plan_root.s3)
    if kind == "images":
        return decode_image(loc.read_bytes(), image_id(first.rel)).shape
    with loc.open_input() as f:
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(batch_size=1, columns=["id", "image"]):
            row = batch.to_pylist()[0]
            if row["image"] is None:
                raise CorpusError(f"item {row['id']!r} in {first.rel}: no image bytes")
            return decode_image(row["image"], row["id"]).shape
    raise CorpusError(f"shard {first.rel} is empty")


def scan_corpus(uri: "str | Location", rows_per_chunk: int = 200_000, endpoint: str | None = None) -> CorpusPlan:
    """List and check a corpus (ids only; images are checked as they are decoded)."""
    root = Location.parse(uri, endpoint=endpoint)
    root.check_reachable()
    if not root.exists():
        raise CorpusError(f"corpus {root.uri} does not exist ({root.where()})")
    entries: list[FileEntry] = root.list(suffixes=(".parquet",))
    kind = "parquet"
    if not entries:
        entries, kind = root.list(suffixes=IMAGE_SUFFIXES), "images"
    if not entries:
        raise CorpusError(f"corpus {root.uri} holds no parquet shards and no image files")
    files: list[SourceFile] = []
    hashes: list[np.ndarray] = []
    for e in entries:
        rel = e.location.relative_to(root)
        if kind == "parquet":
            n, ids = _read_parquet_ids(e.location, rel)
            if n == 0:
                raise CorpusError(f"shard {rel} is empty")
        else:
            n, ids = 1, [image_id(rel)]
        hashes.append(_id_hash(ids))
        files.append(SourceFile(e.location.uri, rel, e.size, e.mtime_ns, n))
    _check_unique(root, kind, files, np.concatenate(hashes))
    plan = CorpusPlan(root, kind, files, _first_image_shape(root, kind, files[0]), has_captions=kind == "parquet" and all(_has_captions(Location(f.uri, root.s3)) for f in files))
    plan.chunks = plan_chunks(files, rows_per_chunk)
    return plan


def _check_unique(root: Location, kind: str, files: list[SourceFile], hashes: np.ndarray) -> None:
    """Duplicate ids, found with 8 bytes per id (hash collisions are confirmed on the strings)."""
    order = np.sort(hashes)
    repeated = np.unique(order[1:][order[1:] == order[:-1]])
    if len(repeated) == 0:
        return
    seen: dict[str, int] = {}
    for f in files:
        ids = _read_parquet_ids(Location(f.uri, root.s3), f.rel)[1] if kind == "parquet" else [image_id(f.rel)]
        for i, h in zip(ids, _id_hash(ids)):
            if h in repeated:
                seen[i] = seen.get(i, 0) + 1
    dupes = sorted(i for i, c in seen.items() if c > 1)
    if dupes:
        raise CorpusError(f"{len(dupes)} id(s) occur more than once in the corpus {root.uri}, e.g. {dupes[:3]}")


def plan_chunks(files: list[SourceFile], rows_per_chunk: int) -> list[Chunk]:
    chunks, current, rows = [], [], 0
    for f in files:
        if current and rows + f.rows > rows_per_chunk:
            chunks.append(Chunk(len(chunks), tuple(current)))
            current, rows = [], 0
        current.append(f)
        rows += f.rows
    if current:
        chunks.append(Chunk(len(chunks), tuple(current)))
    return chunks


# --------------------------------------------------------------------------------------------
# Per-batch work (the Ray stage's map_batches and the single-process loop share it)
# --------------------------------------------------------------------------------------------


@dataclass
class BadRow:
    id: str
    source: str
    reason: str


def decode_batch(
    ids: Sequence[str],
    blobs: Sequence[bytes | None],
    sources: Sequence[str],
    image_shape: tuple[int, ...],
    on_bad: str = "fail",
) -> tuple[list[str], np.ndarray, list[BadRow]]:
    """Decode and check one batch: (kept ids, uint8 NxHxWxC, rows skipped with reasons).

    With on_bad="fail" the first bad row raises CorpusError naming it; with "skip" it is left out
    and reported (the per-row report the index writes next to its manifest).
    """
    keep_ids, pixels, bad = [], [], []
    for item_id, blob, src in zip(ids, blobs, sources):
        try:
            if not item_id:
                raise CorpusError(f"a row of {src} has no id")
            if blob is None:
                raise CorpusError(f"item {item_id!r} in {src}: no image bytes")
            img = decode_image(blob, item_id)
            if img.shape != tuple(image_shape):
                h, w, c = image_shape
                raise CorpusError(
                    f"item {item_id!r} in {src}: image is {img.shape[1]}x{img.shape[0]}x{img.shape[2]}, the corpus is {w}x{h}x{c}"
                )
        except CorpusError as exc:
            if on_bad == "fail":
                raise
            bad.append(BadRow(item_id or "", src, str(exc)))
            continue
        keep_ids.append(item_id)
        pixels.append(img)
    h, w, c = image_shape
    arr = np.stack(pixels) if pixels else np.zeros((0, h, w, c), np.uint8)
    return keep_ids, arr, bad


def iter_file_batches(plan: CorpusPlan, f: SourceFile, batch_size: int) -> Iterator[tuple[list[str], list[bytes | None]]]:
    """(ids, image bytes) batches of one corpus file, streamed (never the whole file at once)."""
    loc = plan.location_of(f)
    if plan.kind == "images":
        try:
            data = loc.read_bytes()
        except Exception as exc:  # noqa: BLE001 - reported as the corpus's fault below
            raise CorpusError(f"image file {f.rel} cannot be read: {exc}") from None
        yield [image_id(f.rel)], [data]
        return
    try:
        with loc.open_input() as fh:
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=batch_size, columns=["id", "image"]):
                yield batch.column("id").to_pylist(), batch.column("image").to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(f"shard {f.rel} cannot be read as parquet: {str(exc).splitlines()[0]}") from None


def iter_file_rows(plan: CorpusPlan, f: SourceFile, batch_size: int = 256) -> Iterator[dict]:
    """Rows {id, image, caption, label} of one corpus file, streamed (absent columns are None)."""
    loc = plan.location_of(f)
    if plan.kind == "images":
        try:
            data = loc.read_bytes()
        except Exception as exc:  # noqa: BLE001 - reported as the corpus's fault below
            raise CorpusError(f"image file {f.rel} cannot be read: {exc}") from None
        yield {"id": image_id(f.rel), "image": data, "caption": None, "label": None}
        return
    try:
        with loc.open_input() as fh:
            pf = pq.ParquetFile(fh)
            columns = [c for c in ("id", "image", "caption", "label") if c in pf.schema_arrow.names]
            for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
                for row in batch.to_pylist():
                    yield {"caption": None, "label": None} | row
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(f"shard {f.rel} cannot be read as parquet: {str(exc).splitlines()[0]}") from None


def vectors_table(ids: Sequence[str], vectors: np.ndarray) -> pa.Table:
    """An embedding batch as arrow: id (string), vector (fixed_size_list<float32>[D])."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    d = vectors.shape[1] if vectors.ndim == 2 else 0
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    return pa.table({"id": pa.array(list(ids), type=pa.string()), "vector": pa.FixedSizeListArray.from_arrays(flat, d)})


def table_vectors(table: pa.Table) -> np.ndarray:
    col = table.column("vector").combine_chunks()
    d = col.type.list_size
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, d)

