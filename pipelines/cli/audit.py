"""`retrack audit`: show a deletion request's audit record, list every request against a registered
model, or trace a model version back through its parents to every request it reflects."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _settings(spec: Optional[Path], root: Optional[str], endpoint: Optional[str], tracking_uri: Optional[str], model: Optional[str]):
    """Storage root, endpoint, tracking URI and model name: options first, then the job spec."""
    if spec is not None:
        from retrack.config.spec import load_spec

        s = load_spec(spec)
        root = root or s.storage.root
        endpoint = endpoint or s.storage.endpoint_url
        tracking_uri = tracking_uri or s.mlflow.tracking_uri
        model = model or s.model.registered_name or s.mlflow.registered_model
    return root, endpoint, tracking_uri, model


def _client(tracking_uri: Optional[str]):
    from mlflow import MlflowClient

    from retrack.errors import InputError
    from retrack.lineage.store import check_tracking_server

    if not tracking_uri:
        raise InputError("listing or tracing model versions needs MLflow: give --tracking-uri or --spec")
    check_tracking_server(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def audit_command(
    request_id: Optional[str] = typer.Argument(None, help="Deletion request whose audit record to show."),
    spec: Optional[Path] = typer.Option(None, "--spec", help="Job spec to take the storage root, tracking URI and model name from."),
    root: Optional[str] = typer.Option(None, "--root", help="Storage root (local path or s3://bucket/prefix)."),
    endpoint_url: Optional[str] = typer.Option(None, "--endpoint-url", help="S3 endpoint of the storage root."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI."),
    model: Optional[str] = typer.Option(None, "--model", help="Registered model: list every deletion request against it."),
    version: Optional[str] = typer.Option(None, "--version", help="With --model: trace this version through its parents."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show the audit trail: `retrack audit REQUEST_ID --spec JOB.yaml`, `retrack audit --model NAME
    --tracking-uri URI [--version V]`. Forget ids appear only as a digest and a count."""
    from retrack.audit import AuditLog, requests_of_model, summarize, to_json, trace_version
    from retrack.errors import InputError

    if request_id is None and model is None:
        raise InputError("give a REQUEST_ID or --model NAME")
    root, endpoint_url, tracking_uri, model_name = _settings(spec, root, endpoint_url, tracking_uri, model)
    if request_id is not None:
        if not root:
            raise InputError("showing a request's audit record needs its storage root: give --root or --spec")
        out = summarize(AuditLog(root, endpoint_url).attempts(request_id))
        typer.echo(to_json(out) if as_json else _describe_request(out))
        return
    client = _client(tracking_uri)
    if version is not None:
        chain = trace_version(client, model_name, version)
        typer.echo(to_json(chain) if as_json else _describe_chain(model_name, chain))
        return
    rows = requests_of_model(client, model_name)
    if root:  # attempts that registered nothing (failed, running) are only in storage
        log = AuditLog(root, endpoint_url)
        registered = {r["request_id"] for r in rows}
        for rid in log.request_ids():
            s = summarize(log.attempts(rid))
            if rid not in registered and s["parent_model"].get("registered_model") == model_name:
                rows.append({"version": None, "request_id": rid, "verdict": s["verdict"], "status": s["status"], "forget_count": s["requested_forget"]["count"], "created": s["started_at"]})
    typer.echo(to_json(rows) if as_json else _describe_rows(model_name, rows))


def _describe_request(s: dict) -> str:
    m = s.get("model") or {}
    f = s.get("forget") or s["requested_forget"]
    lines = [
        f"request {s['request_id']}: {s['status']}" + (f" ({s['error']})" if s.get("error") else ""),
        f"  forget set: {f['count']} {'picture(s)' if f.get('by') == 'picture' else 'item(s)'}, sha256 {f['digest']}"
        + (f" ({f.get('duplicates_added', 0)} near-duplicate(s) added)" if s.get("forget") else ""),
        f"  parent model: {s['parent_model']['uri']} version {s['parent_model']['version'] or '-'}",
        f"  new model: {m.get('registered_model', '-')} version {m.get('version', '-')} (run {m.get('run_id', '-')})",
        f"  method: {s['method']['name']} {s['method']['params']}; config {s['config_hash']}; code {s['code_version']}",
        f"  verdict: {s['verdict'] or '-'}; outcome: {s['outcome'] or '-'}",
        *(f"    {r}" for r in s["reasons"]),
    ]
    lines += [f"  {k}: {v}" for k, v in sorted(s["metrics"].items())]
    lines.append(f"  attempts ({len(s['attempts'])}):")
    for a in s["attempts"]:
        lines.append(f"    {a['started_at']} -> {a['finished_at'] or '?'} {a['status']}" + (f" {a['error'] or a['outcome']}" if a["status"] == "failed" else "")
                     + f"; ran {','.join(a['stages_run']) or '-'}; skipped {','.join(a['stages_skipped']) or '-'}")
    return "\n".join(lines)


def _describe_rows(name: str, rows: list[dict]) -> str:
    lines = [f"deletion requests against {name}: {len(rows)}"]
    for r in rows:
        lines.append(f"  version {r['version'] or '-'}  request {r['request_id']}  forget {r.get('forget_count')}  verdict {r.get('verdict') or '-'}"
                     + (f"  outcome {r['outcome']}" if r.get("outcome") else "")
                     + (f"  parent {r['parent_model_version']}" if r.get("parent_model_version") else "") + (f"  status {r['status']}" if r.get("status") else ""))
    return "\n".join(lines)


def _describe_chain(name: str, chain: list[dict]) -> str:
    reqs = [c for c in chain if c.get("request_id")]
    lines = [f"{name} version {chain[0]['version']} reflects {len(reqs)} deletion request(s):"]
    for c in chain:
        if c.get("missing"):
            lines.append(f"  version {c['version']}: not in the registry")
        elif c["request_id"]:
            lines.append(f"  version {c['version']}: request {c['request_id']} (forget {c['forget_count']}, sha256 {c['forget_ids_digest'][:16]}..., verdict {c['verdict'] or '-'}) from version {c['parent_model_version'] or c['parent_model_uri']}")
        else:
            lines.append(f"  version {c['version']}: not registered by retrack (the original)")
    return "\n".join(lines)
