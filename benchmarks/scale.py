"""One deletion request against corpora of 10k, 100k and 1M images: what grows with the corpus.

    python benchmarks/scale.py [--sizes 10000 100000 1000000] [--out benchmarks/results/scale.json]

The script starts a SeaweedFS S3 server on loopback, pretrains one small pixel DDPM (32x32 grey)
on a set in which one image is planted at 20%, and writes each corpus to S3: N images (upscaled,
shifted and shaded digits) in parquet shards of 10,000 rows in row groups of 64 (statistics for
the id and label columns only), with the same 16
planted copies at every N. Each size then runs `retrack run` as a fresh driver process (a local Ray
instance) with the same forget set (the 16 copies), K, updates and samples: only the corpus
changes. Per size and per stage (preflight, then each stage of the job) it records the wall
seconds, the driver's peak RSS (its high-water mark, reset at each stage), the largest Ray worker
RSS seen (sampled every 0.2 s) and the bytes the S3 server sent (its per-bucket traffic counter),
then the verdict and the forget frequencies.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZE = 32
PLANTED = 16
SHARD_ROWS = 10_000
ROW_GROUP = 64
SPEC = {
    "method": {"name": "retrack", "params": {"lambda": 0.1, "k": 10, "t_min": 100}},
    "train": {"steps": 20, "batch_size": 32, "lr": 7e-5},
    "evaluation": {"num_samples": 256, "reference_items": 10_000},
}


def planted_image() -> np.ndarray:
    """A 'T' on a dark field: nothing like a digit."""
    img = np.full((SIZE, SIZE, 1), 12, np.uint8)
    img[6:11, 5:27] = 240
    img[11:27, 13:19] = 240
    return img


def fillers(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n distinct 32x32 grey images: digits upscaled 4x, shifted, shaded and noised; their labels."""
    from retrack.embedded.benchmark import load_digits_u8

    digits, labels = load_digits_u8()
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(digits), n)
    big = digits[pick].reshape(n, 8, 8).repeat(4, axis=1).repeat(4, axis=2).astype(np.float32)
    shift = rng.integers(-3, 4, (n, 2))
    for axis in (0, 1):
        for s in range(-3, 4):
            rows = shift[:, axis] == s
            big[rows] = np.roll(big[rows], s, axis=axis + 1)
    big = big * rng.uniform(0.6, 1.0, (n, 1, 1)) + rng.normal(0, 8, big.shape)
    return np.clip(big, 0, 255).astype(np.uint8)[..., None], labels[pick].astype(np.int64)


def png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img[:, :, 0]).save(buf, format="PNG")
    return buf.getvalue()


def pretrain_original(dest: Path) -> None:
    """The model every size unlearns: trained on 1,600 fillers and the planted image at 20%."""
    from retrack.data.corpus import to_model_space
    from retrack.embedded.pretrain import PretrainConfig, pretrain
    from retrack.models.pixel import save_pixel_model

    imgs, _ = fillers(1_600, seed=1)
    train = np.concatenate([imgs, np.repeat(planted_image()[None], 400, axis=0)])
    model, seconds = pretrain(to_model_space(train), PretrainConfig(steps=800, batch_size=32, warmup_steps=50, ema_decay=0.99))
    save_pixel_model(model, dest)
    print(f"original pretrained in {seconds:.0f} s", flush=True)


def write_corpus(s3, n: int) -> str:
    """N items on S3, the planted copies at seeded positions; returns the corpus URI."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from retrack.data.corpus import SCHEMA

    client, prefix = s3.client(), f"corpora/{n}"
    planted_at = set(np.random.default_rng(n).choice(n, PLANTED, replace=False).tolist())
    planted, copy = png(planted_image()), 0
    for shard, start in enumerate(range(0, n, SHARD_ROWS)):
        m = min(SHARD_ROWS, n - start)
        imgs, labels = fillers(m, seed=n + shard)
        rows = {"id": [], "image": [], "label": [], "caption": []}
        for j in range(m):
            if start + j in planted_at:
                rows["id"].append(f"planted-{copy:02d}")
                rows["image"].append(planted)
                rows["label"].append(10)
                copy += 1
            else:
                rows["id"].append(f"item-{start + j:07d}")
                rows["image"].append(png(imgs[j]))
                rows["label"].append(int(labels[j]))
            rows["caption"].append(None)
        buf = io.BytesIO()
        # No min/max statistics of the image bytes: they would make every footer (read once per
        # file a stage touches) as large as two images per row group.
        pq.write_table(pa.Table.from_pydict(rows, schema=SCHEMA), buf, row_group_size=ROW_GROUP, write_statistics=["id", "label"])
        client.put_object(Bucket=s3.bucket, Key=f"{prefix}/part-{shard:05d}.parquet", Body=buf.getvalue())
    return s3.uri(prefix)


# --------------------------------------------------------------------------------------------
# One size, in its own driver process
# --------------------------------------------------------------------------------------------


def _status(pid: int | str, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


class Meter:
    """Per stage: wall seconds, the driver's peak RSS, the largest Ray worker RSS, S3 bytes sent."""

    def __init__(self, metrics_url: str, bucket: str):
        self.metrics_url, self.bucket = metrics_url, bucket
        self.stages: list[dict] = []
        self.worker_peak = 0
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sent(self) -> int:
        from tests.fixtures.services import bucket_bytes_sent

        return bucket_bytes_sent(self.metrics_url, self.bucket)

    def _sample(self) -> None:
        import psutil

        while not self._stop.is_set():
            for p in psutil.process_iter(["cmdline", "memory_info"]):
                cmd = p.info["cmdline"] or []
                if cmd and cmd[0].startswith("ray::") and p.info["memory_info"] is not None:
                    self.worker_peak = max(self.worker_peak, p.info["memory_info"].rss)
            time.sleep(0.2)

    def begin(self, stage: str) -> None:
        self.end()
        Path("/proc/self/clear_refs").write_text("5")  # resets this process's peak RSS (VmHWM)
        self.worker_peak = 0
        self.stages.append({"stage": stage, "start": time.perf_counter(), "s3_sent_start": self._sent()})

    def end(self) -> None:
        if self.stages and "wall_seconds" not in self.stages[-1]:
            s = self.stages[-1]
            s["wall_seconds"] = round(time.perf_counter() - s.pop("start"), 2)
            s["driver_peak_rss_mb"] = round(_status("self", "VmHWM") / 2**20, 1)
            s["worker_peak_rss_mb"] = round(self.worker_peak / 2**20, 1)
            s["s3_bytes_read"] = self._sent() - s.pop("s3_sent_start")


def run_one(spec_path: str, metrics_url: str, bucket: str, out: str) -> None:
    from pipelines.job import run_job
    from retrack.config.spec import load_spec

    spec = load_spec(spec_path)
    meter = Meter(metrics_url, bucket)
    meter.begin("preflight")
    result = run_job(spec, on_stage=lambda stage, what: meter.begin(stage))
    meter.end()
    Path(out).write_text(json.dumps({
        "stages": meter.stages,
        "verdict": result.verdict,
        "promoted": result.promoted,
        "forget_frequency": {m: result.metrics[m]["forget_frequency"] for m in ("original", "unlearned")},
        "frechet_distance": {m: result.metrics[m]["frechet_distance"] for m in ("original", "unlearned")},
    }))


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------


def neighbour_recall(s3, spec_path: Path) -> dict:
    """The job's index and its neighbours against exact search over every retained vector (the
    shards' vector files, streamed here, outside the measured driver): recall@K."""
    import pyarrow.parquet as pq

    from retrack.config.spec import load_spec
    from retrack.index import index_manifest, shard_vectors
    from retrack.index.exact import exact_knn
    from retrack.storage.location import Location

    spec = load_spec(spec_path)
    prefix = Location.parse(s3.uri("jobs"), endpoint=s3.endpoint) / spec.request_id / spec.config_hash()
    nb = json.loads((prefix / "neighbours.json").read_text())
    index_uri = (prefix / "stages" / "index.json").read_json()["index_uri"]
    root, manifest = index_manifest(index_uri, s3.endpoint)
    forget = set(nb)
    ids_per_shard = [pq.read_table(io.BytesIO((root / rec.ids.name).read_bytes())).column("id").to_pylist() for rec in manifest.shards]
    row_of = {i: r for r, i in enumerate(i for ids in ids_per_shard for i in ids) if i in forget}
    queries = shard_vectors(root, manifest)(np.array([row_of[f] for f in nb]))  # ranged reads of the forget rows
    k = len(next(iter(nb.values())))
    best: list[list[tuple[float, str]]] = [[] for _ in nb]
    for rec, ids in zip(manifest.shards, ids_per_shard):
        vec = np.frombuffer((root / rec.vectors.name).read_bytes(), np.float32).reshape(-1, manifest.dim)
        kept = np.flatnonzero([i not in forget for i in ids])
        d, idx = exact_knn(queries, vec[kept], k)
        best = [sorted(b + [(float(x), ids[kept[j]]) for x, j in zip(dq, iq)])[:k] for b, dq, iq in zip(best, d, idx)]
    recall = float(np.mean([len(set(nb[f]) & {i for _, i in b}) / k for f, b in zip(nb, best)]))
    return {"type": manifest.index_type, "params": manifest.params, "neighbour_recall_at_k": recall, "k": k}


def main() -> None:
    from tests.fixtures.services import free_port, start_seaweedfs

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="retrack-scale-"))
    port = free_port()
    s3 = start_seaweedfs(work / "weed", metrics_port=port)
    env = {**os.environ, **s3.env()}
    os.environ.update(s3.env())
    try:
        pretrain_original(work / "original")
        model = s3.upload_dir(work / "original", "models/original")
        results = []
        for n in args.sizes:
            began = time.perf_counter()
            corpus = write_corpus(s3, n)
            forget = "\n".join(f"planted-{c:02d}" for c in range(PLANTED)) + "\n"
            s3.client().put_object(Bucket=s3.bucket, Key=f"requests/scale-{n}/forget.txt", Body=forget.encode())
            print(f"N = {n}: corpus written in {time.perf_counter() - began:.0f} s", flush=True)
            spec = {
                "request_id": f"scale-{n}",
                "model": {"kind": "pixel-ddpm", "uri": model},
                "corpus": {"uri": corpus},
                "forget": {"file": s3.uri(f"requests/scale-{n}/forget.txt")},
                **SPEC,
                "storage": {"root": s3.uri("jobs"), "endpoint_url": s3.endpoint},
                "mlflow": {"tracking_uri": f"sqlite:///{work / 'mlflow.db'}", "registered_model": "scale", "artifact_location": (work / "art").as_uri()},
            }
            spec_path, out = work / f"scale-{n}.yaml", work / f"scale-{n}.json"
            spec_path.write_text(json.dumps(spec))
            subprocess.run([sys.executable, __file__, "--one", str(spec_path), s3.metrics_url, s3.bucket, str(out)],
                           check=True, env=env)
            row = {"items": n, **json.loads(out.read_text()), "index": neighbour_recall(s3, spec_path)}
            results.append(row)
            print(json.dumps(row, indent=1), flush=True)
        Path(args.out).write_text(json.dumps({
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": f"{os.cpu_count()} CPUs; one local Ray instance; SeaweedFS on loopback",
            "settings": {"image": f"{SIZE}x{SIZE}x1", "planted_copies": PLANTED, "shard_rows": SHARD_ROWS, "row_group": ROW_GROUP, **SPEC},
            "sizes": results,
        }, indent=2))
    finally:
        s3.service.stop()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        run_one(*sys.argv[2:6])
    else:
        main()
