"""Stable Diffusion items, encoded once (`retrack.data.item_cache`): the wanted rows the cache
holds are read from it; the rest are encoded by a Ray Data actor pool (the encoders loaded once
per actor, on a GPU where the cluster has GPUs) and added to the cache as they are encoded,
except the items the run forgets, which are never kept (and are removed from any part an earlier
run left them in). Where the run names the corpus's index built with the model's VAE, which holds
every item's latent, the actors read the latents from it and encode the captions alone (no VAE);
otherwise they read the items from the corpus (`pipelines.items`) and run the VAE too. The
lookups read the cache parts' id columns and the index shards' ids in Ray tasks, so the driver
holds only the hits among the wanted ids, never a listing of the cache's or the corpus's ids."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import ray

from pipelines.items import fetch_items, items_dataset, materialized
from retrack.data.item_cache import ItemCache
from retrack.errors import CorpusError
from retrack.index.manifest import Manifest
from retrack.storage.location import Location, S3Options
from retrack.training.prepare import CorpusIndex

PARTS_PER_LOOKUP = 16  # cache parts whose id columns one lookup task reads
SHARDS_PER_LOOKUP = 4  # index shards whose ids one lookup task reads


@dataclass
class EncodedItems:
    dataset: ray.data.Dataset  # id, row, pos, latent (fp16), cond (fp16); materialised
    cached: int  # wanted items read from the cache
    from_index: int  # wanted items whose latents were read from the index and captions encoded now
    encoded: int  # wanted items run through the VAE and the text encoder now
    # (the last two are added to the cache unless forgotten)


def encoded_items(corpus: CorpusIndex, wanted_rows: dict[int, tuple[int, int]], cache: ItemCache, model_uri: str,
                  model_s3: S3Options | None, batch_size: int, index: tuple[Location, Manifest] | None = None) -> EncodedItems:
    """The wanted corpus rows (row -> the (row, pos) tags each item carries), encoded; `index`:
    the corpus's index of the model's latents (`retrack.training.prepare.latent_index`)."""
    # Their ids (the cache is keyed by id) and captions first: the wanted rows alone, no image fetched.
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
        kwargs = {"model_uri": model_uri, "model_s3": model_s3, "cache": cache, "resolution": corpus.source.image_shape[0]}
        if index is None:
            items = items_dataset(corpus, missing, corpus.source.image_shape)
        else:
            index = (Location(index[0].uri, index[0].s3.resolved()), index[1])
            items = _indexed(read, missing, index)
            kwargs["index"] = index
        pieces.append(items.map_batches(_EncodeItems, batch_size=batch_size, batch_format="numpy", fn_constructor_kwargs=kwargs,
                                        concurrency=(1, actors), num_gpus=1 if gpus else 0, num_cpus=1))
    dataset = pieces[0] if len(pieces) == 1 else pieces[0].union(*pieces[1:])
    from_index = len(missing) if index is not None else 0
    return EncodedItems(materialized(dataset), len(found), from_index, len(missing) - from_index)


def _indexed(read: dict, missing: dict[int, tuple[int, int]], index: tuple[Location, Manifest]) -> ray.data.Dataset:
    """The missing items' ids, tags, captions and rows in the index, whose shards' ids Ray tasks
    search (the driver never holds them)."""
    pick = np.isin(read["row"], np.fromiter(missing, np.int64, len(missing)))
    ids, rows, captions = read["id"][pick], read["row"][pick], read["caption"][pick]
    groups = [list(range(s, min(s + SHARDS_PER_LOOKUP, len(index[1].shards)))) for s in range(0, len(index[1].shards), SHARDS_PER_LOOKUP)]
    ids_ref, index_ref = ray.put(ids), ray.put(index)
    found = materialized(ray.data.from_items([{"shards": g} for g in groups], override_num_blocks=len(groups)).map_batches(
        _shard_rows, batch_size=1, fn_kwargs={"index": index_ref, "ids": ids_ref}))
    index_row = np.full(len(ids), -1, np.int64)
    for batch in found.iter_batches(batch_size=None, batch_format="numpy"):
        index_row[batch["at"]] = batch["index_row"]
    if (index_row < 0).any():  # rows the index skipped as unreadable when it was built
        raise CorpusError(f"{int((index_row < 0).sum())} of the items the run trains on are not in its index {index[0].uri}: "
                          "they were skipped as unreadable when it was built; fix or remove them and build it again")
    return ray.data.from_items([{"id": str(i), "row": missing[int(r)][0], "pos": missing[int(r)][1], "caption": str(c), "index_row": int(x)}
                                for i, r, c, x in zip(ids, rows, captions, index_row)])


def _shard_rows(batch: dict, index, ids) -> dict:
    """Where the wanted ids sit among the listed shards' rows."""
    import pyarrow as pa

    from retrack.index.serving import rows_in_shards

    (root, manifest), ids = ray.get(index), ray.get(ids)
    rows = rows_in_shards(root, manifest, [int(n) for n in batch["shards"][0]], pa.array(list(ids), pa.string()))
    at = np.flatnonzero(rows >= 0)
    return {"at": at, "index_row": rows[at]}


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
    """map_batches actor: decoded items (or, with the index, captions and index rows) -> latents
    and caption embeddings, added to the cache."""

    def __init__(self, model_uri: str, model_s3: S3Options | None, cache: ItemCache, resolution: int,
                 index: tuple[Location, Manifest] | None = None):
        import torch

        from retrack.index.serving import stored_full_vectors
        from retrack.models.sd import load_sd_encoders, load_sd_text_encoder
        from retrack.storage.cache import local_model_dir

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model_dir = local_model_dir(model_uri, s3=model_s3)
        self.index_latents = None if index is None else stored_full_vectors(*index)
        if index is None:
            self.vae, self.text_encoder, self.tokenizer = load_sd_encoders(model_dir, device)
        else:  # the latents are the index's: no VAE
            self.text_encoder, self.tokenizer = load_sd_text_encoder(model_dir, device)
        self.cache, self.resolution = cache, resolution

    def __call__(self, batch: dict) -> dict:
        from retrack.training.items import encode_sd_captions, encode_sd_items

        if self.index_latents is not None:
            latents = self.index_latents(batch["index_row"]).reshape(-1, *self.cache.latent_shape).astype(np.float16)
            conds = encode_sd_captions(self.text_encoder, self.tokenizer, batch["caption"])
        else:
            latents, conds = encode_sd_items(self.vae, self.text_encoder, self.tokenizer, batch, self.resolution)
        kept = batch["pos"] < 0  # the items this run forgets are never kept
        if kept.any():
            self.cache.write([str(i) for i in batch["id"][kept]], latents[kept], conds[kept])
        return {"id": batch["id"], "row": batch["row"], "pos": batch["pos"], "latent": latents, "cond": conds}
