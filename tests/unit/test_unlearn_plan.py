"""The unlearn stage's driver-side planning and checks (retrack/training/prepare.py, plan.py, run_storage.py) without a Ray cluster."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from retrack.config.model_kind import ModelKind
from retrack.config.spec import CorpusSpec, ForgetSpec, JobSpec, ModelSpec, ScalingSpec, StorageSpec, UnlearnSpec
from retrack.config.train import MethodConfig, TrainConfig
from retrack.config.unlearn_run import UnlearnRun
from retrack.data.corpus import read_corpus
from retrack.data.forget import read_forget_ids
from retrack.errors import ForgetSetError, InputError, ModelLayoutError
from retrack.methods import method_class
from retrack.models.pixel import default_scheduler, save_pixel_model
from retrack.training.items import decode_items
from retrack.training.loop import BatchDrawer, UnlearnData, split_for_unlearning
from retrack.training.plan import Sized, SparseRows, micro_batches_of, needed_retain_rows
from retrack.training.prepare import prepare, run_key
from retrack.training.run_storage import CheckpointMismatchError, RunStorage
from tests.fixtures.models import tiny_pixel


def request(bench, model, tmp_path, *, model_kind="pixel-ddpm", forget_ids=None, neighbours_file=None, **kw) -> UnlearnRun:
    spec = dict(
        request_id="req-1",
        model=ModelSpec(uri=str(model), kind=model_kind),
        corpus=CorpusSpec(uri=str(bench.corpus)),
        forget=ForgetSpec(ids=forget_ids) if forget_ids is not None else ForgetSpec(file=str(bench.forget_ids)),
        method=MethodConfig(name="retrack", params={"k": 4}),
        train=TrainConfig(steps=5, batch_size=16, grad_accum=2),
        scaling=ScalingSpec(num_workers=2),
        storage=StorageSpec(root=str(tmp_path / "runs")),
    )
    spec.update(kw)
    return UnlearnRun(spec=UnlearnSpec(**spec), output_dir=str(tmp_path / "out"), checkpoint_root=str(tmp_path / "runs"), neighbours_file=neighbours_file)


def test_sparse_rows_index_by_global_row():
    values = torch.arange(5).float().view(5, 1) * 10
    rows = SparseRows(1000, np.array([900, 3, 42, 7, 500]), values)
    assert len(rows) == 1000
    assert rows[torch.tensor([3, 900, 3, 500])].view(-1).tolist() == [10.0, 0.0, 10.0, 40.0]
    with pytest.raises(KeyError, match="not held"):
        rows[torch.tensor([4])]


def test_each_worker_holds_exactly_the_rows_its_micro_batches_draw(bench, model_dir, tmp_path):
    prep = prepare(request(bench, model_dir, tmp_path, train=TrainConfig(steps=7, batch_size=24, grad_accum=4)))
    plan, train = prep.plan, prep.run.spec.train
    world = 2
    per_rank = [needed_retain_rows(plan, train, world, rank) for rank in range(world)]
    assert np.array_equal(np.unique(np.concatenate(per_rank)), needed_retain_rows(plan, train, world))
    assert micro_batches_of(0, 2, 4) == [0, 2] and micro_batches_of(1, 2, 4) == [1, 3]
    # Against the drawer over the real data: every retain row a worker's micro-batch uses is held.
    index = torch.arange(plan.n_retain).float().view(-1, 1)
    drawer = BatchDrawer(UnlearnData(retain=index, forget=torch.zeros(plan.n_forget, 1)), method_class("vanilla").requirements, train)
    for rank in range(world):
        used = set()
        for step in range(train.steps):
            for m in micro_batches_of(rank, world, train.grad_accum):
                used |= set(drawer.microbatch(step, m)[0].retain.view(-1).long().tolist())
        assert used == set(per_rank[rank].tolist())
    # A resumed worker needs only what the remaining steps draw.
    assert len(needed_retain_rows(plan, train, world, 0, start_step=5)) < len(per_rank[0])


def test_plan_matches_the_single_process_split(bench, model_dir, tmp_path):
    prep = prepare(request(bench, model_dir, tmp_path))
    corpus = read_corpus(bench.corpus)
    forget = read_forget_ids(bench.forget_ids)
    data = split_for_unlearning(corpus, forget, MethodConfig(name="retrack", params={"k": 4}))
    assert prep.plan.n_retain == len(data.retain) and prep.plan.n_forget == len(data.forget)
    retained = torch.from_numpy(corpus.images[prep.retain_rows[np.arange(len(prep.retain_rows))]])
    assert torch.equal(retained[torch.from_numpy(prep.plan.neighbours)], data.neighbours)
    assert prep.run_name == f"req-1-{prep.config_hash[:12]}"


def test_config_hash_ignores_placement_but_not_the_recipe(bench, model_dir, tmp_path):
    base = prepare(request(bench, model_dir, tmp_path)).config_hash
    same = request(bench, model_dir, tmp_path, scaling=ScalingSpec(num_workers=1, cpus_per_worker=0.5, max_failures=0, allow_tf32=False))
    same = prepare(same.model_copy(update={"checkpoint_root": "/elsewhere"}))
    assert same.config_hash == base
    assert prepare(request(bench, model_dir, tmp_path, train=TrainConfig(steps=5, batch_size=16, grad_accum=2, lr=1e-3))).config_hash != base
    assert prepare(request(bench, model_dir, tmp_path, method=MethodConfig(name="retrack", params={"k": 5}))).config_hash != base


def test_request_validation(bench, model_dir, tmp_path):
    with pytest.raises(ValueError, match="multiple of scaling.num_workers"):
        request(bench, model_dir, tmp_path, train=TrainConfig(steps=5, batch_size=16, grad_accum=1))
    with pytest.raises(ValueError, match="exactly one"):
        request(bench, model_dir, tmp_path, forget=ForgetSpec(ids=["img-000001"], file=str(bench.forget_ids)))
    with pytest.raises(ValueError):
        request(bench, model_dir, tmp_path, request_id="../escape")


def test_wrong_model_directories_are_refused(bench, model_dir, tmp_path):
    with pytest.raises(ModelLayoutError, match="pixel-space DDPM.*model kind 'stable-diffusion'"):
        prepare(request(bench, model_dir, tmp_path, model_kind="stable-diffusion"))
    with pytest.raises(ModelLayoutError, match="does not exist"):
        prepare(request(bench, tmp_path / "nowhere", tmp_path))
    with pytest.raises(ModelLayoutError, match="not a diffusers pipeline"):
        prepare(request(bench, model_dir / "unet", tmp_path))
    pickled = tmp_path / "pickled"
    shutil.copytree(model_dir, pickled)
    (pickled / "unet" / "diffusion_pytorch_model.safetensors").rename(pickled / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelLayoutError, match="only safetensors"):
        prepare(request(bench, pickled, tmp_path))
    big = tmp_path / "big"
    save_pixel_model(tiny_pixel(16), big)
    assert prepare(request(bench, big, tmp_path)).plan.item_shape == (16, 16, 1)  # 8x8 items are resized to it as they are read


def test_bad_forget_sets_and_neighbours(bench, model_dir, tmp_path):
    with pytest.raises(ForgetSetError, match="not in the corpus"):
        prepare(request(bench, model_dir, tmp_path, forget_ids=["nope"]))
    with pytest.raises(InputError, match="larger than the retained set"):
        prepare(request(bench, model_dir, tmp_path, method=MethodConfig(name="retrack", params={"k": 100000})))
    forget = read_forget_ids(bench.forget_ids)
    prep = prepare(request(bench, model_dir, tmp_path))
    ids = read_corpus(bench.corpus).ids
    retained_ids = [ids[r] for r in prep.retain_rows[np.arange(len(prep.retain_rows))]]
    good = {f: [retained_ids[j] for j in prep.plan.neighbours[n]] for n, f in enumerate(forget)}
    path = tmp_path / "nbrs.json"
    path.write_text(json.dumps(good))
    from_file = prepare(request(bench, model_dir, tmp_path, neighbours_file=str(path)))
    assert np.array_equal(from_file.plan.neighbours, prep.plan.neighbours)
    path.write_text(json.dumps({**good, forget[0]: [forget[1]] * 4}))
    with pytest.raises(InputError, match="forget item among its neighbours"):
        prepare(request(bench, model_dir, tmp_path, neighbours_file=str(path)))
    path.write_text(json.dumps({**good, forget[0]: ["no-such-id"] * 4}))
    with pytest.raises(InputError, match="not a retained corpus item"):
        prepare(request(bench, model_dir, tmp_path, neighbours_file=str(path)))
    path.write_text(json.dumps({**good, forget[0]: good[forget[0]][:2]}))
    with pytest.raises(InputError, match="k = 4 are needed"):
        prepare(request(bench, model_dir, tmp_path, neighbours_file=str(path)))


def test_the_index_neighbours_file_is_what_the_unlearn_stage_reads(bench, model_dir, tmp_path):
    """`retrack index neighbours --out F` then `retrack unlearn --neighbours F`: the stage trains on
    exactly the neighbours the index found (one file format, no conversion)."""
    from typer.testing import CliRunner

    from pipelines.cli.index import cli
    from retrack.data.neighbours import read_neighbours

    run = CliRunner().invoke
    assert run(cli, ["build", str(bench.corpus), str(tmp_path / "idx"), "--local"]).exit_code == 0
    res = run(cli, ["neighbours", str(tmp_path / "idx"), "--forget", str(bench.forget_ids), "-k", "4", "--out", str(tmp_path / "nb.json")])
    assert res.exit_code == 0, res.output
    prep = prepare(request(bench, model_dir, tmp_path, neighbours_file=str(tmp_path / "nb.json")))
    forget = read_forget_ids(bench.forget_ids)
    ids = read_corpus(bench.corpus).ids
    retained_ids = [ids[r] for r in prep.retain_rows[np.arange(len(prep.retain_rows))]]
    trained_on = {f: [retained_ids[j] for j in prep.plan.neighbours[n]] for n, f in enumerate(forget)}
    assert trained_on == read_neighbours(tmp_path / "nb.json", forget, 4)


def test_checkpoints_of_another_config_are_refused(bench, model_dir, tmp_path):
    prep = prepare(request(bench, model_dir, tmp_path))
    run = tmp_path / "runs" / prep.run_name
    storage = RunStorage(str(tmp_path / "runs"), prep.run_name, prep.config_hash)
    assert storage.check() is None  # nothing there yet
    (run / "checkpoint_000003").mkdir(parents=True)
    (run / "checkpoint_000003" / "retrack_state.json").write_text(json.dumps({"step": 3, "config_hash": "f" * 64}))
    with pytest.raises(CheckpointMismatchError, match="checkpoint_000003.*ffffffffffff"):
        storage.check()
    (run / "checkpoint_000003" / "retrack_state.json").write_text(json.dumps({"step": 3, "config_hash": prep.config_hash}))
    (run / "retrack_run.json").write_text(json.dumps({"config_hash": "e" * 64}))
    with pytest.raises(CheckpointMismatchError, match="belongs to config eeeeeeeeeeee"):
        storage.check()


def test_decoded_rows_carry_their_tags(bench):
    import pyarrow.parquet as pq

    shard = sorted(bench.corpus.glob("*.parquet"))[0]
    table = pq.read_table(shard).take([1, 4]).to_pydict()
    batch = {k: np.array(v, dtype=object) for k, v in table.items()}
    out = decode_items(batch, [(17, -1), (-1, 0)], (8, 8, 1))
    assert out["id"].tolist() == table["id"] and out["row"].tolist() == [17, -1] and out["pos"].tolist() == [-1, 0]
    assert out["image"].shape == (2, 8, 8, 1) and out["image"].dtype == np.uint8
    sd_out = decode_items(batch, [(17, -1), (-1, 0)], (16, 16, 3))
    assert sd_out["image"].shape == (2, 16, 16, 3)
    empty = decode_items({k: v[:0] for k, v in batch.items()}, [], (8, 8, 1))
    assert empty["image"].shape == (0, 8, 8, 1)


@pytest.mark.parametrize("forget", [[], [0], [9], [0, 1, 2], [3, 4, 7], [0, 9], list(range(1, 10))])
def test_retained_rows_map_retain_indices_to_corpus_rows_without_a_corpus_sized_array(forget):
    """`RetainedRows` equals the explicit list of the rows not forgotten, both ways."""
    from retrack.training.prepare import RetainedRows

    rows = RetainedRows(10, np.array(forget, dtype=np.int64))
    explicit = np.setdiff1d(np.arange(10), forget)
    assert len(rows) == len(explicit)
    assert rows[np.arange(len(rows))].tolist() == explicit.tolist()
    assert all(int(rows[i]) == explicit[i] for i in range(len(explicit)))
    expected = [explicit.tolist().index(r) if r in explicit else -1 for r in range(10)] + [-1]
    assert rows.index_of(np.array(list(range(10)) + [-1])).tolist() == expected


@pytest.mark.parametrize("name", ["retrack", "erasediff", "siss"])
def test_gradient_checkpointing_gives_the_same_update(name):
    """The stage's optional `unet.enable_gradient_checkpointing()` works with step.py's per-loss
    `torch.autograd.grad` (retain_graph between losses) and changes nothing but memory."""
    from retrack.models.schedule import NoiseSchedule
    from retrack.methods import UnlearnBatch, build_method
    from retrack.training.step import make_optimizer, unlearning_step
    from retrack.training.loop import pixel_denoiser

    def run(checkpointing: bool):
        torch.manual_seed(0)
        unet = tiny_pixel(8).unet
        unet.train()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        method = build_method(name, NoiseSchedule.from_scheduler(default_scheduler()), {"k": 3} if name == "retrack" else {})
        g = torch.Generator().manual_seed(1)
        batch = UnlearnBatch(
            retain=torch.rand(4, 1, 8, 8, generator=g) * 2 - 1,
            forget=torch.rand(4, 1, 8, 8, generator=g) * 2 - 1,
            neighbours=torch.rand(4, 3, 1, 8, 8, generator=g) * 2 - 1,
        )
        params = list(unet.parameters())
        logs = unlearning_step(method, params, make_optimizer(params, 1e-3), pixel_denoiser(unet), [batch], [torch.Generator().manual_seed(5)], step=0)
        return logs["loss"], torch.cat([p.detach().flatten() for p in params])

    (loss0, w0), (loss1, w1) = run(False), run(True)
    assert loss0 == loss1 and torch.equal(w0, w1)


def test_an_unset_forget_batch_keeps_the_config_hash_of_runs_made_before_it_existed():
    from types import SimpleNamespace

    method = MethodConfig(name="retrack")
    plan = SimpleNamespace(kind=ModelKind.PIXEL_DDPM, corpus_fingerprint="c", forget_digest="f", neighbours_digest="n")
    # The digest of this request before train.forget_batch_size existed: its checkpoints stay resumable.
    assert run_key(method, TrainConfig(steps=7), plan, "sha") == "f291d5e3fa04e7c1d8467937304c7535cb2547eda471fb32b85cc6a3b1ba6deb"
    assert run_key(method, TrainConfig(steps=7, forget_batch_size=32), plan, "sha") != run_key(method, TrainConfig(steps=7), plan, "sha")


def test_model_kinds_old_names_and_aliases():
    assert ModelKind.parse("sd") is ModelKind.parse("stable-diffusion") is ModelKind.STABLE_DIFFUSION
    assert ModelKind.parse("pixel") is ModelKind.PIXEL_DDPM and ModelKind.PIXEL_DDPM.short == "pixel"
    with pytest.raises(ValueError, match="unknown model kind"):
        ModelKind.parse("auto")
    assert ModelSpec(uri="/m", kind="stable-diffusion").kind is ModelKind.STABLE_DIFFUSION


def test_job_spec_config_hash_keeps_its_value():
    """The job spec's hash (it names every job's storage prefix) of a fixed spec, as before the
    unlearn stage's spec became its base; scaling, storage and mlflow are not part of it."""
    spec = JobSpec(
        request_id="r1", model=ModelSpec(uri="/m"), corpus=CorpusSpec(uri="/c"), forget=ForgetSpec(ids=["a"]),
        train=TrainConfig(steps=7), storage=StorageSpec(root="/s"), mlflow={"tracking_uri": "sqlite:///x.db", "registered_model": "m"},
    )
    assert spec.config_hash() == "b4d69af815d1463f"  # computed on main before the redesign
    moved = spec.model_copy(update={"scaling": ScalingSpec(num_workers=2, fp16_loss_scale=8.0), "storage": StorageSpec(root="/t")})
    assert moved.config_hash() == spec.config_hash()


def test_progress_comes_out_of_the_reported_metrics():
    """The progress callback turns each report's worker identity into one 'worker' event per
    worker process and leaves only the metrics to the others; rank 0's step logs go to the queue
    as 'step' events in order."""
    from pipelines.unlearn.progress import ProgressCallback, hand_on_steps, progress_metrics

    class Sink:
        def __init__(self):
            self.items = []

        def put_nowait_batch(self, items):
            self.items.extend(items)

    sink = Sink()
    callback = ProgressCallback(sink)
    reported = [{"step": 2, **progress_metrics(0, 0)}, {"step": 2, **progress_metrics(1, 0)}]
    callback.after_report(None, reported, None)
    assert reported == [{"step": 2}, {"step": 2}]
    hand_on_steps(sink, [{"step": 1, "steps": 2, "loss": 0.5}, {"step": 2, "steps": 2, "loss": 0.4}])
    assert [(e["event"], e.get("rank"), e["step"] if e["event"] == "step" else e["start_step"]) for e in sink.items] == [
        ("worker", 0, 0), ("worker", 1, 0), ("step", None, 1), ("step", None, 2)]
    callback.after_report(None, [{"step": 3, **progress_metrics(0, 0)}], None)  # the same processes: no new 'worker' event
    assert len(sink.items) == 4


def test_a_block_sample_is_seeded_runs_of_consecutive_rows():
    from retrack.data.sample import BLOCK, block_sample

    assert np.array_equal(block_sample(500, 500, 0), np.arange(500))  # a small corpus whole
    s = block_sample(1_000_003, 10_000, seed=3)
    assert np.array_equal(s, block_sample(1_000_003, 10_000, seed=3)) and not np.array_equal(s, block_sample(1_000_003, 10_000, seed=4))
    assert 10_000 <= len(s) < 10_000 + BLOCK and len(np.unique(s)) == len(s) and s.max() < 1_000_003
    starts = s[np.r_[0, np.where(np.diff(s) != 1)[0] + 1]]
    assert (starts % BLOCK == 0).all()  # whole runs: what one parquet row group of BLOCK rows holds
    assert np.ptp(s) > 900_000  # spread over the corpus


def test_a_large_retained_set_is_drawn_from_a_pool_the_size_of_the_draws():
    from retrack.training.loop import MIN_RETAIN_POOL, POOL_RUNS, retain_pool

    train = TrainConfig(steps=60, batch_size=128, seed=2)
    assert retain_pool(5_000, train) is None  # fewer retained items than draws: every one can be drawn
    pool = retain_pool(1_000_000, train)
    assert 60 * 128 <= len(pool) < 60 * 128 + 64
    assert (np.diff(pool) != 1).sum() < POOL_RUNS  # a few long runs: few corpus files read
    assert len(retain_pool(1_000_000, TrainConfig(steps=2, batch_size=8))) == MIN_RETAIN_POOL
    drawer = BatchDrawer(UnlearnData(retain=Sized(1_000_000), forget=Sized(3)), method_class("retrack").requirements, train)  # type: ignore[arg-type]
    drawn = np.concatenate([drawer.rows(step)[1] for step in range(train.steps)])
    assert np.isin(drawn, pool).all() and len(np.unique(drawn)) > 0.5 * len(pool)
