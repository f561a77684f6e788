"""Resuming the unlearn stage from a checkpoint on S3 (`pipelines/unlearn/resume.py`) against a
real S3 server whose traffic counter shows what was read."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import pytest
import torch

from tests.fixtures.models import tiny_pixel
from tests.fixtures.services import free_port, start_seaweedfs

pytestmark = pytest.mark.integration


def test_a_checkpoint_is_fetched_once_per_node_whatever_its_worker_count(tmp_path, monkeypatch):
    """Three workers of one node resume together: the node's local rank 0 alone fetches and
    verifies the checkpoint; every worker loads the same weights and AdamW state from that copy,
    which is removed once all have loaded."""
    from pipelines.unlearn.resume import resume
    from retrack.storage.location import S3Options
    from retrack.training.checkpoint import checkpoint_name, load_checkpoint, save_checkpoint
    from retrack.training.run_storage import RunStorage
    from retrack.training.step import make_optimizer

    s3 = start_seaweedfs(tmp_path / "weed", metrics_port=free_port())
    try:
        for key, value in s3.env().items():
            monkeypatch.setenv(key, value)
        torch.manual_seed(0)
        saved = tiny_pixel(16).unet
        opt = make_optimizer(list(saved.parameters()), 1e-3)
        saved(torch.randn(2, 1, 16, 16), torch.tensor([3, 5])).sample.square().mean().backward()
        opt.step()  # an AdamW state to carry
        chash = "c" * 64
        local = Path(save_checkpoint(saved, opt, 4, [{"step": 4}], chash, 3))
        size = sum(p.stat().st_size for p in local.iterdir())
        s3.upload_dir(local, f"runs/run-a/{checkpoint_name(4)}")
        storage = RunStorage(s3.uri("runs"), "run-a", chash, S3Options(endpoint=s3.endpoint).resolved())

        loaded: dict[int, tuple] = {}
        sync = threading.Barrier(3)

        def worker(local_rank: int) -> None:
            unet = tiny_pixel(16).unet
            opt_r = make_optimizer(list(unet.parameters()), 1e-3)

            def load(directory: str, state: dict) -> None:
                load_checkpoint(directory, unet, opt_r, torch.device("cpu"))
                loaded[local_rank] = (directory, unet, opt_r, state["step"])

            resume(storage, None, load, local_rank, sync.wait)

        before = s3.bytes_sent()
        threads = [threading.Thread(target=worker, args=(r,)) for r in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        sent = s3.bytes_sent() - before
    finally:
        s3.service.stop()
    print(f"\ncheckpoint {size} bytes; 3 workers resumed reading {sent} bytes from S3")
    assert size <= sent < 1.5 * size  # one fetch, not three
    assert sorted(loaded) == [0, 1, 2] and len({d for d, *_ in loaded.values()}) == 1
    for _, unet, opt_r, step in loaded.values():
        assert step == 4
        assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), saved.state_dict().values()))
        assert all(torch.equal(opt_r.state[p]["exp_avg"], opt.state[q]["exp_avg"]) for p, q in zip(unet.parameters(), saved.parameters()))
    assert not (Path(tempfile.gettempdir()) / "retrack-resume" / chash).exists()
