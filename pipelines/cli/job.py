"""`retrack run | tune | validate | schema`: one deletion request from its job spec."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from pipelines.cli.exit_codes import ExitCode
from pipelines.cli.refusal import refusing_bad_input


@refusing_bad_input
def run(
    job: Path = typer.Argument(..., help="Job spec (YAML); see `retrack schema`."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS or a local instance)."),
) -> None:
    """Run one deletion request: index -> neighbours -> unlearn -> evaluate -> register.
    Completed stages are skipped on rerun. The version is always registered; the alias moves only
    when the verdict is "forgotten" and the quality gate (evaluation.gate) holds."""
    from pipelines.job import run_job
    from retrack.config.spec import load_spec

    finish(run_job(load_spec(job), address=address))


def finish(result) -> None:
    """Print a finished job's summary and exit with its outcome's code (0: promoted)."""
    from pipelines.progress import print_summary

    print_summary(result)
    code = ExitCode.of_outcome(result.outcome)
    if code:
        raise typer.Exit(code)


@refusing_bad_input
def tune(
    job: Path = typer.Argument(..., help="Job spec (YAML) with a `tune` section; see `retrack schema`."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS or a local instance)."),
) -> None:
    """Search the method's hyperparameters with Ray Tune, print the Pareto front of forgetting vs
    quality, then evaluate and register the chosen configuration. Rerun to resume."""
    from pipelines.tune import run_tune
    from retrack.config.spec import load_spec

    finish(run_tune(load_spec(job), address=address).job)


@refusing_bad_input
def validate(job: Path = typer.Argument(..., help="Job spec (YAML).")) -> None:
    """Check a job spec without running anything; exit 2 naming each invalid field."""
    from retrack.config.spec import load_spec

    spec = load_spec(job)
    typer.echo(f"{job}: valid (request {spec.request_id}, method {spec.method.name}, config hash {spec.config_hash()})")


def schema() -> None:
    """Print the job spec's JSON schema."""
    from retrack.config.spec import JobSpec

    typer.echo(json.dumps(JobSpec.model_json_schema(), indent=2))
