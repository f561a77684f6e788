"""The one place that connects to Ray (or starts it) and finds retrack's errors in Ray's failures.

Ray is imported inside functions so that `retrack --help` stays fast.
"""

from __future__ import annotations

import logging
import os

from retrack.errors import RetrackError


def ensure_ray(address: str | None = None, num_cpus: int | None = None):
    """Connect to `address` / RAY_ADDRESS, or start a local instance of `num_cpus` CPUs; returns
    the `ray` module. An explicit environment setting wins over every default set here."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if not address:
            # Our own instance: no token to set up, and its work is the foreground work (Ray
            # starts workers at niceness 15 otherwise). A cluster's own token auth is left alone.
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=False, configure_logging=False)
    return ray


def get(refs):
    """`ray.get(refs)`, raising the RetrackError a task raised itself rather than Ray's wrapper of
    it (whose message is a traceback)."""
    import ray

    try:
        return ray.get(refs)
    except Exception as exc:  # noqa: BLE001 - re-raised as the retrack error inside, if any
        raise unwrap(exc) from None


def unwrap(exc: BaseException) -> BaseException:
    """The RetrackError a Ray failure was raised for (the nearest one), else `exc` itself.

    Found by following the causes Ray keeps as objects, never by reading messages:
    - `RayTaskError.cause`: the error a task or an actor method raised. Ray Data's map functions
      raise theirs only with `DataContext.raise_original_map_exception` set on the dataset (by
      default Ray Data wraps them in a UserCodeException that keeps only their traceback text);
    - Ray Train's `WorkerGroupError.worker_failures` (each worker's own error, by rank) and
      `ControllerError.controller_failure`;
    - `__cause__` (`raise ... from ...`).
    An ActorDiedError keeps no cause (Ray 2.60 keeps only the text of an actor's failed
    `__init__`): it is returned as it is.
    """
    from ray.exceptions import RayTaskError
    # Where `ray.train` exports them from, also importable with Ray Train V2 switched off.
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    seen, todo = set(), [exc]
    while todo:
        err = todo.pop(0)  # breadth first: the nearest cause wins
        if not isinstance(err, BaseException) or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, RayTaskError):
            # Also an instance of its cause's class (`as_instanceof_cause`), but its message is
            # Ray's traceback: the cause itself is the error to report.
            todo.append(err.cause)
        elif isinstance(err, RetrackError):
            return err
        elif isinstance(err, WorkerGroupError):
            todo.extend(err.worker_failures[rank] for rank in sorted(err.worker_failures))
        elif isinstance(err, ControllerError):
            todo.append(err.controller_failure)
        todo.append(err.__cause__)
    return exc
