"""Stable Diffusion at SD-1.5's size through retrack's unlearn stage, on this machine's CPU.

    python benchmarks/sd_shape.py            # -> benchmarks/results/sd_shape.json

An SD-1.5-shaped pipeline is built from the real component configs (UNet 860M parameters, the SD
VAE, a CLIP ViT-L/14-shaped text encoder; random weights, nothing downloaded) with a UNet sample
size of 32, so it denoises 32x32 latents of 256x256 images, and saved as the fp16 variant (as SD
checkpoints ship). The corpus, 16 captioned pictures, is indexed with the model's VAE and its
neighbours found as a job's index and neighbours stages do (`retrack index build --encoder vae`,
`retrack index neighbours`). `retrack unlearn --index --neighbours` (ReTrack, bf16 autocast,
gradient checkpointing, a checkpoint after every update) then runs 2 updates, its items' latents
read from the index and only their captions encoded; it is killed once its first checkpoint is
complete and run again, so the second run resumes from it. Recorded: parameters, peak RSS of the
whole process tree (driver, Ray, the training worker), the index's seconds, seconds per update,
checkpoint bytes and the seconds to write and read one, the resume, where each run's items came
from, and the output loading in `StableDiffusionPipeline` and generating.

Each heavy step runs in its own process, so that no two hold the model at once.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESOLUTION = 256
ITEMS, FORGET, K = 16, 2, 2
TRAIN = ["--steps", "2", "--batch-size", "2", "--forget-batch-size", "1", "--lr", "1e-5", "--mixed-precision", "bf16",
         "--gradient-checkpointing", "--checkpoint-every", "1", "--workers", "1", "--cpus-per-worker", "2",
         "--params", json.dumps({"k": K, "lambda": 0.1})]


def sd15_unet_config(resolution: int) -> dict:
    """SD-1.5's UNet (860M parameters) for `resolution`-pixel images (latents 8x smaller)."""
    return dict(
        sample_size=resolution // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )


def sd15_vae(resolution: int):
    """SD-1.5's VAE (83.7M parameters), random weights."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=resolution,
    )


def sd15_text_encoder():
    """A CLIP ViT-L/14-shaped text encoder (123.1M parameters), random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from retrack.models.clip import CLIP_CONTEXT_LENGTH

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=CLIP_CONTEXT_LENGTH, projection_dim=768, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))


def build(path: str) -> dict:
    """SD-1.5's UNet, VAE and CLIP ViT-L/14 text encoder configs, random weights, saved fp16."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from retrack.models.clip import clip_tokenizer
    from retrack.models.sd import sd_scheduler

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**sd15_unet_config(RESOLUTION))
    vae = sd15_vae(RESOLUTION)
    text_encoder = sd15_text_encoder()
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))}
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet, scheduler=sd_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(path, variant="fp16", safe_serialization=True)
    return params


def write_corpus(root: Path) -> None:
    """16 captioned 256x256 pictures (parquet) and a forget file naming 2 of them."""
    from PIL import Image

    from retrack.data.corpus import write_shards

    rng = np.random.default_rng(0)
    rows = []
    for n in range(ITEMS):
        base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = np.kron(base, np.ones((RESOLUTION // 8, RESOLUTION // 8, 1), np.uint8))
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        rows.append({"id": f"item-{n:03d}", "image": buf.getvalue(), "caption": f"a mosaic, number {n}"})
    write_shards(root / "corpus", rows)
    (root / "forget.txt").write_text("".join(f"item-{n:03d}\n" for n in range(FORGET)))


class TreePeak:
    """Samples the resident memory of a process and all its descendants (Ray's included)."""

    def __init__(self, pid: int):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, args=(pid,), daemon=True)
        self._thread.start()

    def _run(self, pid: int) -> None:
        root = psutil.Process(pid)
        while not self._stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            self._stop.wait(0.2)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def unlearn(work: Path, kill_after_checkpoint: bool) -> dict:
    """`retrack unlearn` on the SD-1.5-shaped model; killed (process group) once its first
    checkpoint is complete when asked."""
    from retrack.training.checkpoint import STATE_FILE, checkpoint_name, verified_state

    argv = [str(Path(sys.executable).with_name("retrack")), "unlearn", "--model", str(work / "model"), "--corpus", str(work / "corpus"),
            "--forget-ids", str(work / "forget.txt"), "--out", str(work / "out"), "--index", str(work / "index"),
            "--neighbours", str(work / "neighbours.json"), *TRAIN]
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)
    peak = TreePeak(proc.pid)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    killed = False
    while proc.poll() is None:
        # Complete: every file uploaded with its recorded digest (the state file may land first).
        if kill_after_checkpoint and any((d / STATE_FILE).is_file() and verified_state(d) for d in (work / "out.runs").rglob(checkpoint_name(1))):
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(2)
    proc.wait()
    reader.join(10)
    seconds = time.perf_counter() - start
    rss = peak.stop()
    subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"], capture_output=True)
    if not killed and proc.returncode != 0:
        raise SystemExit(f"retrack unlearn failed ({proc.returncode}):\n{''.join(out)[-4000:]}")
    items = re.search(r"items: (\d+) from the item cache, (\d+) with their latents from the index, (\d+) encoded", "".join(out))
    return {"seconds": round(seconds, 1), "peak_rss_gb": round(rss / 2**30, 2), "killed_after_first_checkpoint": killed,
            **({"items": {"cached": int(items[1]), "from_index": int(items[2]), "encoded": int(items[3])}} if items else {})}


def index(work: Path) -> dict:
    """The corpus's index of the model's latents (in this process tree, no Ray) and the forget
    items' neighbours from it; seconds of each."""
    retrack = str(Path(sys.executable).with_name("retrack"))
    seconds = {}
    for step, argv in (("build", ["index", "build", str(work / "corpus"), str(work / "index"), "--encoder", "vae",
                                  "--vae-dir", str(work / "model"), "--local"]),
                       ("neighbours", ["index", "neighbours", str(work / "index"), "--forget", str(work / "forget.txt"),
                                       "-k", str(K), "--out", str(work / "neighbours.json")])):
        t = time.perf_counter()
        done = subprocess.run([retrack, *argv], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"retrack index {step} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
        seconds[f"{step}_seconds"] = round(time.perf_counter() - t, 1)
    return seconds


def checkpoint_io(checkpoint: str, model: str) -> dict:
    """Seconds to read the run's checkpoint into a fresh UNet and AdamW, and to write it again."""
    import torch
    from diffusers import UNet2DConditionModel

    from retrack.training.checkpoint import load_checkpoint, save_checkpoint, verified_state
    from retrack.training.step import make_optimizer

    state = verified_state(checkpoint)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(Path(model) / "unet"))
    opt = make_optimizer(list(unet.parameters()), 1e-5)
    t = time.perf_counter()
    load_checkpoint(checkpoint, unet, opt, torch.device("cpu"))
    read = time.perf_counter() - t
    t = time.perf_counter()
    tmp = save_checkpoint(unet, opt, state["step"], state["history"], state["config_hash"], 1)
    write = time.perf_counter() - t
    written = sum(p.stat().st_size for p in Path(tmp).iterdir())
    shutil.rmtree(tmp)
    return {"read_seconds": round(read, 1), "write_seconds": round(write, 1), "bytes_written": written}


def load_output(out: str) -> dict:
    """The output as a user loads it: plain `from_pretrained`, then one short generation."""
    import torch
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    t = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(out)
    seconds = time.perf_counter() - t
    image = pipe("a mosaic", num_inference_steps=2, height=RESOLUTION, width=RESOLUTION, guidance_scale=1.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    generic = type(DiffusionPipeline.from_pretrained(out)).__name__
    return {"stable_diffusion_pipeline_load_seconds": round(seconds, 1), "generated": list(image.shape),
            "finite": bool(np.isfinite(image).all()), "diffusion_pipeline_class": generic, "unet_dtype": str(pipe.unet.dtype)}


def in_process(fn, *args):
    """Run fn(*args) in a fresh process (its memory freed when it ends); its result."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/retrack-sd-shape")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sd_shape.json"))
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    from retrack.training.checkpoint import STATE_FILE, checkpoint_name

    t = time.perf_counter()
    params = in_process(build, str(work / "model"))
    build_seconds = time.perf_counter() - t
    model_bytes = sum(p.stat().st_size for p in (work / "model").rglob("*") if p.is_file())
    write_corpus(work)
    indexed = index(work)
    first = unlearn(work, kill_after_checkpoint=True)
    # The killed run's checkpoint (10 GB) is still being written back: its dirty pages count as
    # used memory, and Ray's memory monitor would kill the resumed run's worker for them.
    os.sync()
    first_update = json.loads(next((work / "out.runs").rglob(f"{checkpoint_name(1)}/{STATE_FILE}")).read_text())["history"][0]
    resumed = unlearn(work, kill_after_checkpoint=False)
    states = sorted((work / "out.runs").rglob(STATE_FILE))
    final = json.loads(states[-1].read_text())
    # Resumed: the first update's record (its seconds included) is the killed run's, not a new one.
    if len(final["history"]) != 2 or final["history"][0] != first_update:
        raise SystemExit(f"the second run did not resume from the first one's checkpoint: {final['history']}")
    # The items the first run encoded and kept (all it used but the forgotten ones): the resumed
    # run reads them back; the forgotten ones, never kept, take their latents from the index again.
    # No run puts an item through the VAE.
    parts = sorted((work / "out.runs" / "_item_cache").rglob("*.parquet"))
    cached = resumed.get("items", {}).get("cached", 0)
    if resumed.get("items") != {"cached": cached, "from_index": FORGET, "encoded": 0} or cached == 0:
        raise SystemExit(f"the resumed run did not read its retained items from the item cache: {resumed.get('items')}")
    checkpoint = states[-1].parent
    ckpt_bytes = sum(p.stat().st_size for p in checkpoint.iterdir())
    io_figures = in_process(checkpoint_io, str(checkpoint), str(work / "model"))
    output = in_process(load_output, str(work / "out"))
    result = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version()},
        "settings": {"resolution": RESOLUTION, "latent": [4, RESOLUTION // 8, RESOLUTION // 8], "corpus_items": ITEMS,
                     "forget_items": FORGET, "unlearn_args": TRAIN, "parent_variant": "fp16"},
        "parameters": {**params, "total": sum(params.values())},
        "parent": {"build_and_save_seconds": round(build_seconds, 1), "bytes_fp16": model_bytes},
        "index": indexed,
        "first_run": first,
        "resumed_run": {**resumed, "resumed_from_step": first_update["step"]},
        "peak_rss_gb": max(first["peak_rss_gb"], resumed["peak_rss_gb"]),
        "updates": [{k: round(v, 4) if isinstance(v, float) else v for k, v in h.items()} for h in final["history"]],
        "checkpoint": {"bytes": ckpt_bytes, **io_figures},
        "item_cache": {"parts": len(parts), "bytes": sum(p.stat().st_size for p in parts),
                       "bytes_per_item": round(sum(p.stat().st_size for p in parts) / cached, 1)},
        "output": output,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
