"""The embedded benchmark: a corpus with a planted forget set, built from data shipped in a package.

Construction of the paper's MNIST + T-shirt setting: ONE image is copied to a few percent of the
corpus, so the original model memorises it and a model retrained without it does not. The image
chosen is the most isolated one (largest distance to its nearest other image), so a sample close
to it is unambiguously a copy, never a look-alike from the retained data. A held-out split (not
in the corpus) gives the non-member reference for membership tests.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from retrack.data.corpus import encode_image, write_shards
from retrack.digest import sha256_bytes

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
INFO_FILE = "benchmark.json"


@dataclass
class BenchmarkInfo:
    name: str
    image_size: int
    channels: int
    corpus_size: int
    forget_count: int
    holdout_size: int
    copy_fraction: float
    forget_threshold: float  # L2 in [0, 1] pixels, flattened, under which a sample is a copy
    forget_image_sha256: str  # digest of the planted image's PNG, never the image itself

    @classmethod
    def load(cls, root: str | Path) -> "BenchmarkInfo":
        return cls(**json.loads((Path(root) / INFO_FILE).read_text()))


@dataclass
class BenchmarkPaths:
    root: Path

    @property
    def corpus(self) -> Path:
        return self.root / "corpus"

    @property
    def holdout(self) -> Path:
        return self.root / "holdout"

    @property
    def forget_ids(self) -> Path:
        return self.root / "forget_ids.txt"

    @property
    def info(self) -> Path:
        return self.root / INFO_FILE

    def complete(self) -> bool:
        return self.info.is_file() and (self.corpus / "_SUCCESS").is_file() and (self.holdout / "_SUCCESS").is_file()


def load_digits_u8() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.round(d.images * (255.0 / 16.0)).astype(np.uint8), d.target.astype(np.int64)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist_available(root: Path = FASHION_MNIST_DIR) -> bool:
    return bool(list(root.glob("train-images-idx3-ubyte*")))


def load_fashion_mnist_u8(root: Path = FASHION_MNIST_DIR, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    images = _read_idx(next(root.glob("train-images-idx3-ubyte*")))
    labels = _read_idx(next(root.glob("train-labels-idx1-ubyte*"))).astype(np.int64)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def most_isolated(images_u8: np.ndarray) -> tuple[int, float]:
    """Index of the image farthest from its nearest neighbour, and that distance ([0, 1] pixels)."""
    from retrack.index.exact import exact_knn

    x = images_u8.reshape(len(images_u8), -1).astype(np.float32) / 255.0
    dist, _ = exact_knn(x, x, 2)  # column 0 is the image itself
    nn = dist[:, 1]
    best = int(np.argmax(nn))
    return best, float(nn[best])


def build_benchmark(
    root: str | Path,
    images_u8: np.ndarray,
    labels: np.ndarray,
    name: str,
    copy_fraction: float = 0.03,
    holdout_fraction: float = 0.1,
    seed: int = 0,
) -> BenchmarkInfo:
    paths = BenchmarkPaths(Path(root))
    rng = np.random.default_rng(seed)
    planted, nn_dist = most_isolated(images_u8)
    others = np.setdiff1d(np.arange(len(images_u8)), [planted])
    rng.shuffle(others)
    n_hold = int(round(holdout_fraction * len(others)))
    holdout, retained = others[:n_hold], others[n_hold:]
    # copies / (retained + copies) = copy_fraction; the original image is one of the copies.
    n_copies = max(1, int(round(copy_fraction * len(retained) / (1.0 - copy_fraction))))
    members = np.concatenate([retained, np.full(n_copies, planted)])
    order = rng.permutation(len(members))
    ids = [f"img-{n:06d}" for n in range(len(members))]
    forget_ids = [ids[n] for n, src in enumerate(members[order]) if src == planted]

    def rows(indices, id_list):
        for item_id, src in zip(id_list, indices):
            yield {"id": item_id, "image": encode_image(_squeeze(images_u8[src])), "label": int(labels[src])}

    write_shards(paths.corpus, rows(members[order], ids))
    write_shards(paths.holdout, rows(holdout, [f"holdout-{n:06d}" for n in range(len(holdout))]))
    paths.forget_ids.write_text("\n".join(forget_ids) + "\n")
    h, w = images_u8.shape[1:3]
    info = BenchmarkInfo(
        name=name,
        image_size=int(h),
        channels=1 if images_u8.ndim == 3 else int(images_u8.shape[3]),
        corpus_size=len(members),
        forget_count=len(forget_ids),
        holdout_size=len(holdout),
        copy_fraction=n_copies / len(members),
        forget_threshold=0.5 * nn_dist,
        forget_image_sha256=sha256_bytes(encode_image(_squeeze(images_u8[planted]))),
    )
    paths.info.write_text(json.dumps(asdict(info), indent=2))
    return info


def _squeeze(img: np.ndarray) -> np.ndarray:
    return img[:, :, 0] if img.ndim == 3 and img.shape[2] == 1 else img


SCENARIOS = {
    "digits": dict(loader=load_digits_u8, copy_fraction=0.03),
    # 10k images keep pretraining within CPU minutes; same construction, 28x28.
    "fashion-mnist": dict(loader=lambda: load_fashion_mnist_u8(limit=10_000), copy_fraction=0.02),
}


def ensure_benchmark(root: str | Path, scenario: str = "digits", seed: int = 0) -> BenchmarkInfo:
    """Build the scenario under `root` unless a complete copy is already there."""
    paths = BenchmarkPaths(Path(root))
    if paths.complete():
        return BenchmarkInfo.load(root)
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; known: {sorted(SCENARIOS)}")
    if scenario == "fashion-mnist" and not fashion_mnist_available():
        raise FileNotFoundError(f"Fashion-MNIST files not found under {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)")
    spec = SCENARIOS[scenario]
    images, labels = spec["loader"]()
    return build_benchmark(root, images, labels, name=scenario, copy_fraction=spec["copy_fraction"], seed=seed)
