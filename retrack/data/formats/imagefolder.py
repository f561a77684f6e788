"""An image folder, the Hugging Face `imagefolder` convention: image files anywhere under the root
(id = the path relative to the root, without its suffix) and captions in `metadata.jsonl` files,
one JSON object a line: `{"file_name": "a/b.png", "text": "..."}` (or `"caption"`). A metadata
file may sit in the root or in any subfolder; its `file_name`s are relative to its own folder. An
image no metadata line names has no caption.

The scan lists the files and reads the metadata files (never an image) and refuses, naming the
file and line: malformed JSON, a line without `file_name`, a name that climbs out of its folder,
names a missing or non-image file, or names an image a second time.
"""

from __future__ import annotations

import json
import posixpath
from typing import Iterator, Sequence

from retrack.data.formats.base import RowBatch, Scanned, SourceFile, caption_of, image_id, label_of
from retrack.errors import CorpusError
from retrack.storage.location import FileEntry, Location

NAME = "imagefolder"
WHAT = "image files"
SCANS_BY_FILE = False  # captions live in metadata.jsonl files beside the images: the listing scans as one
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
METADATA = "metadata.jsonl"


def _lines(loc: Location) -> Iterator[bytes]:
    """The lines of a file, streamed (a metadata file of a large folder is never held whole)."""
    rest = b""
    for chunk in loc.iter_chunks():
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def _captions(root: Location, meta: FileEntry, images: set[str], others: set[str], seen: dict[str, str],
              ) -> Iterator[tuple[str, tuple[str | None, int | None]]]:
    """(image rel, (caption, label)) for each line of one metadata file."""
    meta_rel = meta.location.relative_to(root)
    folder = posixpath.dirname(meta_rel)
    for n, raw in enumerate(_lines(meta.location), 1):
        if not raw.strip():
            continue
        where = f"{meta_rel} line {n}"
        try:
            record = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorpusError(f"{where} is not valid JSON ({exc})") from None
        if not isinstance(record, dict) or not isinstance(record.get("file_name"), str) or not record["file_name"]:
            raise CorpusError(f"{where} has no 'file_name' (the image it describes, relative to {folder or 'the corpus root'})")
        name = record["file_name"]
        if name.startswith("/") or ".." in name.split("/"):
            raise CorpusError(f"{where}: file_name {name!r} must be a path inside {folder or 'the corpus root'}")
        rel = posixpath.join(folder, name) if folder else name
        if rel not in images:
            what = f"is not an image file ({', '.join(IMAGE_SUFFIXES)})" if rel in others else "does not exist"
            raise CorpusError(f"{where}: file_name {name!r} {what}")
        if rel in seen:
            raise CorpusError(f"{where}: image {rel} is described again (first in {seen[rel]})")
        seen[rel] = where
        yield rel, (caption_of(record, where), label_of(record, where))


def scan(root: Location, entries: list[FileEntry], on_bad: str) -> Iterator[Scanned]:
    rels = {e.location.relative_to(root): e for e in entries if e.location.name.lower().endswith(IMAGE_SUFFIXES)}
    others = {e.location.relative_to(root) for e in entries} - set(rels)
    captions: dict[str, tuple[str | None, int | None]] = {}
    seen: dict[str, str] = {}
    for meta in entries:
        if meta.location.name == METADATA:
            captions.update(_captions(root, meta, set(rels), others, seen))
    for rel, e in rels.items():
        caption, label = captions.get(rel, (None, None))
        f = SourceFile(e.location.uri, rel, e.size, e.mtime_ns, 1, int(caption is not None), caption, label, int(label is not None))
        yield Scanned(f, [image_id(rel)])


def ids(loc: Location, f: SourceFile) -> list[str]:
    return [image_id(f.rel)]


def read(loc: Location, f: SourceFile, batch_size: int, images: bool = True) -> Iterator[RowBatch]:
    """The file's one row; without `images` the file is not opened (the listing holds the rest)."""
    yield RowBatch([image_id(f.rel)], [loc.read_bytes() if images else None], [f.caption], [f.label])


def read_rows(loc: Location, f: SourceFile, rows: Sequence[int], images: bool = True) -> Iterator[RowBatch]:
    """An image file is one row."""
    return read(loc, f, 1, images)
