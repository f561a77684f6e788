"""PNG sample grids. Samples that look like a forgotten item are redacted (grey tile): a report
must never show forgotten content, and the original model does generate it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

REDACTED = 0.5


def grid(samples01: np.ndarray, redact: np.ndarray | None = None, ncol: int = 8, scale: int = 4, pad: int = 1) -> np.ndarray:
    """NxCxHxW [0, 1] -> uint8 grid image (HxW or HxWx3), `redact[i]` tiles greyed out."""
    x = samples01.copy()
    if redact is not None:
        x[redact] = REDACTED
    n, c, h, w = x.shape
    nrow = -(-n // ncol)
    canvas = np.ones((c, nrow * (h + pad) + pad, ncol * (w + pad) + pad), np.float32)
    for i in range(n):
        r, k = divmod(i, ncol)
        canvas[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w] = x[i]
    img = (np.clip(canvas, 0, 1) * 255).round().astype(np.uint8)
    img = img.repeat(scale, axis=1).repeat(scale, axis=2)
    return img[0] if c == 1 else img.transpose(1, 2, 0)


def save_before_after(before01: np.ndarray, after01: np.ndarray, redact: np.ndarray, path: str | Path, ncol: int = 8) -> Path:
    """Same-seed samples side by side: original on the left, unlearned on the right."""
    left, right = grid(before01, redact, ncol), grid(after01, redact, ncol)
    gap = np.full((left.shape[0], 12) + left.shape[2:], 255, np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate([left, gap, right], axis=1)).save(path)
    return path
