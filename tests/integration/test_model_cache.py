"""The per-node model cache (`retrack.storage.cache`) against a real S3 server."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.mark.integration
def test_model_cache_copies_a_model_once_per_node_under_concurrent_processes(s3_env, tmp_path):
    """Four processes ask for the same s3:// model at once: one copies it, the others wait on the
    lock and reuse that copy (the folder is never replaced under a reader)."""
    import os
    import subprocess
    import sys

    from retrack.storage.cache import COMPLETE_MARKER, cache_path

    client = s3_env.client()
    rng = np.random.default_rng(0)
    files = {f"unet/part-{n}.bin": rng.bytes(1 << 20) for n in range(12)}
    for key, data in files.items():
        client.put_object(Bucket=s3_env.bucket, Key=f"models/cached/{key}", Body=data)
    uri, cache = s3_env.uri("models/cached"), tmp_path / "cache"
    dest = cache_path(uri, cache)
    (cache / f".{dest.name}.download.killed").mkdir(parents=True)  # left by a process killed mid-copy
    code = ("import os, sys; from retrack.storage.cache import local_model_dir; "
            "d = local_model_dir(sys.argv[1], sys.argv[2]); print(d, os.stat(d).st_ino)")
    procs = [subprocess.Popen([sys.executable, "-c", code, uri, str(cache)], stdout=subprocess.PIPE, text=True, env=os.environ)
             for _ in range(4)]
    outs = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert outs == {f"{dest} {dest.stat().st_ino}"}  # one folder, never replaced
    assert (dest / COMPLETE_MARKER).read_text() == uri
    assert {k: (dest / k).read_bytes() for k in files} == files
    assert sorted(p.name for p in cache.iterdir()) == sorted([dest.name, f"{dest.name}.lock"])


@pytest.mark.integration
def test_a_model_rewritten_at_the_same_uri_is_copied_anew(s3_env, tmp_path):
    """The cache is keyed by the URI and its object listing: a model replaced in place (a new
    upload under the same prefix) is not served from the old copy."""
    from retrack.storage.cache import local_model_dir

    client, cache = s3_env.client(), tmp_path / "cache"
    uri = s3_env.uri("models/rewritten")
    client.put_object(Bucket=s3_env.bucket, Key="models/rewritten/unet/weights.bin", Body=b"first")
    first = local_model_dir(uri, cache)
    assert local_model_dir(uri, cache) == first  # unchanged: the same copy
    client.put_object(Bucket=s3_env.bucket, Key="models/rewritten/unet/weights.bin", Body=b"second version")
    second = local_model_dir(uri, cache)
    assert second != first and (second / "unet" / "weights.bin").read_bytes() == b"second version"
    assert (first / "unet" / "weights.bin").read_bytes() == b"first"  # a reader of the old copy keeps it
