"""The Ray Train worker function of the unlearn stage.

Each worker loads the denoiser alone (Stable Diffusion items arrive encoded, from the item cache),
resumes from the newest verified checkpoint (fetched once per node), assembles the data its
micro-batches draw (micro-batch m of a step runs on worker m % W) and runs
the unchanged update step. DDP wraps the UNet (parameter broadcast from rank 0 at start: replicas
cannot drift); its own gradient reduction is bypassed with `no_sync()` because the gradients come
from `torch.autograd.grad` per named loss and step.py sums them across workers BEFORE the method
combines them, so EraseDiff's projection and SISS's rescaling see the global gradients.
Rank 0 writes a checkpoint every `train.checkpoint_every` updates and at the end; a non-finite
loss (or a quality collapse) writes the run's stop marker so that retries and relaunches stop.
"""

from __future__ import annotations

import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from pipelines.unlearn.datasets import retain_name
from pipelines.unlearn.progress import hand_on_steps, progress_metrics
from pipelines.unlearn.resume import resume
from retrack.config.model_kind import ModelKind
from retrack.config.spec import ScalingSpec
from retrack.config.train import MethodConfig, TrainConfig
from retrack.errors import QualityCollapseError, TrainingDivergedError
from retrack.methods import build_method
from retrack.models.schedule import NoiseSchedule
from retrack.storage.location import S3Options
from retrack.training.checkpoint import checkpoint_name, load_checkpoint, save_checkpoint
from retrack.training.items import CachedItems, PixelItems
from retrack.training.loop import BatchDrawer, pixel_denoiser
from retrack.training.plan import DataPlan, micro_batches_of, needed_retain_rows
from retrack.training.precision import autocast, loss_scaler
from retrack.training.run_storage import RunStorage
from retrack.training.step import make_optimizer, unlearning_step
from retrack.training.worker_data import assemble
from retrack.tuning.search import HEALTH_METRIC, RetainLossRatio

SETTINGS_KEY = "settings"
STEPS_EVERY = 1.0  # seconds between two hand-ons of rank 0's step logs to the driver


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker needs. It reaches the workers inside an object reference, never in the
    train loop config itself (Ray exports that to its state API; the S3 options are in here)."""

    method: MethodConfig
    train: TrainConfig
    scaling: ScalingSpec
    plan: DataPlan
    model_uri: str  # a shared path or an s3:// URI each node copies once
    model_s3: S3Options | None
    storage: RunStorage
    progress: Any  # the driver's progress queue (ray.util.queue.Queue): rank 0 puts its step logs there
    report_every: int = 0  # health reports for an outer controller (a Tune trial); 0: none
    collapse_ratio: float | None = None


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    s: WorkerSettings = ray.get(config[SETTINGS_KEY])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = _set_up_device(s.scaling)
    stopped = s.storage.stop_marker()
    if stopped is not None:
        ray.train.report({"diverged_step": stopped["step"]})
        return
    run = _WorkerRun(s, rank, world, device, ctx.get_local_rank())
    if run.start >= s.train.steps:  # relaunched after the final checkpoint: nothing left to train
        ray.train.report({"step": run.start, **progress_metrics(rank, run.start)})
        return
    run.load_data()
    run.train()


def _set_up_device(scaling: ScalingSpec) -> torch.device:
    if scaling.use_gpu and torch.cuda.is_available():
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
        if scaling.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        return device
    torch.set_num_threads(max(1, int(round(scaling.cpus_per_worker))))
    return torch.device("cpu")


def _load_unet(kind: ModelKind, model_dir: str, device: torch.device):
    """The denoiser and its scheduler; Stable Diffusion items arrive encoded, so no VAE or text encoder."""
    if kind is ModelKind.PIXEL_DDPM:
        from retrack.models.pixel import load_pixel_model

        m = load_pixel_model(model_dir, device)
        return m.unet, m.scheduler
    from retrack.models.sd import load_sd_unet

    return load_sd_unet(model_dir, device)


class _WorkerRun:
    """One worker's model, optimiser, data and progress from its start step on."""

    def __init__(self, s: WorkerSettings, rank: int, world: int, device: torch.device, local_rank: int):
        from retrack.storage.cache import local_model_dir

        self.s, self.rank, self.world, self.device = s, rank, world, device
        self.use_gpu = device.type == "cuda"
        self.unet, scheduler = _load_unet(s.plan.kind, str(local_model_dir(s.model_uri, s3=s.model_s3)), device)
        if s.train.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.method = build_method(s.method.name, NoiseSchedule.from_scheduler(scheduler, device), s.method.params)
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.opt = make_optimizer(self.params, s.train.lr, s.train.betas, s.train.weight_decay)
        self.scaler = loss_scaler(device.type, s.train.mixed_precision, s.scaling.fp16_loss_scale)
        state = resume(s.storage, ray.train.get_checkpoint(), lambda d, _: load_checkpoint(d, self.unet, self.opt, device),
                       local_rank, dist.barrier if world > 1 else lambda: None)
        self.start, self.history = (int(state["step"]), list(state["history"])) if state else (0, [])
        if state and self.scaler is not None and "loss_scaler" in state:
            self.scaler.load_state_dict(state["loss_scaler"])
        self.pending: list[dict] = []  # rank 0's step logs not yet handed on
        self.handed_on = float("-inf")  # the first step's logs go at once: training has begun

    def load_data(self) -> None:
        s = self.s
        mine = needed_retain_rows(s.plan, s.train, self.world, self.rank, self.start)

        def batches(name: str):
            return ray.train.get_dataset_shard(name).iter_batches(batch_size=256, batch_format="numpy")

        retain = batches(retain_name(self.rank)) if s.plan.needs.retain and len(mine) else ()
        data = assemble(s.plan, self._items(), batches("forget"), retain, mine)
        self.drawer = BatchDrawer(data, self.method.requirements, s.train, self.device)

    def _items(self) -> PixelItems | CachedItems:
        """How the worker's items arrive; for Stable Diffusion the encodings' shapes follow from the UNet."""
        if self.s.plan.kind is ModelKind.PIXEL_DDPM:
            return PixelItems(self.s.plan.item_shape)
        from retrack.models.clip import CLIP_CONTEXT_LENGTH

        c = self.unet.config
        size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
        return CachedItems((c.in_channels, size, size), (CLIP_CONTEXT_LENGTH, c.cross_attention_dim))

    def train(self) -> None:
        s, train = self.s, self.s.train
        model = self.unet
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # init_sync broadcasts rank 0's parameters and buffers: replicas start identical. The
            # reducer never runs (no_sync below): step.py reduces the per-loss gradients itself.
            model = DistributedDataParallel(self.unet, device_ids=[self.device.index] if self.use_gpu else None, forward_sync_buffers=False)
        if s.plan.kind is ModelKind.PIXEL_DDPM:
            denoise = pixel_denoiser(model)
        else:
            from retrack.models.sd import ConditionalDenoiser

            denoise = ConditionalDenoiser(model)
        reduce = self._all_reduce if self.world > 1 else None
        mine = micro_batches_of(self.rank, self.world, train.grad_accum)
        health = RetainLossRatio() if s.report_every or s.collapse_ratio else None
        self.unet.train()
        for step in range(self.start, train.steps):
            began = time.perf_counter()
            pairs = [self.drawer.microbatch(step, m) for m in mine]
            batches, gens = [b for b, _ in pairs], [g for _, g in pairs]
            try:
                with model.no_sync() if self.world > 1 else nullcontext():
                    logs = unlearning_step(
                        self.method, self.params, self.opt, denoise, batches, gens,
                        step=step, total_microbatches=train.grad_accum, all_reduce=reduce,
                        autocast=lambda: autocast(self.device.type, train.mixed_precision), scaler=self.scaler,
                    )
            except TrainingDivergedError as exc:
                s.storage.stop({**exc.marker(), "rank": self.rank})
                raise
            if self.rank == 0:
                self.pending.append({"step": step + 1, "steps": train.steps, **logs})
                if time.monotonic() - self.handed_on >= STEPS_EVERY:
                    self._hand_on_steps()
            # Wall time of the update on this worker (draw, passes, all-reduce; checkpoints excluded).
            self.history.append({"step": step + 1, **logs, "seconds": time.perf_counter() - began})
            metrics = {"step": step + 1, **logs}
            if health is not None and self._health_stops(health, logs, metrics, step):
                return
            if step + 1 == train.steps or (train.checkpoint_every and (step + 1) % train.checkpoint_every == 0):
                self._report(metrics, checkpoint_step=step + 1)
            elif s.report_every and (step + 1) % s.report_every == 0:
                self._report(metrics)

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def _health_stops(self, health: RetainLossRatio, logs: dict, metrics: dict, step: int) -> bool:
        """Adds the health ratio to `metrics`; above the collapse limit (or NaN) every worker stops."""
        ratio = health.update(logs)
        if ratio is None:
            return False
        metrics[HEALTH_METRIC] = ratio
        collapse = self.s.collapse_ratio
        # The logs are all-reduced, so every rank sees the same ratio and stops together;
        # stopping here (not from outside) lets Ray Train release the workers cleanly.
        if not collapse or ratio <= collapse:
            return False
        if self.rank == 0:
            self.s.storage.stop(QualityCollapseError(step + 1, ratio, collapse).marker())
        self._report(metrics)
        return True

    def _hand_on_steps(self) -> None:
        if self.pending:
            hand_on_steps(self.s.progress, self.pending)
        self.pending, self.handed_on = [], time.monotonic()

    def _report(self, metrics: dict, checkpoint_step: int | None = None) -> None:
        """A report is collective: every rank calls it; rank 0 alone uploads the checkpoint."""
        self._hand_on_steps()
        metrics = {**metrics, **progress_metrics(self.rank, self.start)}
        if checkpoint_step is None or self.rank != 0:
            ray.train.report(metrics)
            return
        extra = {} if self.scaler is None else {"loss_scaler": self.scaler.state_dict()}
        tmp = save_checkpoint(self.unet, self.opt, checkpoint_step, self.history, self.s.storage.config_hash, self.world, extra)
        try:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=checkpoint_name(checkpoint_step))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
