"""`ray start`, unchanged except that a loopback address is taken as given.

Ray's CLI rewrites 127.0.0.1 / localhost in `--address` and `--node-ip-address` into the host's
outward address (unless multi-node clusters are "disabled", in which case a joining node refuses
to start). A head whose node address is 127.0.0.1 listens on 127.0.0.1 only, so a second node
joining through the rewritten address cannot reach it. This wrapper keeps loopback addresses as
they are, so both nodes of the local stack live on 127.0.0.1, and passes every argument to
`ray start` itself:

    python ray_start_loopback.py start --address=127.0.0.1:6379 --block ...
"""

from __future__ import annotations

import sys

import ray._private.services as services


def _keep_loopback(host: str) -> str:
    if not host:
        raise ValueError(f"Malformed host: {host!r}")
    return host


services.resolve_ip_for_localhost = _keep_loopback

from ray.scripts.scripts import main  # noqa: E402 - after the patch, which it must see

if __name__ == "__main__":
    sys.argv[0] = "ray"
    sys.exit(main())
