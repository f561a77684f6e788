"""Error types. Every refusal of bad input raises one of these before expensive work starts."""


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


def describe_validation_error(exc, prefix: str = "") -> str:
    """One line per problem of a pydantic ValidationError, each naming its field path."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{loc or '<root>'}: {msg}")
    return "; ".join(lines)
