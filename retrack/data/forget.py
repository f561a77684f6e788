"""The forget set: the one reader of forget-id files and the checks every forget set passes."""

from __future__ import annotations

import os
from collections import Counter
from typing import TYPE_CHECKING, Iterable, Sequence

from retrack.errors import ForgetSetError
from retrack.storage.location import Location

if TYPE_CHECKING:
    from retrack.config.spec import UnlearnSpec


def read_forget_ids(uri: str | os.PathLike, endpoint: str | None = None) -> list[str]:
    """A forget-id file, local or s3://: one id a line; blank lines and '#' comments ignored."""
    loc = Location.parse(uri, endpoint=endpoint)
    if not loc.exists():
        raise ForgetSetError(f"forget-id file {uri} does not exist")
    return [ln.strip() for ln in loc.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def requested_forget_ids(spec: "UnlearnSpec") -> list[str]:
    """The ids a job spec's forget section names: inline, or one a line in its file."""
    if spec.forget.ids is not None:
        return list(spec.forget.ids)
    return read_forget_ids(spec.forget.file, spec.storage.endpoint_url)


def check_forget_ids(forget_ids: Sequence[str], corpus_ids: Iterable[str]) -> None:
    """An empty set, a repeated id or an id the corpus lacks is an error (nothing is guessed)."""
    if not forget_ids:
        raise ForgetSetError("the forget set is empty: nothing to unlearn")
    counts = Counter(forget_ids)
    repeated = sum(1 for c in counts.values() if c > 1)
    if repeated:
        # Positions, not the ids: forget ids may themselves be personal data.
        lines = [n + 1 for n, i in enumerate(forget_ids) if counts[i] > 1][:6]
        raise ForgetSetError(f"{repeated} forget id(s) are listed more than once (entries {lines})")
    known = set(corpus_ids)
    missing = [n + 1 for n, i in enumerate(forget_ids) if i not in known]
    if missing:
        raise ForgetSetError(f"{len(missing)} of {len(forget_ids)} forget id(s) are not in the corpus (entries {missing[:6]})")
