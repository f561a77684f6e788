"""The unlearn stage: any registered method, data-parallel on Ray Train (V2 `TorchTrainer`).

How one job runs
----------------
1. The driver validates everything it can before Ray does any work: model directory layout and
   kind (pixel DDPM or Stable Diffusion, safetensors only), corpus shards, forget ids, method
   parameters, batch / micro-batch / worker arithmetic, that the cluster can place the workers,
   and that an existing run under the same (storage path, run name) belongs to the same config.
2. It plans the data. `BatchDrawer` keys every draw by (seed, step, micro-batch), so the set of
   retained rows the whole run will ever touch is known up front from the sizes alone; it is at
   most steps x batch rows, however large the corpus. Ray Data reads the corpus, keeps those rows
   (each tagged with its global retain index), decodes them, and the result is handed to the
   workers as shards (`get_dataset_shard("retain")`). The forget items and their K neighbours
   (a small set) are a second dataset that every worker receives whole (not split).
3. Workers: micro-batch m of a step belongs to worker m % W. After reading its shard, each worker
   swaps rows with its peers (one broadcast per worker over torch.distributed) so that it holds
   exactly the rows its own micro-batches draw; it then serves them to the unchanged
   `BatchDrawer` through `SparseRows`, which is indexed by the GLOBAL retain index. The draws are
   therefore the single-process draws, whatever W is. Per-loss gradients are summed across
   workers BEFORE the method combines them (step.py's `all_reduce` hook), so EraseDiff's
   projection and SISS's rescaling see the global gradients. Tolerance: W workers reproduce one
   process up to float32 summation order and thread count (and, for Stable Diffusion, the batch
   composition of the frozen VAE / text encoder). Measured on CPU: 1 vs 2 workers gave bitwise
   equal loss curves over 30 steps (benchmarks/results/train.json, world_size_max_abs_loss_diff
   = 0.0) and final weights within ~5e-7 of the single process; the tests assert a relative 1e-4
   on every loss and 1e-4 absolute on every weight.
   Rows a run draws after a resume are fetched again by the relaunched workers (the datasets
   always cover the whole plan; each worker keeps only what the remaining steps draw).
4. DDP wraps the UNet (parameter broadcast from rank 0 at start: replicas cannot drift); its own
   gradient reduction is bypassed with `no_sync()` because the gradients come from
   `torch.autograd.grad` per named loss and are reduced by step.py.
5. Rank 0 writes a checkpoint every `train.checkpoint_every` updates and at the end (UNet
   weights in safetensors, AdamW state, step, loss history, config hash). `FailureConfig`
   restarts a failed worker group from the latest checkpoint; relaunching with the same
   (storage_path, run name) resumes the same way. The run name is `<request id>-<config hash>`;
   a checkpoint whose hash differs is refused. A non-finite loss writes a divergence marker next
   to the checkpoints so that retries and relaunches stop at once; nothing is saved as final.
6. The driver turns the final checkpoint into the output model in diffusers layout (atomic write,
   digest recorded in `retrack_digest.json`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional

import numpy as np
import torch
import typer
from pydantic import Field, model_validator

from retrack.config.train import MethodConfig, StrictModel, TrainConfig
from retrack.data.corpus import check_forget_ids, decode_image, read_forget_ids, shard_paths, to_model_space
from retrack.digest import config_digest, ids_digest, sha256_bytes
from retrack.errors import CheckpointMismatchError, CorpusError, InputError, ModelLayoutError, PlacementError, QualityCollapseError, RetrackError, TrainingDivergedError, UnlearnFailedError, stopped_error
from retrack.methods import DataRequirements, UnlearnBatch, build_method, method_class
from retrack.tuning.search import HEALTH_METRIC, RetainLossRatio

if TYPE_CHECKING:
    from retrack.training.loop import BatchDrawer, UnlearnData

STATE_FILE = "retrack_state.json"
UNET_FILE = "unet.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"  # never a pickle: see retrack.step.save_optimizer_state
RUN_MARKER = "retrack_run.json"
DIVERGED_MARKER = "retrack_diverged.json"
CHECKPOINT_PREFIX = "checkpoint_"

Progress = Callable[[dict], None]


# =========================================================================== settings


class ScalingSettings(StrictModel):
    """Where the workers run. Not part of the config hash: the result does not depend on it."""

    num_workers: int = Field(1, ge=1, description="Data-parallel Ray Train workers.")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL); CPU-only uses gloo.")
    cpus_per_worker: float = Field(1.0, gt=0.0, description="Logical CPUs reserved per worker (fractions allowed).")
    allow_tf32: bool = Field(True, description="TF32 matmuls/convolutions on Ampere+ GPUs (ignored on CPU).")
    fp16_loss_scale: float = Field(1024.0, gt=0.0, description="Static loss scale for fp16 autocast (bf16 needs none).")


class UnlearnRequest(StrictModel):
    """One unlearning job of the unlearn stage."""

    request_id: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="Deletion request id; names the run.")
    model_dir: str = Field(..., description="Diffusers directory (pixel DDPM or Stable Diffusion), local or s3://.")
    model_kind: Literal["auto", "pixel", "sd"] = Field("auto", description="Expected model kind; 'auto' detects it.")
    corpus_dir: str = Field(..., description="Directory of parquet shards (id, image[, caption]).")
    forget_ids_file: Optional[str] = Field(None, description="File with one forget id a line.")
    forget_ids: Optional[list[str]] = Field(None, description="Forget ids given inline (instead of a file).")
    neighbours_file: Optional[str] = Field(
        None, description="JSON {forget id: [retained ids, nearest first]} from the index stage; computed exactly here when absent."
    )
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)
    storage_path: str = Field(..., description="Checkpoint storage: local directory or s3://bucket/prefix.")
    storage_endpoint: Optional[str] = Field(None, description="S3-compatible endpoint of the storage (default: AWS_ENDPOINT_URL).")
    output_dir: str = Field(..., description="Where the unlearned model is written (diffusers layout).")
    run_name: Optional[str] = Field(None, description="Override of the derived run name '<request id>-<config hash>'.")
    max_failures: int = Field(2, ge=-1, description="Worker-group failures to recover from (-1: unlimited).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept in storage.")

    @model_validator(mode="after")
    def _check(self) -> "UnlearnRequest":
        if (self.forget_ids_file is None) == (self.forget_ids is None):
            raise ValueError("give exactly one of forget_ids_file and forget_ids")
        w, accum = self.scaling.num_workers, self.train.grad_accum
        if accum % w:
            raise ValueError(
                f"train.grad_accum ({accum}) must be a multiple of scaling.num_workers ({w}): grad_accum is the number of "
                f"GLOBAL micro-batches per update and micro-batch m runs on worker m % {w}"
            )
        self.train.check_pairing(method_class(self.method.name).requirements)
        return self


@dataclass(frozen=True)
class TrainMonitor:
    """Live health for an outer controller (a Ray Tune trial): every `every` updates the workers
    report the retain-loss ratio, which `callbacks` (Ray Train UserCallbacks such as Tune's
    TuneReportCallback) pass on; above `collapse_ratio` (or NaN) the workers stop, and `unlearn`
    raises QualityCollapseError."""

    every: int
    callbacks: tuple = ()
    collapse_ratio: float | None = None


@dataclass
class UnlearnResult:
    output_dir: str
    digest: str
    run_name: str
    config_hash: str
    steps: int
    history: list[dict]
    seconds: float
    model_kind: str
    resumed_from: list[int] = field(default_factory=list)  # the step each resumed attempt started from
    skipped: bool = False  # the output already existed for this config hash


# =========================================================================== planning (driver)


class _Sized:
    """A stand-in with only a length: lets the driver run `BatchDrawer.rows` without any data."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


class SparseRows:
    """Rows of a conceptually [n, ...] tensor of which only some are held, indexed by global row.
    `BatchDrawer` sees the full length and picks by global index exactly as on the full tensor."""

    def __init__(self, n: int, rows: np.ndarray, values: torch.Tensor):
        order = np.argsort(rows, kind="stable")
        self.n = n
        self.rows = np.asarray(rows, dtype=np.int64)[order]
        self.values = values[torch.from_numpy(order)] if len(order) else values
        if len(np.unique(self.rows)) != len(self.rows):
            raise ValueError("SparseRows: duplicate rows")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index) -> torch.Tensor:
        wanted = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64)
        pos = np.searchsorted(self.rows, wanted)
        pos_ok = np.clip(pos, 0, max(len(self.rows) - 1, 0))
        if len(self.rows) == 0 or not np.array_equal(self.rows[pos_ok], wanted):
            missing = sorted(set(wanted.tolist()) - set(self.rows.tolist()))[:5]
            raise KeyError(f"rows {missing} are not held by this worker (data plan and drawer disagree)")
        return self.values[torch.from_numpy(pos_ok)]


@dataclass
class DataPlan:
    """Everything the workers need to know about the data, as integers (never ids or images)."""

    kind: str
    n_retain: int
    n_forget: int
    needs: DataRequirements
    neighbours: np.ndarray | None  # [n_forget, K] global retain indices
    item_shape: tuple[int, int, int]  # uint8 H, W, C delivered to workers
    has_captions: bool
    corpus_fingerprint: str
    forget_digest: str
    neighbours_digest: str | None


def _drawer(plan: DataPlan, train: TrainConfig) -> BatchDrawer:
    from retrack.training.loop import BatchDrawer, UnlearnData

    return BatchDrawer(UnlearnData(retain=_Sized(plan.n_retain), forget=_Sized(plan.n_forget)), plan.needs, train)  # type: ignore[arg-type]


def micro_batches_of(rank: int, world: int, grad_accum: int) -> list[int]:
    """The global micro-batch indices a worker runs: m % world == rank."""
    return [m for m in range(grad_accum) if m % world == rank]


def needed_retain_rows(plan: DataPlan, train: TrainConfig, world: int, rank: int | None = None, start_step: int = 0) -> np.ndarray:
    """Global retain rows drawn by one worker (or all workers when rank is None) from start_step on."""
    if not plan.needs.retain:
        return np.zeros(0, dtype=np.int64)
    drawer = _drawer(plan, train)
    size = drawer.micro_size
    micro = range(train.grad_accum) if rank is None else micro_batches_of(rank, world, train.grad_accum)
    parts = []
    for step in range(start_step, train.steps):
        _, r_rows = drawer.rows(step)
        parts.extend(r_rows[m * size : (m + 1) * size] for m in micro)
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


@dataclass
class CorpusIndex:
    ids: list[str]
    shards: list[Path]
    has_captions: bool


def read_corpus_index(corpus_dir: str | Path) -> CorpusIndex:
    """The corpus ids in corpus order (shards sorted by name, then row order) without images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = shard_paths(corpus_dir)
    ids: list[str] = []
    has_captions = True
    for shard in shards:
        try:
            pf = pq.ParquetFile(shard)
        except (pa.ArrowInvalid, OSError) as exc:
            raise CorpusError(f"shard {shard.name} cannot be read as parquet: {exc}") from None
        names = pf.schema_arrow.names
        if "id" not in names or "image" not in names:
            raise CorpusError(f"shard {shard.name} lacks column(s) {sorted({'id', 'image'} - set(names))}; a corpus needs 'id' and 'image'")
        has_captions &= "caption" in names
        ids.extend(pf.read(columns=["id"]).column("id").to_pylist())
    if any(not i for i in ids):
        raise CorpusError("the corpus has empty ids")
    if len(set(ids)) != len(ids):
        raise CorpusError("ids occur more than once in the corpus")
    return CorpusIndex(ids=ids, shards=shards, has_captions=has_captions)


def corpus_fingerprint(index: CorpusIndex) -> str:
    """Cheap content key of a corpus: shard names and sizes plus the ordered ids."""
    parts = [(p.name, p.stat().st_size) for p in index.shards]
    return config_digest({"shards": parts, "ids": sha256_bytes("\n".join(index.ids).encode())})


def resolve_model(request: UnlearnRequest) -> tuple[str, Path]:
    """(kind, local directory) after checking the layout; a kind other than the expected one is refused."""
    from retrack.models.sd import check_sd_model_dir, local_model_dir, model_kind

    from retrack.models.pixel import check_pixel_model_dir

    local = local_model_dir(request.model_dir)
    kind = model_kind(local)
    if request.model_kind != "auto" and kind != request.model_kind:
        names = {"pixel": "a pixel-space DDPM (UNet2DModel)", "sd": "a Stable Diffusion pipeline (UNet2DConditionModel)"}
        raise ModelLayoutError(f"{request.model_dir} holds {names[kind]}, but model_kind={request.model_kind!r} was requested")
    if kind == "pixel":
        check_pixel_model_dir(local)
    else:
        check_sd_model_dir(local)
    return kind, local


def _model_geometry(kind: str, model_dir: Path) -> tuple[int, int, int]:
    """uint8 (H, W, C) every item is delivered in."""
    cfg = json.loads((model_dir / "unet" / "config.json").read_text())
    size = cfg["sample_size"] if isinstance(cfg["sample_size"], int) else cfg["sample_size"][0]
    if kind == "pixel":
        return (size, size, int(cfg["in_channels"]))
    vae = json.loads((model_dir / "vae" / "config.json").read_text())
    res = size * 2 ** (len(vae["block_out_channels"]) - 1)
    return (res, res, 3)


def _read_neighbours_file(path: str, forget_ids: list[str], retain_pos: dict[str, int], k: int) -> np.ndarray:
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"neighbours file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"neighbours file {path} is not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(raw, dict):
        raise InputError(f"neighbours file {path} must map each forget id to a list of retained ids")
    out = np.zeros((len(forget_ids), k), dtype=np.int64)
    for n, fid in enumerate(forget_ids):
        nbrs = raw.get(fid)
        if not isinstance(nbrs, list) or len(nbrs) < k:
            raise InputError(f"neighbours file {path}: forget entry {n + 1} has {0 if not isinstance(nbrs, list) else len(nbrs)} neighbours, k = {k} are needed")
        for j, nid in enumerate(nbrs[:k]):
            if nid not in retain_pos:
                raise InputError(f"neighbours file {path}: forget entry {n + 1} names a neighbour that is not a retained corpus item")
            out[n, j] = retain_pos[nid]
    return out


def _exact_neighbours(kind: str, model_dir: Path, corpus: CorpusIndex, forget_rows: np.ndarray, retain_rows: np.ndarray, k: int, geometry) -> np.ndarray:
    """Exact K nearest retained items of every forget item, in the space the model denoises
    (the small-corpus path; large corpora pass the index stage's neighbours file)."""
    from retrack.data.corpus import read_corpus
    from retrack.index.exact import exact_knn

    if kind == "pixel":
        c = read_corpus(corpus.shards[0].parent)
        _, idx = exact_knn(c.images[forget_rows], c.images[retain_rows], k)
        return idx.astype(np.int64)
    from diffusers import AutoencoderKL

    from retrack.data.corpus import iter_rows
    from retrack.models.sd import encode_latents, item_seed, to_sd_pixels

    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", use_safetensors=True).float().eval()
    res = geometry[0]
    latents = []
    chunk_imgs, chunk_seeds = [], []
    for row in iter_rows(corpus.shards[0].parent):
        chunk_imgs.append(decode_image(row["image"], row["id"]))
        chunk_seeds.append(item_seed(row["id"]))
        if len(chunk_imgs) == 64:
            latents.append(encode_latents(vae, to_sd_pixels(np.stack(chunk_imgs), res), chunk_seeds))
            chunk_imgs, chunk_seeds = [], []
    if chunk_imgs:
        latents.append(encode_latents(vae, to_sd_pixels(np.stack(chunk_imgs), res), chunk_seeds))
    z = torch.cat(latents).numpy()
    _, idx = exact_knn(z[forget_rows], z[retain_rows], k)
    return idx.astype(np.int64)


@dataclass
class Prepared:
    request: UnlearnRequest
    kind: str
    model_dir: Path
    corpus: CorpusIndex
    forget_rows: np.ndarray  # corpus rows, in forget-list order
    retain_rows: np.ndarray  # corpus rows of the retained set, ascending (retain index -> corpus row)
    plan: DataPlan
    config_hash: str
    run_name: str


def prepare(request: UnlearnRequest) -> Prepared:
    """All validation and planning that needs no cluster."""
    from retrack.models.pixel import model_digest

    kind, model_dir = resolve_model(request)
    corpus = read_corpus_index(request.corpus_dir)
    forget_ids = list(request.forget_ids) if request.forget_ids is not None else read_forget_ids(request.forget_ids_file)
    check_forget_ids(forget_ids, corpus.ids)
    pos = {i: n for n, i in enumerate(corpus.ids)}
    forget_rows = np.array([pos[i] for i in forget_ids], dtype=np.int64)
    retain_rows = np.setdiff1d(np.arange(len(corpus.ids)), forget_rows)
    if len(retain_rows) == 0:
        raise InputError("the forget set covers the whole corpus: nothing is left to retain")
    if kind == "sd" and not corpus.has_captions:
        raise CorpusError("a Stable Diffusion corpus needs a 'caption' column (each item is conditioned on its own caption)")
    geometry = _model_geometry(kind, model_dir)
    if kind == "pixel":
        first = decode_image(_first_image(corpus), "first item")
        if first.shape != geometry:
            raise CorpusError(f"corpus images are {first.shape[1]}x{first.shape[0]}x{first.shape[2]} but the model denoises {geometry[1]}x{geometry[0]}x{geometry[2]}")
    needs = method_class(request.method.name).requirements
    neighbours = None
    nbr_digest = None
    if needs.neighbours:
        from retrack.training.loop import check_k

        k = request.method.k
        check_k(k, len(retain_rows))
        if request.neighbours_file:
            retain_pos = {corpus.ids[r]: n for n, r in enumerate(retain_rows)}
            neighbours = _read_neighbours_file(request.neighbours_file, forget_ids, retain_pos, k)
            nbr_digest = sha256_bytes(Path(request.neighbours_file).read_bytes())
        else:
            neighbours = _exact_neighbours(kind, model_dir, corpus, forget_rows, retain_rows, k, geometry)
            nbr_digest = "exact:" + sha256_bytes(neighbours.tobytes())
    plan = DataPlan(
        kind=kind,
        n_retain=len(retain_rows),
        n_forget=len(forget_rows),
        needs=needs,
        neighbours=neighbours,
        item_shape=geometry,
        has_captions=corpus.has_captions,
        corpus_fingerprint=corpus_fingerprint(corpus),
        forget_digest=ids_digest(forget_ids),
        neighbours_digest=nbr_digest,
    )
    chash = config_hash(request, plan, model_digest(model_dir))
    name = request.run_name or f"{request.request_id}-{chash[:12]}"
    return Prepared(request, kind, model_dir, corpus, forget_rows, retain_rows, plan, chash, name)


def _first_image(corpus: CorpusIndex) -> bytes:
    import pyarrow.parquet as pq

    return pq.ParquetFile(corpus.shards[0]).read_row_group(0, columns=["image"]).column("image")[0].as_py()


def config_hash(request: UnlearnRequest, plan: DataPlan, model_sha: str) -> str:
    """Digest of everything that determines the result (not where or on how many workers it runs)."""
    return config_digest(
        {
            "model": model_sha,
            "model_kind": plan.kind,
            "corpus": plan.corpus_fingerprint,
            "forget": plan.forget_digest,
            "neighbours": plan.neighbours_digest,
            "method": request.method.model_dump(by_alias=True),
            "train": request.train.recorded(),
        }
    )


# =========================================================================== storage


def _storage(storage_path: str, s3=None):
    """(pyarrow filesystem, path on it) of the job storage: a local directory (made absolute) or
    s3://bucket/prefix (endpoint and credentials from `s3`, else the AWS_* environment)."""
    from retrack.storage.location import Location

    loc = Location.parse(storage_path, s3=s3)
    return loc.fs, loc.path.rstrip("/")


def _model_options(model_dir: str):
    from retrack.storage.location import S3Options, is_s3

    return S3Options().resolved() if is_s3(model_dir) else None


def _storage_options(request: "UnlearnRequest"):
    """S3 options resolved on the driver: workers started before the AWS_* variables were set
    (a local instance, a test) still reach the store. They travel inside an object reference,
    never in the train loop config (Ray exports that config to its state API / dashboard)."""
    from retrack.storage.location import S3Options, is_s3

    return S3Options(endpoint=request.storage_endpoint).resolved() if is_s3(request.storage_path) else None


def _read_json_fs(fs, path: str) -> dict | None:
    import pyarrow.fs as pafs

    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def _write_json_fs(fs, path: str, obj: dict) -> None:
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True).encode())
    fs.move(tmp, path)


def check_run_storage(storage_path: str, run_name: str, chash: str, s3=None) -> dict | None:
    """Refuse a run directory that holds another config's run marker or checkpoints; returns the
    divergence marker if this config already diverged there."""
    import pyarrow.fs as pafs

    fs, base = _storage(storage_path, s3)
    run_dir = f"{base}/{run_name}"
    marker = _read_json_fs(fs, f"{run_dir}/{RUN_MARKER}")
    if marker is not None and marker.get("config_hash") != chash:
        raise CheckpointMismatchError(
            f"run {run_name!r} in {storage_path} belongs to config {marker.get('config_hash', '?')[:12]}, this job is {chash[:12]}: "
            "refusing to resume from another configuration's checkpoints (use another run name or storage path)"
        )
    if fs.get_file_info(run_dir).type == pafs.FileType.Directory:
        for info in fs.get_file_info(pafs.FileSelector(run_dir)):
            if info.type == pafs.FileType.Directory and info.base_name.startswith(CHECKPOINT_PREFIX):
                state = _read_json_fs(fs, f"{info.path}/{STATE_FILE}")
                if state is not None and state.get("config_hash") != chash:
                    raise CheckpointMismatchError(
                        f"checkpoint {info.base_name} of run {run_name!r} was written by config {state.get('config_hash', '?')[:12]}, "
                        f"this job is {chash[:12]}: refusing to mix configurations"
                    )
    diverged = _read_json_fs(fs, f"{run_dir}/{DIVERGED_MARKER}")
    if diverged is not None and diverged.get("config_hash") == chash:
        return diverged
    return None


def _claim_run(storage_path: str, run_name: str, chash: str, request_id: str, s3=None) -> None:
    fs, base = _storage(storage_path, s3)
    path = f"{base}/{run_name}/{RUN_MARKER}"
    if _read_json_fs(fs, path) is None:
        _write_json_fs(fs, path, {"config_hash": chash, "request_id": request_id, "created": time.time()})


# =========================================================================== cluster checks


def check_placement(scaling: ScalingSettings) -> None:
    """Fail at once when the cluster cannot place the workers (instead of waiting forever)."""
    import ray

    per_worker = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        per_worker["GPU"] = 1.0
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    capacity = 0
    for node in nodes:
        res = node.get("Resources", {})
        capacity += min(int(math.floor(res.get(k, 0.0) / v + 1e-9)) for k, v in per_worker.items())
    if capacity < scaling.num_workers:
        total = ray.cluster_resources()
        have = ", ".join(f"{k}={total.get(k, 0):g}" for k in per_worker)
        want = ", ".join(f"{k}={v:g}" for k, v in per_worker.items())
        raise PlacementError(
            f"{scaling.num_workers} workers with {want} each cannot be placed: the cluster has {have} over {len(nodes)} node(s), "
            f"room for {capacity} worker(s); lower --workers or cpus_per_worker, or add nodes"
        )


# =========================================================================== datasets


def _decode_batch(batch: dict, wanted: dict[str, tuple[int, int]], kind: str, shape: tuple[int, int, int]) -> dict:
    """Keep the wanted ids of a corpus batch, decoded to uint8 HxWxC at the model's geometry.
    `wanted[id] = (row, pos)`: global retain index (or -1) and forget position (or -1)."""
    from retrack.models.sd import item_seed

    keep = [n for n, i in enumerate(batch["id"]) if i in wanted]
    h, w, c = shape
    images = np.zeros((len(keep), h, w, c), dtype=np.uint8)
    for j, n in enumerate(keep):
        img = decode_image(batch["image"][n], batch["id"][n])
        if kind == "sd":
            from PIL import Image

            pil = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).convert("RGB")
            if pil.size != (w, h):
                pil = pil.resize((w, h), Image.BICUBIC)
            img = np.asarray(pil)
        elif img.shape != shape:
            raise CorpusError(f"item {batch['id'][n]!r}: image is {img.shape}, the model denoises {shape}")
        images[j] = img
    captions = batch.get("caption")
    ids = [batch["id"][n] for n in keep]
    return {
        "row": np.array([wanted[i][0] for i in ids], dtype=np.int64),
        "pos": np.array([wanted[i][1] for i in ids], dtype=np.int64),
        "seed": np.array([item_seed(i) for i in ids], dtype=np.int64),
        "image": images,
        "caption": np.array([("" if captions is None or captions[n] is None else str(captions[n])) for n in keep], dtype=object),
    }


def _exact_split_config(split: list[str]):
    """Ray Train's DataConfig splits with `streaming_split(equal=True)`, which drops up to W - 1
    rows to even the shards out; every planned row is needed here, so split with equal=False."""
    from ray.train import DataConfig

    class ExactSplit(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = [{} for _ in range(world_size)]
            hints = worker_node_ids if self._enable_shard_locality else None
            for name, ds in datasets.items():
                if ds.name is None:
                    ds.set_name(name)
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                if name in split:
                    for i, part in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                        output[i][name] = part
                else:
                    for i in range(world_size):
                        output[i][name] = ds.iterator()
            return output

    return ExactSplit(datasets_to_split=split)


def build_datasets(prep: Prepared, world: int) -> dict:
    """'retain': the retained rows the run draws (split across workers); 'forget': forget items and
    their neighbours (every worker gets all of it). Both materialised before training starts, so
    no Ray Data task competes with the training workers for CPUs (no deadlock on small clusters)."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    plan, corpus = prep.plan, prep.corpus
    cols = ["id", "image"] + (["caption"] if corpus.has_captions else [])
    files = [str(p) for p in corpus.shards]

    def dataset(wanted: dict[str, tuple[int, int]]):
        ds = ray.data.read_parquet(files).select_columns(cols)
        return ds.map_batches(
            _decode_batch, batch_format="numpy", fn_kwargs={"wanted": wanted, "kind": plan.kind, "shape": plan.item_shape}
        ).materialize()

    def dataset_checked(wanted):
        try:
            return dataset(wanted)
        except RetrackError:
            raise
        except Exception as exc:  # a Ray task error: surface retrack's own message, not a traceback
            cause = _retrack_cause(exc)
            if cause is not None:
                raise cause from None
            raise

    rows = needed_retain_rows(plan, prep.request.train, world)
    retain_wanted = {corpus.ids[prep.retain_rows[r]]: (int(r), -1) for r in rows}
    forget_wanted = {corpus.ids[r]: (-1, n) for n, r in enumerate(prep.forget_rows)}
    if plan.neighbours is not None:
        for r in np.unique(plan.neighbours):
            forget_wanted[corpus.ids[prep.retain_rows[r]]] = (int(r), -1)
    out = {"forget": dataset_checked(forget_wanted)}
    if len(retain_wanted):
        out["retain"] = dataset_checked(retain_wanted)
    return out


def _retrack_cause(exc: BaseException) -> RetrackError | None:
    """The RetrackError a (possibly nested) Ray error was raised for, unwrapped."""
    seen = set()
    todo = [exc]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        cause = getattr(err, "cause", None)
        if isinstance(err, RetrackError) and not isinstance(cause, BaseException):
            return err
        todo.extend([cause if isinstance(cause, BaseException) else None, err.__cause__, err.__context__])
    # Ray Data wraps errors of user functions in a UserCodeException that keeps only the text of
    # the original traceback: recover retrack's error class and message from it.
    import re

    import retrack.errors as errors

    found = re.findall(r"retrack\.errors\.(\w+): ([^\n]+)", str(exc))
    for name, message in reversed(found):
        cls = getattr(errors, name, None)
        if isinstance(cls, type) and issubclass(cls, RetrackError) and cls is not TrainingDivergedError:
            return cls(message)
    return None


# =========================================================================== worker side


def _empty(shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    return {
        "row": np.zeros(0, np.int64),
        "pos": np.zeros(0, np.int64),
        "seed": np.zeros(0, np.int64),
        "image": np.zeros((0, *shape), np.uint8),
        "caption": np.zeros(0, dtype=object),
    }


def _collect(iterator, shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Materialise a dataset shard on this worker."""
    parts: dict[str, list] = {k: [v] for k, v in _empty(shape).items()}
    if iterator is not None:
        for batch in iterator.iter_batches(batch_size=256, batch_format="numpy"):
            for k in parts:
                parts[k].append(batch[k])
    return {k: np.concatenate(v) for k, v in parts.items()}


def _exchange(local: dict[str, np.ndarray], mine: np.ndarray, world: int) -> dict[str, np.ndarray]:
    """Each worker broadcasts its shard in turn; every worker keeps the rows in `mine`."""
    import torch.distributed as dist

    if world == 1:
        keep = np.isin(local["row"], mine)
        return {k: v[keep] for k, v in local.items()}
    rank = dist.get_rank()
    kept: dict[str, list] = {k: [v[:0]] for k, v in local.items()}
    for src in range(world):
        box = [local if src == rank else None]
        dist.broadcast_object_list(box, src=src)
        payload = box[0]
        if len(payload["row"]) == 0:
            continue
        keep = np.isin(payload["row"], mine)
        for k in kept:
            kept[k].append(payload[k][keep])
    return {k: np.concatenate(v) for k, v in kept.items()}


class _Encoder:
    """Items (uint8 images, captions, per-item seeds) -> tensors in the space the model denoises."""

    def __init__(self, kind: str, bundle):
        self.kind, self.bundle = kind, bundle

    def images(self, part: dict[str, np.ndarray]) -> torch.Tensor:
        if self.kind == "pixel":
            return torch.from_numpy(to_model_space(part["image"].astype(np.uint8)))
        from retrack.models.sd import encode_latents, to_sd_pixels

        m = self.bundle
        return encode_latents(m.vae, to_sd_pixels(part["image"].astype(np.uint8), m.resolution), [int(s) for s in part["seed"]])

    def conds(self, part: dict[str, np.ndarray]) -> torch.Tensor | None:
        if self.kind == "pixel":
            return None
        from retrack.models.sd import encode_captions, tokenize

        return encode_captions(self.bundle.text_encoder, tokenize(self.bundle.tokenizer, list(part["caption"])))


def _worker_data(plan: DataPlan, encoder: _Encoder, train: TrainConfig, rank: int, world: int, start_step: int) -> UnlearnData:
    import ray.train

    from retrack.training.loop import UnlearnData

    forget_part = _collect(ray.train.get_dataset_shard("forget"), plan.item_shape)
    f_idx = np.where(forget_part["pos"] >= 0)[0]
    f_idx = f_idx[np.argsort(forget_part["pos"][f_idx])]
    if len(f_idx) != plan.n_forget:
        raise RuntimeError(f"worker {rank} received {len(f_idx)} forget items, expected {plan.n_forget}")
    fsel = {k: v[f_idx] for k, v in forget_part.items()}
    forget = encoder.images(fsel)
    forget_cond = encoder.conds(fsel)
    neighbours = None
    if plan.neighbours is not None:
        n_idx = np.where(forget_part["row"] >= 0)[0]
        nsel = {k: v[n_idx] for k, v in forget_part.items()}
        bank = SparseRows(plan.n_retain, nsel["row"], encoder.images(nsel))
        flat = bank[torch.from_numpy(np.array(plan.neighbours).reshape(-1))]
        neighbours = flat.view(plan.n_forget, plan.neighbours.shape[1], *flat.shape[1:])
    retain = _Sized(plan.n_retain)
    retain_cond = None
    if plan.needs.retain:
        mine = needed_retain_rows(plan, train, world, rank, start_step)
        shard = _collect(ray.train.get_dataset_shard("retain"), plan.item_shape)
        held = _exchange(shard, mine, world)
        if not np.array_equal(np.sort(held["row"]), mine):
            raise RuntimeError(f"worker {rank} holds {len(held['row'])} of its {len(mine)} retained rows after the exchange")
        retain = SparseRows(plan.n_retain, held["row"], encoder.images(held))
        cond = encoder.conds(held)
        retain_cond = None if cond is None else SparseRows(plan.n_retain, held["row"], cond)
    return UnlearnData(retain=retain, forget=forget, neighbours=neighbours, retain_cond=retain_cond, forget_cond=forget_cond)  # type: ignore[arg-type]


class _ScaledLosses:
    """Static loss scaling for fp16 autocast: losses x S before autograd, gradients / S before the
    method combines them (logs unscaled). Overflow shows up as a non-finite gradient (diverged)."""

    def __init__(self, method, scale: float):
        self.method, self.scale = method, scale
        self.requirements, self.name = method.requirements, method.name

    def losses(self, denoise, batch, generator):
        terms = self.method.losses(denoise, batch, generator)
        terms.losses = {k: v * self.scale for k, v in terms.losses.items()}
        return terms

    def combine(self, grads):
        return self.method.combine({k: g / self.scale for k, g in grads.items()})


def _to_device(batch: UnlearnBatch, device: torch.device) -> UnlearnBatch:
    if device.type == "cpu":
        return batch
    return UnlearnBatch(**{f.name: None if (x := getattr(batch, f.name)) is None else x.to(device, non_blocking=True) for f in fields(batch)})


def _device_generator(gen: torch.Generator, device: torch.device) -> torch.Generator:
    if device.type == "cpu":
        return gen
    return torch.Generator(device=device).manual_seed(gen.initial_seed())


def _load_bundle(kind: str, model_dir: str, device: torch.device):
    if kind == "pixel":
        from retrack.models.pixel import load_pixel_model

        m = load_pixel_model(model_dir, device)
        return m, m.unet, m.scheduler
    from retrack.models.sd import load_sd_model

    m = load_sd_model(model_dir, device)
    return m, m.unet, m.scheduler


def _sha256_file(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _save_checkpoint(unet, opt, step: int, history: list[dict], chash: str, world: int) -> str:
    """UNet weights (safetensors), AdamW state, and a state file with the step, the loss history,
    the config hash and the digest of each file (a partially uploaded checkpoint never verifies)."""
    from safetensors.torch import save_file

    tmp = tempfile.mkdtemp(prefix="retrack-ckpt-")
    save_file({k: v.detach().contiguous().cpu() for k, v in unet.state_dict().items()}, os.path.join(tmp, UNET_FILE))
    from retrack.training.step import save_optimizer_state

    save_optimizer_state(opt, os.path.join(tmp, OPTIMIZER_FILE))
    files = {name: _sha256_file(os.path.join(tmp, name)) for name in (UNET_FILE, OPTIMIZER_FILE)}
    with open(os.path.join(tmp, STATE_FILE), "w") as f:
        json.dump({"step": step, "config_hash": chash, "history": history, "world_size": world, "files": files}, f)
    return tmp


def _verified_state(directory: str) -> dict | None:
    try:
        state = json.loads(Path(directory, STATE_FILE).read_text())
        ok = all(_sha256_file(os.path.join(directory, n)) == sha for n, sha in state["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state if ok else None


def _resume(fs, run_dir: str, chash: str, registered, load: Callable[[str, dict], None]) -> dict | None:
    """Load the newest verified checkpoint of this run: the one Ray registered (`get_checkpoint`)
    or a newer complete one in the run's storage. Ray registers a checkpoint when its controller
    next polls the workers (every 2 s); a worker killed in between loses the registration, not the
    uploaded files, so the storage is scanned too."""
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    candidates: list[tuple[int, Any]] = []
    if registered is not None:
        name = Path(str(registered.path)).name
        candidates.append((int(name[len(CHECKPOINT_PREFIX):]) if name.startswith(CHECKPOINT_PREFIX) else -1, registered))
    try:
        infos = fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    except OSError:
        infos = []
    for info in infos:
        if info.type == pafs.FileType.Directory and info.base_name.startswith(CHECKPOINT_PREFIX):
            try:
                candidates.append((int(info.base_name[len(CHECKPOINT_PREFIX):]), Checkpoint(info.path, filesystem=fs)))
            except ValueError:
                continue
    for _, ckpt in sorted(candidates, key=lambda c: c[0], reverse=True):
        try:
            with ckpt.as_directory() as d:
                state = _verified_state(d)
                if state is None:
                    continue
                if state.get("config_hash") != chash:
                    raise CheckpointMismatchError(
                        f"checkpoint at step {state.get('step')} belongs to config {str(state.get('config_hash'))[:12]}, not {chash[:12]}"
                    )
                load(d, state)
                return state
        except (OSError, FileNotFoundError):  # deleted by checkpoint rotation meanwhile
            continue
    return None


class ProgressSink:
    """A zero-CPU actor collecting progress events; workers push without waiting (fire and
    forget: a slow driver never slows training), the driver drains it a few times a second."""

    def __init__(self):
        self.items: list[dict] = []

    def push(self, item: dict) -> None:
        self.items.append(item)

    def drain(self) -> list[dict]:
        out, self.items = self.items, []
        return out


def _emit(sink, item: dict, wait: bool = False) -> None:
    if sink is not None:
        try:
            ref = sink.push.remote(item)
            if wait:  # the actor runs one caller's calls in order: everything sent before is in
                import ray

                ray.get(ref, timeout=30)
        except Exception:  # progress is best effort; never fail training over it
            pass


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import shutil

    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from safetensors.torch import load_file

    from retrack.models.schedule import NoiseSchedule
    from retrack.training.step import load_optimizer_state, make_optimizer, unlearning_step
    from retrack.training.loop import BatchDrawer, pixel_denoiser

    import ray

    cfg = ray.get(config["spec"])
    sink = config.get("progress")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    train = TrainConfig.model_validate(cfg["train"])
    plan: DataPlan = cfg["plan"]
    use_gpu = cfg["use_gpu"] and torch.cuda.is_available()
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
        if cfg["allow_tf32"]:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(max(1, int(round(cfg["cpus_per_worker"]))))
    fs, base = _storage(cfg["storage_path"], cfg["storage_s3"])
    run_dir = f"{base}/{cfg['run_name']}"

    diverged = _read_json_fs(fs, f"{run_dir}/{DIVERGED_MARKER}")
    if diverged is not None and diverged.get("config_hash") == cfg["config_hash"]:
        ray.train.report({"diverged_step": diverged["step"]})
        return

    from retrack.models.sd import local_model_dir

    bundle, unet, scheduler = _load_bundle(plan.kind, str(local_model_dir(cfg["model_dir"], s3=cfg["model_s3"])), device)
    if train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    method = build_method(cfg["method"]["name"], NoiseSchedule.from_scheduler(scheduler, device), cfg["method"]["params"])
    if use_gpu and train.mixed_precision == "fp16":
        method = _ScaledLosses(method, cfg["fp16_loss_scale"])
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = make_optimizer(params, train.lr, train.betas, train.weight_decay)

    def load(d: str, state: dict) -> None:
        unet.load_state_dict(load_file(os.path.join(d, UNET_FILE), device=str(device)))
        load_optimizer_state(opt, os.path.join(d, OPTIMIZER_FILE), device)

    state = _resume(fs, run_dir, cfg["config_hash"], ray.train.get_checkpoint(), load)
    start, history = (int(state["step"]), list(state["history"])) if state else (0, [])
    _emit(sink, {"event": "worker", "rank": rank, "pid": os.getpid(), "world_size": world, "start_step": start})
    if start >= train.steps:  # relaunched after the final checkpoint: nothing left to train
        ray.train.report({"step": start})
        return

    data = _worker_data(plan, _Encoder(plan.kind, bundle), train, rank, world, start)
    drawer = BatchDrawer(data, method.requirements, train)
    mine = micro_batches_of(rank, world, train.grad_accum)

    model = unet
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # init_sync broadcasts rank 0's parameters and buffers: replicas start identical. The
        # reducer never runs (no_sync below): step.py reduces the per-loss gradients itself.
        model = DistributedDataParallel(unet, device_ids=[device.index] if use_gpu else None, forward_sync_buffers=False)
    if plan.kind == "pixel":
        denoise = pixel_denoiser(model)
    else:
        from retrack.models.sd import ConditionalDenoiser

        denoise = ConditionalDenoiser(model)
    reduce = None
    if world > 1:
        def reduce(t: torch.Tensor) -> torch.Tensor:
            t = t.to(device)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            return t

    def autocast():
        if use_gpu and train.mixed_precision != "no":
            return torch.autocast("cuda", dtype=torch.bfloat16 if train.mixed_precision == "bf16" else torch.float16)
        return torch.autocast("cpu", enabled=False)

    from contextlib import nullcontext

    unet.train()
    every = train.checkpoint_every
    health_every, collapse = cfg.get("report_every", 0), cfg.get("collapse_ratio")
    health = RetainLossRatio() if health_every or collapse else None
    for step in range(start, train.steps):
        began = time.perf_counter()
        pairs = [drawer.microbatch(step, m) for m in mine]
        batches = [_to_device(b, device) for b, _ in pairs]
        gens = [_device_generator(g, device) for _, g in pairs]
        try:
            with model.no_sync() if world > 1 else nullcontext():
                logs = unlearning_step(
                    method, params, opt, denoise, batches, gens,
                    step=step, total_microbatches=train.grad_accum, all_reduce=reduce, autocast=autocast,
                )
        except TrainingDivergedError as exc:
            _write_json_fs(fs, f"{run_dir}/{DIVERGED_MARKER}", {**exc.marker(), "config_hash": cfg["config_hash"], "rank": rank})
            raise
        if rank == 0:
            _emit(sink, {"event": "step", "step": step + 1, "steps": train.steps, **logs})
        # Wall time of the update on this worker (draw, passes, all-reduce, progress; checkpoints excluded).
        history.append({"step": step + 1, **logs, "seconds": time.perf_counter() - began})
        last = step + 1 == train.steps
        metrics = {"step": step + 1, **logs}
        if health is not None:
            ratio = health.update(logs)
            if ratio is not None:
                metrics[HEALTH_METRIC] = ratio
                # The logs are all-reduced, so every rank sees the same ratio and stops together;
                # stopping here (not from outside) lets Ray Train release the workers cleanly.
                if collapse and not ratio <= collapse:
                    if rank == 0:
                        _write_json_fs(fs, f"{run_dir}/{DIVERGED_MARKER}", {**QualityCollapseError(step + 1, ratio, collapse).marker(), "config_hash": cfg["config_hash"]})
                    ray.train.report(metrics)
                    return
        if last or (every and (step + 1) % every == 0):
            if rank == 0:
                tmp = _save_checkpoint(unet, opt, step + 1, history, cfg["config_hash"], world)
                try:
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{step + 1:06d}")
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
            else:
                ray.train.report(metrics)
        elif health_every and (step + 1) % health_every == 0:
            ray.train.report(metrics)  # every rank: a report is collective
    _emit(sink, {"event": "done", "rank": rank, "step": train.steps}, wait=True)


# =========================================================================== driver


def _drain(sink, stop: threading.Event, progress: Progress | None, events: list[dict]) -> None:
    import ray

    while True:
        last = stop.is_set()
        try:
            items = ray.get(sink.drain.remote(), timeout=30)
        except Exception:
            return
        for item in items:
            events.append(item)
            if progress is not None:
                try:
                    progress(item)
                except Exception:  # a broken progress callback must not kill the job
                    pass
        if last:
            return
        stop.wait(0.1)


def _save_output(prep: Prepared, ckpt_dir: str, state: dict, scaling: ScalingSettings) -> str:
    from safetensors.torch import load_file

    from retrack.models.pixel import model_digest

    req = prep.request
    meta = {
        "request_id": req.request_id,
        "config_hash": prep.config_hash,
        "run_name": prep.run_name,
        "method": req.method.name,
        "steps": state["step"],
        "base_model_sha256": model_digest(prep.model_dir),
        "forget_ids_sha256": prep.plan.forget_digest,
        "forget_count": prep.plan.n_forget,
        "num_workers": scaling.num_workers,
    }
    weights = load_file(os.path.join(ckpt_dir, UNET_FILE))
    if prep.kind == "pixel":
        from retrack.models.pixel import load_pixel_model, save_pixel_model

        model = load_pixel_model(prep.model_dir)
        model.unet.load_state_dict(weights)
        return save_pixel_model(model, req.output_dir, metadata=meta)
    from diffusers import UNet2DConditionModel

    from retrack.models.sd import save_finetuned_unet

    unet = UNet2DConditionModel.from_pretrained(prep.model_dir, subfolder="unet", use_safetensors=True).float()
    unet.load_state_dict(weights)
    return save_finetuned_unet(unet, prep.model_dir, req.output_dir, metadata=meta)


def _existing_output(prep: Prepared) -> str | None:
    from retrack.models.pixel import DIGEST_FILE

    marker = Path(prep.request.output_dir) / DIGEST_FILE
    if marker.is_file():
        meta = json.loads(marker.read_text())
        if meta.get("config_hash") == prep.config_hash:
            return meta["sha256"]
    return None


def _worker_errors(exc: BaseException) -> list[BaseException]:
    found = []
    for err in (getattr(exc, "worker_failures", None) or {}).values():
        found.append(err)
        cause = getattr(err, "cause", None)
        if cause is not None:
            found.append(cause)
    return found


def unlearn(
    request: UnlearnRequest,
    progress: Progress | None = None,
    address: str | None = None,
    monitor: TrainMonitor | None = None,
) -> UnlearnResult:
    """Run the unlearn stage on Ray (the current connection, `address`, or a new local instance).
    Raises InputError subclasses for bad input before training, TrainingDivergedError on a
    non-finite loss (nothing saved), UnlearnFailedError when the workers fail beyond the retries."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    prep = prepare(request)
    done = _existing_output(prep)
    if done is not None:
        return UnlearnResult(request.output_dir, done, prep.run_name, prep.config_hash, request.train.steps, [], 0.0, prep.kind, skipped=True)

    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if address is None:  # our own local instance: training is the foreground work, not nice 15
            os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
    scaling = request.scaling
    check_placement(scaling)
    s3 = _storage_options(request)
    diverged = check_run_storage(request.storage_path, prep.run_name, prep.config_hash, s3)
    if diverged is not None:
        raise stopped_error(diverged)
    _claim_run(request.storage_path, prep.run_name, prep.config_hash, request.request_id, s3)

    datasets = build_datasets(prep, scaling.num_workers)
    sink = ray.remote(num_cpus=0)(ProgressSink).remote()
    fs, base = _storage(request.storage_path, s3)
    storage_kwargs = {"storage_path": base, "storage_filesystem": fs} if s3 is not None else {"storage_path": base}
    spec = {
        "train": request.train.model_dump(),
        "method": {"name": request.method.name, "params": request.method.params},
        "plan": prep.plan,
        "model_dir": request.model_dir,  # a shared path or an s3:// URI each node copies once
        "model_s3": _model_options(request.model_dir),
        "config_hash": prep.config_hash,
        "run_name": prep.run_name,
        "storage_path": request.storage_path,
        "storage_s3": s3,
        "use_gpu": scaling.use_gpu,
        "cpus_per_worker": scaling.cpus_per_worker,
        "allow_tf32": scaling.allow_tf32,
        "fp16_loss_scale": scaling.fp16_loss_scale,
        "report_every": monitor.every if monitor else 0,
        "collapse_ratio": monitor.collapse_ratio if monitor else None,
    }
    # The train loop config is exported to Ray's state API: only a reference and the sink go there.
    cfg = {"spec": ray.put(spec), "progress": sink}
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = 1.0
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=cfg,
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=prep.run_name,
            failure_config=FailureConfig(max_failures=request.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=request.keep_checkpoints),
            callbacks=list(monitor.callbacks) if monitor else None,
            **storage_kwargs,
        ),
        datasets=datasets,
        dataset_config=_exact_split_config(["retain"] if "retain" in datasets else []),
    )
    events: list[dict] = []
    stop = threading.Event()
    drainer = threading.Thread(target=_drain, args=(sink, stop, progress, events), daemon=True)
    drainer.start()
    start = time.perf_counter()
    error: BaseException | None = None
    try:
        result = trainer.fit()
    except Exception as exc:  # ray.train.TrainingFailedError and friends
        error = exc
    finally:
        seconds = time.perf_counter() - start
        stop.set()
        drainer.join(timeout=10)
        try:
            ray.kill(sink)
        except Exception:
            pass
    diverged = _read_json_fs(fs, f"{base}/{prep.run_name}/{DIVERGED_MARKER}")
    if diverged is not None and diverged.get("config_hash") == prep.config_hash:
        raise stopped_error(diverged)
    if error is not None:
        for err in _worker_errors(error):
            cause = _retrack_cause(err)
            if cause is not None:
                raise cause from None
        raise UnlearnFailedError(f"training failed after {request.max_failures} retries: {error}") from error
    saved: dict[str, str] = {}

    def save(d: str, state: dict) -> None:
        if state["step"] == request.train.steps:
            saved["digest"] = _save_output(prep, d, state, scaling)

    state = _resume(fs, f"{base}/{prep.run_name}", prep.config_hash, result.checkpoint, save)
    if state is None or "digest" not in saved:
        got = "no checkpoint" if state is None else f"the last checkpoint at step {state['step']}"
        raise UnlearnFailedError(f"training ended with {got}; {request.train.steps} steps were planned")
    digest = saved["digest"]
    starts = [e["start_step"] for e in events if e.get("event") == "worker" and e.get("rank") == 0]
    resumed = [s for n, s in enumerate(starts) if n > 0 or s > 0]
    return UnlearnResult(
        output_dir=request.output_dir,
        digest=digest,
        run_name=prep.run_name,
        config_hash=prep.config_hash,
        steps=state["step"],
        history=state["history"],
        seconds=seconds,
        model_kind=prep.kind,
        resumed_from=resumed,
    )


# =========================================================================== CLI


def _parse_params(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--param")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _parse_json_params(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"--params is not JSON: {exc.msg}") from None
    if not isinstance(value, dict):
        raise InputError('--params must be a JSON object, e.g. \'{"lambda": 0.5, "k": 10}\'')
    return value


def _print_progress(event: dict) -> None:
    if event.get("event") == "step":
        keys = [k for k in ("loss", "loss_knn", "loss_retain", "loss_corr", "grad_norm") if k in event]
        values = " ".join(f"{k}={event[k]:.4g}" for k in keys)
        typer.echo(f"step {event['step']}/{event['steps']} {values}")
    elif event.get("event") == "worker" and event.get("rank") == 0 and event.get("start_step"):
        typer.echo(f"resuming from the checkpoint at step {event['start_step']}")


def unlearn_command(
    model_dir: str = typer.Option(..., "--model-dir", "--model", help="Diffusers model directory (pixel DDPM or Stable Diffusion), local or s3://."),
    corpus_dir: str = typer.Option(..., "--corpus-dir", "--corpus", help="Corpus directory (parquet shards of id, image[, caption])."),
    forget_ids: str = typer.Option(..., "--forget-ids", help="File with one id to forget per line."),
    output_dir: str = typer.Option(..., "--output-dir", "--out", help="Where the unlearned model is written (diffusers layout)."),
    method: str = typer.Option("retrack", "--method", help="retrack, vanilla, neggrad, erasediff or siss."),
    params: str = typer.Option("{}", "--params", help='Method parameters as JSON, e.g. \'{"lambda": 0.5, "k": 10}\'.'),
    param: list[str] = typer.Option([], "--param", help="One method parameter KEY=VALUE (repeatable; wins over --params)."),
    steps: int = typer.Option(50, "--steps"),
    batch_size: int = typer.Option(128, "--batch-size", help="Global batch per branch."),
    forget_batch_size: Optional[int] = typer.Option(None, "--forget-batch-size", help="Global forget-branch batch, when it should differ from --batch-size."),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Global micro-batches per update (default: the worker count)."),
    lr: float = typer.Option(5e-5, "--lr"),
    seed: int = typer.Option(0, "--seed"),
    mixed_precision: str = typer.Option("no", "--mixed-precision", help="no, bf16 or fp16 (GPU only)."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing"),
    checkpoint_every: int = typer.Option(10, "--checkpoint-every"),
    workers: int = typer.Option(1, "--workers"),
    gpu: bool = typer.Option(False, "--gpu"),
    cpus_per_worker: float = typer.Option(1.0, "--cpus-per-worker"),
    neighbours: Optional[str] = typer.Option(None, "--neighbours", help="Neighbours JSON from the index stage."),
    model_kind: str = typer.Option("auto", "--model-kind", help="auto, pixel or sd."),
    request_id: str = typer.Option("manual", "--request-id"),
    storage_path: Optional[str] = typer.Option(None, "--storage-path", help="Checkpoint storage (default: <output-dir>.runs)."),
    max_failures: int = typer.Option(2, "--max-failures"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: a local instance)."),
) -> None:
    """Unlearn the listed items from a diffusion model with Ray Train."""
    try:
        request = UnlearnRequest(
            request_id=request_id,
            model_dir=model_dir,
            model_kind=model_kind,
            corpus_dir=corpus_dir,
            forget_ids_file=forget_ids,
            neighbours_file=neighbours,
            method=MethodConfig(name=method, params={**_parse_json_params(params), **_parse_params(param)}),
            train=TrainConfig(
                steps=steps, batch_size=batch_size, forget_batch_size=forget_batch_size, grad_accum=grad_accum or max(workers, 1), lr=lr, seed=seed,
                mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing, checkpoint_every=checkpoint_every,
            ),
            scaling=ScalingSettings(num_workers=workers, use_gpu=gpu, cpus_per_worker=cpus_per_worker),
            storage_path=storage_path or f"{output_dir.rstrip('/')}.runs",
            output_dir=output_dir,
            max_failures=max_failures,
        )
        result = unlearn(request, progress=_print_progress, address=address)
    except RetrackError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except ValueError as exc:  # pydantic's ValidationError included
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            from retrack.errors import describe_validation_error

            typer.echo(f"error: invalid settings: {describe_validation_error(exc)}", err=True)
        else:
            typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if result.skipped:
        typer.echo(f"already done: {result.output_dir} (sha256 {result.digest})")
    else:
        typer.echo(f"wrote {result.output_dir} (sha256 {result.digest}) after {result.steps} steps in {result.seconds:.1f}s")


cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)


@cli.callback()
def _group() -> None:
    """retrack's unlearn stage (mount `unlearn_command` as `retrack unlearn`)."""


cli.command("unlearn")(unlearn_command)
