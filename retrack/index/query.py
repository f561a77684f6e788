"""Requests by picture: the corpus items a query picture stands for.

Each picture is encoded by the index's own encoder (the manifest records it: model-space pixels,
or Stable Diffusion latents from the model's VAE), so it lands in the space the corpus was indexed
in; every item within the duplicate threshold of it is one of its copies. A picture that matches
no item is an error: a request must not pass as done when it deleted nothing.
"""

from __future__ import annotations

import numpy as np

from retrack.data.forget import ForgetImages
from retrack.errors import ForgetSetError
from retrack.index.search import VectorIndex, within
from retrack.models.encoders import EncoderSpec, build_encoder


def match_images(index: VectorIndex, queries: ForgetImages, threshold: float) -> list[str]:
    """The ids of every indexed item within `threshold` of a query picture, in index order."""
    if index.manifest is None:
        raise ForgetSetError("a request by picture needs an index built by retrack (its manifest names the encoder)")
    encoder = build_encoder(EncoderSpec(**index.manifest.encoder["spec"]))
    rows: set[int] = set()
    for n, (image, digest) in enumerate(zip(queries.images, queries.digests), 1):
        # A query's latent is sampled with a seed of its own, as an item's is with its id's.
        vector, full = encoder.indexed_and_full(image[None], [f"forget-image-{digest}"])
        found = within(index, vector[0], threshold, q_full=full[0])
        if not found:
            raise ForgetSetError(f"forget.images entry {n} (sha256 {digest[:12]}) matches no corpus item within distance "
                                 f"{threshold:.4g}: it is not in the corpus, or is further from its copy than the "
                                 "duplicate threshold (forget.duplicate_threshold)")
        rows.update(r for r, _ in found)
    return index.ids_of(np.array(sorted(rows), dtype=np.int64))
