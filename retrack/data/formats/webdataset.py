"""WebDataset tar shards (`*.tar`), the format of LAION- and DataComp-style corpora.

A sample is the run of consecutive tar members that share a key: the member path up to the first
'.' of its base name (`dir/000123.jpg` and `dir/000123.txt` are sample `dir/000123`, exactly as
`ray.data.read_webdataset` and the webdataset library group them). Its id is the key: unique in
every img2dataset shard set, and present for every sample (a `json` member's `key` repeats it,
and an `id` field is not part of the convention). Its image is the `jpg`, `jpeg`, `png` or `webp`
member (exactly one); its caption the `txt` member, else the `caption` or `text` field of the
`json` member; its class label the `cls` member (an integer as text, the WebDataset convention),
else the json's `label`. Members without an extension and non-file members are ignored, as read_webdataset
ignores them.

A shard is streamed (`tarfile` in stream mode over a buffered `Location.open_input()`): never held
whole, never copied. A tar has no index, so the scan reads each shard once to learn its keys,
which members each sample has, and its captions; it refuses a file that is not a tar, a shard
without samples, a key whose members are not consecutive, a member that occurs twice in a sample,
a sample with two images, and a caption that is not UTF-8 text. A sample without an image is
refused there under on_bad="fail"; under "skip" it is kept as a row without image bytes, which the
decoder reports as a bad row like any other.
"""

from __future__ import annotations

import json
import logging
import re
import tarfile
from typing import Iterator, NamedTuple, Sequence

import pyarrow as pa

from retrack.data.formats.base import RowBatch, Scanned, SourceFile, caption_of, rows_at, label_of
from retrack.errors import CorpusError, StorageError, redact
from retrack.storage.location import FileEntry, Location

NAME = "webdataset"
WHAT = "WebDataset tar shards (*.tar)"
SCANS_BY_FILE = True  # each tar's keys are its own: tars scan independently
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# read_webdataset's split of a member path into (key, extension).
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
# Each refill is one ranged GET on S3: large enough that requests stay few.
_BUFFER = 4 << 20

log = logging.getLogger(__name__)


class Sample(NamedTuple):
    key: str
    has_image: bool
    image: bytes | None  # None when not read (the scan) or absent
    caption: str | None
    label: int | None


def _sample(rel: str, key: str, members: dict[str, bytes | None]) -> Sample:
    where = f"shard {rel}: sample {key!r}"
    images = [e for e in IMAGE_EXTENSIONS if e in members]
    if len(images) > 1:
        raise CorpusError(f"{where} has {len(images)} images ({', '.join(images)}); a sample holds one")
    caption = label = None
    try:
        record = json.loads(members["json"]) if members.get("json") is not None else None
        record = record if isinstance(record, dict) else {}
        if members.get("txt") is not None:
            caption = members["txt"].decode()
        else:
            caption = caption_of(record, f"{where} json")
    except UnicodeDecodeError:
        raise CorpusError(f"{where}: its caption is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise CorpusError(f"{where}: its json member is not valid JSON ({exc})") from None
    label = label_of(record, f"{where} json")
    if members.get("cls") is not None:
        try:
            label = int(members["cls"].decode().strip())
        except (UnicodeDecodeError, ValueError):
            raise CorpusError(f"{where}: its cls member is not an integer class label") from None
    return Sample(key, bool(images), members[images[0]] if images else None, caption, label)


def samples(loc: Location, rel: str, images: bool) -> Iterator[Sample]:
    """The samples of one shard, in order, streamed; image bytes are read only if `images`."""
    wanted = {"txt", "json", "cls", *(IMAGE_EXTENSIONS if images else ())}
    seen: set[str] = set()
    key, members = None, {}
    try:
        with loc.open_input() as raw:
            stream = tarfile.open(fileobj=pa.BufferedInputStream(raw, _BUFFER), mode="r|*")
            for m in stream:
                match = _KEY.match(m.name) if m.isreg() else None
                if match is None:
                    continue
                name, ext = match.group(1), match.group(2).lower()
                if name != key:
                    if key is not None:
                        yield _sample(rel, key, members)
                    if name in seen:
                        raise CorpusError(f"shard {rel}: the members of sample {name!r} are not consecutive "
                                          "(a WebDataset shard keeps each sample's files together; write it sorted by name)")
                    seen.add(name)
                    key, members = name, {}
                if ext in members:
                    raise CorpusError(f"shard {rel}: sample {name!r} has two {ext!r} members")
                members[ext] = stream.extractfile(m).read() if ext in wanted else None
            if key is not None:
                yield _sample(rel, key, members)
    except (tarfile.TarError, EOFError) as exc:
        raise CorpusError(f"shard {rel} is not a readable tar archive ({exc})") from None
    except (OSError, pa.ArrowException) as exc:
        raise StorageError(redact(f"cannot read {loc.uri} ({loc.where()}): {str(exc).splitlines()[0]}")) from None


def _scan_file(loc: Location, rel: str, on_bad: str) -> tuple[list[str], int, int]:
    keys, captioned, labelled, imageless = [], 0, 0, 0
    for s in samples(loc, rel, images=False):
        if not s.has_image:
            if on_bad == "fail":
                raise CorpusError(f"shard {rel}: sample {s.key!r} has no image (a {', '.join(IMAGE_EXTENSIONS)} member)")
            imageless += 1
        keys.append(s.key)
        captioned += s.caption is not None
        labelled += s.label is not None
    if not keys:
        raise CorpusError(f"shard {rel} holds no samples")
    if imageless:  # counted here, reported per row by the decoder
        log.warning("shard %s: %d sample(s) without an image will be skipped (on_bad=skip)", rel, imageless)
    return keys, captioned, labelled


def scan(root: Location, entries: list[FileEntry], on_bad: str) -> Iterator[Scanned]:
    for e in entries:
        if not e.location.name.endswith(".tar"):
            continue
        rel = e.location.relative_to(root)
        keys, captioned, labelled = _scan_file(e.location, rel, on_bad)
        yield Scanned(SourceFile(e.location.uri, rel, e.size, e.mtime_ns, len(keys), captioned, labelled=labelled), keys)


def ids(loc: Location, f: SourceFile) -> list[str]:
    return [s.key for s in samples(loc, f.rel, images=False)]


def read(loc: Location, f: SourceFile, batch_size: int, images: bool = True) -> Iterator[RowBatch]:
    """The shard's rows, streamed; without `images` no image member is kept (a tar is still read through)."""
    batch = RowBatch([], [], [], [])
    for s in samples(loc, f.rel, images=images):
        batch.ids.append(s.key)
        batch.images.append(s.image)
        batch.captions.append(s.caption)
        batch.labels.append(s.label)
        if len(batch.ids) == batch_size:
            yield batch
            batch = RowBatch([], [], [], [])
    if batch.ids:
        yield batch


def read_rows(loc: Location, f: SourceFile, rows: Sequence[int], images: bool = True) -> Iterator[RowBatch]:
    """The given rows of one shard (positions, ascending); a tar is read through to find them."""
    return rows_at(read(loc, f, 256, images), rows)
