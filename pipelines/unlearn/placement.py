"""Fail at once when the cluster cannot place the workers, instead of waiting forever."""

from __future__ import annotations

import ray
from ray.util.placement_group import placement_group, remove_placement_group

from retrack.config.spec import ScalingSpec
from retrack.errors import PlacementError

PLACEMENT_TIMEOUT_S = 15.0  # Ray reserves placeable bundles in well under a second


def worker_resources(scaling: ScalingSpec) -> dict[str, float]:
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = 1.0
    return resources


def check_placement(scaling: ScalingSpec, timeout_s: float = PLACEMENT_TIMEOUT_S) -> None:
    """Reserve the workers' bundles once (Ray's own feasibility and scheduling), then hand them back
    to Ray Train; a reservation that is not granted within `timeout_s` is refused."""
    per_worker = worker_resources(scaling)
    group = placement_group([per_worker] * scaling.num_workers, strategy="PACK")
    try:
        placed = group.wait(timeout_seconds=timeout_s)
    finally:
        remove_placement_group(group)
    if not placed:
        total = ray.cluster_resources()
        have = ", ".join(f"{k}={total.get(k, 0):g}" for k in per_worker)
        want = ", ".join(f"{k}={v:g}" for k, v in per_worker.items())
        raise PlacementError(
            f"{scaling.num_workers} workers with {want} each cannot be placed within {timeout_s:g} s: the cluster has {have} "
            f"over {len(ray.nodes())} node(s); lower --workers or cpus_per_worker, or add nodes"
        )
