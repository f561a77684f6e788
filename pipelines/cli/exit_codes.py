"""Every exit code of the `retrack` commands, in this one place; `retrack run --help` prints the
table (`EXIT_CODES_HELP`), and the KubeRay manifests rely on it: a non-zero code fails the Ray
job, so the RayJob's `.status.jobStatus` is FAILED and its message names the code."""

from __future__ import annotations

from enum import IntEnum

from retrack.evaluation.verdict import NOT_FORGOTTEN, PROMOTED, QUALITY_GATE


class ExitCode(IntEnum):
    PROMOTED = 0
    FAILED = 1
    REFUSED = 2
    NOT_FORGOTTEN = 3
    QUALITY_GATE = 4

    @classmethod
    def of_outcome(cls, outcome: str) -> "ExitCode":
        """The exit code of a finished job's promotion outcome (`JobResult.outcome`)."""
        return {PROMOTED: cls.PROMOTED, NOT_FORGOTTEN: cls.NOT_FORGOTTEN, QUALITY_GATE: cls.QUALITY_GATE}[outcome]


MEANING = {
    ExitCode.PROMOTED: "the version was registered and promoted: the alias moved (other commands: success)",
    ExitCode.FAILED: "an unexpected failure (a traceback); `retrack queue run`: a request failed (see `retrack queue status`)",
    ExitCode.REFUSED: "refused or stopped with a one-line error: bad input (spec, corpus, forget list, model), storage or MLflow unreachable, training diverged",
    ExitCode.NOT_FORGOTTEN: "registered, not promoted: the verdict is 'not forgotten'",
    ExitCode.QUALITY_GATE: "registered, not promoted: forgotten, but a ceiling of evaluation.gate was missed",
}

EXIT_CODES_HELP = "Exit codes:\n\n" + "\n\n".join(f"{int(c)}: {MEANING[c]}" for c in ExitCode)
