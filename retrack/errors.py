"""Error types. Every refusal of bad input raises one of these before expensive work starts.

Every error carries a stable `code` (callers, logs and tests branch on it, never on the message);
a code extends its parent's, so `code.startswith("input.")` means "bad input":

    retrack                          RetrackError, the base
    input                            InputError: a user-supplied input is invalid
    input.corpus                     CorpusError
    input.corpus.captions            CaptionsMissingError: an item has no caption where each needs one
    input.forget_set                 ForgetSetError
    input.forget_set.duplicates      retrack.index.search.DuplicatesFound (`report`)
    input.model_layout               ModelLayoutError
    input.placement                  PlacementError: the cluster cannot place the workers
    input.checkpoint_mismatch        CheckpointMismatchError
    input.no_acceptable_trial        retrack.tuning.search.NoAcceptableTrialError
    storage                          StorageError: storage cannot be reached or written
    storage.tracking                 TrackingError: an MLflow call failed (`mlflow_code`)
    training.diverged                TrainingDivergedError (`step`, `what`)
    training.diverged.collapse       QualityCollapseError (`step`, `what`, `ratio`, `limit`)
    training.failed                  UnlearnFailedError: workers failed beyond their retries

Every error pickles to an equal one (same type, message, code and attributes): Ray carries them
between processes, and a driver finds them by cause (`pipelines.runtime.unwrap`).
"""

import copyreg
import os
import re

# `scheme://user:password@host`: the user-info part of a URI never reaches a message.
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def redact(text: str) -> str:
    """`text` with URI credentials and the values of secret environment variables masked."""
    text = _USERINFO.sub("***@", text)
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


class RetrackError(Exception):
    """Base class of every error retrack raises on purpose (the CLI turns it into exit code 2)."""

    code = "retrack"

    def __init__(self, message: str):
        super().__init__(message)
        # Kept apart from `args`, which libraries amend in flight (Ray Data appends its retry
        # hints to the args of an error raised in a map task): the message is what retrack said.
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        # Rebuilt from its args and attributes without calling __init__, so subclasses with their
        # own signatures (step, ratio, report, ...) unpickle as they were with no code of their own.
        return copyreg.__newobj__, (type(self), *self.args), self.__dict__


class InputError(RetrackError, ValueError):
    """A user-supplied input (job spec, corpus, forget list, model directory, argument) is invalid."""

    code = "input"


class CorpusError(InputError):
    """The corpus is malformed: corrupt or mis-sized images, duplicate or missing ids, empty shards."""

    code = "input.corpus"


class CaptionsMissingError(CorpusError):
    """Some corpus item has no caption, and the model (Stable Diffusion) is trained on each item's own."""

    code = "input.corpus.captions"


class ForgetSetError(InputError):
    """The forget set is empty, has duplicates, or names ids that are not in the corpus."""

    code = "input.forget_set"


class ModelLayoutError(InputError):
    """A model directory is not the diffusers layout that was expected."""

    code = "input.model_layout"


class PlacementError(InputError):
    """The cluster cannot place the requested workers."""

    code = "input.placement"


class CheckpointMismatchError(InputError):
    """The run's storage holds checkpoints of a different configuration."""

    code = "input.checkpoint_mismatch"


class StorageError(RetrackError):
    """Storage (local or object store) cannot be reached or written."""

    code = "storage"


class TrackingError(StorageError):
    """An MLflow tracking or registry call failed; `mlflow_code` is MLflow's own error code
    (RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ...; None when the server was not reached)."""

    code = "storage.tracking"

    def __init__(self, message: str, mlflow_code: str | None = None):
        super().__init__(message)
        self.mlflow_code = mlflow_code


class TrainingDivergedError(RetrackError):
    """A loss or gradient became non-finite; nothing from this run may be registered."""

    code = "training.diverged"

    def __init__(self, step: int, what: str):
        super().__init__(f"non-finite {what} at step {step}: training stopped, nothing was saved as final")
        self.step = step
        self.what = what

    def marker(self) -> dict:
        """What the run's stop marker records (a relaunch of the same config stops at once)."""
        return {"step": self.step, "what": self.what}


class QualityCollapseError(TrainingDivergedError):
    """The health scalar passed its limit: the model is losing what it should keep (tuning stops
    such a trial early)."""

    code = "training.diverged.collapse"

    def __init__(self, step: int, ratio: float, limit: float):
        RetrackError.__init__(self, f"quality collapse at step {step}: retain-loss ratio {ratio:.3g} is above {limit:g}; training stopped, nothing was saved as final")
        self.step, self.what, self.ratio, self.limit = step, "retain-loss ratio", ratio, limit

    def marker(self) -> dict:
        return {"step": self.step, "what": self.what, "kind": "collapse", "ratio": self.ratio, "limit": self.limit}


class UnlearnFailedError(RetrackError):
    """Training failed for a reason other than divergence (after the allowed retries)."""

    code = "training.failed"


def stopped_error(marker: dict) -> TrainingDivergedError:
    """The error a run's stop marker stands for."""
    if marker.get("kind") == "collapse":
        return QualityCollapseError(marker["step"], marker["ratio"], marker["limit"])
    return TrainingDivergedError(marker["step"], marker.get("what", "loss"))


def describe_validation_error(exc, prefix: str = "") -> str:
    """One line per problem of a pydantic ValidationError, each naming its field path."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}" if loc else msg)  # a cross-field rule names its fields itself
    return "; ".join(lines)
