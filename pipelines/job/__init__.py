"""`retrack run JOB.yaml`: one deletion request through index -> neighbours -> unlearn ->
evaluate -> register (`chain`), each stage a module of `stages/` taking one `JobContext`."""

from pipelines.job.chain import STAGES, JobResult, run_job, run_request, run_stages
from pipelines.job.context import JobContext, JobDir
from pipelines.job.preflight import Preflight, preflight

__all__ = ["STAGES", "JobContext", "JobDir", "JobResult", "Preflight", "preflight", "run_job", "run_request", "run_stages"]
