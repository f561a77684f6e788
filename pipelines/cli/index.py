"""`retrack index build | neighbours | duplicates`, mounted from beside the index stage."""

from __future__ import annotations

import typer

from pipelines.index import build_cmd, duplicates_cmd, neighbours_cmd

cli = typer.Typer(help="Encode a corpus, build its sharded kNN index, find neighbours and near-duplicates.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
cli.command("build")(build_cmd)
cli.command("neighbours")(neighbours_cmd)
cli.command("duplicates")(duplicates_cmd)
