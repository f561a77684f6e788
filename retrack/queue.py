"""The deletion queue: requests wait as job-spec files under a storage prefix until a scheduled
`retrack queue run` processes them as one batch.

Layout under the queue prefix (a local directory or `s3://bucket/prefix`):

    pending/<request id>.yaml   a submitted job spec, exactly as submitted (validated first)
    claims/<request id>.json    the lease of the run processing it: owner token, expiry
    done/<request id>.json      outcome: model version, verdict, report, batch; no forget ids
    failed/<request id>.json    outcome of a failure (the error), with failed/<request id>.yaml
                                kept so that `retrack queue retry` can queue it again

Exactly once, even when two runs overlap (a schedule firing while the last run still works):
a run processes a request only while it holds its claim, and a claim is taken atomically:
- on a local filesystem the claim file is created with a hard link from a complete temporary
  file (`os.link` fails when the name exists), and the few read-compare-write steps (lease
  take-over, renewal, release) run under an exclusive `flock` of `<queue>/.lock`;
- on S3 with conditional writes: `PutObject` with `If-None-Match: *` creates the claim only if
  no claim exists, and take-over, renewal and release are `If-Match: <ETag>` operations that fail
  if anyone changed the claim meanwhile. SeaweedFS (4.x) and AWS S3 honour both; a run first
  probes the server and refuses to start on one that ignores them. Every claim is read back.
After claiming, the run checks that the request is still pending and not done, because a claim
is released only after the outcome is written: a run that lists a request just before another
run finishes it finds the outcome there. A lease expires (default 15 min) unless its run renews
it (every third of the lease, from a background thread), so the claims of a crashed run are
retaken by the next one.

Requests claimed together that agree on everything but their id and forget set (same model,
corpus, method, training, storage and MLflow settings) are merged into one job that forgets the
union of their items: one unlearning run and one new model version for the batch, rather than
versions that each start from the same parent and so forget only their own items. A merged job
that is refused for bad input is split, each request then run alone, so one bad request cannot
sink the others. Runs are keyed by the batch (`batch-<digest of the request ids>`), so a batch
retaken after a crash resumes under the same run name.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator


from retrack.digest import ids_digest
from retrack.errors import InputError, RetrackError, StorageError
from retrack.config.spec import JobSpec, check_safe_name, parse_spec
from retrack.storage.location import Location, S3Options

DEFAULT_LEASE_SECONDS = 900.0
PENDING, CLAIMS, DONE, FAILED = "pending", "claims", "done", "failed"

Runner = Callable[[JobSpec, "str | None"], Any]


# =========================================================================== stores


@dataclass(frozen=True)
class Versioned:
    data: bytes
    version: str  # an opaque token: the S3 ETag, or a digest of a local file's content


class Store:
    """The few operations the queue needs; keys are '/'-separated paths under the queue root."""

    def get(self, key: str) -> Versioned | None:
        raise NotImplementedError

    def create(self, key: str, data: bytes) -> str | None:
        """Write `key` only if it does not exist; its version, or None when it exists."""
        raise NotImplementedError

    def replace(self, key: str, data: bytes, version: str) -> str | None:
        """Overwrite `key` only if it still has `version`; the new version, or None."""
        raise NotImplementedError

    def put(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def delete(self, key: str, version: str | None = None) -> bool:
        """Delete `key` (only if it still has `version`, when given); False if it did not."""
        raise NotImplementedError

    def list(self, folder: str) -> list[str]:
        """Names of the files directly in `folder`, sorted."""
        raise NotImplementedError

    def check_atomic(self) -> None:
        """Raise StorageError when create/replace cannot be trusted to be atomic here."""

    def describe(self) -> str:
        raise NotImplementedError


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


class LocalStore(Store):
    """A directory on a local (POSIX) filesystem."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the queue directory {self.root}: {exc.strerror}") from None

    def describe(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / ".lock", "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _temp(self, target: Path, data: bytes) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return Path(tmp)

    def get(self, key: str) -> Versioned | None:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {self._path(key)}: {exc.strerror}") from None
        return Versioned(data, _digest(data))

    def create(self, key: str, data: bytes) -> str | None:
        target = self._path(key)
        tmp = self._temp(target, data)
        try:
            os.link(tmp, target)  # atomic, and fails if the name exists: the file appears complete
        except FileExistsError:
            return None
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):  # no hard links here
                with self._locked():
                    if target.exists():
                        return None
                    os.replace(tmp, target)
                    return _digest(data)
            raise StorageError(f"cannot create {target}: {exc.strerror}") from None
        finally:
            tmp.unlink(missing_ok=True)
        return _digest(data)

    def replace(self, key: str, data: bytes, version: str) -> str | None:
        target = self._path(key)
        with self._locked():
            current = self.get(key)
            if current is None or current.version != version:
                return None
            os.replace(self._temp(target, data), target)
        return _digest(data)

    def put(self, key: str, data: bytes) -> None:
        target = self._path(key)
        try:
            os.replace(self._temp(target, data), target)
        except OSError as exc:
            raise StorageError(f"cannot write {target}: {exc.strerror}") from None

    def delete(self, key: str, version: str | None = None) -> bool:
        target = self._path(key)
        with self._locked():
            if version is not None:
                current = self.get(key)
                if current is None or current.version != version:
                    return False
            try:
                target.unlink()
            except FileNotFoundError:
                return False
        return True

    def list(self, folder: str) -> list[str]:
        d = self._path(folder)
        try:
            return sorted(p.name for p in d.iterdir() if p.is_file() and not p.name.startswith("."))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StorageError(f"cannot list {d}: {exc.strerror}") from None


class S3Store(Store):
    """A prefix in an S3 bucket, through boto3 (pyarrow has no conditional writes)."""

    def __init__(self, location: Location):
        import boto3
        from botocore.config import Config

        opts: S3Options = location.s3.resolved()
        endpoint = opts.endpoint
        if endpoint and "://" not in endpoint:
            endpoint = "https://" + endpoint
        self.bucket = location.bucket
        self.prefix = location.path.split("/", 1)[1].strip("/") if "/" in location.path else ""
        self.uri = location.uri
        self.endpoint = opts.describe()
        os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=opts.access_key,
            aws_secret_access_key=opts.secret_key,
            region_name=opts.region,
            config=Config(
                connect_timeout=opts.connect_timeout,
                read_timeout=opts.request_timeout,
                retries={"max_attempts": opts.retries, "mode": "standard"},
            ),
        )

    def describe(self) -> str:
        return f"{self.uri} (at {self.endpoint})"

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @staticmethod
    def _code(exc: Exception) -> str:
        return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))

    def _fail(self, action: str, key: str, exc: Exception) -> StorageError:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return StorageError(f"cannot {action} s3://{self.bucket}/{self._key(key)} (at {self.endpoint}): {msg}")

    def _call(self, action: str, key: str, fn: Callable[[], Any], refused: tuple[str, ...] = ()) -> Any:
        """`fn()`, None when the server answers one of the `refused` codes, else StorageError."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except ClientError as exc:
            if self._code(exc) in refused:
                return None
            raise self._fail(action, key, exc) from None
        except BotoCoreError as exc:
            raise self._fail(action, key, exc) from None

    def get(self, key: str) -> Versioned | None:
        def fetch():
            r = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return Versioned(r["Body"].read(), r["ETag"])

        return self._call("read", key, fetch, refused=("NoSuchKey", "404"))

    def create(self, key: str, data: bytes) -> str | None:
        r = self._call(
            "create", key,
            lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*"),
            refused=("PreconditionFailed", "412", "ConditionalRequestConflict", "409"),
        )
        return None if r is None else r["ETag"]

    def replace(self, key: str, data: bytes, version: str) -> str | None:
        r = self._call(
            "replace", key,
            lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfMatch=version),
            refused=("PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404"),
        )
        return None if r is None else r["ETag"]

    def put(self, key: str, data: bytes) -> None:
        self._call("write", key, lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data))

    def delete(self, key: str, version: str | None = None) -> bool:
        kwargs = {"IfMatch": version} if version is not None else {}
        r = self._call(
            "delete", key,
            lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key), **kwargs),
            refused=("PreconditionFailed", "412", "NoSuchKey", "404"),
        )
        return r is not None

    def list(self, folder: str) -> list[str]:
        base = self._key(folder).rstrip("/") + "/"

        def names():
            out = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base, Delimiter="/"):
                out += [o["Key"][len(base):] for o in page.get("Contents", [])]
            return out

        return sorted(n for n in self._call("list", folder, names) if n and not n.startswith("."))

    def check_atomic(self) -> None:
        """Conditional writes are what make claims exclusive: refuse a server that ignores them."""
        key = f"_probe/{uuid.uuid4().hex}"
        first = self.create(key, b"1")
        second = self.create(key, b"2") if first is not None else None
        stale = self.replace(key, b"3", '"0123456789abcdef0123456789abcdef"') if first is not None else None
        self._call("delete", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key)), refused=("NoSuchKey", "404"))
        if first is None or second is not None or stale is not None:
            raise StorageError(
                f"the S3 server at {self.endpoint} does not honour conditional writes (If-None-Match / If-Match on PutObject): "
                "two overlapping queue runs could process a request twice, so the queue refuses to run there"
            )


def open_store(uri: str, endpoint: str | None = None) -> Store:
    loc = Location.parse(uri, endpoint=endpoint)
    return S3Store(loc) if loc.is_s3 else LocalStore(loc.path)


# =========================================================================== records


@dataclass
class Lease:
    owner: str
    host: str
    pid: int
    acquired_at: float
    expires_at: float

    def to_bytes(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @classmethod
    def parse(cls, data: bytes) -> "Lease | None":
        try:
            d = json.loads(data)
            return cls(str(d["owner"]), str(d.get("host", "")), int(d.get("pid", 0)), float(d["acquired_at"]), float(d["expires_at"]))
        except (ValueError, KeyError, TypeError):
            return None  # unreadable: treated as expired


@dataclass
class Claim:
    request_id: str
    version: str
    lease: Lease
    lost: bool = False  # another run took the lease over while this one held it
    completed: bool = False  # outcome written and claim released


@dataclass
class RequestState:
    request_id: str
    state: str  # pending | claimed | done | failed
    detail: dict = field(default_factory=dict)


def _now_iso(t: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if t is None else t))


def read_forget_ids(spec: JobSpec) -> list[str]:
    """The forget ids a request names: inline, or one a line in its file (local or s3://)."""
    if spec.forget.ids is not None:
        return list(spec.forget.ids)
    text = Location.parse(spec.forget.file, endpoint=spec.storage.endpoint_url).read_text()
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def batch_id(request_ids: list[str]) -> str:
    return "batch-" + hashlib.sha256("\n".join(sorted(request_ids)).encode()).hexdigest()[:16]


def merge_key(spec: JobSpec) -> str:
    """What requests must share to be unlearned in one job: everything but the id and the items."""
    d = spec.model_dump(mode="json")
    d.pop("request_id")
    d["forget"].pop("ids", None)
    d["forget"].pop("file", None)
    return json.dumps(d, sort_keys=True)


def merged_spec(specs: list[JobSpec], ids: dict[str, list[str]]) -> JobSpec:
    """One job for compatible requests: their forget sets' union, named after the batch."""
    if len(specs) == 1:
        return specs[0]
    data = specs[0].model_dump(mode="json")
    data["request_id"] = batch_id([s.request_id for s in specs])
    data["forget"]["ids"] = sorted({i for s in specs for i in ids[s.request_id]})
    data["forget"]["file"] = None
    return JobSpec.model_validate(data)


def result_fields(result: Any) -> dict:
    """model_version, verdict and report_uri of whatever the runner returned (object or mapping)."""
    get = result.get if isinstance(result, dict) else (lambda k: getattr(result, k, None))
    out = {k: get(k) for k in ("model_version", "verdict", "report_uri")}
    return {k: (None if v is None else str(v)) for k, v in out.items()}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


# =========================================================================== the queue


class DeletionQueue:
    def __init__(self, uri: str, endpoint: str | None = None, lease_seconds: float = DEFAULT_LEASE_SECONDS,
                 store: Store | None = None, clock: Callable[[], float] = time.time):
        if lease_seconds <= 0:
            raise InputError("the lease must last a positive number of seconds")
        self.uri = uri
        self.store = store or open_store(uri, endpoint)
        self.lease_seconds = float(lease_seconds)
        self.clock = clock
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"

    def describe(self) -> str:
        return self.store.describe()

    # -- submitting ---------------------------------------------------------------------
    def submit(self, spec_path: str | Path) -> JobSpec:
        """Queue a validated job spec (kept as written); a request id is queued or done only once."""
        from retrack.config.spec import load_spec

        spec = load_spec(spec_path)
        rid = spec.request_id
        if self.store.get(f"{DONE}/{rid}.json") is not None:
            raise InputError(f"request {rid} was already processed (see `retrack queue status`); give a new request_id")
        if self.store.get(f"{FAILED}/{rid}.json") is not None:
            raise InputError(f"request {rid} failed earlier: queue it again with `retrack queue retry {rid}`, or give a new request_id")
        if self.store.create(f"{PENDING}/{rid}.yaml", Path(spec_path).read_bytes()) is None:
            raise InputError(f"request {rid} is already queued")
        return spec

    def retry(self, request_id: str) -> None:
        """Queue a failed request again, with the spec it was submitted with."""
        check_safe_name(request_id, "request id")
        failed = self.store.get(f"{FAILED}/{request_id}.yaml")
        if failed is None:
            raise InputError(f"request {request_id} has not failed (nothing to retry)")
        if self.store.create(f"{PENDING}/{request_id}.yaml", failed.data) is None:
            raise InputError(f"request {request_id} is already queued")
        self.store.delete(f"{FAILED}/{request_id}.json")
        self.store.delete(f"{FAILED}/{request_id}.yaml")

    # -- reading ----------------------------------------------------------------------------
    def pending(self) -> list[str]:
        return [n[: -len(".yaml")] for n in self.store.list(PENDING) if n.endswith(".yaml")]

    def lease_of(self, request_id: str) -> tuple[Lease | None, str | None]:
        v = self.store.get(f"{CLAIMS}/{request_id}.json")
        return (None, None) if v is None else (Lease.parse(v.data), v.version)

    def status(self) -> list[RequestState]:
        out = []
        now = self.clock()
        for rid in self.pending():
            lease, _ = self.lease_of(rid)
            if lease is not None and lease.expires_at > now:
                out.append(RequestState(rid, "claimed", {"owner": lease.owner, "expires": _now_iso(lease.expires_at)}))
            else:
                out.append(RequestState(rid, "pending"))
        for folder in (DONE, FAILED):
            for name in self.store.list(folder):
                if name.endswith(".json"):
                    v = self.store.get(f"{folder}/{name}")
                    detail = json.loads(v.data) if v is not None else {}
                    out.append(RequestState(name[: -len(".json")], folder, detail))
        return out

    # -- claiming ---------------------------------------------------------------------------
    def _new_lease(self) -> Lease:
        now = self.clock()
        return Lease(self.owner, socket.gethostname(), os.getpid(), now, now + self.lease_seconds)

    def claim(self, request_id: str) -> Claim | None:
        """Take the request's lease if nobody holds a live one; None when another run has it,
        or when it is no longer pending."""
        key = f"{CLAIMS}/{request_id}.json"
        lease = self._new_lease()
        version = self.store.create(key, lease.to_bytes())
        if version is None:
            current = self.store.get(key)
            if current is None:  # released meanwhile: its outcome is written, or it is free
                version = self.store.create(key, lease.to_bytes())
            else:
                held = Lease.parse(current.data)
                if held is not None and held.owner == self.owner:  # our own create, answered late
                    version = current.version
                elif held is not None and held.expires_at > self.clock():
                    return None
                else:  # expired (its run crashed): take it over, unless someone else just did
                    version = self.store.replace(key, lease.to_bytes(), current.version)
        if version is None:
            return None
        back = self.store.get(key)  # read back: the claim must be ours, as written
        mine = Lease.parse(back.data) if back is not None else None
        if back is None or back.version != version or mine is None or mine.owner != self.owner:
            return None
        claim = Claim(request_id, version, lease)
        if self.store.get(f"{DONE}/{request_id}.json") is not None or self.store.get(f"{PENDING}/{request_id}.yaml") is None:
            self.release(claim)  # finished by another run between our listing and our claim
            return None
        return claim

    def renew(self, claim: Claim) -> bool:
        lease = self._new_lease()
        lease.acquired_at = claim.lease.acquired_at
        version = self.store.replace(f"{CLAIMS}/{claim.request_id}.json", lease.to_bytes(), claim.version)
        if version is None:
            claim.lost = True
            return False
        claim.version, claim.lease = version, lease
        return True

    def release(self, claim: Claim) -> None:
        self.store.delete(f"{CLAIMS}/{claim.request_id}.json", claim.version)

    def spec_of(self, request_id: str) -> tuple[bytes, JobSpec]:
        v = self.store.get(f"{PENDING}/{request_id}.yaml")
        if v is None:
            raise StorageError(f"request {request_id} vanished from {self.describe()}/{PENDING}")
        return v.data, parse_spec(v.data.decode(), f"queued request {request_id}")

    # -- finishing --------------------------------------------------------------------------
    def complete(self, claim: Claim, record: dict, ok: bool, spec_text: bytes | None = None) -> None:
        """Write the outcome, then drop the pending spec, then the claim (in that order: see the
        module docstring)."""
        rid = claim.request_id
        record = {"request_id": rid, "status": "done" if ok else "failed", "processed_by": self.owner,
                  "finished_at": _now_iso(), **record}
        if claim.lost:
            record["warning"] = "this run's lease was lost while it processed the request"
        if ok:
            self.store.put(f"{DONE}/{rid}.json", json.dumps(record, indent=2, sort_keys=True).encode())
        else:
            if spec_text is not None:
                self.store.put(f"{FAILED}/{rid}.yaml", spec_text)
            self.store.put(f"{FAILED}/{rid}.json", json.dumps(record, indent=2, sort_keys=True).encode())
        self.store.delete(f"{PENDING}/{rid}.yaml")
        self.release(claim)


class LeaseKeeper:
    """Renews a run's claims in the background (every third of the lease) until stopped."""

    def __init__(self, queue: DeletionQueue, claims: list[Claim], log: Callable[[str], None]):
        self.queue, self.claims, self.log = queue, claims, log
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="retrack-queue-leases", daemon=True)

    def __enter__(self) -> "LeaseKeeper":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Hold renewals while a claim's outcome is written and the claim released."""
        with self._lock:
            yield

    def _run(self) -> None:
        while not self._stop.wait(self.queue.lease_seconds / 3):
            with self._lock:
                for claim in self.claims:
                    if claim.lost or claim.completed:
                        continue
                    try:
                        if not self.queue.renew(claim):
                            self.log(f"warning: lost the lease of request {claim.request_id} (another run took it over)")
                    except RetrackError as exc:
                        self.log(f"warning: could not renew the lease of request {claim.request_id}: {exc}")


# =========================================================================== a run


@dataclass
class Outcome:
    request_id: str
    ok: bool
    record: dict


@dataclass
class RunSummary:
    outcomes: list[Outcome] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # pending but claimed by another run

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]


def run_queue(queue: DeletionQueue, runner: Runner, address: str | None = None, max_batch: int | None = None,
              log: Callable[[str], None] = print) -> RunSummary:
    """Process the requests pending when the run starts: claim up to `max_batch` of them (all by
    default), run each compatible group as one job, record every outcome; repeat until none is
    left to claim. Requests another run holds are left to it."""
    if max_batch is not None and max_batch < 1:
        raise InputError("--max-batch must be at least 1")
    queue.store.check_atomic()
    summary = RunSummary()
    todo = queue.pending()
    log(f"queue {queue.describe()}: {len(todo)} pending request(s)")
    while todo:
        claims: list[Claim] = []
        rest = []
        for rid in todo:
            if max_batch is not None and len(claims) >= max_batch:
                rest.append(rid)
                continue
            claim = queue.claim(rid)
            if claim is not None:
                claims.append(claim)
            elif rid not in summary.skipped:
                summary.skipped.append(rid)
        todo = rest
        if not claims:
            continue
        with LeaseKeeper(queue, claims, log) as keeper:
            try:
                summary.outcomes += _process(queue, claims, runner, address, keeper, log)
            finally:
                for claim in claims:  # anything not completed (an interrupt): free it at once
                    if not claim.completed:
                        with keeper.paused():
                            queue.release(claim)
    summary.skipped = [r for r in summary.skipped if r not in {o.request_id for o in summary.outcomes}]
    return summary


def _process(queue: DeletionQueue, claims: list[Claim], runner: Runner, address: str | None,
             keeper: LeaseKeeper, log: Callable[[str], None]) -> list[Outcome]:
    outcomes: list[Outcome] = []
    started = _now_iso()

    def finish(claim: Claim, ok: bool, record: dict, text: bytes | None) -> None:
        with keeper.paused():
            queue.complete(claim, {"claimed_at": started, **record}, ok, spec_text=text)
            claim.completed = True
        outcomes.append(Outcome(claim.request_id, ok, record))
        if ok:
            log(f"done    {claim.request_id}: model version {record.get('model_version')}, verdict {record.get('verdict')} (job {record.get('job_request_id')})")
        else:
            log(f"failed  {claim.request_id}: {record.get('error')}")

    # Read every claimed request; one that cannot be read fails alone, before any job runs.
    ready: list[tuple[Claim, bytes, JobSpec, list[str]]] = []
    for claim in claims:
        text = None
        try:
            text, spec = queue.spec_of(claim.request_id)
            ids = read_forget_ids(spec)
            if not ids:
                raise InputError("the forget set is empty: nothing to unlearn")
            ready.append((claim, text, spec, ids))
        except RetrackError as exc:
            finish(claim, False, {"error": _first_line(exc)}, text)

    groups: dict[str, list[tuple[Claim, bytes, JobSpec, list[str]]]] = {}
    for item in ready:
        groups.setdefault(merge_key(item[2]), []).append(item)

    def run_group(items: list[tuple[Claim, bytes, JobSpec, list[str]]]) -> None:
        specs = [s for _, _, s, _ in items]
        ids = {s.request_id: i for _, _, s, i in items}
        job = merged_spec(specs, ids)
        log(f"running {job.request_id} for {len(items)} request(s): {', '.join(s.request_id for s in specs)}")
        try:
            result = runner(job, address)
        except Exception as exc:  # noqa: BLE001 - every failure is recorded against its requests
            if len(items) > 1 and isinstance(exc, InputError):
                log(f"job {job.request_id} refused its input ({_first_line(exc)}); running its requests one by one")
                for item in items:
                    run_group([item])
                return
            for claim, text, spec, _ in items:
                finish(claim, False, {"error": _first_line(exc), "job_request_id": job.request_id, "batch_size": len(items)}, text)
            return
        fields = result_fields(result)
        for claim, _, spec, i in items:
            finish(claim, True, {**fields, "job_request_id": job.request_id, "batch_size": len(items),
                                 "forget_count": len(i), "forget_ids_digest": ids_digest(i)}, None)

    for items in groups.values():
        run_group(items)
    return outcomes
