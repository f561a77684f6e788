"""What the Stable Diffusion actors run on a CUDA GPU (`-m gpu`, where there is one; no GPU there is
a failure, not a skip): the item encoding that fills the item cache (the VAE in fp32, the text
encoder under bf16 autocast) and the evaluation scorers' generation and losses under bf16
autocast, each against the same call in fp32 on the CPU. The Ray actors around them
(`pipelines.encoded_items`, `pipelines.evaluate.SdScorer`) only load the model on the GPU and
enter that autocast."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrack.evaluation.sd import generate_latents, item_losses
from retrack.models import sd
from retrack.models.latents import item_seed
from retrack.training.items import encode_sd_items

pytestmark = pytest.mark.gpu

CAPTIONS = ["a handwritten digit 3", "a handwritten digit 7", "a photo of a t-shirt", ""]


def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.fail("-m gpu was asked for but torch sees no CUDA GPU")
    return torch.device("cuda")


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def test_item_encoding_on_the_gpu_matches_the_cpu():
    device = cuda()
    model = sd.tiny_sd(16, seed=0)
    ids = [f"img-{n}" for n in range(8)]
    part = {"image": np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8),
            "seed": np.array([item_seed(i) for i in ids]), "caption": np.array(CAPTIONS * 2, dtype=object)}
    want = encode_sd_items(model.vae, model.text_encoder, model.tokenizer, part, model.resolution)
    model.to(device)
    got = encode_sd_items(model.vae, model.text_encoder, model.tokenizer, part, model.resolution)
    assert [a.dtype for a in got] == [np.float16, np.float16] and [a.shape for a in got] == [a.shape for a in want]
    print(f"\nlatents: relative difference {rel(got[0], want[0]):.2e}; caption embeddings {rel(got[1], want[1]):.2e}")
    assert rel(got[0], want[0]) < 1e-2  # fp32 on both, TF32 convolutions on the GPU
    assert rel(got[1], want[1]) < 3e-2  # bf16 autocast


def test_generation_and_losses_under_bf16_on_the_gpu_follow_fp32_on_the_cpu():
    device = cuda()
    model = sd.tiny_sd(16, seed=0)
    seeds = [11, 12, 13, 14]
    latents = np.random.default_rng(1).standard_normal((4, *model.latent_shape)).astype(np.float32)
    want_z, want_px = generate_latents(model, CAPTIONS, seeds, num_inference_steps=8, guidance_scale=3.0, decode=[True, False, True, False])
    want_loss = item_losses(model, latents, CAPTIONS, n_draws=16, seed=3)
    model.to(device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got_z, got_px = generate_latents(model, CAPTIONS, seeds, num_inference_steps=8, guidance_scale=3.0, decode=[True, False, True, False])
        got_loss = item_losses(model, latents, CAPTIONS, n_draws=16, seed=3)
    assert got_z.shape == want_z.shape and got_px.shape == want_px.shape == (2, 3, 16, 16) and np.isfinite(got_z).all()
    print(f"\ngenerations: relative difference {rel(got_z, want_z):.2e}; decoded {rel(got_px, want_px):.2e}; "
          f"losses {rel(got_loss, want_loss):.2e}")
    # The same seeds give the same images (noise is drawn on the CPU), to bf16's precision.
    assert rel(got_z, want_z) < 5e-2 and rel(got_px, want_px) < 5e-2
    assert rel(got_loss, want_loss) < 3e-2
