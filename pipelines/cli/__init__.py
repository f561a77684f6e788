"""The `retrack` command line: the root app, one module per command group (`job`: run, tune,
validate, schema; `demo`: the embedded benchmark; `audit`; `queue`; `index`; `unlearn`). Commands import their stage modules inside, so `--help` stays fast."""

from __future__ import annotations

import typer

from pipelines.cli import audit, demo, index, job, queue
from pipelines.cli.unlearn import unlearn_command
from pipelines.cli.exit_codes import EXIT_CODES_HELP
from pipelines.cli.refusal import refusing_bad_input

app = typer.Typer(
    help="Make a trained diffusion model forget specific training data (ReTrack and baselines, on Ray).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

JOBS = (demo.demo, job.run, job.tune)  # they exit with the job's outcome
for command in (demo.pretrain, demo.evaluate, demo.demo, job.run, job.tune, job.validate, job.schema):
    app.command(epilog=EXIT_CODES_HELP if command in JOBS else None)(command)
app.command("unlearn", help="Unlearn the listed items from a diffusion model with Ray Train (every input checked first).")(refusing_bad_input(unlearn_command))
app.add_typer(index.cli, name="index", help="Build the corpus kNN index; find neighbours and near-duplicates.")
app.add_typer(queue.cli, name="queue", help="The deletion queue: submit requests, run the pending ones as one batch job.")
app.command("audit", help="The audit trail: a request's record, every request against a model, a version's lineage.")(refusing_bad_input(audit.audit_command))
