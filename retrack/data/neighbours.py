"""The neighbours file: for each forget item, its retained neighbours, nearest first.

One format, written by `retrack index neighbours --out` and by a job's neighbours stage, read by
`retrack unlearn --neighbours`: a JSON object mapping each forget id to a list of retained ids.
Error messages name forget items by their position in the forget list, never by id (an id may
itself be personal data).
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

from retrack.errors import InputError
from retrack.storage.location import Location


def write_neighbours(loc_or_path: Location | str | os.PathLike, mapping: Mapping[str, Sequence[str]]) -> None:
    """Write the file atomically (local path or s3://; a `Location` carries its endpoint). The bytes
    are plain `json.dumps` of the mapping in its order: the unlearn stage hashes the file into its
    config hash, so the same neighbours must always give the same bytes."""
    Location.parse(loc_or_path).write_text(json.dumps({fid: list(ids) for fid, ids in mapping.items()}))


def read_neighbours(uri: Location | str | os.PathLike, forget_ids: Sequence[str], k: int, endpoint: str | None = None) -> dict[str, list[str]]:
    """The first `k` neighbours of every forget id, in the forget list's order. Refused: a file
    that is missing or not this format, a forget id without an entry or with fewer than `k`
    neighbours, and a forget id among the neighbours."""
    loc, name = Location.parse(uri, endpoint=endpoint), str(uri)
    if not loc.exists():
        raise InputError(f"neighbours file {name} does not exist")
    try:
        raw = json.loads(loc.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"neighbours file {name} is not JSON ({exc})") from None
    if not isinstance(raw, dict) or not all(isinstance(v, list) and all(isinstance(i, str) for i in v) for v in raw.values()):
        raise InputError(f"neighbours file {name} must be a JSON object mapping each forget id to a list of retained ids")
    forget = set(forget_ids)
    out = {}
    for n, fid in enumerate(forget_ids):
        if fid not in raw:
            raise InputError(f"neighbours file {name} has no entry for forget item {n + 1} of {len(forget_ids)}")
        ids = raw[fid][:k]
        if len(ids) < k:
            raise InputError(f"neighbours file {name}: forget item {n + 1} has {len(ids)} neighbour(s), k = {k} are needed")
        if forget.intersection(ids):
            raise InputError(f"neighbours file {name}: forget item {n + 1} has a forget item among its neighbours; "
                             "neighbours must be retained items")
        out[fid] = ids
    return out
