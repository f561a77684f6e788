"""A small CNN the project trains itself, used as the feature network of the Fréchet distance.

FID needs Inception weights, which cannot be downloaded here (and Inception features of 8x8 grey
digits mean little anyway). A classifier trained on the retained data gives penultimate features
that separate the classes the generator should reproduce; distances between feature statistics of
samples and of real data then measure quality in the same spirit. Weights are stored only as
safetensors next to a JSON config, never pickled.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from retrack.storage.atomic import atomic_directory
from retrack.errors import InputError, ModelLayoutError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CLASS_NAME = "FeatureClassifier"


@dataclass(frozen=True)
class ClassifierConfig:
    image_size: int
    channels: int
    num_classes: int
    feature_dim: int = 64
    width: int = 32


class FeatureClassifier(nn.Module):
    """conv-conv-pool-conv-pool, then a pooled 2x2 grid -> `feature_dim` -> classes.

    The adaptive pool to 2x2 keeps coarse layout (which half of the image holds ink) and makes the
    same architecture work for 8x8 digits and 28x28 (Fashion-)MNIST. Inputs are in model space
    [-1, 1], like the corpus.
    """

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.body = nn.Sequential(
            nn.Conv2d(config.channels, w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * w * 4, config.feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N x feature_dim) of images in [-1, 1]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(
    images_m11: np.ndarray,
    labels: np.ndarray,
    seed: int = 0,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 3e-3,
    holdout_fraction: float = 0.1,
    feature_dim: int = 64,
    width: int = 32,
) -> tuple[FeatureClassifier, float]:
    """Train on all but a seeded held-out slice; return the model (eval mode) and its held-out accuracy.

    The accuracy is the evidence that the features are meaningful: a Fréchet distance computed
    with a classifier that cannot tell the classes apart says little about sample quality.
    """
    if images_m11.ndim != 4 or images_m11.shape[2] != images_m11.shape[3]:
        raise InputError(f"images must be NxCxHxW with H == W, got shape {images_m11.shape}")
    labels = np.asarray(labels)
    if labels.shape != (len(images_m11),) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise InputError(f"labels must be {len(images_m11)} non-negative integers, got {labels.dtype} {labels.shape}")
    if not 0.0 < holdout_fraction < 1.0:
        raise InputError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images_m11))
    n_hold = max(1, int(round(holdout_fraction * len(order))))
    held, train = order[:n_hold], order[n_hold:]
    x = torch.as_tensor(images_m11, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.long)
    config = ClassifierConfig(
        image_size=int(images_m11.shape[2]),
        channels=int(images_m11.shape[1]),
        num_classes=int(labels.max()) + 1,
        feature_dim=feature_dim,
        width=width,
    )
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = FeatureClassifier(config)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model.train()
    for _ in range(steps):
        rows = torch.as_tensor(rng.choice(train, size=min(batch_size, len(train)), replace=False))
        loss = nn.functional.cross_entropy(model(x[rows]), y[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x[held]).argmax(dim=1) == y[held]).float().mean())
    return model, accuracy


def save_classifier(model: FeatureClassifier, path: str | Path) -> None:
    """Write config.json + model.safetensors atomically (temp dir, then rename)."""
    with atomic_directory(path) as tmp:
        config = {"_class_name": CLASS_NAME, **asdict(model.config)}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE))


def _read_config(root: Path) -> ClassifierConfig:
    try:
        raw = json.loads((root / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise ModelLayoutError(f"{root}: missing {CONFIG_FILE}; expected a feature-classifier directory ({CONFIG_FILE} + {WEIGHTS_FILE})") from None
    except json.JSONDecodeError as exc:
        raise ModelLayoutError(f"{root / CONFIG_FILE}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(raw, dict) or raw.get("_class_name") != CLASS_NAME:
        found = raw.get("_class_name") if isinstance(raw, dict) else type(raw).__name__
        raise ModelLayoutError(f"{root / CONFIG_FILE} describes {found!r}, expected {CLASS_NAME!r}")
    raw = {k: v for k, v in raw.items() if k != "_class_name"}
    known = {f.name for f in fields(ClassifierConfig)}
    if set(raw) - known:
        raise ModelLayoutError(f"{root / CONFIG_FILE} has unknown key(s) {sorted(set(raw) - known)}")
    try:
        return ClassifierConfig(**raw)
    except TypeError as exc:
        raise ModelLayoutError(f"{root / CONFIG_FILE}: {exc}") from None


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> FeatureClassifier:
    """Load a directory written by `save_classifier`; anything else raises ModelLayoutError saying why."""
    root = Path(path)
    if not root.is_dir():
        raise ModelLayoutError(f"classifier directory {root} does not exist")
    config = _read_config(root)
    weights = root / WEIGHTS_FILE
    if not weights.is_file():
        others = sorted(p.name for p in root.iterdir() if p.name != CONFIG_FILE)
        raise ModelLayoutError(f"{root} has no {WEIGHTS_FILE} (found: {others or 'nothing'}); only safetensors weights are loaded")
    try:
        state = load_file(str(weights))
    except SafetensorError as exc:
        raise ModelLayoutError(f"{weights}: not a readable safetensors file ({exc})") from None
    model = FeatureClassifier(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelLayoutError(f"{weights} does not match {CONFIG_FILE}: {exc}") from None
    return model.to(device).eval()
