"""[register] MLflow: a run with the parameters, metrics, inputs and report, and a new model
version with its lineage tags and its promotion decision; the alias moves last (atomic), and only
when the verdict is "forgotten" and the quality gate (`evaluation.gate`) holds.

Needs every earlier stage's record, the unlearned model and the report. `retrack.lineage.store`
does the work, `retrack.evaluation.verdict.promotion` decides. Writes nothing under the job
prefix; its record holds the model version, the MLflow run and the decision (`outcome`,
`promoted`, `gate_failed`, `reasons`): a version that was not promoted is registered all the same.
"""

from __future__ import annotations

import json

from pipelines.job.context import JobContext


def run(ctx: JobContext) -> dict:
    from retrack.audit import flat_metrics
    from retrack.evaluation.verdict import promotion
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
    report = jobdir.fetch("report")
    verdict_reasons = json.loads((report / "report.json").read_text())["verdict"]["reasons"]
    decision = promotion(ev["verdict"], verdict_reasons, ev["metrics"]["original"], ev["metrics"]["unlearned"],
                         spec.evaluation.gate.ceilings(spec.model.kind))
    run_id = store.request_run(spec.mlflow.experiment, spec.run_name, spec.request_id, spec.config_hash(), spec.mlflow.artifact_location)
    params = {f"method.{k}": v for k, v in spec.method.params.items()} | {f"train.{k}": v for k, v in spec.train.recorded().items()}
    params |= {"method": spec.method.name, "model.kind": spec.model.kind, "model.uri": spec.model.uri, "corpus.uri": spec.corpus.uri,
               "forget.count": nb["forget_count"], "workers": spec.scaling.num_workers}
    params |= {f"gate.{k}": v for k, v in spec.evaluation.gate.ceilings(spec.model.kind).items()}
    store.log_params(run_id, params)
    store.log_metrics(run_id, flat_metrics(ev["metrics"]) | {"unlearn.wall_seconds": un["wall_seconds"]})
    store.log_inputs(run_id, {
        "corpus": (spec.corpus.uri, ctx.pre.corpus_key, ctx.pre.corpus_index.count),
        "forget": (f"retrack://{spec.request_id}/forget-set", nb["forget_ids_digest"], nb["forget_count"]),
    })
    store.log_artifacts(run_id, report, "report")
    alias = spec.mlflow.alias if decision.promoted else None
    version = store.register(name, run_id, ctx.unlearned_model(), lineage, alias, tags={"verdict": ev["verdict"], **decision.tags()})
    store.finish_run(run_id)
    alias_version = store.alias_version(name, spec.mlflow.alias) if spec.mlflow.alias else None
    return {"model_version": version, "registered_model": name, "run_id": run_id, "alias_version": alias_version, **decision.to_dict()}
