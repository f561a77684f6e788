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

Modules: `store` (local directory | S3), `lease` (claims and their renewal), `queue` (the
requests: submit, claim, complete), `runner` (a run: batches, merging, outcomes).
"""

from retrack.queue.lease import Claim, Lease, LeaseKeeper
from retrack.queue.queue import CLAIMS, DEFAULT_LEASE_SECONDS, DONE, FAILED, PENDING, DeletionQueue, RequestState
from retrack.queue.runner import Outcome, Runner, RunSummary, run_queue
from retrack.queue.store import LocalStore, S3Store, Store, Versioned, open_store

__all__ = ["CLAIMS", "DEFAULT_LEASE_SECONDS", "DONE", "FAILED", "PENDING", "Claim", "DeletionQueue", "Lease", "LeaseKeeper", "LocalStore",
           "Outcome", "RequestState", "RunSummary", "Runner", "S3Store", "Store", "Versioned", "open_store", "run_queue"]
