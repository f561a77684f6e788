"""A run's hold on a request: the lease record, the claim a run keeps, and the background
renewal that keeps a working run's claims alive."""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

from retrack.errors import RetrackError

if TYPE_CHECKING:
    from retrack.queue.queue import DeletionQueue


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
