"""The deletion queue's requests: submit, retry, list, claim, renew, release, complete."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from retrack.config.spec import JobSpec, check_safe_name, parse_spec
from retrack.errors import InputError, StorageError
from retrack.queue.lease import Claim, Lease
from retrack.queue.store import Store, open_store

DEFAULT_LEASE_SECONDS = 900.0
PENDING, CLAIMS, DONE, FAILED = "pending", "claims", "done", "failed"


@dataclass
class RequestState:
    request_id: str
    state: str  # pending | claimed | done | failed
    detail: dict = field(default_factory=dict)


def now_iso(t: float | None = None) -> str:
    """A UTC time as the outcome records write it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if t is None else t))


class DeletionQueue:
    """The queue under one prefix, as one run (its `owner` token) sees it."""

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
                out.append(RequestState(rid, "claimed", {"owner": lease.owner, "expires": now_iso(lease.expires_at)}))
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
                  "finished_at": now_iso(), **record}
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
