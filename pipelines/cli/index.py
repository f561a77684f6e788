"""`retrack index ...`: the index stage's commands (the work itself: `pipelines.index`).

    retrack index build CORPUS INDEX [--encoder pixels|vae] [--index-type auto|flat|ivf|ivfpq]
    retrack index neighbours INDEX --forget IDS.txt -k 8 --out neighbours.json
    retrack index duplicates INDEX --forget IDS.txt --threshold 2.0 --policy fail|warn|add
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from pipelines.index import RayExecutor, build
from retrack.errors import InputError, RetrackError

cli = typer.Typer(help="Encode a corpus, build its sharded kNN index, find neighbours and near-duplicates.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


def _fail(exc: RetrackError) -> None:
    from pipelines.progress import console

    console.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
    raise typer.Exit(2)


def _write(uri: str, text: str, endpoint: str | None) -> None:
    from retrack.storage.location import Location

    Location.parse(uri, endpoint=endpoint).write_text(text)


@cli.command("build")
def build_cmd(
    corpus: str = typer.Argument(..., help="Corpus folder (path or s3://bucket/prefix) in the --format given."),
    out: str = typer.Argument(..., help="Index folder (path or s3://bucket/prefix)."),
    corpus_format: str = typer.Option("parquet", "--format", help="parquet (id, image[, caption] shards), imagefolder (image files + metadata.jsonl) or webdataset (tar shards)."),
    encoder: str = typer.Option("pixels", help="pixels (pixel DDPMs) or vae (Stable Diffusion latents)."),
    vae_dir: Optional[str] = typer.Option(None, help="vae: the Stable Diffusion pipeline folder (or its vae/); items are encoded at its resolution."),
    device: str = typer.Option("cuda", help="vae: device of the encoding actors when the cluster has GPUs."),
    latent_pool: int = typer.Option(1, help="vae: side of the latent blocks pooled into the indexed vector (1: latents indexed whole; see docs/scaling.md)."),
    index_type: str = typer.Option("auto", help="auto | flat | ivf | ivfpq"),
    nlist: Optional[int] = typer.Option(None), nprobe: Optional[int] = typer.Option(None),
    pq_m: Optional[int] = typer.Option(None),
    pca_dim: Optional[int] = typer.Option(None, help="Project the vectors to this many dimensions (PCA trained with the index); candidates are re-ranked on the full ones."),
    rows_per_chunk: int = typer.Option(200_000, help="Rows per encode chunk / index shard."),
    on_bad: str = typer.Option("fail", help="fail, or skip bad rows and report them in bad_rows.jsonl."),
    force: bool = typer.Option(False, help="Rebuild even if the manifest matches."),
    endpoint: Optional[str] = typer.Option(None, envvar="AWS_ENDPOINT_URL", help="S3-compatible endpoint."),
    local: bool = typer.Option(False, help="Run in this process (no Ray)."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS or local)."),
    num_cpus: Optional[int] = typer.Option(None, help="CPUs of a locally started Ray instance."),
) -> None:
    """Encode the corpus (streaming) and build, reuse or repair its sharded index."""
    from pipelines.progress import console, stage_progress
    from retrack.index import EncoderSpec, IndexParams, LocalExecutor, build_index

    try:
        spec = EncoderSpec(kind=encoder, model_dir=vae_dir, device=device if encoder == "vae" else "cpu", pool=latent_pool)
        params = IndexParams(type=index_type, nlist=nlist, nprobe=nprobe, pq_m=pq_m, pca=pca_dim)
        with stage_progress("index") as progress:
            if local:
                res = build_index(corpus, out, spec, params, LocalExecutor(threads=os.cpu_count() or 1),
                                  on_bad=on_bad, rows_per_chunk=rows_per_chunk, force=force, endpoint=endpoint,
                                  progress=progress, format=corpus_format)
            else:
                res = build(corpus, out, spec, params, on_bad, rows_per_chunk, force, endpoint, ray_address, num_cpus,
                            progress, RayExecutor(show_progress=True), format=corpus_format)
    except RetrackError as exc:
        _fail(exc)
    m = res.manifest
    console.print(f"index {res.status}: {m.count} vectors of dim {m.dim}, {m.index_type}, {len(m.shards)} shard(s), "
                  f"{res.encoded_chunks} chunk(s) encoded, {res.built_shards} shard(s) built, {res.seconds:.1f} s"
                  + (f"; {m.skipped} bad row(s) skipped (bad_rows.jsonl)" if m.skipped else ""), highlight=False)


@cli.command("neighbours")
def neighbours_cmd(
    index: str = typer.Argument(..., help="Index folder (path or s3://)."),
    forget: str = typer.Option(..., help="Forget-id file: one id a line."),
    k: int = typer.Option(8, "-k", help="Neighbours per forget item."),
    margin: Optional[int] = typer.Option(None, help="Extra candidates searched before re-ranking (default max(k, 16); deeper for PQ codes and projected indexes)."),
    out: str = typer.Option(..., help="Where to write the neighbours file (the one `retrack unlearn --neighbours` reads; path or s3://)."),
    vectors_out: Optional[str] = typer.Option(None, help="Also write the neighbour vectors [U, K, D] (.npy, local)."),
    nprobe: Optional[int] = typer.Option(None), endpoint: Optional[str] = typer.Option(None, envvar="AWS_ENDPOINT_URL"),
) -> None:
    """The K nearest retained items of each forget item (forget ids dropped, exact re-rank)."""
    from pipelines.progress import console
    from retrack.data.forget import read_forget_ids
    from retrack.data.neighbours import write_neighbours
    from retrack.index import find_neighbours, open_index
    from retrack.storage.location import Location

    try:
        with console.status("loading the index"):
            idx = open_index(index, endpoint=endpoint, nprobe=nprobe)
        forget_ids = read_forget_ids(forget, endpoint)
        with console.status(f"searching neighbours of {len(forget_ids)} forget item(s)"):
            nb = find_neighbours(idx, forget_ids, k, margin)
        write_neighbours(Location.parse(out, endpoint=endpoint), dict(zip(nb.forget_ids, nb.ids)))
        if vectors_out:
            import numpy as np

            np.save(Path(vectors_out), nb.vectors)
    except RetrackError as exc:
        _fail(exc)
    console.print(f"{len(forget_ids)} forget item(s) x {k} neighbours written to {out}", highlight=False)


@cli.command("duplicates")
def duplicates_cmd(
    index: str = typer.Argument(..., help="Index folder (path or s3://)."),
    forget: str = typer.Option(..., help="Forget-id file: one id a line."),
    threshold: float = typer.Option(..., help="Euclidean distance in the index space under which an item is a copy."),
    policy: str = typer.Option("fail", help="fail | warn | add"),
    out: Optional[str] = typer.Option(None, help="Report (JSON): the duplicates with their distances."),
    forget_out: Optional[str] = typer.Option(None, help="policy add: write the enlarged forget-id list here."),
    nprobe: Optional[int] = typer.Option(None), endpoint: Optional[str] = typer.Option(None, envvar="AWS_ENDPOINT_URL"),
) -> None:
    """Report every retained item within the threshold of a forget item; fail, warn, or add them."""
    from pipelines.progress import console
    from retrack.data.forget import read_forget_ids
    from retrack.index import find_duplicates, open_index
    from retrack.index.search import DuplicatesFound

    if policy == "add" and not forget_out:
        _fail(InputError("policy 'add' needs --forget-out for the enlarged forget-id list"))
    report = None
    try:
        idx = open_index(index, endpoint=endpoint, nprobe=nprobe)
        report = find_duplicates(idx, read_forget_ids(forget, endpoint), threshold, policy)
    except DuplicatesFound as exc:
        report = exc.report
        if out:
            _write(out, _report_json(report), endpoint)
        _fail(exc)
    except RetrackError as exc:
        _fail(exc)
    if out:
        _write(out, _report_json(report), endpoint)
    if policy == "add" and forget_out:
        _write(forget_out, "\n".join(report.forget_ids) + "\n", endpoint)
    console.print(f"{report.count} near-duplicate(s) within {threshold:g} (policy {policy})"
                  + (f"; forget set now {len(report.forget_ids)} item(s)" if policy == "add" else ""), highlight=False)


def _report_json(report) -> str:
    return json.dumps({**report.summary(), "duplicates": [
        {"id": i, "forget_position": m, "distance": round(d, 6)}
        for i, m, d in zip(report.duplicate_ids, report.matched, report.distances)]}, indent=1)
