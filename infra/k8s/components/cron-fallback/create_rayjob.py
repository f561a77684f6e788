"""Create this tick's RayJob from the suspended template RayJob (the fallback CronJob's pod).

Standard library only; it talks to the Kubernetes API with the pod's ServiceAccount token, which
may only `get` the template and `create` RayJobs in this namespace. The new RayJob's name carries
the scheduled minute, so a retried pod finds its RayJob already there and succeeds without
creating a second one.

Environment: TEMPLATE (name of the template RayJob), NAMESPACE (from the downward API),
NAME_PREFIX (default: the template's name without "-template").
"""

from __future__ import annotations

import copy
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
GROUP_VERSION = "ray.io/v1"
KEEP_ANNOTATIONS = ("retrack.io/",)


def build_rayjob(template: dict, name: str) -> dict:
    """The RayJob to create: the template's spec, not suspended, under a new name."""
    meta = template.get("metadata", {})
    labels = {k: v for k, v in (meta.get("labels") or {}).items() if k != "retrack.io/template"}
    labels["retrack.io/created-by"] = "cron-fallback"
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k.startswith(KEEP_ANNOTATIONS)}
    spec = copy.deepcopy(template["spec"])
    spec["suspend"] = False
    job = {
        "apiVersion": GROUP_VERSION,
        "kind": "RayJob",
        "metadata": {"name": name, "namespace": meta.get("namespace"), "labels": labels},
        "spec": spec,
    }
    if annotations:
        job["metadata"]["annotations"] = annotations
    return job


def tick_name(prefix: str, now: float | None = None) -> str:
    """`<prefix>-YYYYMMDD-HHMM` (UTC minute of the tick): at most one RayJob per tick."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M', time.gmtime(time.time() if now is None else now))}"


def _api(method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    host = os.environ["KUBERNETES_SERVICE_HOST"]
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    with open(f"{SA_DIR}/token") as f:
        token = f.read().strip()
    ctx = ssl.create_default_context(cafile=f"{SA_DIR}/ca.crt")
    req = urllib.request.Request(
        f"https://{host}:{port}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json", "Accept": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def main() -> int:
    namespace = os.environ.get("NAMESPACE") or open(f"{SA_DIR}/namespace").read().strip()
    template_name = os.environ.get("TEMPLATE", "retrack-queue-template")
    prefix = os.environ.get("NAME_PREFIX") or template_name.removesuffix("-template")
    base = f"/apis/{GROUP_VERSION}/namespaces/{namespace}/rayjobs"
    status, template = _api("GET", f"{base}/{template_name}")
    if status != 200:
        print(f"cannot read RayJob {namespace}/{template_name}: HTTP {status} {template.get('message', '')}", file=sys.stderr)
        return 1
    job = build_rayjob(template, tick_name(prefix))
    status, created = _api("POST", base, job)
    if status == 409:
        print(f"RayJob {namespace}/{job['metadata']['name']} already exists (a retried tick): nothing to do")
        return 0
    if status not in (200, 201):
        print(f"cannot create RayJob {namespace}/{job['metadata']['name']}: HTTP {status} {created.get('message', '')}", file=sys.stderr)
        return 1
    print(f"created RayJob {namespace}/{job['metadata']['name']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
