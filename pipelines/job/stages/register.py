"""[register] MLflow: a run with the parameters, metrics, inputs and report, and a new model
version with its lineage tags; the alias moves last (atomic).

Needs every earlier stage's record, the unlearned model and the report. `retrack.lineage.store`
does the work. Writes nothing under the job prefix; its record holds the model version and the
MLflow run.
"""

from __future__ import annotations

import json

from pipelines.job.context import JobContext


def run(ctx: JobContext) -> dict:
    from retrack.audit import flat_metrics
    from retrack.lineage.store import Lineage, LineageStore, code_version, mlflow_env_for_storage

    spec, jobdir = ctx.spec, ctx.jobdir
    idx, nb, un, ev = (ctx.records[s] for s in ("index", "neighbours", "unlearn", "evaluate"))
    mlflow_env_for_storage(spec.storage.endpoint_url)
    store = LineageStore(spec.mlflow.tracking_uri)
    name = spec.model.registered_name or spec.mlflow.registered_model
    lineage = Lineage(
        request_id=spec.request_id,
        config_hash=spec.config_hash(),
        parent_model_uri=spec.model.uri,
        parent_model_version=spec.model.version or "",
        forget_ids_digest=nb["forget_ids_digest"],
        forget_count=nb["forget_count"],
        index_manifest_digest=idx["manifest_digest"],
        method=spec.method.name,
        method_params=json.dumps(spec.method.params, sort_keys=True),
        code_version=code_version(),
        model_digest=un["model_digest"],
    )
    run_id = store.request_run(spec.mlflow.experiment, spec.run_name, spec.request_id, spec.config_hash(), spec.mlflow.artifact_location)
    params = {f"method.{k}": v for k, v in spec.method.params.items()} | {f"train.{k}": v for k, v in spec.train.recorded().items()}
    params |= {"method": spec.method.name, "model.kind": spec.model.kind, "model.uri": spec.model.uri, "corpus.uri": spec.corpus.uri,
               "forget.count": nb["forget_count"], "workers": spec.scaling.num_workers}
    store.log_params(run_id, params)
    store.log_metrics(run_id, flat_metrics(ev["metrics"]) | {"unlearn.wall_seconds": un["wall_seconds"]})
    store.log_inputs(run_id, {
        "corpus": (spec.corpus.uri, ctx.pre.corpus_key, len(ctx.pre.corpus_index.ids)),
        "forget": (f"retrack://{spec.request_id}/forget-set", nb["forget_ids_digest"], nb["forget_count"]),
    })
    store.log_artifacts(run_id, jobdir.fetch("report"), "report")
    version = store.register(name, run_id, ctx.unlearned_model(), lineage, spec.mlflow.alias)
    store.finish_run(run_id)
    alias_version = store.alias_version(name, spec.mlflow.alias) if spec.mlflow.alias else None
    return {"model_version": version, "registered_model": name, "run_id": run_id, "alias_version": alias_version}
