"""Stable Diffusion models: the model bundle, tiny models built from configs for tests, the checks
of a diffusers pipeline directory (safetensors only), checked load and save, caption encoding and
the conditional denoiser the methods call.

Only the UNet (`UNet2DConditionModel`) is fine-tuned; the VAE and the CLIP text encoder stay
frozen. Every item is conditioned on its own caption; its latent follows the one rule of
`retrack.models.latents`. Nothing is downloaded: weights come from a local directory (an s3://
model is copied to the node's cache first, see `retrack.storage.cache`), and the tiny models'
tokenizer is built offline (`retrack.models.clip`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from retrack.config.model_kind import ModelKind
from retrack.errors import InputError, ModelLayoutError
from retrack.models.clip import CLIP_CONTEXT_LENGTH, clip_tokenizer, write_tokenizer_vocab_files
from retrack.models.pixel import DIGEST_FILE, WEIGHTS_FILE, read_json, write_model_dir

if TYPE_CHECKING:  # diffusers / transformers load lazily: importing them costs seconds
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

PIPELINE_CLASS = "StableDiffusionPipeline"
TEXT_WEIGHTS_FILE = "model.safetensors"
FP16_WEIGHTS_FILE = "diffusion_pytorch_model.fp16.safetensors"
MODEL_INDEX = "model_index.json"


def sd_resolution(unet_config: Mapping, vae_config: Mapping) -> int:
    """Pixel side length the UNet's sample size corresponds to (the VAE halves it per level)."""
    size = unet_config["sample_size"]
    return (size if isinstance(size, int) else size[0]) * 2 ** (len(vae_config["block_out_channels"]) - 1)


def pipeline_resolution(path: str | Path) -> int:
    """`sd_resolution` of a Stable Diffusion directory, read from its configs (no weights loaded)."""
    root = Path(path)
    return sd_resolution(read_json(root / "unet" / "config.json", "UNet"), read_json(root / "vae" / "config.json", "VAE"))


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
        return sd_resolution(self.unet.config, self.vae.config)

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


def model_kind(path: str | Path) -> ModelKind:
    """The kind of a diffusers pipeline directory, read from its UNet's class; anything else is
    refused with what was found."""
    root = Path(path)
    if not root.is_dir():
        raise ModelLayoutError(f"model directory {root} does not exist")
    unet_cfg = root / "unet" / "config.json"
    if not unet_cfg.is_file():
        found = sorted(p.name for p in root.iterdir())
        hint = ""
        if (root / "config.json").is_file():
            cls = read_json(root / "config.json", "model").get("_class_name") or "unknown"
            hint = f" (it looks like a single {cls} component, not a pipeline)"
        raise ModelLayoutError(f"{root} is not a diffusers pipeline directory: no unet/config.json{hint}; found {found or 'nothing'}")
    cls = read_json(unet_cfg, "UNet").get("_class_name")
    if cls == "UNet2DModel":
        return ModelKind.PIXEL_DDPM
    if cls == "UNet2DConditionModel":
        return ModelKind.STABLE_DIFFUSION
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
    if kind is not ModelKind.STABLE_DIFFUSION:
        raise ModelLayoutError(f"{root} holds a pixel-space DDPM (UNet2DModel), not a Stable Diffusion pipeline")
    index = read_json(root / MODEL_INDEX, "Stable Diffusion pipeline")
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if part not in index or not (root / part).is_dir():
            raise ModelLayoutError(f"{root}: the pipeline has no {part}/ component (model_index.json lists {sorted(k for k in index if not k.startswith('_'))})")
    vae_cls = read_json(root / "vae" / "config.json", "VAE").get("_class_name")
    if vae_cls != "AutoencoderKL":
        raise ModelLayoutError(f"{root}/vae is {vae_cls!r}, expected AutoencoderKL")
    text_cfg = read_json(root / "text_encoder" / "config.json", "text encoder")
    if "CLIPTextModel" not in (text_cfg.get("architectures") or []):
        raise ModelLayoutError(f"{root}/text_encoder is {text_cfg.get('architectures')}, expected CLIPTextModel")
    tok = root / "tokenizer"
    if not ((tok / "vocab.json").is_file() and (tok / "merges.txt").is_file()) and not (tok / "tokenizer.json").is_file():
        raise ModelLayoutError(f"{tok} has neither vocab.json + merges.txt nor tokenizer.json")
    sched = read_json(root / "scheduler" / "scheduler_config.json", "scheduler")
    if sched.get("prediction_type", "epsilon") != "epsilon":
        raise ModelLayoutError(f"{root}/scheduler predicts {sched.get('prediction_type')!r}; retrack's losses need 'epsilon'")
    variants = {
        "unet": _variant(_weights(root / "unet", [WEIGHTS_FILE, FP16_WEIGHTS_FILE])),
        "vae": _variant(_weights(root / "vae", [WEIGHTS_FILE, FP16_WEIGHTS_FILE])),
        "text_encoder": _variant(_weights(root / "text_encoder", [TEXT_WEIGHTS_FILE, "model.fp16.safetensors"])),
    }
    return variants


def load_vae(folder: str | Path) -> AutoencoderKL:
    """A VAE folder (a pipeline's `vae/`, or a bare AutoencoderKL), safetensors only, upcast to
    fp32 and frozen: the VAE every latent is encoded with, in training as in the index."""
    from diffusers import AutoencoderKL

    folder = Path(folder)
    variant = _variant(_weights(folder, [WEIGHTS_FILE, FP16_WEIGHTS_FILE]))
    try:
        vae = AutoencoderKL.from_pretrained(folder, use_safetensors=True, variant=variant)
    except (OSError, ValueError) as exc:
        raise ModelLayoutError(f"{folder} is not a diffusers AutoencoderKL folder: {exc}") from None
    return vae.float().eval().requires_grad_(False)


def load_sd_unet(path: str | Path, device: str | torch.device = "cpu") -> tuple[UNet2DConditionModel, DDPMScheduler]:
    """The UNet (upcast to fp32: fp32 master weights; autocast handles reduced precision) and the
    noise scheduler of a Stable Diffusion directory: all a training worker loads, its items
    arriving encoded (`retrack.data.item_cache`)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    root = Path(path)
    variants = check_sd_model_dir(root)
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", use_safetensors=True, variant=variants["unet"])
    return unet.float().to(device), DDPMScheduler.from_pretrained(root, subfolder="scheduler")


def load_sd_text_encoder(path: str | Path, device: str | torch.device = "cpu") -> tuple[CLIPTextModel, CLIPTokenizer]:
    """The frozen text encoder (fp32) and the tokenizer of a Stable Diffusion directory."""
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(path)
    variants = check_sd_model_dir(root)
    text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", use_safetensors=True, variant=variants["text_encoder"])
    text_encoder = text_encoder.float().eval().requires_grad_(False).to(device)
    return text_encoder, CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")


def load_sd_encoders(path: str | Path, device: str | torch.device = "cpu") -> tuple[AutoencoderKL, CLIPTextModel, CLIPTokenizer]:
    """The frozen VAE, text encoder (fp32) and tokenizer of a Stable Diffusion directory."""
    text_encoder, tokenizer = load_sd_text_encoder(path, device)
    return load_vae(Path(path) / "vae").to(device), text_encoder, tokenizer


def load_sd_model(path: str | Path, device: str | torch.device = "cpu") -> StableDiffusion:
    """Load a Stable Diffusion directory (diffusers layout, safetensors only), encoders frozen,
    every weight upcast to fp32."""
    unet, scheduler = load_sd_unet(path, device)
    vae, text_encoder, tokenizer = load_sd_encoders(path, device)
    return StableDiffusion(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


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
            write_tokenizer_vocab_files(tmp / "tokenizer", model.tokenizer)
        model.scheduler.save_pretrained(tmp / "scheduler")
        (tmp / MODEL_INDEX).write_text(json.dumps(_model_index(), indent=2, sort_keys=True))

    return write_model_dir(path, fill, metadata)


def save_finetuned_unet(unet: UNet2DConditionModel, base_dir: str | Path, path: str | Path, metadata: dict | None = None) -> str:
    """A copy of the base Stable Diffusion directory with its UNet replaced by `unet` (every frozen
    component, safety checker and feature extractor included, keeps the base's bytes).

    The copy loads with a plain `from_pretrained(out)` whatever variant the base was shipped as
    (SD checkpoints commonly are `save_pretrained(..., variant="fp16")`): weights that exist only
    as a variant (`*.fp16.safetensors`) are written under the plain name too, in fp32 as plain
    weights are, and the UNet is written plain (fp32) and, when the base's was a variant, as that
    variant in its dtype."""
    from safetensors.torch import save_file

    from retrack.training.precision import DTYPES

    base = Path(base_dir)
    variants = check_sd_model_dir(base)

    def fill(tmp: Path) -> None:
        for entry in base.iterdir():
            if entry.name in ("unet", DIGEST_FILE) or entry.name.startswith("."):
                continue
            if entry.is_dir():
                shutil.copytree(entry, tmp / entry.name)
                _add_plain_weights(tmp / entry.name)
            else:
                shutil.copy2(entry, tmp / entry.name)
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        variant = variants["unet"]
        if variant is not None:
            dtype = DTYPES.get(variant, torch.float32)
            state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in unet.state_dict().items()}
            save_file(state, str(tmp / "unet" / f"diffusion_pytorch_model.{variant}.safetensors"), metadata={"format": "pt"})

    return write_model_dir(path, fill, metadata)


def _add_plain_weights(folder: Path) -> None:
    """Write `<name>.<variant>.safetensors` as plain fp32 `<name>.safetensors` where that is missing,
    and say float32 in the config: transformers loads a component in the dtype its config names
    (an fp16 text encoder beside an fp32 UNet cannot generate)."""
    from safetensors.torch import load_file, save_file

    wrote = False
    for weights in folder.glob("*.*.safetensors"):
        name, _variant_name, ext = weights.name.rsplit(".", 2)
        plain = folder / f"{name}.{ext}"
        if not plain.exists():
            state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
            save_file(state, str(plain), metadata={"format": "pt"})
            wrote = True
    config = folder / "config.json"
    if wrote and config.is_file():
        cfg = json.loads(config.read_text())
        cfg.update({k: "float32" for k in ("dtype", "torch_dtype") if k in cfg})
        config.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


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
