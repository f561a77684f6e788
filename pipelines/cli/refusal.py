"""How every `retrack` command refuses bad input: one line on stderr, exit code 2 (ExitCode.REFUSED), no traceback."""

from __future__ import annotations

import functools

import typer

from pipelines.cli.exit_codes import ExitCode


def refusing_bad_input(fn):
    """Turn retrack's own errors (and invalid settings) into a one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pydantic import ValidationError

        from retrack.errors import RetrackError, describe_validation_error, redact

        try:
            return fn(*args, **kwargs)
        except RetrackError as exc:
            typer.secho(redact(f"error: {exc}"), fg="red", err=True)
            raise typer.Exit(ExitCode.REFUSED) from None
        except ValidationError as exc:
            typer.secho(redact(f"error: invalid settings: {describe_validation_error(exc)}"), fg="red", err=True)
            raise typer.Exit(ExitCode.REFUSED) from None

    return wrapper
