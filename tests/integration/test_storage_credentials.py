"""Credentials on a real S3 server (SeaweedFS): a refused signature and a missing bucket are named
in the error, the secret never."""

from __future__ import annotations

import pytest

from retrack.errors import StorageError
from retrack.storage.location import Location, S3Options

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


@pytest.mark.integration
def test_wrong_secret_and_missing_bucket_on_a_real_server(seaweedfs_s3, s3_env, monkeypatch, tmp_path, capfd):
    """Against SeaweedFS: a refused signature and a missing bucket fail the job's preflight with
    the endpoint and bucket named, and neither secret in the message or the output."""
    from pipelines.job import preflight
    from retrack.config.spec import JobSpec

    wrong = "Wrong" + SECRET
    loc = Location.parse(s3_env.uri("jobs/x.json"), s3=S3Options(endpoint=s3_env.endpoint, access_key=s3_env.access_key, secret_key=wrong))
    with pytest.raises(StorageError) as err:
        loc.write_bytes(b"{}")
    msg = str(err.value)
    assert s3_env.bucket in msg and wrong not in msg and s3_env.secret_key not in msg

    spec = JobSpec.model_validate({
        "request_id": "req-secret",
        "model": {"uri": str(tmp_path / "m")}, "corpus": {"uri": str(tmp_path / "c")}, "forget": {"ids": ["a"]},
        "storage": {"root": "s3://no-such-bucket-retrack-secret/jobs", "endpoint_url": s3_env.endpoint},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'm.db'}", "registered_model": "m"},
    })
    with pytest.raises(StorageError, match="no-such-bucket-retrack-secret") as err:
        preflight(spec)
    out, errs = capfd.readouterr()
    assert s3_env.secret_key not in str(err.value) + out + errs
