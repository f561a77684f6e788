"""The corpus format: parquet shards of (id, image bytes[, label][, caption]).

The same format serves the embedded benchmark and a production corpus. This module reads small
corpora into memory (the embedded benchmark, the forget items and their neighbours); the index
stage streams large ones with Ray Data using the same decoding and checks.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from retrack.storage.atomic import atomic_directory
from retrack.errors import CorpusError

if TYPE_CHECKING:
    from retrack.data.source import CorpusPlan

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("label", pa.int64()),
        pa.field("caption", pa.string()),
    ]
)
SHARD_PATTERN = "part-{:05d}.parquet"
COMPLETE_MARKER = "_SUCCESS"


def encode_image(pixels: np.ndarray) -> bytes:
    """uint8 HxW (grey) or HxWx3 (RGB) -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def decode_image(data: bytes, item_id: str = "?") -> np.ndarray:
    """PNG/JPEG bytes -> uint8 array HxWxC. Raises CorpusError naming the item on corrupt bytes."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            arr = np.asarray(img)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise CorpusError(f"item {item_id!r}: image bytes cannot be decoded ({type(exc).__name__}: {exc})") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


FIT_RULE = "shorter side resized to the target (PIL box filter shrinking, bicubic enlarging), centre-cropped; grey<->RGB converted, alpha dropped"


def fit_image(img: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """uint8 HxWxC -> uint8 at `shape` (H, W, C) by FIT_RULE (diffusers' training examples' Resize +
    CenterCrop): the one rule that brings every item, of any size, to a model's geometry. Shrinking
    averages areas (no aliasing; a whole-number reduction of a blocky image is exact). An image
    already at `shape` is returned as it is."""
    h, w, c = shape
    if img.shape == (h, w, c):
        return img
    pil = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).convert("L" if c == 1 else "RGB")
    if pil.size != (w, h):
        scale = max(w / pil.width, h / pil.height)
        sw, sh = max(w, round(pil.width * scale)), max(h, round(pil.height * scale))
        left, top = (sw - w) // 2, (sh - h) // 2
        pil = pil.resize((sw, sh), Image.BOX if scale < 1 else Image.BICUBIC).crop((left, top, left + w, top + h))
    arr = np.asarray(pil)
    return arr[:, :, None] if arr.ndim == 2 else arr


def to_model_space(images_u8: np.ndarray) -> np.ndarray:
    """uint8 NxHxWxC -> float32 NxCxHxW in [-1, 1], the space pixel DDPMs denoise."""
    return (images_u8.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2)


def from_model_space(x: np.ndarray) -> np.ndarray:
    """float NxCxHxW in [-1, 1] -> uint8 NxHxWxC: exact inverse of `to_model_space`."""
    return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def to_unit_range(x: np.ndarray) -> np.ndarray:
    """Model space [-1, 1] -> [0, 1] (where forget frequency distances are measured)."""
    return np.clip((x + 1.0) / 2.0, 0.0, 1.0)


@dataclass
class Corpus:
    ids: list[str]
    images: np.ndarray  # float32 NxCxHxW in [-1, 1]
    labels: np.ndarray | None
    captions: list[str] | None

    def __len__(self) -> int:
        return len(self.ids)

    def index_of(self, ids: Sequence[str]) -> np.ndarray:
        pos = {i: n for n, i in enumerate(self.ids)}
        return np.array([pos[i] for i in ids], dtype=np.int64)


def write_shards(out_dir: str | Path, rows: Iterable[dict], shard_size: int = 512) -> list[Path]:
    """Write rows as parquet shards into `out_dir`, atomically: a reader never sees a partial corpus."""
    out = Path(out_dir)
    with atomic_directory(out) as tmp:
        batch: list[dict] = []
        n = 0
        for row in rows:
            batch.append(row)
            if len(batch) == shard_size:
                _write_shard(tmp / SHARD_PATTERN.format(n), batch)
                batch, n = [], n + 1
        if batch:
            _write_shard(tmp / SHARD_PATTERN.format(n), batch)
        (tmp / COMPLETE_MARKER).write_text("")
    return sorted(out.glob("part-*.parquet"))


def _write_shard(path: Path, rows: list[dict]) -> None:
    cols = {f.name: [r.get(f.name) for r in rows] for f in SCHEMA}
    pq.write_table(pa.Table.from_pydict(cols, schema=SCHEMA), path)


def iter_rows(corpus: "str | Path | CorpusPlan", endpoint: str | None = None, format: str = "parquet") -> Iterator[dict]:
    """Every row ({id, image, caption, label}) of a corpus (a local path or s3:// URI of the given
    format, or a scanned plan), streamed file by file."""
    from retrack.data.source import CorpusPlan, iter_file_rows, scan_corpus

    plan = corpus if isinstance(corpus, CorpusPlan) else scan_corpus(corpus, format, endpoint=endpoint)
    for f in plan.files:
        yield from iter_file_rows(plan, f)


def read_corpus(corpus: "str | Path | CorpusPlan", endpoint: str | None = None, format: str = "parquet",
                shape: Sequence[int] | None = None) -> Corpus:
    """Read and check a small corpus into memory (the embedded benchmark, an evaluation's
    holdout): unique non-empty ids, decodable images of one size, or each brought to `shape`
    (`fit_image`) when it is given."""
    ids: list[str] = []
    pixels: list[np.ndarray] = []
    labels: list[int | None] = []
    captions: list[str | None] = []
    fit, shape = shape is not None, None if shape is None else tuple(shape)
    for row in iter_rows(corpus, endpoint, format):
        item_id = row["id"]
        if not item_id:
            raise CorpusError(f"row {len(ids)}: empty id")
        if row["image"] is None:
            raise CorpusError(f"item {item_id!r}: no image bytes")
        img = decode_image(row["image"], item_id)
        if fit:
            img = fit_image(img, shape)
        elif shape is None:
            shape = img.shape
        elif img.shape != shape:
            raise CorpusError(f"item {item_id!r}: image is {img.shape[1]}x{img.shape[0]}x{img.shape[2]}, the corpus is {shape[1]}x{shape[0]}x{shape[2]}")
        ids.append(item_id)
        pixels.append(img)
        labels.append(row.get("label"))
        captions.append(row.get("caption"))
    dupes = [i for i, c in Counter(ids).items() if c > 1]
    if dupes:
        raise CorpusError(f"{len(dupes)} id(s) occur more than once in the corpus, e.g. {dupes[:3]}")
    return Corpus(
        ids=ids,
        images=to_model_space(np.stack(pixels)),
        labels=None if all(v is None for v in labels) else np.array([-1 if v is None else v for v in labels]),
        captions=None if all(c is None for c in captions) else [c or "" for c in captions],
    )
