"""`retrack queue`: submit deletion requests, and process every pending one as a batch.

    retrack queue submit JOB.yaml           queue a request (validated; one file per request)
    retrack queue run                       process the pending requests (what the schedule runs)
    retrack queue status [--json]           pending / claimed / done / failed, with model versions
    retrack queue retry REQUEST_ID          queue a failed request again

The queue lives under `--queue` (or RETRACK_QUEUE): a local directory or s3://bucket/prefix, the
S3 endpoint from --endpoint-url or AWS_ENDPOINT_URL, credentials from the AWS_* variables. How
overlapping runs stay exactly-once is described in `retrack.queue`.

`run` hands each batch to `pipelines.job.run_job`.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from pipelines.cli.exit_codes import EXIT_CODES_HELP, ExitCode
from pipelines.cli.refusal import refusing_bad_input

cli = typer.Typer(help="The deletion queue: requests wait as job specs until a scheduled run processes them as one batch.",
                  no_args_is_help=True, pretty_exceptions_enable=False)

QueueOpt = typer.Option(..., "--queue", envvar="RETRACK_QUEUE", help="Queue location: a local directory or s3://bucket/prefix.")
EndpointOpt = typer.Option(None, "--endpoint-url", envvar=["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"], help="S3-compatible endpoint.")


def _queue(queue: str, endpoint: Optional[str], lease_seconds: float = 900.0):
    from retrack.queue import DeletionQueue

    return DeletionQueue(queue, endpoint=endpoint, lease_seconds=lease_seconds)


@cli.command()
@refusing_bad_input
def submit(
    job: Path = typer.Argument(..., help="Job spec (YAML) of one deletion request."),
    queue: str = QueueOpt,
    endpoint: Optional[str] = EndpointOpt,
) -> None:
    """Validate a job spec and queue it (refused if its request id is queued or was processed)."""
    q = _queue(queue, endpoint)
    spec = q.submit(job)
    typer.echo(f"queued {spec.request_id} in {q.describe()}")


@cli.command(epilog=EXIT_CODES_HELP)
@refusing_bad_input
def run(
    queue: str = QueueOpt,
    endpoint: Optional[str] = EndpointOpt,
    address: Optional[str] = typer.Option(None, help="Ray cluster address of the jobs (default: RAY_ADDRESS or a local instance)."),
    max_batch: Optional[int] = typer.Option(None, min=1, help="Most requests merged into one job (default: all that are pending)."),
    lease_seconds: float = typer.Option(900.0, min=1.0, help="A claim expires this long after its last renewal (renewed every third of it)."),
) -> None:
    """Process every pending request as one batch; each ends done (its version promoted) or failed
    (an error, or a version registered but not promoted: its cause in `retrack queue status`); any
    failed request makes the run exit 1."""
    from pipelines.job import run_job
    from retrack.queue import run_queue

    # A stopped job (SIGTERM from `ray job stop` or Kubernetes) releases its claims on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    q = _queue(queue, endpoint, lease_seconds)
    summary = run_queue(q, run_job, address=address, max_batch=max_batch, log=lambda m: typer.echo(m))
    done = len(summary.outcomes) - len(summary.failed)
    typer.echo(f"processed {len(summary.outcomes)} request(s): {done} done, {len(summary.failed)} failed"
               + (f"; {len(summary.skipped)} held by another run" if summary.skipped else ""))
    if summary.failed:
        raise typer.Exit(ExitCode.FAILED)


@cli.command()
@refusing_bad_input
def status(
    queue: str = QueueOpt,
    endpoint: Optional[str] = EndpointOpt,
    as_json: bool = typer.Option(False, "--json", help="One JSON object per request."),
) -> None:
    """List the requests: pending, claimed (by which run, until when), done (model version), failed."""
    q = _queue(queue, endpoint)
    states = q.status()
    if as_json:
        for s in states:
            typer.echo(json.dumps({"request_id": s.request_id, "state": s.state, **s.detail}, sort_keys=True))
        return
    if not states:
        typer.echo(f"{q.describe()}: empty")
    for s in states:
        d = s.detail
        extra = {
            "claimed": lambda: f"by {d.get('owner')} until {d.get('expires')}",
            "done": lambda: f"model version {d.get('model_version')}, verdict {d.get('verdict')}, job {d.get('job_request_id')}",
            "failed": lambda: str(d.get("error")),
        }.get(s.state, lambda: "")()
        typer.echo(f"{s.state:<8} {s.request_id}  {extra}".rstrip())


@cli.command()
@refusing_bad_input
def retry(
    request_id: str = typer.Argument(..., help="Id of a failed request."),
    queue: str = QueueOpt,
    endpoint: Optional[str] = EndpointOpt,
) -> None:
    """Queue a failed request again (with the spec it was submitted with)."""
    q = _queue(queue, endpoint)
    q.retry(request_id)
    typer.echo(f"queued {request_id} again in {q.describe()}")
