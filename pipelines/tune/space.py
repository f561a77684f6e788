"""The search: the spec's `tune` section as a Ray Tune search algorithm and parameter space, how
many trials run at once, and the K every trial's neighbours are sliced from."""

from __future__ import annotations

from ray import tune
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from retrack.config.spec import JobSpec
from retrack.tuning.search import OBJECTIVES, apply_params


class MultiObjectiveOptuna(OptunaSearch):
    """A trial stopped early (collapse) or ended by a NaN reports no objectives: Optuna records it
    as pruned instead of failing to `tell` a list of Nones."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if result is not None and any(result.get(m) is None for m in OBJECTIVES):
            result = None
        super().on_trial_complete(trial_id, result, error)


def search_algorithm(spec: JobSpec, default: dict[str, float], concurrency: int):
    """(search algorithm, param space, num_samples) for the spec's `tune` section; at most
    `concurrency` trials run at once."""
    tuning = spec.tune
    kinds = tuning.kinds(spec.method.name)
    if tuning.search == "grid":
        from ray.tune.search import BasicVariantGenerator

        space = {n: tune.grid_search([kinds[n](v) for v in r.values]) for n, r in tuning.space.items()}
        in_grid = all(default[n] in [kinds[n](v) for v in r.values] for n, r in tuning.space.items())
        points = [default] if tuning.include_default and not in_grid else None
        # Tune applies max_concurrent_trials only to Searchers: the grid generator limits itself.
        return BasicVariantGenerator(points_to_evaluate=points, max_concurrent=concurrency), space, 1
    import optuna

    space = {}
    for name, r in tuning.space.items():
        if r.values is not None:
            space[name] = tune.choice([kinds[name](v) for v in r.values])
        elif kinds[name] is int:
            space[name] = (tune.lograndint if r.log else tune.randint)(int(r.low), int(r.high) + 1)
        else:
            space[name] = (tune.loguniform if r.log else tune.uniform)(r.low, r.high)
    # TPE handles several objectives (MOTPE); its startup trials are random, the rest model the front.
    sampler = optuna.samplers.TPESampler(seed=tuning.seed, n_startup_trials=max(1, tuning.trials // 2))
    searcher = MultiObjectiveOptuna(
        metric=list(OBJECTIVES), mode=["min"] * len(OBJECTIVES), sampler=sampler,
        points_to_evaluate=[default] if tuning.include_default else None,
    )
    return ConcurrencyLimiter(searcher, max_concurrent=concurrency), space, tuning.trials


def max_concurrent_trials(spec: JobSpec) -> int:
    """As many trials as the cluster holds worker groups for."""
    import ray

    if spec.tune.max_concurrent_trials:
        return spec.tune.max_concurrent_trials
    res = ray.cluster_resources()
    if spec.scaling.use_gpu:
        per = spec.scaling.num_workers
        return max(1, int(res.get("GPU", 0) // per))
    per = spec.scaling.num_workers * spec.scaling.cpus_per_worker
    return max(1, int(res.get("CPU", 1) // per))


def largest_k_spec(spec: JobSpec) -> JobSpec:
    """The spec with K at the largest value searched (the neighbours every trial slices)."""
    space = spec.tune.space
    if "k" not in space:
        return spec
    k = int(max(space["k"].bounds()[1], spec.method.k))
    return spec.model_copy(update={"method": apply_params(spec.method, spec.train, {"k": k})[0]})
