"""Evaluation on Ray: sampling spread over tasks, then the metrics, the verdict and the report.

Each task draws a contiguous range of sampling batches from BOTH models with the same seeds, so
the samples equal those of a single process and integrity stays paired. A model reaches the tasks
either as an s3:// URI that each node copies once, or as its files through the object store (no
shared filesystem needed between nodes either way).

Stable Diffusion (`evaluate_sd_request`): each model in turn is loaded once per scorer actor (one
per GPU with bf16 autocast where the cluster has GPUs, one per CPU otherwise); the forgotten items
and their retained candidates arrive as the latents the index holds, and the original's scorer
encodes only the held-out items (not corpus items, so not in the index); then each model's
scorers share out its generations (batched) for the forgotten and for retained captions and the
per-item denoising losses, and `retrack.evaluation.sd` scores them. Captions travel only inside
call arguments, never in task names, logs or the report.
"""

from __future__ import annotations

import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipelines.runtime import get
from retrack.data.item_cache import ItemCache
from retrack.evaluation.pixel import EvalReference, membership, score
from retrack.evaluation.metrics import nearest_forget_distance
from retrack.models.pixel import load_pixel_model
from retrack.evaluation.report import write_report
from retrack.evaluation.verdict import Verdict, decide

if TYPE_CHECKING:
    from pipelines.progress import Report

SAMPLE_RETRIES = 3


def _pack(model_dir: str | Path) -> dict[str, bytes]:
    root = Path(model_dir)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _unpack(files: dict[str, bytes], dest: Path) -> Path:
    for rel, data in files.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(data)
    return dest


def model_source(model: str | Path, endpoint: str | None = None):
    """An object reference a task turns into a model directory with `_open_model`: an s3:// URI
    (each node copies it once; credentials resolved here, on the driver, and kept out of task
    arguments) or a local directory's files."""
    import ray

    from retrack.storage.location import S3Options, is_s3

    if is_s3(model):
        return ray.put({"uri": str(model), "s3": S3Options(endpoint=endpoint).resolved()})
    return ray.put({"files": _pack(model)})


def _open_model(source: dict, tmp: str) -> Path:
    from retrack.storage.cache import local_model_dir

    if "uri" in source:
        return local_model_dir(source["uri"], s3=source["s3"])
    return _unpack(source["files"], Path(tmp))


def _sample_range(source: dict, n: int, first_batch: int, seed: int, batch_size: int, threads: int) -> np.ndarray:
    import torch

    from retrack.evaluation.sampling import generate

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = load_pixel_model(_open_model(source, tmp))
        return generate(model, n, seed=seed, batch_size=batch_size, first_batch=first_batch)


def _task_count(n_units: int, num_tasks: int | None = None) -> int:
    """Tasks to spread n_units over: one per cluster CPU (or `num_tasks`), at most one per unit."""
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return max(1, min(num_tasks or cpus, n_units))


def _split(n: int, parts: int) -> list[slice]:
    """Contiguous ranges covering 0..n in at most `parts` pieces."""
    per = -(-n // parts) if n else 1
    return [slice(s, min(s + per, n)) for s in range(0, n, per)]


def _gather(futures: list, sizes: list[int], progress: Report | None, part: str, done: int, total: int) -> list:
    """`get(futures)`; as each task ends, `progress(part, done, total)` counts its size in `sizes`."""
    import ray

    if progress is None:
        return get(futures)
    results, size_of, pending = {}, dict(zip(futures, sizes)), list(futures)
    progress(part, done, total)  # the tasks are submitted: the part has begun
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        results[ready[0]] = get(ready[0])  # a failed task raises at once, as `get(futures)` would
        done += size_of[ready[0]]
        progress(part, done, total)
    return [results[f] for f in futures]


def sample_on_ray(model_dirs: list[str | Path], n: int, seed: int, batch_size: int = 250, num_tasks: int | None = None,
                  progress: Report | None = None, endpoint: str | None = None) -> list[np.ndarray]:
    """n samples of each model (local directory or s3:// URI), batches spread over Ray tasks; same
    seeds for every model. `progress("samples", done, total)` as tasks end."""
    import ray

    n_batches = -(-n // batch_size)
    parts = _split(n_batches, _task_count(n_batches, num_tasks))
    sizes = [min(n, p.stop * batch_size) - p.start * batch_size for p in parts]
    # A task whose worker dies is rerun (same seeds, so the same samples): a lost worker costs time only.
    remote = ray.remote(num_cpus=1, max_retries=SAMPLE_RETRIES)(_sample_range)
    out = []
    for k, model_dir in enumerate(model_dirs):
        ref = model_source(model_dir, endpoint)
        futures = [remote.remote(ref, m, p.start, seed, batch_size, 1) for p, m in zip(parts, sizes)]
        out.append(np.concatenate(_gather(futures, sizes, progress, "samples", k * n, n * len(model_dirs))))
    return out


@dataclass
class Evaluation:
    metrics: dict[str, dict]
    verdict: Verdict
    membership: dict | None
    report_dir: Path
    holdout_items: dict[str, int] | None = None  # Stable Diffusion: held-out items read from the item cache, and encoded now


def evaluate_request(
    original_dir: str | Path,
    unlearned_dir: str | Path,
    ref: EvalReference,
    n_samples: int,
    seed: int,
    max_frequency_ratio: float,
    alpha: float,
    report_dir: str | Path,
    request_id: str,
    context: dict,
    progress: Report | None = None,
    endpoint: str | None = None,
) -> Evaluation:
    """Score an unlearned pixel DDPM against its original (local directories or s3:// URIs: the
    sampling tasks fetch them, the driver scores with its own copies)."""
    from retrack.storage.cache import local_model_dir

    before, after = sample_on_ray([original_dir, unlearned_dir], n_samples, seed, progress=progress, endpoint=endpoint)
    original, unlearned = (load_pixel_model(local_model_dir(m, endpoint=endpoint)) for m in (original_dir, unlearned_dir))
    metrics = {
        "original": score(original, before, ref) | {"integrity": 0.0, "integrity_ratio": 0.0, "feature_integrity": 0.0},
        "unlearned": score(unlearned, after, ref, original_samples01=before),
    }
    member = None if ref.holdout_m11 is None else membership(unlearned, ref, alpha)
    verdict = decide(metrics["original"], metrics["unlearned"], member, max_frequency_ratio)
    shown = slice(0, 64)
    redact = (nearest_forget_distance(before[shown], ref.forget01) < ref.threshold) | (
        nearest_forget_distance(after[shown], ref.forget01) < ref.threshold
    )
    out = write_report(report_dir, request_id, metrics, verdict, member, before[shown], after[shown], redact, context)
    return Evaluation(metrics=metrics, verdict=verdict, membership=member, report_dir=out)


# =========================================================================== Stable Diffusion


@dataclass
class SdItems:
    """What the Stable Diffusion evaluation reads from the index and the corpus. Held in memory on
    the driver and passed to tasks only inside object references: never printed, logged or
    reported."""

    forget_latents: np.ndarray  # F x D, the forgotten items' latents, flattened (the index's)
    forget_captions: list[str]  # in the order of forget_latents
    candidates: list[np.ndarray]  # per forgotten item: its nearest retained items' latents, K x D
    integrity_captions: list[str]  # retained captions, one same-seed pair of generations each
    holdout_images: np.ndarray | None = None  # non-members for the membership test
    holdout_ids: list[str] | None = None
    holdout_captions: list[str] | None = None


class SdScorer:
    """One model (the original or the unlearned), loaded once per actor: on the actor's GPU, where
    it was given one, with bf16 autocast for generation and losses; on its CPU otherwise. It
    encodes held-out items as the item cache's actors encode (the VAE in fp32 either way)."""

    def __init__(self, source: dict):
        import torch

        from retrack.models.sd import load_sd_model

        self._tmp = tempfile.TemporaryDirectory()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(1)  # one CPU per actor, as Ray placed it
        self.model = load_sd_model(_open_model(source, self._tmp.name), self.device)

    def _autocast(self):
        import torch

        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()

    def latent_shape(self) -> tuple[int, int, int]:
        return self.model.latent_shape

    def encode(self, images: np.ndarray, ids: list[str], captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Items' latents and caption embeddings in fp16, as the item cache keeps them."""
        from retrack.models.latents import item_seed
        from retrack.training.items import encode_sd_items

        part = {"image": images, "seed": np.array([item_seed(i) for i in ids]), "caption": captions}
        return encode_sd_items(self.model.vae, self.model.text_encoder, self.model.tokenizer, part, self.model.resolution)

    def generate(self, work: dict) -> tuple[np.ndarray, np.ndarray | None]:
        from retrack.evaluation.sd import generate_latents

        with self._autocast():
            return generate_latents(self.model, work["captions"], work["seeds"], work["steps"], work["guidance"],
                                    decode=work["decode"])

    def close(self) -> None:
        """Removes the model copy; the actor is killed next (a graceful exit would be retried as a failed call)."""
        self._tmp.cleanup()

    def losses(self, work: dict) -> np.ndarray:
        from retrack.evaluation.sd import item_losses

        with self._autocast():
            return item_losses(self.model, work["latents"], work["captions"], seed=work["seed"])


def _scorers(source: dict, wanted: int) -> list:
    """Up to `wanted` SdScorer actors of one model: one per cluster GPU when there are GPUs, one
    per CPU otherwise. A scorer whose worker dies is restarted and its calls rerun (same seeds,
    same results): a lost worker costs time only."""
    import ray

    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    slots = gpus or max(1, int(res.get("CPU", 1)))
    actor = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0, max_restarts=SAMPLE_RETRIES, max_task_retries=SAMPLE_RETRIES)(SdScorer)
    return [actor.remote(source) for _ in range(max(1, min(wanted, slots)))]


def _spread(scorers: list, method: str, rows: int, work_of, done: int, total: int, num_tasks: int | None = None,
            progress: Report | None = None, name: str = "") -> list:
    """`method` of the scorers over contiguous row ranges, dealt round-robin; the parts in order.
    `progress(name, rows done, total)` as calls end, counting from `done`."""
    parts = _split(rows, _task_count(rows, num_tasks))
    futures = [getattr(scorers[n % len(scorers)], method).remote(work_of(part)) for n, part in enumerate(parts)]
    return _gather(futures, [p.stop - p.start for p in parts], progress, name, done, total)


def evaluate_sd_request(
    original: str | Path,
    unlearned: str | Path,
    items: SdItems,
    settings,
    max_frequency_ratio: float,
    alpha: float,
    report_dir: str | Path,
    request_id: str,
    context: dict,
    endpoint: str | None = None,
    num_tasks: int | None = None,
    progress: Report | None = None,
    holdout_cache: ItemCache | None = None,
) -> Evaluation:
    """Score an unlearned Stable Diffusion against its original (local directories or s3:// URIs).
    `settings`: seed, forget_threshold (latent L2, None: calibrated per item), generations_per_caption,
    inference_steps, guidance_scale (`retrack.spec.EvaluationSpec` and its `stable_diffusion`).
    `holdout_cache`: where the held-out items' encodings are kept between jobs."""
    import ray

    from retrack.evaluation.metrics import membership_test
    from retrack.evaluation.sd import SD_METRIC_KEYS, ForgetReference, copy_thresholds, is_copy, memorisation, sd_integrity

    sd_settings = settings.stable_diffusion
    sources = [model_source(original, endpoint), model_source(unlearned, endpoint)]
    # One job list for both models: generation k draws its noise from seed + k (paired by seed).
    prompts = list(dict.fromkeys(items.forget_captions))  # distinct forget captions: planted copies share one
    g = sd_settings.generations_per_caption
    n_forget_gens = len(prompts) * g
    captions = [p for p in prompts for _ in range(g)] + list(items.integrity_captions)
    seeds = [settings.seed + k for k in range(len(captions))]
    shown = min(64, len(items.integrity_captions))
    decode = [False] * n_forget_gens + [k < shown for k in range(len(items.integrity_captions))]

    # One model at a time, its scorers holding one copy each. The VAE is frozen by unlearning: the
    # original's encodes the held-out items an earlier job did not keep, for both models.
    scorers = _scorers(sources[0], _task_count(len(captions), num_tasks))
    holdout, holdout_items = (None, None) if items.holdout_ids is None else _holdout_latents(scorers[0], items, holdout_cache)
    shape = get(scorers[0].latent_shape.remote())
    forget_latents = items.forget_latents.reshape(-1, *shape)

    prompt_of = np.array([prompts.index(c) for c in items.forget_captions])
    if settings.forget_threshold is not None:
        thresholds = np.full(len(prompt_of), float(settings.forget_threshold))
    else:
        thresholds = copy_thresholds(forget_latents, [c.reshape(-1, *shape) for c in items.candidates])
    ref = ForgetReference(latents=forget_latents, thresholds=thresholds, prompt_of=prompt_of, n_prompts=len(prompts))

    def gen_work(part: slice) -> dict:
        return {"captions": captions[part], "seeds": seeds[part], "decode": decode[part],
                "steps": sd_settings.inference_steps, "guidance": sd_settings.guidance_scale}

    all_latents = forget_latents if holdout is None else np.concatenate([forget_latents, holdout])
    loss_captions = list(items.forget_captions) + list(items.holdout_captions or [])

    def loss_work(part: slice) -> dict:
        return {"latents": all_latents[part], "captions": loss_captions[part], "seed": settings.seed}

    generated, losses = [], []
    n_gen, n_loss = len(captions), len(all_latents)
    for k, source in enumerate(sources):
        if k:
            scorers = _scorers(source, _task_count(n_gen, num_tasks))
        generated.append(_spread(scorers, "generate", n_gen, gen_work, k * n_gen, 2 * n_gen, num_tasks, progress, "generations"))
        losses.append(np.concatenate(_spread(scorers, "losses", n_loss, loss_work, k * n_loss, 2 * n_loss, num_tasks, progress, "losses")))
        get([actor.close.remote() for actor in scorers])  # after its calls (an actor runs them in order)
        for actor in scorers:
            ray.kill(actor, no_restart=True)
    gens = [np.concatenate([z for z, _ in parts]) for parts in generated]
    pixels = [np.concatenate([px for _, px in parts if px is not None]) for parts in generated]

    prompt = np.repeat(np.arange(len(prompts)), g)
    n_f = len(items.forget_latents)
    metrics, per_prompt = {}, {}
    for name, z, loss in zip(("original", "unlearned"), gens, losses):
        metrics[name], per_prompt[name] = memorisation(z[:n_forget_gens], prompt, ref)
        metrics[name]["forget_loss"] = float(loss[:n_f].mean())
    before, after = gens[0][n_forget_gens:], gens[1][n_forget_gens:]
    metrics["original"] |= {"integrity": 0.0, "integrity_ratio": 0.0}
    metrics["unlearned"] |= sd_integrity(before, after, ref)
    for m in metrics.values():
        m["integrity_samples"] = float(len(before))
    member = None
    if items.holdout_images is not None:
        # Both models: the original's count shows the test can see the items as members at all.
        for name, loss in zip(("original", "unlearned"), losses):
            member = membership_test(loss[:n_f], loss[n_f:], alpha=alpha)
            metrics[name]["remembered_items"] = float(member["remembered_count"])
    verdict = decide(metrics["original"], metrics["unlearned"], member, max_frequency_ratio)

    redact = is_copy(before[:shown], ref) | is_copy(after[:shown], ref)
    before01, after01 = pixels
    details = {"memorisation_per_prompt": [
        {"prompt": b["prompt"], "items": b["items"], "generations": b["generations"],
         **{f"{k}_{name}": m[k] for name, m in (("original", b), ("unlearned", a)) for k in ("frequency", "max_cosine", "min_distance_ratio")}}
        for b, a in zip(per_prompt["original"], per_prompt["unlearned"])
    ]}
    out = write_report(report_dir, request_id, metrics, verdict, member, before01, after01, redact,
                       {**context, "space": "VAE latents", "forget_prompts": len(prompts), "generations_per_prompt": g},
                       columns=SD_METRIC_KEYS, details=details)
    return Evaluation(metrics=metrics, verdict=verdict, membership=member, report_dir=out, holdout_items=holdout_items)


def _holdout_latents(scorer, items: SdItems, cache: ItemCache | None) -> tuple[np.ndarray, dict[str, int]]:
    """The held-out items' latents (fp16, as the item cache keeps them, so every job scores the
    same values) and how many were read from the cache and encoded: an earlier job's are read, the
    rest encoded by the original's scorer and kept. The held-out set is small: read here."""
    kept: dict[str, np.ndarray] = {}
    for part in cache.parts() if cache is not None else []:
        ids, latents, _ = cache.read(part, items.holdout_ids)
        kept.update(zip(ids, latents))
    new = [n for n, i in enumerate(items.holdout_ids) if i not in kept]
    if new:
        ids = [items.holdout_ids[n] for n in new]
        latents, conds = get(scorer.encode.remote(items.holdout_images[new], ids, [items.holdout_captions[n] for n in new]))
        if cache is not None:
            cache.write(ids, latents, conds)
        kept.update(zip(ids, latents))
    return np.stack([kept[i] for i in items.holdout_ids]).astype(np.float32), {"cached": len(items.holdout_ids) - len(new), "encoded": len(new)}
