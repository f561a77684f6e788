"""The RetrackError behind a Ray failure. To be replaced by `pipelines.runtime.unwrap` (errors
that pickle, unwrapped by their cause)."""

from __future__ import annotations

from retrack.errors import RetrackError, TrainingDivergedError


def worker_errors(exc: BaseException) -> list[BaseException]:
    """The errors of the failed workers of a `ray.train.TrainingFailedError` (and their causes)."""
    found = []
    for err in (getattr(exc, "worker_failures", None) or {}).values():
        found.append(err)
        cause = getattr(err, "cause", None)
        if cause is not None:
            found.append(cause)
    return found


def retrack_cause(exc: BaseException) -> RetrackError | None:
    """The RetrackError a (possibly nested) Ray error was raised for, unwrapped."""
    seen = set()
    todo = [exc]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        cause = getattr(err, "cause", None)
        if isinstance(err, RetrackError) and not isinstance(cause, BaseException):
            return err
        todo.extend([cause if isinstance(cause, BaseException) else None, err.__cause__, err.__context__])
    # Ray Data wraps errors of user functions in a UserCodeException that keeps only the text of
    # the original traceback: recover retrack's error class and message from it.
    import re

    import retrack.errors as errors

    found = re.findall(r"retrack\.errors\.(\w+): ([^\n]+)", str(exc))
    for name, message in reversed(found):
        cls = getattr(errors, name, None)
        if isinstance(cls, type) and issubclass(cls, RetrackError) and cls is not TrainingDivergedError:
            return cls(message)
    return None
