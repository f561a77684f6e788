"""Stable Diffusion support (retrack/models/sd.py): offline CLIP tokenizer, tiny models, layout checks,
latent/caption encoding and saving the fine-tuned UNet. No Ray."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from retrack.models import sd
from retrack.digest import directory_digest
from retrack.errors import ModelLayoutError


@pytest.fixture(scope="module")
def tiny(tiny_sd_dir) -> tuple[sd.StableDiffusion, Path]:
    """The tiny SD built again in memory (same configs and seed) and the saved one."""
    return sd.tiny_sd(16, seed=0), tiny_sd_dir


def test_clip_tokenizer_from_the_open_clip_bpe_matches_clip_ids():
    tok = sd.clip_tokenizer()
    assert len(tok) == 49408
    # The published CLIP ids of this prompt (SD v1 / ViT-L/14 tokenizer).
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    ids = sd.tokenize(tok, ["a photo of a cat", ""])
    assert ids.shape == (2, 77)
    assert ids[1, 0] == 49406 and ids[1, 1] == 49407 and (ids[1, 2:] == 49407).all()  # padded with <|endoftext|>


def test_vocab_files_round_trip(tmp_path):
    sd.write_clip_tokenizer_files(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    merges = (tmp_path / "merges.txt").read_text().splitlines()
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + sd.CLIP_NUM_MERGES
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tmp_path)  # a diffusers tokenizer/ folder with only the two classic files
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_save_load_round_trip_and_layout(tiny):
    model, path = tiny
    assert sd.model_kind(path) == "sd"
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

    assert sd.model_kind(model_dir) == "pixel"
    with pytest.raises(ModelLayoutError, match="pixel-space DDPM"):
        sd.check_sd_model_dir(model_dir)


def test_latents_are_per_item_deterministic(tiny):
    model, _ = tiny
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    z = sd.encode_latents(model.vae, x, [11, 12, 13, 14], chunk=4)
    z_alone = sd.encode_latents(model.vae, x[2:3], [13])
    assert z.shape == (4, 4, 8, 8)
    assert torch.allclose(z[2:3], z_alone, atol=1e-5)  # same item, same seed: same latent whatever the batch
    z_other = sd.encode_latents(model.vae, x[2:3], [99])
    assert not torch.allclose(z_alone, z_other)  # the posterior is sampled, not its mean
    assert sd.item_seed("img-000001") == sd.item_seed("img-000001") != sd.item_seed("img-000002")


def test_conditional_denoiser_takes_ids_or_embeddings(tiny):
    model, _ = tiny
    ids = sd.tokenize(model.tokenizer, ["digit three", "digit seven"])
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
