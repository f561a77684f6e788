"""The forget set: the one reader of forget-id files and the checks every forget set passes."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np

from retrack.digest import ids_digest, sha256_bytes
from retrack.errors import CorpusError, ForgetSetError
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
    """The ids a job spec's forget section names: inline, or one a line in its file (none for a
    request by picture: its ids are found through the index)."""
    if spec.forget.images is not None:
        return []
    if spec.forget.ids is not None:
        return list(spec.forget.ids)
    return read_forget_ids(spec.forget.file, spec.storage.endpoint_url)


def check_forget_ids(forget_ids: Sequence[str], positions: Callable[[Sequence[str]], np.ndarray]) -> np.ndarray:
    """The corpus rows of the forget ids (`positions(ids)`: each id's row, -1 where the corpus lacks
    it); an empty set, a repeated id or an id the corpus lacks is an error (nothing is guessed)."""
    if not forget_ids:
        raise ForgetSetError("the forget set is empty: nothing to unlearn")
    counts = Counter(forget_ids)
    repeated = sum(1 for c in counts.values() if c > 1)
    if repeated:
        # Positions, not the ids: forget ids may themselves be personal data.
        lines = [n + 1 for n, i in enumerate(forget_ids) if counts[i] > 1][:6]
        raise ForgetSetError(f"{repeated} forget id(s) are listed more than once (entries {lines})")
    rows = positions(forget_ids)
    missing = (np.flatnonzero(rows < 0) + 1).tolist()
    if missing:
        raise ForgetSetError(f"{len(missing)} of {len(forget_ids)} forget id(s) are not in the corpus (entries {missing[:6]})")
    return rows


def positions_in(corpus_ids: Iterable[str], ids: Sequence[str]) -> np.ndarray:
    """The row of each of the given (distinct) ids in an in-memory list of corpus ids, -1 where it
    lacks it: one pass, holding a map of the given ids only."""
    wanted = {i: n for n, i in enumerate(ids)}
    out = np.full(len(ids), -1, np.int64)
    for row, i in enumerate(corpus_ids):
        n = wanted.get(i)
        if n is not None:
            out[n] = row
    return out


@dataclass(frozen=True)
class ForgetImages:
    """The pictures of a request by picture (`forget.images`), held in memory only: they are
    never logged or written anywhere; the audit keeps their digests and count."""

    images: list[np.ndarray]  # uint8 HxWxC, at the model's geometry (`fit_image`)
    digests: list[str]  # sha256 of each file's bytes

    def summary(self) -> dict:
        """What the audit keeps of the request: the pictures' digest and count."""
        return {"digest": ids_digest(self.digests), "count": len(self.digests), "by": "picture"}


def read_forget_images(uris: Sequence[str], endpoint: str | None, shape: Sequence[int]) -> ForgetImages:
    """Read and decode every query picture, brought to the model's geometry `shape` as corpus items are;
    a missing, unreadable, undecodable or repeated one is refused naming its entry (1-based),
    never its URI or content."""
    from retrack.data.corpus import decode_image, fit_image

    images, digests = [], []
    for n, uri in enumerate(uris, 1):
        loc = Location.parse(uri, endpoint=endpoint)
        if not loc.exists():
            raise ForgetSetError(f"forget.images entry {n} does not exist")
        data = loc.read_bytes()
        digest = sha256_bytes(data)
        if digest in digests:
            raise ForgetSetError(f"forget.images entries {digests.index(digest) + 1} and {n} are the same file")
        try:
            images.append(fit_image(decode_image(data, f"forget.images entry {n}"), shape))
        except CorpusError as exc:
            raise ForgetSetError(str(exc)) from None
        digests.append(digest)
    return ForgetImages(images, digests)
