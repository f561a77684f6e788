"""One optimiser update of any method: per-loss gradients, optional cross-worker averaging, combine, clip."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, Sequence

import torch

from retrack.errors import TrainingDivergedError
from retrack.methods import Denoiser, Method, UnlearnBatch

# Sums a tensor across data-parallel workers (absent in a single process).
AllReduce = Callable[[torch.Tensor], torch.Tensor]

MAX_GRAD_NORM = 1.0


def make_optimizer(params, lr: float, betas: tuple[float, float] = (0.95, 0.999), weight_decay: float = 1e-6) -> torch.optim.AdamW:
    # Fused: one kernel per tensor and no temporaries; the foreach path's square root of the second
    # moments alone is model-sized (3.4 GB for an SD-1.5 UNet).
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)


def save_optimizer_state(optimizer: torch.optim.Optimizer, path: str) -> None:
    """The optimiser's state as safetensors (its tensors) plus JSON in the file's metadata (the
    rest): a resumed run loads no pickle from storage."""
    import json

    from safetensors.torch import save_file

    sd = optimizer.state_dict()
    tensors, plain = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}/{k}"] = v.detach().contiguous().cpu()
            else:
                plain[f"{idx}/{k}"] = v
    save_file(tensors, path, metadata={"param_groups": json.dumps(sd["param_groups"]), "plain": json.dumps(plain)})


def load_optimizer_state(optimizer: torch.optim.Optimizer, path: str, device: str | torch.device = "cpu") -> None:
    import json

    from safetensors import safe_open

    with safe_open(path, framework="pt", device=str(device)) as f:
        meta = f.metadata()
        state: dict[int, dict] = {}
        for key in f.keys():
            idx, k = key.split("/", 1)
            state.setdefault(int(idx), {})[k] = f.get_tensor(key)
    for key, v in json.loads(meta["plain"]).items():
        idx, k = key.split("/", 1)
        state.setdefault(int(idx), {})[k] = v
    groups = json.loads(meta["param_groups"])
    for g in groups:  # JSON has no tuples; torch keeps betas as one
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _point_grads(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Make each parameter's .grad a view into `flat`: backward then accumulates into it in place."""
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p)
        offset += n


def unlearning_step(
    method: Method,
    params: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    denoise: Denoiser,
    microbatches: Sequence[UnlearnBatch],
    generators: Sequence[torch.Generator | None],
    *,
    step: int,
    total_microbatches: int | None = None,
    all_reduce: AllReduce | None = None,
    autocast: Callable[[], object] = nullcontext,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """Accumulate each named loss's gradient over the micro-batches, sum it over workers, let the
    method combine the global gradients (EraseDiff's projection and SISS's rescaling then give the
    single-process update whatever the worker count), clip at 1.0 and step.

    Every worker divides by `total_microbatches` (all workers' micro-batches together) and
    `all_reduce` SUMS across workers, so the result is the mean over every micro-batch.

    With a `scaler` (fp16), the losses are scaled before autograd and the summed gradients
    unscaled before the method combines them (SISS's rescaling is not scale-free); an overflow
    skips the update and lowers the scale (`skipped_updates` 1, no `grad_norm`) instead of
    counting as divergence."""
    total = total_microbatches or len(microbatches)
    scale = 1.0 if scaler is None else scaler.get_scale()
    sums: dict[str, torch.Tensor] = {}
    logs: dict[str, float] = {}
    for mb, gen in zip(microbatches, generators, strict=True):
        with autocast():
            terms = method.losses(denoise, mb, gen)
        names = list(terms.losses)
        # A flat gradient per loss where one is needed (several losses for the method to combine,
        # or one all-reduce per loss across workers): backward accumulates into it in place
        # through the parameters' .grad views. Otherwise backward fills .grad as a plain loop does.
        flat = len(names) > 1 or all_reduce is not None
        for i, name in enumerate(names):
            loss = terms.losses[name].float() / total
            if not torch.isfinite(loss):
                raise TrainingDivergedError(step, f"loss {name!r}")
            if flat:
                if name not in sums:
                    sums[name] = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32, device=params[0].device)
                _point_grads(params, sums[name])
            torch.autograd.backward(loss if scaler is None else scaler.scale(loss), inputs=params, retain_graph=i < len(names) - 1)
        for key, value in terms.logs.items():
            logs[key] = logs.get(key, 0.0) + value / total
    if all_reduce is not None:
        sums = {name: all_reduce(g) for name, g in sums.items()}
        keys = sorted(logs)
        reduced = all_reduce(torch.tensor([logs[k] for k in keys], dtype=torch.float64))
        logs = dict(zip(keys, reduced.tolist()))
    if sums:
        combined = method.combine(sums if scaler is None else {name: g / scale for name, g in sums.items()})
        if scaler is not None:
            combined = combined * scale  # the scaler unscales .grad itself
        _point_grads(params, combined)
    for p in params:  # a parameter the losses did not reach: a zero gradient, as every worker count gives it
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = float(torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM))
    # The norm is finite exactly when every gradient is. With fp16 a non-finite one is an overflow,
    # which the all-reduce hands to every worker alike: the scaler skips the update everywhere and
    # lowers the scale. Without a scaler it is divergence.
    overflow = not math.isfinite(norm)
    if overflow and scaler is None:
        raise TrainingDivergedError(step, "gradient")
    if scaler is not None:
        logs.update(loss_scale=scale, skipped_updates=float(overflow))
    if not overflow:
        logs["grad_norm"] = norm
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not all(math.isfinite(v) for v in logs.values()):
        raise TrainingDivergedError(step, "metric")
    return logs
