"""Stable Diffusion items, encoded once (`retrack.data.item_cache`): the wanted rows the cache
holds are read from it; the rest are read from the corpus (`pipelines.items`), encoded by a Ray
Data actor pool (the VAE and text encoder loaded once per actor, on a GPU where the cluster has
GPUs) and added to the cache as they are encoded, except the items the run forgets, which are
never kept (and are removed from any part an earlier run left them in). The lookup reads the
cache parts' id columns in Ray tasks, so the driver holds only the hits among the wanted ids,
never the cache's listing of ids."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import ray

from pipelines.items import fetch_items, items_dataset, materialized
from retrack.data.item_cache import ItemCache
from retrack.storage.location import Location, S3Options
from retrack.training.prepare import CorpusIndex

PARTS_PER_LOOKUP = 16  # cache parts whose id columns one lookup task reads


@dataclass
class EncodedItems:
    dataset: ray.data.Dataset  # id, row, pos, latent (fp16), cond (fp16); materialised
    cached: int  # wanted items read from the cache
    encoded: int  # wanted items encoded now (added to the cache unless forgotten)


def encoded_items(corpus: CorpusIndex, wanted_rows: dict[int, tuple[int, int]], cache: ItemCache, model_uri: str,
                  model_s3: S3Options | None, batch_size: int) -> EncodedItems:
    """The wanted corpus rows (row -> the (row, pos) tags each item carries), encoded."""
    # Their ids first (the cache is keyed by id): a read of the wanted rows alone, nothing decoded.
    read = fetch_items(corpus, sorted(wanted_rows), corpus.source.image_shape, images=False)
    id_of = dict(zip(read["row"].tolist(), read["id"].tolist()))
    tags = {id_of[r]: t for r, t in wanted_rows.items()}
    # Credentials resolved here (workers may have started before the AWS_* variables were set),
    # inside object references, never in a task's arguments.
    cache = replace(cache, root=Location(cache.root.uri, cache.root.s3.resolved()))
    cache_ref, tags_ref = ray.put(cache), ray.put(tags)
    found = _lookup(cache, cache_ref, tags_ref)
    pieces = []
    if found:
        parts: dict[str, list[str]] = {}
        for i, part in found.items():
            parts.setdefault(part, []).append(i)
        pieces.append(ray.data.from_items([{"part": p, "ids": ids} for p, ids in parts.items()], override_num_blocks=len(parts))
                      .map_batches(_read_cached, batch_size=1, fn_kwargs={"cache": cache_ref, "tags": tags_ref}))
    missing = {r: t for r, t in wanted_rows.items() if id_of[r] not in found}
    if missing:
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        # One model copy per actor: no more actors than batches, one per GPU, else one per CPU.
        actors = min(gpus or max(1, int(res.get("CPU", 1))), -(-len(missing) // batch_size))
        pieces.append(items_dataset(corpus, missing, corpus.source.image_shape).map_batches(
            _EncodeItems, batch_size=batch_size, batch_format="numpy",
            fn_constructor_kwargs={"model_uri": model_uri, "model_s3": model_s3, "cache": cache, "resolution": corpus.source.image_shape[0]},
            concurrency=(1, actors), num_gpus=1 if gpus else 0, num_cpus=1))
    dataset = pieces[0] if len(pieces) == 1 else pieces[0].union(*pieces[1:])
    return EncodedItems(materialized(dataset), len(found), len(missing))


def subset(items: ray.data.Dataset, rows: np.ndarray, forget: bool = False) -> ray.data.Dataset:
    """The items whose retain row is in `rows` (and, with `forget`, the forget items), materialised."""
    return materialized(items.map_batches(_keep, batch_format="numpy", fn_kwargs={"rows": ray.put(np.asarray(rows)), "forget": forget}))


def _keep(batch: dict, rows, forget: bool) -> dict:
    keep = np.isin(batch["row"], ray.get(rows)) | (forget & (batch["pos"] >= 0))
    return {k: v[keep] for k, v in batch.items()}


def _lookup(cache: ItemCache, cache_ref, tags_ref) -> dict[str, str]:
    """Wanted id -> the cache part that holds it (the first, where two do)."""
    parts = [str(p) for p in cache.parts()]
    if not parts:
        return {}
    groups = [parts[s : s + PARTS_PER_LOOKUP] for s in range(0, len(parts), PARTS_PER_LOOKUP)]
    hits = materialized(ray.data.from_items([{"parts": g} for g in groups], override_num_blocks=len(groups)).map_batches(
        _part_ids, batch_size=1, fn_kwargs={"cache": cache_ref, "tags": tags_ref}))
    found: dict[str, str] = {}
    for batch in hits.iter_batches(batch_size=None, batch_format="numpy"):
        for i, part in zip(batch["id"], batch["part"]):
            found.setdefault(str(i), str(part))
    return found


def _part_ids(batch: dict, cache, tags) -> dict:
    """The wanted ids the listed parts hold; a part holding a forget item is rewritten without it first."""
    cache, wanted = ray.get(cache), ray.get(tags)
    ids, parts = [], []
    for uri in batch["parts"][0]:
        part = Location(uri, cache.root.s3)
        held = cache.ids_in(part)
        forgotten = [i for i in held if i in wanted and wanted[i][1] >= 0]
        if forgotten:
            part = cache.drop(part, forgotten)
            if part is None:
                continue
        kept = [i for i in held if i in wanted and wanted[i][1] < 0]
        ids += kept
        parts += [str(part)] * len(kept)
    return {"id": np.array(ids, dtype=object), "part": np.array(parts, dtype=object)}


def _read_cached(batch: dict, cache, tags) -> dict:
    cache, tags = ray.get(cache), ray.get(tags)
    ids, latents, conds = cache.read(Location(str(batch["part"][0]), cache.root.s3), list(batch["ids"][0]))
    return {"id": np.array(ids, dtype=object), "row": np.array([tags[i][0] for i in ids], np.int64),
            "pos": np.array([tags[i][1] for i in ids], np.int64), "latent": latents, "cond": conds}


class _EncodeItems:
    """map_batches actor: decoded items -> latents and caption embeddings, added to the cache."""

    def __init__(self, model_uri: str, model_s3: S3Options | None, cache: ItemCache, resolution: int):
        import torch

        from retrack.models.sd import load_sd_encoders
        from retrack.storage.cache import local_model_dir

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.vae, self.text_encoder, self.tokenizer = load_sd_encoders(local_model_dir(model_uri, s3=model_s3), device)
        self.cache, self.resolution = cache, resolution

    def __call__(self, batch: dict) -> dict:
        from retrack.training.items import encode_sd_items

        latents, conds = encode_sd_items(self.vae, self.text_encoder, self.tokenizer, batch, self.resolution)
        kept = batch["pos"] < 0  # the items this run forgets are never kept
        if kept.any():
            self.cache.write([str(i) for i in batch["id"][kept]], latents[kept], conds[kept])
        return {"id": batch["id"], "row": batch["row"], "pos": batch["pos"], "latent": latents, "cond": conds}
