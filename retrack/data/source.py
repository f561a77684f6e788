"""The corpus as the stages see it: a list of files, checked before anything is encoded.

A corpus has one explicit format (`CorpusSpec.format`; each in `retrack.data.formats`):

- parquet: shards with columns `id`, `image` (bytes) [, `caption`, `label`];
- imagefolder: image files (id = the path relative to the root, without its suffix), captions in
  Hugging Face style `metadata.jsonl` files;
- webdataset: tar shards whose samples are keyed members (`key.jpg`, `key.txt`, `key.json`).

All are read from a local path or S3, a file at a time and streamed, never copied whole.
`scan_corpus` lists the corpus and reads its ids and captions (never the images, except the first
one for the image size) and refuses bad input before the expensive encode: unreadable files, missing
columns, malformed metadata, empty or missing ids, duplicate ids across files, an empty corpus. Its
digest (paths, sizes, modification times, and an image folder's captions) keys the cache: a
rewritten or added file changes it. Files are grouped into chunks of about `rows_per_chunk` rows;
a chunk is the unit of encoding, resumption and index sharding. `iter_file_batches` streams the
rows (ids, image bytes, captions) of one file. `scan_corpus_ids` scans as `scan_corpus` does and
writes the corpus's id table on storage as it reads the ids (`retrack.data.id_table`), a group of
files at a time wherever its runner runs them. `require_captions` refuses a corpus in which some
item has no caption (a Stable Diffusion model is trained on each item's own caption).

`decode_batch` is the per-batch work both the Ray stage and the single-process loop run: decode,
check the image size against the corpus's, normalise and encode.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np
import pyarrow as pa

from retrack.data.corpus import decode_image, fit_image
from retrack.data.formats import FORMATS, RowBatch, SourceFile, corpus_format, image_id
from retrack.data.id_table import IdTable, bucket_count, id_hash, id_rows, write_id_table
from retrack.digest import config_digest
from retrack.errors import CaptionsMissingError, CorpusError, InputError
from retrack.storage.location import FileEntry, Location

__all__ = [
    "BadRow", "Chunk", "CorpusPlan", "FORMATS", "ON_BAD", "RowBatch", "SourceFile", "decode_batch", "image_id",
    "iter_file_batches", "iter_file_rows", "plan_chunks", "require_captions", "require_labels", "scan_corpus", "scan_corpus_ids", "table_vectors", "vectors_table",
]

ON_BAD = ("fail", "skip")


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
    format: str  # parquet | imagefolder | webdataset
    files: list[SourceFile]
    image_shape: tuple[int, int, int]  # H, W, C every item is decoded to (`fit_image`): the first item's, a job's model's
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def captioned(self) -> int:
        """Items with a caption."""
        return sum(f.captioned for f in self.files)

    @property
    def labelled(self) -> int:
        """Items with a class label."""
        return sum(f.labelled for f in self.files)

    @property
    def has_captions(self) -> bool:
        """Whether every item has a caption."""
        return self.captioned == self.count

    def digest(self) -> str:
        files = [(f.rel, f.size, f.mtime_ns) + ((f.caption, f.label) if self.format == "imagefolder" else ()) for f in self.files]
        return config_digest({"format": self.format, "files": files})

    def location_of(self, f: SourceFile) -> Location:
        return Location(f.uri, self.root.s3)


def scan_corpus(uri: "str | Location", format: str = "parquet", *, rows_per_chunk: int = 200_000,
                endpoint: str | None = None, on_bad: str = "fail", image_shape: Sequence[int] | None = None) -> CorpusPlan:
    """List and check a corpus of the given format (ids and captions; images are checked as they
    are decoded). `on_bad` is the bad-row policy: "skip" lets through the rows that the decoder
    will report (a WebDataset sample without an image), "fail" refuses them here. Items are
    delivered at `image_shape` (a job's model geometry), else at the first image's shape (the
    one image decoded here)."""
    return _scan(uri, format, rows_per_chunk, endpoint, on_bad, image_shape)


# A corpus scan's unit of work: a group of listed files, each (path relative to the corpus root,
# size, mtime_ns) -> their metadata and their rows of the id table (`scan_group`).
ScanGroup = Callable[[list[tuple[str, int, int]]], tuple[list[SourceFile], pa.Table]]
SCAN_GROUP = 16  # files per group: a group's ids are a second or so of reads
SCAN_GROUPS_FROM = 2 * SCAN_GROUP  # files: a smaller corpus is scanned in this process (the groups would cost more than they save)


class ScanRunner(Protocol):
    """Where a corpus's files are scanned and its id table written (`pipelines.corpus_ids.RayScan`):
    `scan` yields, in the groups' order, each group's files and a handle on its id rows, which
    `write_ids` writes."""

    def scan(self, fn: ScanGroup, groups: list[list[tuple[str, int, int]]]) -> Iterable[tuple[list[SourceFile], Any]]: ...

    def write_ids(self, table: IdTable, handles: list[Any], corpus: str) -> None: ...


class InProcess:
    def scan(self, fn: ScanGroup, groups: list[list[tuple[str, int, int]]]) -> Iterable[tuple[list[SourceFile], pa.Table]]:
        return (fn(g) for g in groups)

    def write_ids(self, table: IdTable, handles: list[pa.Table], corpus: str) -> None:
        write_id_table(table, handles, corpus)


def scan_corpus_ids(uri: "str | Location", format: str = "parquet", *, ids_root: Location, endpoint: str | None = None,
                    on_bad: str = "fail", image_shape: Sequence[int] | None = None,
                    runner: ScanRunner | None = None) -> tuple[CorpusPlan, IdTable]:
    """`scan_corpus`, and the corpus's id table (`retrack.data.id_table`) under `ids_root`, written
    from the ids the scan reads (no file is read twice), so that the ids are never gathered in one
    process. With `runner`, a corpus of many files in a format whose files scan independently is
    read in groups of `SCAN_GROUP` files where the runner runs them, and its table written there.
    The table is keyed by the listing (every path, size and mtime, an image folder's metadata files
    included): a listing scanned before is not read again, its table and files' record are kept."""
    root, entries = _listing(uri, format, endpoint, on_bad)
    files = [(e.location.relative_to(root), e.size, e.mtime_ns) for e in entries]
    key = config_digest({"format": format, "on_bad": on_bad, "listing": files})
    done = IdTable.open(_resolved(ids_root) / key[:24])
    if done is not None:
        table, record = done
        return _plan(root, format, entries, [SourceFile(uri=(root / f["rel"]).uri, **f) for f in record], 200_000, image_shape), table
    size = SCAN_GROUP
    if runner is None or not corpus_format(format).SCANS_BY_FILE or len(entries) < SCAN_GROUPS_FROM:
        runner, size = InProcess(), max(1, len(entries))
    # Credentials resolved here: the groups may run where the AWS_* variables are not set.
    groups = [files[i:i + size] for i in range(0, len(files), size)]
    scanned, handles = [], []
    for part, rows in runner.scan(partial(scan_group, format, _resolved(root), on_bad), groups):
        scanned += part
        handles.append(rows)
    plan = _plan(root, format, entries, scanned, 200_000, image_shape)
    table = IdTable(_resolved(ids_root) / key[:24], bucket_count(plan.count), plan.count)
    runner.write_ids(table, handles, root.uri)
    table.mark_complete([{k: v for k, v in asdict(f).items() if k != "uri"} for f in scanned])
    return plan, table


def scan_group(format: str, root: Location, on_bad: str, files: list[tuple[str, int, int]]) -> tuple[list[SourceFile], pa.Table]:
    """One group's scan: its files' metadata and their rows of the id table."""
    entries = [FileEntry(root / rel, size, mtime) for rel, size, mtime in files]
    scanned = list(corpus_format(format).scan(root, entries, on_bad))
    return [s.file for s in scanned], id_rows([(s.file.rel, s.ids) for s in scanned])


def _resolved(loc: Location) -> Location:
    return Location(loc.uri, loc.s3.resolved()) if loc.is_s3 else loc


def _listing(uri, format: str, endpoint: str | None, on_bad: str) -> tuple[Location, list[FileEntry]]:
    if on_bad not in ON_BAD:
        raise InputError(f"on_bad must be one of {ON_BAD}, not {on_bad!r}")
    corpus_format(format)  # an unknown format is refused before anything is listed
    root = Location.parse(uri, endpoint=endpoint)
    root.check_reachable()
    if not root.exists():
        raise CorpusError(f"corpus {root.uri} does not exist ({root.where()})")
    return root, root.list()


def _scan(uri, format: str, rows_per_chunk: int, endpoint: str | None, on_bad: str, image_shape: Sequence[int] | None) -> CorpusPlan:
    root, entries = _listing(uri, format, endpoint, on_bad)
    files: list[SourceFile] = []
    hashes: list[np.ndarray] = []  # 8 bytes per id are what the check needs
    for scanned in corpus_format(format).scan(root, entries, on_bad):
        files.append(scanned.file)
        hashes.append(id_hash(scanned.ids))
    plan = _plan(root, format, entries, files, rows_per_chunk, image_shape)
    _check_unique(root, format, files, hashes)
    return plan


def _plan(root: Location, format: str, entries: list[FileEntry], files: list[SourceFile], rows_per_chunk: int,
          image_shape: Sequence[int] | None) -> CorpusPlan:
    if not files:
        found = Counter(e.location.name.rpartition(".")[2].lower() if "." in e.location.name else "(none)" for e in entries)
        what = ", ".join(f"{n} .{ext}" for ext, n in found.most_common(5)) or "nothing"
        raise CorpusError(f"corpus {root.uri} holds no {corpus_format(format).WHAT}; corpus.format is {format!r} and the folder holds {what}")
    plan = CorpusPlan(root, format, files, (0, 0, 0))
    plan.image_shape = tuple(image_shape) if image_shape else _first_image_shape(plan)
    plan.chunks = plan_chunks(files, rows_per_chunk)
    return plan


def _check_unique(root: Location, format: str, files: list[SourceFile], hashes: list[np.ndarray]) -> None:
    """Duplicate ids, found with 8 bytes per id; the files holding a repeated hash are read again
    for their ids, to confirm (a hash collision is not a duplicate) and to name them."""
    order = np.sort(np.concatenate(hashes))
    repeated = np.unique(order[1:][order[1:] == order[:-1]])
    if len(repeated) == 0:
        return
    fmt = corpus_format(format)
    seen: Counter[str] = Counter()
    for f, h in zip(files, hashes):
        if np.isin(h, repeated).any():
            ids = fmt.ids(Location(f.uri, root.s3), f)
            seen.update(i for i, x in zip(ids, id_hash(ids)) if x in repeated)
    dupes = sorted(i for i, c in seen.items() if c > 1)
    if dupes:
        raise CorpusError(f"{len(dupes)} id(s) occur more than once in the corpus {root.uri}, e.g. {dupes[:3]}")


def _first_image_shape(plan: CorpusPlan) -> tuple[int, int, int]:
    for f in plan.files:
        for batch in iter_file_batches(plan, f, 16):
            for item_id, blob in zip(batch.ids, batch.images):
                if blob is not None:
                    return decode_image(blob, item_id).shape
    raise CorpusError(f"no item of corpus {plan.root.uri} has image bytes")


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


_CAPTION_HINTS = {
    "parquet": "a 'caption' column with a value in every row",
    "imagefolder": 'a metadata.jsonl line for every image: {"file_name": "<path relative to the file>", "text": "<caption>"}',
    "webdataset": "a txt member, or a json member with a 'caption' or 'text' field, in every sample",
}


def require_captions(plan: CorpusPlan, what: str = "corpus") -> None:
    """Refuse a corpus in which an item has no caption (CaptionsMissingError, counts only)."""
    if plan.has_captions:
        return
    missing = plan.count - plan.captioned
    kind = {"imagefolder": "an image folder", "webdataset": "WebDataset shards"}.get(plan.format, "parquet shards")
    raise CaptionsMissingError(
        f"{what} {plan.root.uri} ({kind}): {missing} of {plan.count} item(s) have no caption; a Stable Diffusion "
        f"model is trained on each item's own caption, so it needs {_CAPTION_HINTS[plan.format]}"
    )


_LABEL_HINTS = {
    "parquet": "an integer 'label' column with a value in every row",
    "imagefolder": 'a "label" (an integer) in every image\'s metadata.jsonl line',
    "webdataset": "a cls member (an integer class), or a json member with a 'label' field, in every sample",
}


def require_labels(plan: CorpusPlan, what: str = "corpus") -> None:
    """Refuse a corpus in which an item has no class label (counts only): a pixel model's
    Fréchet distance is measured with a feature network trained on the retained items' labels."""
    if plan.labelled == plan.count:
        return
    raise CorpusError(
        f"{what} {plan.root.uri}: {plan.count - plan.labelled} of {plan.count} item(s) have no class label; the pixel "
        f"evaluation's Fréchet distance uses a feature network trained on the retained items' labels, so it needs {_LABEL_HINTS[plan.format]}"
    )


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
    """Decode and check one batch: (kept ids, uint8 NxHxWxC at `image_shape` by `fit_image`,
    rows skipped with reasons).

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
            img = fit_image(decode_image(blob, item_id), image_shape)
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


def iter_file_batches(plan: CorpusPlan, f: SourceFile, batch_size: int) -> Iterator[RowBatch]:
    """RowBatch(ids, image bytes, captions, labels) of one corpus file, streamed (never the whole
    file at once); image bytes, captions and labels are None where the file has none."""
    yield from corpus_format(plan.format).read(plan.location_of(f), f, batch_size)


def iter_file_rows(plan: CorpusPlan, f: SourceFile, batch_size: int = 256, rows: Sequence[int] | None = None,
                   images: bool = True) -> Iterator[dict]:
    """The rows {id, image, caption, label} of one corpus file (or just those at the positions
    `rows`, ascending), streamed; without `images` no image bytes are fetched (image None)."""
    fmt = corpus_format(plan.format)
    loc = plan.location_of(f)
    batches = fmt.read(loc, f, batch_size, images) if rows is None else fmt.read_rows(loc, f, rows, images)
    for b in batches:
        for row in zip(*b):
            yield dict(zip(("id", "image", "caption", "label"), row))


def vectors_table(ids: Sequence[str], vectors: np.ndarray, latents: np.ndarray | None = None) -> pa.Table:
    """An embedding batch as arrow: id (string), vector (fixed_size_list<float32>[D]) and, for an
    index of pooled latents, latent (the full latents, fixed_size_list<float16>[L])."""
    columns = {"id": pa.array(list(ids), type=pa.string()), "vector": _fixed_lists(vectors, np.float32)}
    if latents is not None:
        columns["latent"] = _fixed_lists(latents, np.float16)
    return pa.table(columns)


def _fixed_lists(x: np.ndarray, dtype) -> pa.FixedSizeListArray:
    x = np.ascontiguousarray(x, dtype=dtype)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1] if x.ndim == 2 else 0)


def table_vectors(table: pa.Table, column: str = "vector") -> np.ndarray:
    """The vectors of an embedding batch (float32, or float16 for `latent`), N x D."""
    col = table.column(column).combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size)

