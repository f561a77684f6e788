"""Stable Diffusion support (retrack/models/{sd,clip,latents}.py, retrack/storage/cache.py): offline
CLIP tokenizer, tiny models, layout checks, the one latent rule (the same latent in the index, in
training and in evaluation), caption encoding, saving the fine-tuned UNet and the per-node model
cache. No Ray."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from retrack.config.model_kind import ModelKind
from retrack.data.item_cache import ItemCache
from retrack.digest import directory_digest
from retrack.errors import InputError, ModelLayoutError
from retrack.models import clip, sd
from retrack.models.latents import encode_latents, item_seed
from retrack.storage.location import Location
from retrack.training.items import encode_sd_items


@pytest.fixture(scope="module")
def tiny(tiny_sd_dir) -> tuple[sd.StableDiffusion, Path]:
    """The tiny SD built again in memory (same configs and seed) and the saved one."""
    return sd.tiny_sd(16, seed=0), tiny_sd_dir


def test_clip_tokenizer_from_the_open_clip_bpe_matches_clip_ids():
    tok = clip.clip_tokenizer()
    assert len(tok) == 49408
    # The published CLIP ids of this prompt (SD v1 / ViT-L/14 tokenizer).
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    ids = clip.tokenize(tok, ["a photo of a cat", ""])
    assert ids.shape == (2, 77)
    assert ids[1, 0] == 49406 and ids[1, 1] == 49407 and (ids[1, 2:] == 49407).all()  # padded with <|endoftext|>


def test_vocab_files_round_trip(tmp_path):
    clip.write_clip_tokenizer_files(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    merges = (tmp_path / "merges.txt").read_text().splitlines()
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + clip.CLIP_NUM_MERGES
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tmp_path)  # a diffusers tokenizer/ folder with only the two classic files
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_save_load_round_trip_and_layout(tiny):
    model, path = tiny
    assert sd.model_kind(path) is ModelKind.STABLE_DIFFUSION
    assert sd.check_sd_model_dir(path) == {"unet": None, "vae": None, "text_encoder": None}
    loaded = sd.load_sd_model(path)
    assert loaded.latent_shape == (4, 8, 8) and loaded.resolution == 16
    for a, b in zip(model.unet.state_dict().values(), loaded.unet.state_dict().values()):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in loaded.vae.parameters())
    assert not any(p.requires_grad for p in loaded.text_encoder.parameters())
    assert all(p.requires_grad for p in loaded.unet.parameters())
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"


def test_layout_errors_are_specific(tiny, model_dir, tmp_path):
    _, path = tiny
    bad = tmp_path / "bin"
    shutil.copytree(path, bad)
    (bad / "unet" / sd.WEIGHTS_FILE).rename(bad / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelLayoutError, match="only safetensors"):
        sd.check_sd_model_dir(bad)

    vpred = tmp_path / "vpred"
    shutil.copytree(path, vpred)
    cfg = json.loads((vpred / "scheduler" / "scheduler_config.json").read_text())
    (vpred / "scheduler" / "scheduler_config.json").write_text(json.dumps({**cfg, "prediction_type": "v_prediction"}))
    with pytest.raises(ModelLayoutError, match="v_prediction"):
        sd.check_sd_model_dir(vpred)

    notok = tmp_path / "notok"
    shutil.copytree(path, notok)
    shutil.rmtree(notok / "tokenizer")
    with pytest.raises(ModelLayoutError, match="tokenizer"):
        sd.check_sd_model_dir(notok)

    with pytest.raises(ModelLayoutError, match="single AutoencoderKL component"):
        sd.model_kind(path / "vae")

    assert sd.model_kind(model_dir) is ModelKind.PIXEL_DDPM
    with pytest.raises(ModelLayoutError, match="pixel-space DDPM"):
        sd.check_sd_model_dir(model_dir)


def test_latents_are_per_item_deterministic(tiny):
    model, _ = tiny
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    z = encode_latents(model.vae, images, [11, 12, 13, 14], model.resolution)
    z_alone = encode_latents(model.vae, images[2:3], [13], model.resolution)
    assert z.shape == (4, 4, 8, 8)
    assert torch.allclose(z[2:3], z_alone, atol=1e-5)  # same item, same seed: same latent whatever the batch
    z_other = encode_latents(model.vae, images[2:3], [99], model.resolution)
    assert not torch.allclose(z_alone, z_other)  # the posterior is sampled, not its mean
    assert item_seed("img-000001") == item_seed("img-000001") != item_seed("img-000002")


def test_an_item_has_the_same_latent_in_the_index_in_training_and_in_evaluation(tiny):
    """Bit for bit: the index's VAE encoder (given the pipeline, or its vae/ as a job passes it;
    training and evaluation read their latents from the index) and the latent rule; the item cache
    keeps it rounded to fp16 (what training reads, and evaluation for its held-out items)."""
    from retrack.models.encoders import EncoderSpec, build_encoder

    _, path = tiny
    model = sd.load_sd_model(path)  # what a training worker and an evaluation task hold
    images = np.random.default_rng(1).integers(0, 256, (6, 12, 12, 1), dtype=np.uint8)  # grey, resized to 16
    ids = [f"img-{n:06d}" for n in range(6)]
    training = encode_latents(model.vae, images, [item_seed(i) for i in ids], model.resolution).numpy()
    assert training.shape == (6, 4, 8, 8)
    for model_dir in (path, path / "vae"):
        index = build_encoder(EncoderSpec(kind="vae", model_dir=str(model_dir)))(images, ids)
        assert np.array_equal(index, training.reshape(6, -1))
    # The VAE samples, shifts and scales as diffusers' SD training scripts do.
    from retrack.models.latents import sd_pixels

    generators = [torch.Generator().manual_seed(item_seed(i)) for i in ids]
    with torch.no_grad():
        want = model.vae.encode(sd_pixels(images, 16)).latent_dist.sample(generator=generators) * model.vae.config.scaling_factor
    assert np.array_equal(want.numpy(), training)
    # What the item cache keeps: the same latent, rounded to fp16.
    part = {"image": images, "seed": np.array([item_seed(i) for i in ids]), "caption": np.array(["a digit"] * 6, dtype=object)}
    cached, _ = encode_sd_items(model.vae, model.text_encoder, model.tokenizer, part, model.resolution)
    assert cached.dtype == np.float16 and np.array_equal(cached, training.astype(np.float16))


def test_the_item_cache_keeps_encodings_under_the_corpus_and_the_encoders(tiny, tmp_path):
    """Parts written whole, read back bit for bit by id, found by id; another corpus, another VAE
    or another resolution is another key; encodings of the wrong shape are refused."""
    _, path = tiny
    root = Location.parse(tmp_path / "cache")
    cache = ItemCache.for_model(root, "corpus-a", path, 16)
    assert cache.latent_shape == (4, 8, 8) and cache.cond_shape == (77, 32) and cache.parts() == []
    rng = np.random.default_rng(0)
    latents, conds = rng.standard_normal((3, 4, 8, 8)), rng.standard_normal((3, 77, 32))
    part = cache.write(["a", "b", "c"], latents, conds)
    assert cache.parts() == [part]
    assert cache.ids_in(part) == ["a", "b", "c"]
    ids, got_latents, got_conds = cache.read(part, ["c", "a"])
    assert ids == ["a", "c"]
    assert np.array_equal(got_latents, latents[[0, 2]].astype(np.float16)) and np.array_equal(got_conds, conds[[0, 2]].astype(np.float16))
    # A forgotten item leaves the cache: the part is rewritten without it, the old one removed.
    rest = cache.drop(part, ["b"])
    assert cache.parts() == [rest] and cache.ids_in(rest) == ["a", "c"]
    assert np.array_equal(cache.read(rest, ["c"])[1], got_latents[1:])
    assert cache.drop(rest, ["a", "c"]) is None and cache.parts() == []
    with pytest.raises(ValueError, match="do not fit"):
        cache.write(["d"], latents[:1, :, :4], conds[:1])
    assert ItemCache.for_model(root, "corpus-a", path, 16).root == cache.root
    other_vae = tmp_path / "other"
    shutil.copytree(path, other_vae)
    weights = other_vae / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    for other in (ItemCache.for_model(root, "corpus-b", path, 16), ItemCache.for_model(root, "corpus-a", other_vae, 16),
                  ItemCache.for_model(root, "corpus-a", path, 32)):
        assert other.root != cache.root and other.parts() == []


def test_index_encoder_resolution_comes_from_the_pipeline(tiny):
    from retrack.models.encoders import EncoderSpec

    _, path = tiny
    assert EncoderSpec(kind="vae", model_dir=str(path / "vae")).vae_geometry() == (path / "vae", 16)
    assert EncoderSpec(kind="vae", model_dir=str(path)).digest() == EncoderSpec(kind="vae", model_dir=str(path / "vae")).digest()
    with pytest.raises(InputError, match="resolution 32 was given, but the model .* denoises 16x16"):
        EncoderSpec(kind="vae", model_dir=str(path), resolution=32).vae_geometry()


def test_conditional_denoiser_takes_ids_or_embeddings(tiny):
    model, _ = tiny
    ids = clip.tokenize(model.tokenizer, ["digit three", "digit seven"])
    emb = sd.encode_captions(model.text_encoder, ids)
    assert emb.shape == (2, 77, 32)
    den = sd.ConditionalDenoiser(model.unet, model.text_encoder)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    with torch.no_grad():
        assert torch.allclose(den(x, t, ids), den(x, t, emb), atol=1e-6)
    with pytest.raises(Exception, match="conditioning"):
        den(x, t, None)


def test_finetuned_unet_replaces_only_the_unet(tiny, tmp_path):
    model, path = tiny
    unet = sd.load_sd_model(path).unet
    with torch.no_grad():
        next(unet.parameters()).add_(1.0)
    out = tmp_path / "out"
    digest = sd.save_finetuned_unet(unet, path, out, metadata={"note": "test"})
    meta = json.loads((out / sd.DIGEST_FILE).read_text())
    assert meta["sha256"] == digest and meta["note"] == "test"
    for part in ("vae", "text_encoder", "tokenizer", "scheduler"):
        assert directory_digest(out / part) == directory_digest(path / part)
    assert directory_digest(out / "unet") != directory_digest(path / "unet")
    reloaded = sd.load_sd_model(out)
    assert torch.equal(next(reloaded.unet.parameters()), next(unet.parameters()))


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_the_unlearned_model_loads_as_a_plain_pipeline_whatever_the_parents_variant(tiny, tmp_path, variant):
    """SD checkpoints commonly ship as the fp16 variant (`save_pretrained(..., variant="fp16")`):
    the output still loads with a plain `from_pretrained(out)` and generates, and with the
    parent's variant too; the frozen components keep the parent's tensors."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    _, path = tiny
    parent = tmp_path / "parent"
    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.to(torch.float16 if variant else torch.float32).save_pretrained(parent, variant=variant, safe_serialization=True)
    unet = sd.load_sd_model(parent).unet
    with torch.no_grad():
        next(unet.parameters()).add_(0.5)
    out = tmp_path / "out"
    sd.save_finetuned_unet(unet, parent, out)
    for cls in (StableDiffusionPipeline, DiffusionPipeline):
        loaded = cls.from_pretrained(out)
        assert torch.equal(next(loaded.unet.parameters()), next(unet.parameters()))
        images = loaded("a handwritten digit 3", num_inference_steps=2, height=16, width=16, guidance_scale=1.0, output_type="np").images
        assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()
    if variant:
        as_shipped = StableDiffusionPipeline.from_pretrained(out, variant=variant, torch_dtype=torch.float16)
        assert as_shipped.unet.dtype == torch.float16
        assert torch.equal(next(as_shipped.unet.parameters()), next(unet.parameters()).half())
        assert torch.equal(next(as_shipped.vae.parameters()), next(pipe.vae.parameters()))
