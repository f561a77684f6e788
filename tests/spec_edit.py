"""Editing one field of a job-spec dict by its dotted path (what the bad-input tests vary)."""

from __future__ import annotations

DELETE = object()


def with_field(spec: dict, dotted: str, value) -> dict:
    """`spec` with the field at `dotted` set to `value`, or removed for value=DELETE."""
    node = spec
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node[p]
    if value is DELETE:
        node.pop(leaf)
    else:
        node[leaf] = value
    return spec
