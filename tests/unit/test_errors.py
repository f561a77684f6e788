"""retrack's errors pickle to equal errors and carry stable codes; `pipelines.runtime.unwrap` finds
them inside Ray's exception objects by cause (on a real Ray instance: tests/integration/test_runtime.py)."""

from __future__ import annotations

import importlib
import pickle
import pkgutil

import pytest

import pipelines
import retrack
from retrack import errors
from retrack.errors import CorpusError, RetrackError, StorageError, TrainingDivergedError


def every_error_class() -> list[type[RetrackError]]:
    """RetrackError and all its subclasses, wherever they are defined: every module of retrack/
    and pipelines/ is imported first, so a new class anywhere is covered."""
    for package in (retrack, pipelines):
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            importlib.import_module(module.name)
    found, todo = [], [RetrackError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def example(cls: type[RetrackError]) -> RetrackError:
    """An instance of `cls`: its attributes set, for the classes whose constructor takes more than a message."""
    from retrack.index.search import DuplicateReport, DuplicatesFound

    if cls is DuplicatesFound:
        return cls(DuplicateReport(2.0, "fail", ["a"], ["b", "c"], [0, 0], [0.5, 1.25]))
    if cls is errors.QualityCollapseError:
        return cls(12, 3.25, 2.0)
    if cls is TrainingDivergedError:
        return cls(7, "loss 'forget'")
    if cls is errors.TrackingError:
        return cls("MLflow at http://x: create experiment failed", mlflow_code="RESOURCE_ALREADY_EXISTS")
    return cls(f"a {cls.__name__} for the test")


CLASSES = every_error_class()


def test_the_walk_finds_the_errors_defined_outside_retrack_errors():
    names = {cls.__name__ for cls in CLASSES}
    assert {"DuplicatesFound", "NoAcceptableTrialError", "TrackingError", "QualityCollapseError"} <= names


@pytest.mark.parametrize("cls", CLASSES, ids=[c.__name__ for c in CLASSES])
def test_every_error_pickles_to_an_equal_error(cls):
    err = example(cls)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls
    assert str(back) == str(err) and back.args == err.args
    assert back.code == err.code == cls.code
    assert vars(back) == vars(err)


def test_custom_constructors_round_trip_their_attributes():
    collapse = pickle.loads(pickle.dumps(errors.QualityCollapseError(12, 3.25, 2.0)))
    assert (collapse.step, collapse.what, collapse.ratio, collapse.limit) == (12, "retain-loss ratio", 3.25, 2.0)
    assert collapse.marker() == {"step": 12, "what": "retain-loss ratio", "kind": "collapse", "ratio": 3.25, "limit": 2.0}
    diverged = pickle.loads(pickle.dumps(TrainingDivergedError(7, "gradient")))
    assert diverged.marker() == {"step": 7, "what": "gradient"}
    tracking = pickle.loads(pickle.dumps(errors.TrackingError("m", mlflow_code="BAD_REQUEST")))
    assert isinstance(tracking, StorageError) and tracking.mlflow_code == "BAD_REQUEST"


@pytest.mark.parametrize("cls", CLASSES, ids=[c.__name__ for c in CLASSES])
def test_every_error_declares_its_own_documented_code_under_its_parents(cls):
    assert "code" in vars(cls), f"{cls.__qualname__} declares no code of its own"
    parent = next(base for base in cls.__mro__[1:] if issubclass(base, RetrackError)) if cls is not RetrackError else None
    if parent is not None and parent is not RetrackError:
        assert cls.code.startswith(parent.code + "."), f"{cls.code!r} does not extend {parent.code!r}"
    documented = {line.split()[0] for line in errors.__doc__.splitlines() if line.startswith("    ") and line.split()}
    assert cls.code in documented, f"{cls.code!r} is not in retrack.errors' table of codes"


def test_codes_are_unique():
    codes = [cls.code for cls in CLASSES]
    assert len(codes) == len(set(codes))


# --------------------------------------------------------------------------------------------
# unwrap: synthetic wrappers (the shapes Ray 2.60 builds), then real Ray failures
# --------------------------------------------------------------------------------------------


def test_unwrap_follows_train_worker_failures_controller_failures_and_explicit_causes():
    from ray.train import ControllerError, WorkerGroupError  # Ray Train V2, the default

    from pipelines.runtime import unwrap

    diverged = TrainingDivergedError(3, "loss")
    group = WorkerGroupError("rank 1 failed", {1: RuntimeError("other"), 0: diverged})
    assert unwrap(group) is diverged
    assert unwrap(ControllerError(group)) is diverged
    try:
        try:
            raise CorpusError("bad shard")
        except CorpusError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert isinstance(unwrap(outer), CorpusError)
    plain = RuntimeError("no retrack error inside")
    assert unwrap(plain) is plain


def test_unwrap_ignores_an_error_that_was_only_being_handled():
    """`__context__` is not a cause: an unrelated failure during handling stays itself."""
    from pipelines.runtime import unwrap

    try:
        try:
            raise CorpusError("handled")
        except CorpusError:
            raise OSError("cleanup failed")  # noqa: B904 - the implicit context is the point
    except OSError as exc:
        assert unwrap(exc) is exc
