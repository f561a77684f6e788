"""The compact latent index against exact search on full latents, on real images.

    python benchmarks/latent_index.py [--items 20000]   # -> benchmarks/results/latent_index.json

Needs Debian's `dataset-fashion-mnist` (apt-get install dataset-fashion-mnist). Its first N
training images (28x28, grey, as RGB) are a parquet corpus, brought to 128x128 by retrack's fit
rule and encoded by a VAE of Stable Diffusion's shape (4 levels, so latents are 4x16x16: 4 KiB in
fp32), narrower so that 20k images encode on a laptop CPU; random weights (nothing is downloaded)
with a trained VAE's tight posterior, as the tests' tiny SD has. `retrack index build`'s code path
(`build_index`, `EncoderSpec(pool=4)`) indexes the latents pooled 4x4 (64 floats, 1/16 of the full
latent), first flat (the auto choice at this size), then as IVF-PQ over the same encoded chunks.
A deletion request of 100 random items asks for their 10 nearest retained items
(`find_neighbours`, K + margin candidates re-ranked on the full latents the index stage stored in
fp16 beside the index, at several margins); the truth is exact search on every full latent (fp32,
encoded again) with the forget items left out. Recorded: recall@10, candidates re-ranked per
forget item, bytes per item of the index and of the stored latents against a full fp32 latent,
seconds; and, for comparison, the same request through a PCA projection to as many floats as the
pooled vectors (not part of retrack).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESOLUTION, POOL, K, REQUEST = 128, 4, 10, 100
MARGINS = (32, 64, 128, 256, 512)


def make_vae(path: Path) -> None:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(16, 32, 64, 64),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=16, sample_size=RESOLUTION)
    with torch.no_grad():  # a trained VAE's posterior is tight: its samples are nearly its means
        vae.quant_conv.weight[4:] = 0.0
        vae.quant_conv.bias[4:] = -12.0
    vae.save_pretrained(path)


def index_bytes(manifest) -> dict:
    """Bytes per item of what a search loads (the faiss index and the ids) and of the files read
    by row beside it: the pooled vectors (.vec) and the full latents in fp16 (.lat)."""
    per_item = lambda files: round(sum(f.size for f in files) / manifest.count, 1)  # noqa: E731
    shards = manifest.shards
    return {"index_bytes_per_item": per_item([f for s in shards for f in (s.faiss, s.ids)]),
            "pooled_vector_bytes_per_item": per_item([s.vectors for s in shards]),
            "stored_latent_bytes_per_item": per_item([s.latents for s in shards])}


def request(index, forget: list[str], truth) -> list[dict]:
    """The request's neighbours at each candidate margin (re-ranked on the full latents stored
    beside the index), against the truth."""
    from retrack.index import find_neighbours

    stored, out = index.full, []
    for margin in MARGINS:
        reranked: list[int] = []
        index.full = lambda rows: reranked.append(len(rows)) or stored(rows)  # noqa: B023 (counts this margin's reads)
        t = time.perf_counter()
        got = find_neighbours(index, forget, K, margin=margin)
        seconds = time.perf_counter() - t
        out.append({"margin": margin, "recall_at_10": float(np.mean([len(set(a) & set(b)) / K for a, b in zip(got.ids, truth.ids)])),
                    "items_with_all_10": int(sum(set(a) == set(b) for a, b in zip(got.ids, truth.ids))), "seconds": round(seconds, 2),
                    # one read for the forget items, then one per forget item
                    "candidates_reranked_per_item": round((sum(reranked) - len(forget)) / len(forget), 1)})
    index.full = stored
    return out


def projection_request(full: np.ndarray, ids: list[str], forget: list[str], truth, dim: int) -> list[dict]:
    """The same request through a PCA projection of the full latents to `dim` (as many floats as
    the pooled vectors), flat search, re-ranked on the full latents: what a learned projection
    would give in place of pooling (measured here, not built into retrack)."""
    import faiss

    pca = faiss.PCAMatrix(full.shape[1], dim)
    pca.train(full[np.random.default_rng(1).choice(len(full), min(5000, len(full)), replace=False)])
    projected = pca.apply(full)
    at = {i: n for n, i in enumerate(ids)}
    rows = np.array([at[i] for i in forget])
    kept = np.setdiff1d(np.arange(len(ids)), rows)
    index = faiss.IndexFlatL2(dim)
    index.add(projected[kept])
    out = []
    for margin in MARGINS:
        _, found = index.search(projected[rows], K + margin)
        got = []
        for q, cand in zip(rows, kept[found]):
            order = np.argsort(((full[cand] - full[q]) ** 2).sum(axis=1), kind="stable")[:K]
            got.append([ids[r] for r in cand[order]])
        out.append({"margin": margin, "recall_at_10": float(np.mean([len(set(a) & set(b)) / K for a, b in zip(got, truth.ids)])),
                    "candidates_reranked_per_item": K + margin})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--work", default="/tmp/retrack-latent-index")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "latent_index.json"))
    args = parser.parse_args()

    import shutil

    import torch

    from retrack.data.corpus import encode_image, write_shards
    from retrack.embedded.benchmark import fashion_mnist_available, load_fashion_mnist_u8
    from retrack.index import EncoderSpec, IndexParams, LocalExecutor, VectorIndex, build_index, find_neighbours, open_index
    from retrack.models.encoders import build_encoder

    if not fashion_mnist_available():
        raise SystemExit("Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist")
    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    grey, _ = load_fashion_mnist_u8(limit=args.items)
    images = np.repeat(grey[:, :, :, None], 3, axis=3)
    ids = [f"fm-{n:06d}" for n in range(len(images))]
    write_shards(work / "corpus", ({"id": i, "image": encode_image(im)} for i, im in zip(ids, images)), shard_size=5000)
    make_vae(work / "vae")
    spec = EncoderSpec(kind="vae", model_dir=str(work / "vae"), resolution=RESOLUTION, pool=POOL)
    executor = LocalExecutor(threads=os.cpu_count() or 1, batch_size=256)

    t = time.perf_counter()
    flat = build_index(work / "corpus", work / "index", encoder=spec, executor=executor, rows_per_chunk=5000)
    build_seconds = time.perf_counter() - t
    t = time.perf_counter()
    encoder = build_encoder(spec)  # brings the images to the model's resolution as the index stage does
    full = np.concatenate([encoder.indexed_and_full(images[s:s + 256], ids[s:s + 256])[1] for s in range(0, len(ids), 256)])
    full_seconds = time.perf_counter() - t
    forget = [ids[n] for n in sorted(np.random.default_rng(0).choice(len(ids), REQUEST, replace=False))]
    truth = find_neighbours(VectorIndex.from_arrays(ids, full), forget, K)

    flat_result = {"type": flat.manifest.index_type, **index_bytes(flat.manifest), "by_margin": request(open_index(work / "index"), forget, truth)}
    t = time.perf_counter()
    pq = build_index(work / "corpus", work / "index", encoder=spec, params=IndexParams(type="ivfpq", pq_m=16), executor=executor,
                     rows_per_chunk=5000)
    pq_seconds = time.perf_counter() - t
    p = pq.manifest.params
    pq_result = {"type": pq.manifest.index_type, "nlist": p["nlist"], "nprobe": p["nprobe"], "pq_m": p["pq_m"], "pq_bits": p["pq_bits"],
                 "build_seconds_reusing_the_encoded_chunks": round(pq_seconds, 1), **index_bytes(pq.manifest),
                 "by_margin": request(open_index(work / "index"), forget, truth)}
    result = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "data": f"Fashion-MNIST, first {len(ids)} training images, as RGB at {RESOLUTION}x{RESOLUTION}",
        "latent": [4, RESOLUTION // 8, RESOLUTION // 8], "full_latent_bytes": full.shape[1] * 4, "pool": POOL,
        "request": {"forget_items": REQUEST, "k": K, "truth": "exact search on every full latent, forget items left out"},
        "encode_and_build_flat_seconds": round(build_seconds, 1), "full_latents_seconds": round(full_seconds, 1),
        "flat": flat_result, "ivfpq": pq_result,
        f"pca_{full.shape[1] // POOL**2}_flat_for_comparison": projection_request(full, ids, forget, truth, full.shape[1] // POOL**2),
    }
    if flat.manifest.count != len(ids) or flat.manifest.dim * POOL * POOL != full.shape[1]:
        raise SystemExit(f"the index holds {flat.manifest.count} vectors of dim {flat.manifest.dim}: not the corpus's pooled latents")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
