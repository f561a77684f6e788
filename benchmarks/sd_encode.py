"""Filling the Stable Diffusion item cache: SD-1.5's VAE and a CLIP ViT-L/14-shaped text encoder
encode corpus items as the cache's actors do, and the encodings go into a cache part.

    python benchmarks/sd_encode.py         # -> benchmarks/results/sd_encode.json (a CUDA GPU if there is one)
    python benchmarks/sd_encode.py --resolutions 256 --batch 8 --batches 1   # a CPU-sized run

Per resolution: `encode_sd_items` (the VAE in fp32, the text encoder under bf16 autocast, the
function `pipelines.encoded_items` runs in its actors) on batches of random images with captions
of 10 to 60 tokens; `--rounds` rounds of `--batches` timed batches after a warm-up; items/s (median
over rounds), peak GPU memory (on a GPU). Beside it, in the same rounds, `encode_sd_captions` alone:
what an item costs whose latent the actors read from the job's index instead (the read itself, a
row of a memory-mapped file or one ranged GET, is not timed). Then one batch written as a cache part
to local disk and read back (`retrack.data.item_cache`), its bytes per item. Random weights,
nothing downloaded.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.sd_shape import sd15_text_encoder, sd15_vae  # noqa: E402

WORDS = "a photo of the red blue small large dog cat house tree car person on in with at by near under old new".split()


def make_part(batch: int, resolution: int, rng: np.random.Generator) -> dict:
    from retrack.models.latents import item_seed

    ids = [f"item-{rng.integers(1 << 40)}" for _ in range(batch)]
    captions = [" ".join(rng.choice(WORDS, rng.integers(10, 61))) for _ in range(batch)]
    return {"id": np.array(ids, dtype=object), "seed": np.array([item_seed(i) for i in ids]),
            "image": rng.integers(0, 256, (batch, resolution, resolution, 3), dtype=np.uint8),
            "caption": np.array(captions, dtype=object)}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench(vae, text_encoder, tokenizer, resolution: int, batch: int, rounds: int, batches: int) -> dict:
    from retrack.data.item_cache import ItemCache
    from retrack.storage.location import Location
    from retrack.training.items import encode_sd_captions, encode_sd_items

    rng = np.random.default_rng(resolution)
    parts = [make_part(batch, resolution, rng) for _ in range(batches)]
    encode_sd_items(vae, text_encoder, tokenizer, parts[0], resolution)  # warm-up: kernels chosen, memory pooled
    sync()
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    rates, caption_rates = [], []
    for _ in range(rounds):  # the two side by side in each round, so a slower spell slows both
        began = time.perf_counter()
        for part in parts:
            latents, conds = encode_sd_items(vae, text_encoder, tokenizer, part, resolution)
        sync()
        rates.append(batch * batches / (time.perf_counter() - began))
        began = time.perf_counter()
        for part in parts:
            encode_sd_captions(text_encoder, tokenizer, part["caption"])
        sync()
        caption_rates.append(batch * batches / (time.perf_counter() - began))
    with tempfile.TemporaryDirectory() as tmp:
        cache = ItemCache(Location.parse(tmp), latents.shape[1:], conds.shape[1:])
        began = time.perf_counter()
        written = cache.write(list(parts[-1]["id"]), latents, conds)
        write_s = time.perf_counter() - began
        began = time.perf_counter()
        cache.read(written, list(parts[-1]["id"]))
        read_s = time.perf_counter() - began
        part_bytes = written.size()
    return {
        "resolution": resolution, "batch": batch, "latent_shape": list(latents.shape[1:]), "cond_shape": list(conds.shape[1:]),
        "items_per_s": round(statistics.median(rates), 2), "items_per_s_rounds": [round(r, 2) for r in rates],
        "captions_only_items_per_s": round(statistics.median(caption_rates), 2),
        "captions_only_items_per_s_rounds": [round(r, 2) for r in caption_rates],
        "latent_from_index_speedup": round(statistics.median(c / r for c, r in zip(caption_rates, rates)), 1),
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if gpu else None,
        "cache_bytes_per_item": round(part_bytes / batch, 1),
        "cache_part": {"items": batch, "bytes": part_bytes, "write_s": round(write_s, 4), "read_s": round(read_s, 4)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", default="256,512")
    parser.add_argument("--batch", type=int, default=32, help="items per batch (scaling.encode_batch_size's default)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sd_encode.json"))
    args = parser.parse_args()
    import diffusers

    from retrack.models.clip import clip_tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    vae = sd15_vae(512).to(device).eval().requires_grad_(False)
    text_encoder = sd15_text_encoder().to(device).eval().requires_grad_(False)
    tokenizer = clip_tokenizer()
    result = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads", "torch": torch.__version__, "cuda": torch.version.cuda,
                    "diffusers": diffusers.__version__, "python": platform.python_version()},
        "parameters": {"vae": sum(p.numel() for p in vae.parameters()), "text_encoder": sum(p.numel() for p in text_encoder.parameters())},
        "protocol": {"rounds": args.rounds, "timed_batches": args.batches, "precision": "VAE fp32, text encoder bf16 autocast on a GPU (fp32 on the CPU)",
                     "cache_part": "local disk, one batch"},
        "configs": [bench(vae, text_encoder, tokenizer, int(r), args.batch, args.rounds, args.batches) for r in args.resolutions.split(",")],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
