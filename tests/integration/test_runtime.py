"""`pipelines.runtime` on a real local Ray instance: `unwrap` finds retrack's own error inside
Ray's failures by cause, and `get` raises it at the call site."""

from __future__ import annotations

import pytest

from retrack.errors import CorpusError, ModelLayoutError, TrainingDivergedError


def _task_raising(error):
    raise error


def _map_raising(batch, error):
    raise error


@pytest.mark.integration
def test_unwrap_finds_errors_raised_in_ray_tasks_and_ray_data_maps(ray_local):
    from pipelines.runtime import unwrap

    ray = ray_local
    diverged = TrainingDivergedError(5, "gradient")
    with pytest.raises(TrainingDivergedError) as caught:
        ray.get(ray.remote(max_retries=0)(_task_raising).remote(diverged))
    found = unwrap(caught.value)
    assert type(found) is TrainingDivergedError and vars(found) == vars(diverged) and str(found) == str(diverged)

    ds = ray.data.range(4).map_batches(_map_raising, fn_kwargs={"error": CorpusError("item 'x' cannot be decoded")})
    ds.context.raise_original_map_exception = True
    with pytest.raises(Exception) as caught:
        ds.materialize()
    found = unwrap(caught.value)
    assert type(found) is CorpusError and str(found) == "item 'x' cannot be decoded" and found.code == "input.corpus"


@pytest.mark.integration
def test_an_evaluation_task_raises_the_retrack_error_itself(ray_local, tmp_path):
    """`pipelines.runtime.get` at the evaluation's call sites: the caller gets the task's
    ModelLayoutError, not Ray's wrapper whose message is a traceback."""
    from pipelines.evaluate import sample_on_ray

    (tmp_path / "model" / "unet").mkdir(parents=True)
    (tmp_path / "model" / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    with pytest.raises(ModelLayoutError) as caught:
        sample_on_ray([tmp_path / "model"], 4, seed=0, batch_size=4, num_tasks=1)
    assert type(caught.value) is ModelLayoutError
    assert str(caught.value).endswith("/unet is a UNet2DConditionModel, expected a diffusers UNet2DModel")


def _train_loop(config):
    raise TrainingDivergedError(9, "loss 'retain'")


@pytest.mark.integration
@pytest.mark.slow
def test_unwrap_finds_the_error_of_a_ray_train_worker(ray_local, tmp_path):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.runtime import unwrap

    trainer = TorchTrainer(_train_loop, scaling_config=ScalingConfig(num_workers=1),
                           run_config=RunConfig(storage_path=str(tmp_path), failure_config=FailureConfig(max_failures=0)))
    with pytest.raises(Exception) as caught:
        trainer.fit()
    found = unwrap(caught.value)
    assert type(found) is TrainingDivergedError and found.marker() == {"step": 9, "what": "loss 'retain'"}
