"""`retrack tune JOB.yaml`: Ray Tune over the unlearn stage (`driver`), one trial (`trial`), the
search space (`space`) and the MLflow child runs (`callbacks`)."""

from pipelines.tune.driver import Search, TuneResult, run_tune, search
from pipelines.tune.trial import TUNE_DIR

__all__ = ["TUNE_DIR", "Search", "TuneResult", "run_tune", "search"]
