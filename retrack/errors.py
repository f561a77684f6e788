"""Error types. Every refusal of bad input raises one of these before expensive work starts."""

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


class InputError(RetrackError, ValueError):
    """A user-supplied input (job spec, corpus, forget list, model directory, argument) is invalid."""


class CorpusError(InputError):
    """The corpus is malformed: corrupt or mis-sized images, duplicate or missing ids, empty shards."""


class ForgetSetError(InputError):
    """The forget set is empty, has duplicates, or names ids that are not in the corpus."""


class ModelLayoutError(InputError):
    """A model directory is not the diffusers layout that was expected."""


class StorageError(RetrackError):
    """Storage (local or object store) cannot be reached or written."""


class TrainingDivergedError(RetrackError):
    """A loss or gradient became non-finite; nothing from this run may be registered."""

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

    def __init__(self, step: int, ratio: float, limit: float):
        RetrackError.__init__(self, f"quality collapse at step {step}: retain-loss ratio {ratio:.3g} is above {limit:g}; training stopped, nothing was saved as final")
        self.step, self.what, self.ratio, self.limit = step, "retain-loss ratio", ratio, limit

    def marker(self) -> dict:
        return {"step": self.step, "what": self.what, "kind": "collapse", "ratio": self.ratio, "limit": self.limit}


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
        lines.append(f"{loc or '<root>'}: {msg}")
    return "; ".join(lines)
