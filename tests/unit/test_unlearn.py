"""Single-process unlearning: data assembly, deterministic micro-batches, and that training moves
the model the way each objective says."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrack.config.train import MethodConfig, TrainConfig
from retrack.data.corpus import Corpus
from retrack.errors import InputError
from retrack.models.pixel import default_scheduler
from retrack.training.loop import BatchDrawer, run_unlearning, split_for_unlearning
from tests.fixtures.models import tiny_pixel


def toy_corpus(n=40, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (n, 1, 8, 8)).astype(np.float32)
    return Corpus(ids=[f"i{k}" for k in range(n)], images=images, labels=None, captions=None)


def test_neighbours_are_the_exact_nearest_retained_items():
    c = toy_corpus()
    forget = ["i3", "i7"]
    data = split_for_unlearning(c, forget, MethodConfig(name="retrack", params={"k": 5}))
    retained = np.delete(c.images, [3, 7], axis=0)
    for row, fid in enumerate([3, 7]):
        d = ((retained - c.images[fid]) ** 2).reshape(len(retained), -1).sum(1)
        np.testing.assert_array_equal(data.neighbours[row].numpy(), retained[np.argsort(d)[:5]])
    assert data.retain.shape[0] == 38 and data.forget.shape[0] == 2


def test_methods_without_neighbours_get_none_and_k_is_checked():
    c = toy_corpus()
    assert split_for_unlearning(c, ["i1"], MethodConfig(name="siss")).neighbours is None
    with pytest.raises(InputError, match="k = 40 is larger than the retained set \\(39 items\\)"):
        split_for_unlearning(c, ["i1"], MethodConfig(name="retrack", params={"k": 40}))
    with pytest.raises(InputError, match="whole corpus"):
        split_for_unlearning(toy_corpus(2), ["i0", "i1"], MethodConfig(name="vanilla"))


def test_microbatches_partition_the_global_batch_deterministically():
    c = toy_corpus()
    data = split_for_unlearning(c, ["i3", "i7"], MethodConfig(name="retrack", params={"k": 3}))
    needs = MethodConfig(name="retrack").needs_neighbours
    assert needs
    from retrack.methods import method_class

    req = method_class("retrack").requirements
    one = BatchDrawer(data, req, TrainConfig(batch_size=8, grad_accum=1, seed=5))
    four = BatchDrawer(data, req, TrainConfig(batch_size=8, grad_accum=4, seed=5))
    whole, _ = one.microbatch(step=3, micro=0)
    parts = [four.microbatch(step=3, micro=m)[0] for m in range(4)]
    torch.testing.assert_close(torch.cat([p.retain for p in parts]), whole.retain)
    torch.testing.assert_close(torch.cat([p.neighbour_of for p in parts]), whole.neighbour_of)
    # A drawer's batches point into one set per forget item, prepared once, each sample at its own item's.
    sets = whole.neighbours
    assert all(p.neighbours is parts[0].neighbours for p in parts) and len(sets) == len(data.forget) == 2
    torch.testing.assert_close(data.forget[whole.neighbour_of], whole.forget)
    rebuilt = (sets.anchor.unsqueeze(1) + sets.diffs).view_as(data.neighbours)
    torch.testing.assert_close(rebuilt, data.neighbours)
    again, gen = four.microbatch(step=3, micro=2)
    torch.testing.assert_close(again.forget, parts[2].forget)
    assert torch.equal(torch.randn(3, generator=gen), torch.randn(3, generator=four.microbatch(3, 2)[1]))
    assert not torch.equal(one.microbatch(4, 0)[0].retain, whole.retain)


@pytest.mark.parametrize("name", ["retrack", "vanilla", "neggrad", "erasediff", "siss"])
def test_every_method_trains_end_to_end(name):
    torch.manual_seed(0)
    model = tiny_pixel(8)
    before = [p.detach().clone() for p in model.unet.parameters()]
    data = split_for_unlearning(toy_corpus(), ["i0", "i1"], MethodConfig(name=name, params={"k": 3} if name == "retrack" else {}))
    history, secs = run_unlearning(model, data, MethodConfig(name=name, params={"k": 3} if name == "retrack" else {}), TrainConfig(steps=2, batch_size=4, lr=1e-3))
    assert [h["step"] for h in history] == [1, 2] and secs > 0
    assert all(np.isfinite(h["loss"]) for h in history)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.unet.parameters()))


def test_retrack_pulls_the_prediction_toward_the_neighbour_target():
    """After ReTrack steps with lambda = 1, the kNN loss on fixed (t, eps) draws falls."""
    from retrack.models.schedule import NoiseSchedule
    from retrack.methods.retrack import knn_target

    torch.manual_seed(0)
    model = tiny_pixel(8)
    cfg = MethodConfig(name="retrack", params={"lambda": 1.0, "k": 3})
    data = split_for_unlearning(toy_corpus(), ["i0"], cfg)
    schedule = NoiseSchedule.from_scheduler(model.scheduler)
    t = torch.arange(100, 1000, 50)
    g = torch.Generator().manual_seed(1)
    xt = schedule.add_noise(data.forget.expand(len(t), -1, -1, -1), t, torch.randn((len(t), 1, 8, 8), generator=g))
    knn = knn_target(schedule, xt, t, data.neighbours.expand(len(t), -1, -1, -1, -1))

    def knn_loss():
        with torch.no_grad():
            pred = model.unet(xt, t).sample
        return float(knn.loss(pred).mean())

    before = knn_loss()
    run_unlearning(model, data, cfg, TrainConfig(steps=20, batch_size=16, lr=1e-3))
    assert knn_loss() < 0.8 * before


def test_a_forget_batch_of_its_own_is_drawn_and_split_into_micro_batches():
    from retrack.methods import method_class

    data = split_for_unlearning(toy_corpus(), ["i3", "i7"], MethodConfig(name="retrack", params={"k": 3}))
    req = method_class("retrack").requirements
    # Unset and explicitly equal draw the same rows: earlier runs' batches are unchanged.
    unset = BatchDrawer(data, req, TrainConfig(batch_size=8, seed=5))
    equal = BatchDrawer(data, req, TrainConfig(batch_size=8, forget_batch_size=8, seed=5))
    for a, b in zip(unset.rows(2), equal.rows(2)):
        np.testing.assert_array_equal(a, b)
    small = BatchDrawer(data, req, TrainConfig(batch_size=8, forget_batch_size=4, grad_accum=2, seed=5))
    f_rows, r_rows = small.rows(3)
    assert (len(f_rows), len(r_rows)) == (4, 8)
    parts = [small.microbatch(3, m)[0] for m in range(2)]
    assert [(len(p.forget), len(p.retain), len(p.neighbour_of)) for p in parts] == [(2, 4, 2), (2, 4, 2)]
    torch.testing.assert_close(torch.cat([p.forget for p in parts]), data.forget[torch.from_numpy(f_rows)])
    torch.testing.assert_close(torch.cat([p.retain for p in parts]), data.retain[torch.from_numpy(r_rows)])
    with pytest.raises(InputError, match="forget_batch_size 4 must equal batch_size 8"):
        BatchDrawer(data, method_class("siss").requirements, TrainConfig(batch_size=8, forget_batch_size=4))


@pytest.mark.parametrize("name", ["retrack", "erasediff", "neggrad"])
def test_methods_with_a_forget_branch_train_with_a_smaller_forget_batch(name):
    torch.manual_seed(0)
    model = tiny_pixel(8)
    cfg = MethodConfig(name=name, params={"k": 3} if name == "retrack" else {})
    data = split_for_unlearning(toy_corpus(), ["i0", "i1"], cfg)
    history, _ = run_unlearning(model, data, cfg, TrainConfig(steps=2, batch_size=4, forget_batch_size=2, lr=1e-3))
    assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)


def test_data_without_neighbours_gets_the_methods_own_error_not_a_crash():
    from retrack.models.schedule import NoiseSchedule
    from retrack.methods import build_method

    data = split_for_unlearning(toy_corpus(), ["i3"], MethodConfig(name="vanilla"))
    assert data.neighbours is None
    method = build_method("retrack", NoiseSchedule.from_scheduler(default_scheduler()), {"k": 3})
    batch, gen = BatchDrawer(data, method.requirements, TrainConfig(batch_size=4)).microbatch(0, 0)
    assert batch.neighbours is None and batch.neighbour_of is None
    with pytest.raises(InputError, match="needs a neighbours batch"):
        method.losses(lambda x, t, c=None: x, batch, gen)
