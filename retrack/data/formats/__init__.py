"""Corpus formats, one module each behind one interface (`retrack.data.source` uses them):

    NAME, WHAT                          its `corpus.format` name; what its files are, for messages
    SCANS_BY_FILE                       whether `scan` of a part of the listing is that part's scan
                                        (so a large corpus can be scanned in groups, in parallel)
    scan(root, entries, on_bad)      -> Scanned(SourceFile, ids) per corpus file, from the listing
                                        of every file under the root; reads no image, refuses
                                        malformed input naming the file (and line or key)
    ids(loc, file)                   -> the ids of one file again (to name duplicate ids)
    read(loc, file, batch_size, images)
                                     -> RowBatch(ids, image bytes, captions, labels) of one file,
                                        streamed; images=False: no image bytes fetched (None)
    read_rows(loc, file, rows, images)
                                     -> the same for the given row positions only (a parquet shard
                                        fetches just the row groups that hold them)

Every format is read from a local path or S3 through `Location`, a file at a time and never whole.
"""

from __future__ import annotations

from types import ModuleType

from retrack.data.formats import imagefolder, parquet, webdataset
from retrack.data.formats.base import RowBatch, Scanned, SourceFile, image_id
from retrack.errors import InputError

FORMATS: dict[str, ModuleType] = {m.NAME: m for m in (parquet, imagefolder, webdataset)}

__all__ = ["FORMATS", "RowBatch", "Scanned", "SourceFile", "corpus_format", "image_id"]


def corpus_format(name: str) -> ModuleType:
    try:
        return FORMATS[name]
    except KeyError:
        raise InputError(f"unknown corpus format {name!r}; known: {', '.join(FORMATS)}") from None
