"""What every corpus format shares: the scanned file, a batch of rows, and the caption rule."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

from retrack.errors import CorpusError

# A caption is read from the first of these fields that is present and not null (HF imagefolder's
# metadata.jsonl names it `text` by default; img2dataset's WebDataset json names it `caption`).
CAPTION_FIELDS = ("caption", "text")


@dataclass(frozen=True)
class SourceFile:
    """One corpus file as the scan saw it: a parquet shard, a tar shard or one image file.

    `captioned` counts its rows with a caption. An image folder keeps captions outside the image,
    in metadata.jsonl, so its files carry their item's `caption` themselves (the reader needs it and
    the file list is what travels to a worker)."""

    uri: str
    rel: str
    size: int
    mtime_ns: int
    rows: int
    captioned: int = 0
    caption: str | None = field(default=None, repr=False)
    label: int | None = None  # an image folder's item's class label, from metadata.jsonl
    labelled: int = 0  # rows with a class label


class RowBatch(NamedTuple):
    """Rows of one corpus file, in file order: image bytes or captions are None where absent."""

    ids: list[str]
    images: list[bytes | None]
    captions: list[str | None]
    labels: list[int | None]  # class labels (the pixel evaluation's feature network is trained on them)


@dataclass(frozen=True)
class Scanned:
    """A scanned file and its ids (the scan checks them for duplicates across the corpus)."""

    file: SourceFile
    ids: Sequence[str]


def image_id(rel: str) -> str:
    """An image file's id: its path relative to the corpus root, without its suffix."""
    return posixpath.splitext(rel)[0]


def label_of(record: dict[str, Any], where: str) -> int | None:
    """The integer class label of a metadata record (`label`), None if it has none."""
    value = record.get("label")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise CorpusError(f"{where}: field 'label' is a {type(value).__name__}, a label must be an integer")
    return value


def caption_of(record: dict[str, Any], where: str) -> str | None:
    """The caption of a metadata record (`caption` or `text`), None if it has none."""
    for name in CAPTION_FIELDS:
        value = record.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise CorpusError(f"{where}: field {name!r} is a {type(value).__name__}, a caption must be a string")
        return value
    return None


def rows_at(batches: Iterable[RowBatch], rows: Sequence[int]) -> Iterator[RowBatch]:
    """The rows at the given positions (ascending) of a file's batches, in file order."""
    wanted, start = set(int(r) for r in rows), 0
    for b in batches:
        keep = [n for n in range(len(b.ids)) if start + n in wanted]
        start += len(b.ids)
        if keep:
            yield RowBatch(*([col[n] for n in keep] for col in b))
