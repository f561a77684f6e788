"""Scoring an unlearned Stable Diffusion against the original (no Ray; the stage in
`pipelines/evaluate.py` spreads the work below over tasks).

- Memorisation check: for each distinct caption of the forgotten items, generate images with both
  models from the same seeds and compare each generation with the forgotten items. A generation
  is a copy of forgotten item j when its L2 distance to j is under j's threshold (by default half
  the distance from j to its nearest retained item, the rule of the pixel benchmark); the SD forget
  frequency is the share of copies. A copy-detection style score, the best cosine similarity of
  a prompt's generations to its own item, is reported beside it.
- Integrity (arXiv 2411.02068): mean distance between same-seed generations of the two models on
  captions that were NOT forgotten, pairs where the original drew a copy left out.
- Membership: each forgotten item's denoising loss (its own latent and caption) against the
  held-out items' losses, as for pixel models.

Everything is measured in VAE-latent space (`retrack.models.latents`: exactly the latents the
model was trained and unlearned on, and searched in): the space the
project denoises and searches for Stable Diffusion, and one that does not depend on the decoder.
Generations are decoded to pixels only for the report grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from retrack.errors import InputError
from retrack.evaluation.metrics import denoising_loss, integrity, integrity_ratio, nearest_forget_distance
from retrack.models.clip import tokenize
from retrack.models.sd import StableDiffusion, encode_captions

SD_METRIC_KEYS = ("forget_frequency", "forget_max_cosine", "forget_distance_ratio", "integrity", "integrity_ratio", "forget_loss")


def generation_pipeline(model: StableDiffusion):
    """diffusers' StableDiffusionPipeline over the model with a DDIM sampler: deterministic, so the
    same seed gives paired images from the original and the unlearned model."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=DDIMScheduler.from_config(model.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def condition(model: StableDiffusion, captions: Sequence[str]) -> torch.Tensor:
    """Encoder hidden states of captions, tokenised as in training. Passing these (not the text) to
    the pipeline matters: its own tokenisation logs the truncated part of a long caption."""
    return encode_captions(model.text_encoder, tokenize(model.tokenizer, list(captions)))


@torch.no_grad()
def generate_latents(
    model: StableDiffusion,
    captions: Sequence[str],
    seeds: Sequence[int],
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    batch_size: int = 16,
    decode: Sequence[bool] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One generation per (caption, seed): latents N x C x h x w (the UNet's space) and the
    generations flagged in `decode` decoded to [0, 1] (M x 3 x H x W in their order; None when
    none is flagged). Each image's noise comes from its own seed, so batching never changes a
    generation."""
    if len(captions) != len(seeds):
        raise InputError(f"{len(captions)} captions but {len(seeds)} seeds")
    pipe = generation_pipeline(model)
    device = next(model.unet.parameters()).device
    decode = list(decode) if decode is not None else [False] * len(captions)
    latents, pixels = [], []
    for start in range(0, len(captions), batch_size):
        caps, sds = list(captions[start : start + batch_size]), seeds[start : start + batch_size]
        emb = condition(model, caps).to(device)
        kwargs = {}
        if guidance_scale > 1.0:
            kwargs["negative_prompt_embeds"] = condition(model, [""] * len(caps)).to(device)
        z = pipe(
            prompt_embeds=emb,
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            generator=[torch.Generator(device="cpu").manual_seed(int(s)) for s in sds],
            output_type="latent",
            **kwargs,
        ).images
        latents.append(z.float().cpu().numpy())
        want = [n for n in range(len(caps)) if decode[start + n]]
        if want:
            pixels.append(decode_latents(model, z[want]))
    return np.concatenate(latents), (np.concatenate(pixels) if pixels else None)


@torch.no_grad()
def decode_latents(model: StableDiffusion, latents: torch.Tensor) -> np.ndarray:
    """Latents (scaled, as generated) -> images in [0, 1], N x 3 x H x W."""
    vae = model.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    z = torch.as_tensor(latents).to(next(vae.parameters()).device) / vae.config.scaling_factor + shift
    return ((vae.decode(z).sample.float().cpu().numpy() + 1.0) / 2.0).clip(0.0, 1.0)


def item_losses(model: StableDiffusion, latents: np.ndarray, captions: Sequence[str], n_draws: int = 64, seed: int = 0) -> np.ndarray:
    """Per item, the denoising loss over fixed (t, eps) draws, conditioned on the item's own caption."""
    return denoising_loss(model.unet, model.scheduler, latents, n_draws=n_draws, seed=seed, cond=condition(model, captions))


@dataclass
class ForgetReference:
    """The forgotten items in latent space: what generations are compared with."""

    latents: np.ndarray  # F x C x h x w, one per forgotten item
    thresholds: np.ndarray  # F: L2 under which a generation is a copy of item j
    prompt_of: np.ndarray  # F: index of item j's caption among the distinct forget captions
    n_prompts: int


def copy_thresholds(forget_latents: np.ndarray, candidates: list[np.ndarray]) -> np.ndarray:
    """Per forgotten item, half its L2 distance to the nearest of its retained candidates: a
    generation under it is closer to the forgotten item than to anything retained."""
    if len(candidates) != len(forget_latents):
        raise InputError(f"{len(forget_latents)} forgotten items but {len(candidates)} candidate sets")
    out = np.empty(len(forget_latents))
    for j, cand in enumerate(candidates):
        if len(cand) == 0:
            raise InputError(f"forgotten item #{j} has no retained candidates to calibrate its copy threshold")
        out[j] = 0.5 * nearest_forget_distance(forget_latents[j : j + 1], cand)[0]
    if not (out > 0).all():
        bad = np.flatnonzero(~(out > 0)).tolist()[:6]
        raise InputError(f"forgotten item(s) #{bad} coincide with a retained item in latent space: add the duplicates to the forget set")
    return out


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    a /= np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)
    b /= np.linalg.norm(b, axis=1, keepdims=True).clip(1e-12)
    return a @ b.T


def copy_ratios(generations: np.ndarray, ref: ForgetReference) -> np.ndarray:
    """G x F: each generation's L2 distance to each forgotten item over that item's threshold
    (< 1: a copy of it)."""
    cols = [nearest_forget_distance(generations, ref.latents[j : j + 1]) / ref.thresholds[j] for j in range(len(ref.latents))]
    return np.stack(cols, axis=1)


def memorisation(generations: np.ndarray, prompt: np.ndarray, ref: ForgetReference) -> tuple[dict[str, float], list[dict]]:
    """Metrics of one model's generations for the forget captions (`prompt[g]`: generation g's
    caption index) and the per-prompt figures behind them (positions only, no content)."""
    ratios = copy_ratios(generations, ref)
    cos = _cosine(generations, ref.latents)
    copy = ratios.min(axis=1) < 1.0
    per_prompt = []
    for p in range(ref.n_prompts):
        gens, own = prompt == p, ref.prompt_of == p
        per_prompt.append({
            "prompt": p,
            "items": int(own.sum()),
            "generations": int(gens.sum()),
            "frequency": float(copy[gens].mean()),
            "max_cosine": float(cos[np.ix_(gens, own)].max()),
            "min_distance_ratio": float(ratios[np.ix_(gens, own)].min()),
        })
    metrics = {
        "forget_frequency": float(copy.mean()),
        "forget_max_cosine": float(np.mean([p["max_cosine"] for p in per_prompt])),
        "forget_distance_ratio": float(np.mean([p["min_distance_ratio"] for p in per_prompt])),
        "num_samples": float(len(generations)),
    }
    return metrics, per_prompt


def is_copy(generations: np.ndarray, ref: ForgetReference) -> np.ndarray:
    """Per generation: is it a copy of some forgotten item?"""
    return copy_ratios(generations, ref).min(axis=1) < 1.0


def sd_integrity(original: np.ndarray, unlearned: np.ndarray, ref: ForgetReference) -> dict[str, float]:
    """`integrity` (mean latent L2) and `integrity_ratio` between same-seed generations on retained
    captions, without the pairs where the original drew a copy of a forgotten item (those are
    supposed to change)."""
    copies = is_copy(original, ref)
    return {"integrity": integrity(original, unlearned, exclude=copies), "integrity_ratio": integrity_ratio(original, unlearned, exclude=copies)}
