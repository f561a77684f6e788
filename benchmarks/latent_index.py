"""The compact latent indexes against exact search on full latents, on real images.

    python benchmarks/latent_index.py [--items 20000]   # -> benchmarks/results/latent_index.json

Needs Debian's `dataset-fashion-mnist` (apt-get install dataset-fashion-mnist). Its first N
training images (28x28, grey, as RGB) are a parquet corpus, brought to 128x128 by retrack's fit
rule and encoded by a VAE of Stable Diffusion's shape (4 levels, so latents are 4x16x16: 4 KiB in
fp32), narrower so that 20k images encode on a laptop CPU; random weights (nothing is downloaded)
with a trained VAE's tight posterior, as the tests' tiny SD has. Through `retrack index build`'s
code path (`build_index`) the corpus is indexed two ways, each flat and as IVF-PQ over the same
encoded chunks: the latents pooled 4x4 (`EncoderSpec(pool=4)`: 64 floats, 1/16 of the full latent;
the full latents stored in fp16 beside the index), and the full latents projected by a PCA trained
with the index (`IndexParams(pca=...)`; the full latents are the index's stored vectors). A
deletion request of 100 random items asks for their 10 nearest retained items (`find_neighbours`,
K + margin candidates re-ranked on the full latents, at several margins); the truth is exact
search on every full latent (fp32) with the forget items left out. Recorded: recall@10,
candidates re-ranked per forget item, bytes per item of the index and of what is stored beside
it, against a full fp32 latent; seconds.
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
PCA_DIMS = (64, 128)


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
    by row beside it: the indexed vectors (.vec: pooled, or the full latents when projected) and
    the full latents in fp16 (.lat, pooled indexes only)."""
    per_item = lambda files: round(sum(f.size for f in files) / manifest.count, 1)  # noqa: E731
    shards = manifest.shards
    return {"index_bytes_per_item": per_item([f for s in shards for f in (s.faiss, s.ids)]),
            "vector_bytes_per_item": per_item([s.vectors for s in shards]),
            "stored_latent_bytes_per_item": per_item([s.latents for s in shards if s.latents is not None])}


def request(index, forget: list[str], truth) -> list[dict]:
    """The request's neighbours at each candidate margin (re-ranked on the full latents), against the truth."""
    from retrack.index import find_neighbours

    reads = "full" if index.full is not None else "vectors"  # where the re-rank reads the full latents
    stored, out = getattr(index, reads), []
    for margin in MARGINS:
        reranked: list[int] = []
        setattr(index, reads, lambda rows: reranked.append(len(rows)) or stored(rows))  # noqa: B023 (counts this margin's reads)
        t = time.perf_counter()
        got = find_neighbours(index, forget, K, margin=margin)
        seconds = time.perf_counter() - t
        out.append({"margin": margin, "recall_at_10": float(np.mean([len(set(a) & set(b)) / K for a, b in zip(got.ids, truth.ids)])),
                    "items_with_all_10": int(sum(set(a) == set(b) for a, b in zip(got.ids, truth.ids))), "seconds": round(seconds, 2),
                    # one read for the forget items (two when the re-rank reads the indexed vectors), then one per forget item
                    "candidates_reranked_per_item": round((sum(reranked) - len(forget) * (1 + (reads == "vectors"))) / len(forget), 1)})
    setattr(index, reads, stored)
    return out


def variant(work: Path, name: str, spec, params, executor, forget: list[str], truth) -> dict:
    """Build (or rebuild over the kept encoded chunks) the index `name` and run the request on it."""
    from retrack.index import build_index, open_index

    t = time.perf_counter()
    built = build_index(work / "corpus", work / name, encoder=spec, params=params, executor=executor, rows_per_chunk=5000)
    seconds = time.perf_counter() - t
    p = built.manifest.params
    return {"type": built.manifest.index_type, **{k: p[k] for k in ("pca", "nlist", "nprobe", "pq_m", "pq_bits") if p.get(k) is not None},
            "encoded_chunks": built.encoded_chunks, "build_seconds": round(seconds, 1), **index_bytes(built.manifest),
            "by_margin": request(open_index(work / name), forget, truth)}


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
    whole = EncoderSpec(kind="vae", model_dir=str(work / "vae"), resolution=RESOLUTION)
    pooled = EncoderSpec(kind="vae", model_dir=str(work / "vae"), resolution=RESOLUTION, pool=POOL)
    executor = LocalExecutor(threads=os.cpu_count() or 1, batch_size=256)

    # The truth: exact search on the full latents, read back from a flat index of them (encoded once).
    t = time.perf_counter()
    build_index(work / "corpus", work / "whole", encoder=whole, executor=executor, rows_per_chunk=5000)
    encode_seconds = time.perf_counter() - t
    exact = open_index(work / "whole")
    full = exact.vectors(np.arange(len(exact)))
    forget = [ids[n] for n in sorted(np.random.default_rng(0).choice(len(ids), REQUEST, replace=False))]
    truth = find_neighbours(VectorIndex.from_arrays(exact.ids_of(np.arange(len(exact))), full), forget, K)

    results = {}
    for dim in PCA_DIMS:
        results[f"pca_{dim}_flat"] = variant(work, "whole", whole, IndexParams(type="flat", pca=dim), executor, forget, truth)
        results[f"pca_{dim}_ivfpq"] = variant(work, "whole", whole, IndexParams(type="ivfpq", pca=dim, pq_m=64), executor, forget, truth)
    results["pool_4_flat"] = variant(work, "pooled", pooled, IndexParams(type="flat"), executor, forget, truth)
    results["pool_4_ivfpq"] = variant(work, "pooled", pooled, IndexParams(type="ivfpq", pq_m=16), executor, forget, truth)
    if exact.manifest.count != len(ids) or full.shape[1] != 4 * (RESOLUTION // 8) ** 2:
        raise SystemExit(f"the index holds {exact.manifest.count} vectors of dim {full.shape[1]}: not the corpus's full latents")
    result = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "data": f"Fashion-MNIST, first {len(ids)} training images, as RGB at {RESOLUTION}x{RESOLUTION}",
        "latent": [4, RESOLUTION // 8, RESOLUTION // 8], "full_latent_bytes": full.shape[1] * 4,
        "request": {"forget_items": REQUEST, "k": K, "truth": "exact search on every full latent, forget items left out"},
        "encode_and_build_exact_seconds": round(encode_seconds, 1),
        **results,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
