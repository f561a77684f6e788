"""Stable Diffusion support: tiny models built from configs, checked load/save of a diffusers
directory (safetensors only), caption and VAE-latent encoding, and the conditional denoiser.

Only the UNet (`UNet2DConditionModel`) is fine-tuned; the VAE and the CLIP text encoder stay
frozen. Every item is conditioned on its own caption. Latents are drawn from the VAE posterior
(`latent_dist.sample() * scaling_factor`) with a generator keyed by the item's id, so an item
has the same latent in the neighbour search, on every worker and in every run.

Nothing is downloaded: real weights come from a local directory (or an object-store URI copied to
a local cache first, see `local_model_dir`); the tokenizer of the tiny test models is built from
the CLIP BPE vocabulary file that ships inside the `open_clip_torch` package.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from functools import lru_cache
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from retrack.errors import InputError, ModelLayoutError, StorageError
from retrack.models.pixel import DIGEST_FILE, write_model_dir

if TYPE_CHECKING:  # diffusers / transformers load lazily: importing them costs seconds
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

PIPELINE_CLASS = "StableDiffusionPipeline"
TEXT_WEIGHTS_FILE = "model.safetensors"
CLIP_CONTEXT_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# The CLIP BPE vocabulary: 256 byte symbols, their end-of-word forms, then the first
# 49152 - 256 - 2 merges of the file, then the two special tokens (49408 entries in all).
CLIP_NUM_MERGES = 49152 - 256 - 2
MODEL_INDEX = "model_index.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # as retrack.models


def _read_json(path: Path, what: str) -> dict:
    from retrack.models.pixel import _read_json as read

    return read(path, what)


# --------------------------------------------------------------------------- tokenizer


def open_clip_bpe_path() -> Path:
    """The BPE vocabulary file shipped in `open_clip_torch`, found without importing open_clip
    (its import pulls torchvision, which cannot be installed next to the CPU torch build here)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("open_clip_torch is not installed; install it with `pip install --no-deps open_clip_torch`")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise InputError(f"{path} is missing from the open_clip_torch package")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map of the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def clip_vocab_from_bpe(bpe_path: str | Path | None = None) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of the CLIP tokenizer, derived from the BPE merges file as CLIP does."""
    path = Path(bpe_path) if bpe_path is not None else open_clip_bpe_path()
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = lines[1 : CLIP_NUM_MERGES + 1]  # line 0 is a version header
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(m.split()) for m in merges]
    vocab += [BOS, EOS]
    return {tok: n for n, tok in enumerate(vocab)}, merges


def write_clip_tokenizer_files(out_dir: str | Path, bpe_path: str | Path | None = None) -> Path:
    """Write `vocab.json` and `merges.txt` (the files a diffusers `tokenizer/` folder holds)."""
    vocab, merges = clip_vocab_from_bpe(bpe_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return out


@lru_cache(maxsize=2)
def _cached_vocab(bpe_path: str | None) -> tuple[dict[str, int], list[str]]:
    return clip_vocab_from_bpe(bpe_path)


def _write_vocab_files(out: Path, tokenizer) -> None:
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (out / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def clip_tokenizer(bpe_path: str | Path | None = None) -> CLIPTokenizer:
    """A real `CLIPTokenizer` (49408 tokens, 77 positions) built offline from the BPE vocabulary."""
    from transformers import CLIPTokenizer

    vocab, merges = _cached_vocab(str(bpe_path) if bpe_path is not None else None)
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=CLIP_CONTEXT_LENGTH)


def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """Token ids [N, 77]: padded and truncated to the encoder's context like SD's training."""
    out = tokenizer(
        [c or "" for c in captions],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return out.input_ids


# --------------------------------------------------------------------------- models


@dataclass
class StableDiffusion:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDPMScheduler

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """Pixel side length the UNet's sample size corresponds to."""
        size = self.unet.config.sample_size
        return (size if isinstance(size, int) else size[0]) * self.vae_scale_factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.resolution // self.vae_scale_factor
        return (self.unet.config.in_channels, size, size)

    def freeze_encoders(self) -> None:
        for module in (self.vae, self.text_encoder):
            module.requires_grad_(False)
            module.eval()

    def to(self, device) -> "StableDiffusion":
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device)
        return self


def sd_scheduler() -> DDPMScheduler:
    """Stable Diffusion v1's training schedule (scaled-linear betas, epsilon prediction)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


def tiny_sd(resolution: int = 16, seed: int = 0, bpe_path: str | Path | None = None) -> StableDiffusion:
    """A ~3M-parameter Stable Diffusion with SD's structure, for tests: VAE halving the resolution
    into 4 latent channels, a 2-layer CLIP text encoder over the real 49408-token vocabulary and a
    cross-attention UNet."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=resolution,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=CLIP_CONTEXT_LENGTH,
            projection_dim=32,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=resolution // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    model = StableDiffusion(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(bpe_path), scheduler=sd_scheduler())
    model.freeze_encoders()
    return model


# --------------------------------------------------------------------------- layout checks


def model_kind(path: str | Path) -> str:
    """'pixel' (a DDPM pipeline with a UNet2DModel) or 'sd' (a Stable Diffusion pipeline);
    anything else is refused with what was found."""
    root = Path(path)
    if not root.is_dir():
        raise ModelLayoutError(f"model directory {root} does not exist")
    unet_cfg = root / "unet" / "config.json"
    if not unet_cfg.is_file():
        found = sorted(p.name for p in root.iterdir())
        hint = ""
        if (root / "config.json").is_file():
            cls = _read_json(root / "config.json", "model").get("_class_name") or "unknown"
            hint = f" (it looks like a single {cls} component, not a pipeline)"
        raise ModelLayoutError(f"{root} is not a diffusers pipeline directory: no unet/config.json{hint}; found {found or 'nothing'}")
    cls = _read_json(unet_cfg, "UNet").get("_class_name")
    if cls == "UNet2DModel":
        return "pixel"
    if cls == "UNet2DConditionModel":
        return "sd"
    raise ModelLayoutError(
        f"{root}/unet is a {cls or 'model without _class_name'}; expected a diffusers UNet2DModel (pixel DDPM) "
        "or UNet2DConditionModel (Stable Diffusion)"
    )


def _weights(folder: Path, names: Sequence[str]) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise ModelLayoutError(
        f"{folder} has no {' or '.join(names)} (found: {found or 'nothing'}); only safetensors weights are loaded"
    )


def _variant(weights: Path) -> str | None:
    parts = weights.name.split(".")
    return parts[-2] if len(parts) == 3 else None


def check_sd_model_dir(path: str | Path) -> dict[str, str | None]:
    """Refuse anything but a diffusers Stable Diffusion directory with safetensors weights.
    Returns the weights variant ('fp16' or None) of each trainable/frozen component."""
    root = Path(path)
    kind = model_kind(root)
    if kind != "sd":
        raise ModelLayoutError(f"{root} holds a pixel-space DDPM (UNet2DModel), not a Stable Diffusion pipeline")
    index = _read_json(root / MODEL_INDEX, "Stable Diffusion pipeline")
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if part not in index or not (root / part).is_dir():
            raise ModelLayoutError(f"{root}: the pipeline has no {part}/ component (model_index.json lists {sorted(k for k in index if not k.startswith('_'))})")
    vae_cls = _read_json(root / "vae" / "config.json", "VAE").get("_class_name")
    if vae_cls != "AutoencoderKL":
        raise ModelLayoutError(f"{root}/vae is {vae_cls!r}, expected AutoencoderKL")
    text_cfg = _read_json(root / "text_encoder" / "config.json", "text encoder")
    if "CLIPTextModel" not in (text_cfg.get("architectures") or []):
        raise ModelLayoutError(f"{root}/text_encoder is {text_cfg.get('architectures')}, expected CLIPTextModel")
    tok = root / "tokenizer"
    if not ((tok / "vocab.json").is_file() and (tok / "merges.txt").is_file()) and not (tok / "tokenizer.json").is_file():
        raise ModelLayoutError(f"{tok} has neither vocab.json + merges.txt nor tokenizer.json")
    sched = _read_json(root / "scheduler" / "scheduler_config.json", "scheduler")
    if sched.get("prediction_type", "epsilon") != "epsilon":
        raise ModelLayoutError(f"{root}/scheduler predicts {sched.get('prediction_type')!r}; retrack's losses need 'epsilon'")
    variants = {
        "unet": _variant(_weights(root / "unet", [WEIGHTS_FILE, "diffusion_pytorch_model.fp16.safetensors"])),
        "vae": _variant(_weights(root / "vae", [WEIGHTS_FILE, "diffusion_pytorch_model.fp16.safetensors"])),
        "text_encoder": _variant(_weights(root / "text_encoder", [TEXT_WEIGHTS_FILE, "model.fp16.safetensors"])),
    }
    return variants


def local_model_dir(uri: str | Path, cache_dir: str | Path | None = None, endpoint: str | None = None, s3=None) -> Path:
    """A local directory for a model given as a local path or an s3:// URI (endpoint and
    credentials from `endpoint` / the AWS_* environment, see retrack.storage). Remote directories
    are copied once into `cache_dir` (keyed by the URI) and reused."""
    text = str(uri)
    if "://" not in text:
        return Path(text)
    import pyarrow.fs as pafs

    from retrack.storage.location import Location

    if not text.startswith("s3://"):
        raise InputError(f"model directory {text}: only local paths and s3:// URIs are supported")

    cache = Path(cache_dir or Path(tempfile.gettempdir()) / "retrack-models")
    dest = cache / hashlib.sha256(text.encode()).hexdigest()[:16]
    marker = dest / ".complete"
    if marker.is_file():
        return dest
    try:
        loc = Location.parse(text, endpoint=endpoint, s3=s3)
        fs, remote = loc.fs, loc.path
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".download.", dir=cache))
        pafs.copy_files(remote, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    except (OSError, ValueError) as exc:
        raise StorageError(f"cannot copy model directory {text}: {exc}") from None
    (tmp / ".complete").write_text(text)
    if marker.is_file():  # another process on this node finished the same copy meanwhile: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    try:
        os.replace(tmp, dest)
    except OSError:
        if not marker.is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # lost the race to a complete copy
    return dest


def load_sd_model(path: str | Path, device: str | torch.device = "cpu") -> StableDiffusion:
    """Load a Stable Diffusion directory (diffusers layout, safetensors only), encoders frozen,
    every weight upcast to fp32 (fp32 master weights; autocast handles reduced precision)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(path)
    variants = check_sd_model_dir(root)
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", use_safetensors=True, variant=variants["unet"])
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", use_safetensors=True, variant=variants["vae"])
    text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", use_safetensors=True, variant=variants["text_encoder"])
    tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler")
    model = StableDiffusion(unet=unet.float(), vae=vae.float(), text_encoder=text_encoder.float(), tokenizer=tokenizer, scheduler=scheduler)
    model.freeze_encoders()
    return model.to(device)


def _model_index() -> dict:
    import diffusers

    return {
        "_class_name": PIPELINE_CLASS,
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def save_sd_model(model: StableDiffusion, path: str | Path, metadata: dict | None = None) -> str:
    """Write a whole Stable Diffusion directory (diffusers layout, safetensors) atomically; returns its digest."""

    def fill(tmp: Path) -> None:
        model.unet.save_pretrained(tmp / "unet", safe_serialization=True)
        model.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        model.text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        model.tokenizer.save_pretrained(tmp / "tokenizer")
        if not (tmp / "tokenizer" / "vocab.json").is_file():
            # transformers 5 writes tokenizer.json only; keep the classic files for older readers.
            _write_vocab_files(tmp / "tokenizer", model.tokenizer)
        model.scheduler.save_pretrained(tmp / "scheduler")
        (tmp / MODEL_INDEX).write_text(json.dumps(_model_index(), indent=2, sort_keys=True))

    return write_model_dir(path, fill, metadata)


def save_finetuned_unet(unet: UNet2DConditionModel, base_dir: str | Path, path: str | Path, metadata: dict | None = None) -> str:
    """A copy of the base Stable Diffusion directory with its UNet replaced by `unet` (every frozen
    component, safety checker and feature extractor included, is kept byte for byte)."""
    base = Path(base_dir)
    check_sd_model_dir(base)

    def fill(tmp: Path) -> None:
        for entry in base.iterdir():
            if entry.name in ("unet", DIGEST_FILE) or entry.name.startswith("."):
                continue
            if entry.is_dir():
                shutil.copytree(entry, tmp / entry.name)
            else:
                shutil.copy2(entry, tmp / entry.name)
        unet.save_pretrained(tmp / "unet", safe_serialization=True)

    return write_model_dir(path, fill, metadata)


# --------------------------------------------------------------------------- encoding


def item_seed(item_id: str) -> int:
    """A 63-bit seed derived from an item's id: the item's latent sample never depends on batching."""
    return int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:8], "big") >> 1


def to_sd_pixels(images_u8: np.ndarray, resolution: int) -> torch.Tensor:
    """uint8 NxHxWxC (grey or RGB) -> float32 Nx3xRxR in [-1, 1], resized when the sizes differ."""
    from PIL import Image

    out = []
    for img in images_u8:
        if img.ndim == 3 and img.shape[2] == 1:
            img = img[:, :, 0]
        pil = Image.fromarray(img).convert("RGB")
        if pil.size != (resolution, resolution):
            pil = pil.resize((resolution, resolution), Image.BICUBIC)
        out.append(np.asarray(pil))
    arr = np.stack(out).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.transpose(0, 3, 1, 2).copy())


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, pixels: torch.Tensor, seeds: Sequence[int], chunk: int = 16) -> torch.Tensor:
    """`latent_dist.sample() * scaling_factor` (minus the shift where the VAE has one), each item's
    sample drawn from its own seed."""
    if len(seeds) != len(pixels):
        raise ValueError(f"{len(pixels)} images but {len(seeds)} seeds")
    device = next(vae.parameters()).device
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    out = []
    for start in range(0, len(pixels), chunk):
        x = pixels[start : start + chunk].to(device=device, dtype=next(vae.parameters()).dtype)
        dist = vae.encode(x).latent_dist
        noise = torch.stack(
            [torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in seeds[start : start + chunk]]
        ).to(device=device, dtype=dist.mean.dtype)
        out.append(((dist.mean + dist.std * noise - shift) * scale).float().cpu())
    return torch.cat(out) if out else torch.zeros((0,))


@torch.no_grad()
def encode_captions(text_encoder: CLIPTextModel, token_ids: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """The text encoder's last hidden states [N, 77, D]: the UNet's cross-attention conditioning."""
    device = next(text_encoder.parameters()).device
    out = [text_encoder(token_ids[s : s + chunk].to(device))[0].float().cpu() for s in range(0, len(token_ids), chunk)]
    return torch.cat(out) if out else torch.zeros((0,))


class ConditionalDenoiser:
    """eps_theta(x_t, t, c) for the methods: `c` is either encoder hidden states (float) or
    token ids (int), which are encoded with the frozen text encoder first."""

    def __init__(self, unet: torch.nn.Module, text_encoder: CLIPTextModel | None = None):
        self.unet = unet
        self.text_encoder = text_encoder

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is None:
            raise InputError("a Stable Diffusion UNet needs text conditioning for every item; the batch has none")
        if not cond.is_floating_point():
            if self.text_encoder is None:
                raise InputError("token ids were given but the denoiser has no text encoder")
            with torch.no_grad():
                cond = self.text_encoder(cond)[0]
        return self.unet(x, t, encoder_hidden_states=cond).sample
