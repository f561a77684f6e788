"""The scan that proves nothing forgotten leaked: no forget image (encoded or as pixels), latent,
caption or id inside what a job wrote (artifacts, MLflow params/tags/metrics, logs, reports).

Byte needles catch copies of encoded images, raw pixels and text; parquet files are decoded (their
compressed pages would hide a copy); PNG outputs are also decoded and searched for the forget
images at every integer upscale, which is how sample grids show images.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError


@dataclass
class Finding:
    where: str
    what: str
    size: int


@dataclass
class ForgetContent:
    images_u8: list[np.ndarray]  # HxWxC uint8 as stored in the corpus
    encoded: list[bytes] = field(default_factory=list)  # the corpus bytes of each image
    captions: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    latents: list[np.ndarray] = field(default_factory=list)  # e.g. VAE latents, searched as float32
    min_id_length: int = 6  # shorter ids are too likely to occur by chance

    def needles(self) -> list[tuple[str, bytes]]:
        out = [("encoded image", b) for b in self.encoded]
        for img in self.images_u8:
            out.append(("raw pixels", np.ascontiguousarray(img).tobytes()))
            m11 = (img.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)
            out.append(("model-space tensor", np.ascontiguousarray(m11).tobytes()))
        out += [("latent", np.ascontiguousarray(z, dtype=np.float32).tobytes()) for z in self.latents]
        out += [("caption", c.encode()) for c in self.captions if c.strip()]
        out += [("forget id", i.encode()) for i in self.ids if len(i) >= self.min_id_length]
        return [(what, n) for what, n in out if len(n) >= 4]


PROBES = 5  # per side: the pattern's pixels every position is first checked at


def _contains_image(haystack: np.ndarray, needle: np.ndarray, max_scale: int = 8) -> bool:
    hay = haystack if haystack.ndim == 3 else haystack[:, :, None]
    if hay.shape[2] != needle.shape[2]:
        hay = hay[:, :, :1] if needle.shape[2] == 1 else np.repeat(hay[:, :, :1], needle.shape[2], 2)
    for s in range(1, max_scale + 1):
        pat = needle.repeat(s, 0).repeat(s, 1)
        (ph, pw), (h, w) = pat.shape[:2], hay.shape[:2]
        if ph > h or pw > w:
            break
        # Positions where a grid of the pattern's pixels match, then each of those checked whole:
        # exact, and linear in the picture's size (comparing every window whole is not).
        at = np.ones((h - ph + 1, w - pw + 1), dtype=bool)
        for py in np.linspace(0, ph - 1, PROBES).astype(int):
            for px in np.linspace(0, pw - 1, PROBES).astype(int):
                at &= np.all(hay[py : py + h - ph + 1, px : px + w - pw + 1] == pat[py, px], axis=-1)
        if any(np.array_equal(hay[y : y + ph, x : x + pw], pat) for y, x in zip(*np.nonzero(at))):
            return True
    return False


def _parquet_buffers(blob: bytes) -> list[bytes] | None:
    """The decoded column buffers of a parquet file (its pages are compressed, so its raw bytes
    would hide a copied image or caption), or None if the blob is not parquet."""
    if blob[:4] != b"PAR1" or blob[-4:] != b"PAR1":
        return None
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(blob))
    except (pa.ArrowException, OSError):
        return None
    return [buf.to_pybytes() for col in table.columns for buf in col.combine_chunks().buffers() if buf is not None]


def scan_blob(blob: bytes, where: str, content: ForgetContent) -> list[Finding]:
    found = [Finding(where, what, len(n)) for what, n in content.needles() if n in blob]
    for buf in _parquet_buffers(blob) or []:
        found += [Finding(where + " (parquet, decoded)", what, len(n)) for what, n in content.needles() if n in buf]
    if blob[:8] == b"\x89PNG\r\n\x1a\n":
        try:
            img = np.asarray(Image.open(io.BytesIO(blob)).convert("L" if content.images_u8 and content.images_u8[0].shape[2] == 1 else "RGB"))
        except (UnidentifiedImageError, OSError):
            img = None
        if img is not None:
            for k, needle in enumerate(content.images_u8):
                if _contains_image(img, needle):
                    found.append(Finding(where, f"forget image #{k} drawn in a PNG", needle.size))
    return found


def scan_files(paths: Iterable[Path], content: ForgetContent) -> list[Finding]:
    out = []
    for p in paths:
        if p.is_file():
            out += scan_blob(p.read_bytes(), str(p), content)
    return out


def scan_tree(root: str | Path, content: ForgetContent) -> list[Finding]:
    return scan_files(sorted(Path(root).rglob("*")), content)


def scan_texts(texts: dict[str, str], content: ForgetContent) -> list[Finding]:
    return [f for where, text in texts.items() for f in scan_blob(text.encode(), where, content)]


def mlflow_texts(client, run_id: str) -> dict[str, str]:
    """Every parameter, tag, metric and input of a run, as text keyed by where it is."""
    run = client.get_run(run_id)
    texts = {f"param {k}": f"{k}={v}" for k, v in run.data.params.items()}
    texts |= {f"tag {k}": f"{k}={v}" for k, v in run.data.tags.items()}
    texts |= {f"metric {k}": f"{k}={v}" for k, v in run.data.metrics.items()}
    for n, d in enumerate(run.inputs.dataset_inputs if run.inputs else []):
        texts[f"input {n}"] = f"{d.dataset.name} {d.dataset.source} {d.dataset.digest} " + " ".join(f"{t.key}={t.value}" for t in d.tags)
    return texts


@dataclass
class ScanReport:
    """What a scan looked at and what it found; `bytes_found` is the figure that must be 0."""

    files: int = 0
    bytes_scanned: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def bytes_found(self) -> int:
        return sum(f.size for f in self.findings)

    def add(self, blob: bytes, where: str, content: ForgetContent) -> None:
        self.files += 1
        self.bytes_scanned += len(blob)
        self.findings += scan_blob(blob, where, content)

    def summary(self) -> str:
        return f"{self.files} file(s), {self.bytes_scanned} bytes scanned: {len(self.findings)} finding(s), {self.bytes_found} bytes of forget content"


def scan_location(root, content: ForgetContent, report: ScanReport | None = None, skip=lambda rel: False) -> ScanReport:
    """Every file under a storage `Location` (local or s3://), hidden ones included; `skip(rel)`
    leaves out files by their path relative to `root`."""
    report = report or ScanReport()
    for e in root.list(hidden=True):
        rel = e.location.relative_to(root)
        if not skip(rel):
            report.add(e.location.read_bytes(), e.location.uri, content)
    return report


def mlflow_blobs(client, run_id: str, model_versions: Iterable[tuple[str, str]] = ()) -> dict[str, bytes]:
    """Everything MLflow holds for a run: its params, tags, metrics and inputs (`mlflow_texts`), every
    artifact file, and the tags and descriptions of the given (name, version) model versions."""
    import tempfile

    blobs = {k: v.encode() for k, v in mlflow_texts(client, run_id).items()}
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(run_id, "", tmp))
        for p in sorted(local.rglob("*")):
            if p.is_file():
                blobs[f"artifact {p.relative_to(local).as_posix()}"] = p.read_bytes()
    for name, version in model_versions:
        mv = client.get_model_version(name, version)
        blobs[f"version {name}/{version}"] = (f"{mv.description or ''} {mv.source} " + " ".join(f"{k}={v}" for k, v in mv.tags.items())).encode()
        rm = client.get_registered_model(name)
        blobs[f"registered model {name}"] = (f"{rm.description or ''} " + " ".join(f"{k}={v}" for k, v in (rm.tags or {}).items())).encode()
    return blobs
