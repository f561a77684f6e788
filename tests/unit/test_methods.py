"""Each loss against a direct transcription of its formula (method.md), on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from retrack.models.schedule import NoiseSchedule
from retrack.errors import InputError, TrainingDivergedError
from retrack.methods import UnlearnBatch, build_method, method_class, method_names
from retrack.methods.neighbour_sets import NeighbourSets
from retrack.methods.retrack import knn_target
from retrack.methods.siss import importance_weights
from retrack.models.pixel import default_scheduler
from retrack.training.step import make_optimizer, unlearning_step

SHAPE = (1, 4, 4)
B, K = 3, 4


@pytest.fixture
def schedule():
    return NoiseSchedule.from_scheduler(default_scheduler())


class TinyDenoiser(torch.nn.Module):
    """eps_theta(x, t) = conv(x) * (1 + t / 1000): cheap, differentiable, depends on x and t."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, t, cond=None):
        return self.conv(x) * (1 + t.float().view(-1, 1, 1, 1) / 1000)


def make_batch(seed=1, k=K):
    g = torch.Generator().manual_seed(seed)
    return UnlearnBatch(
        retain=torch.rand((B, *SHAPE), generator=g) * 2 - 1,
        forget=torch.rand((B, *SHAPE), generator=g) * 2 - 1,
        neighbours=torch.rand((B, k, *SHAPE), generator=g) * 2 - 1,
    )


def gen(seed=7):
    return torch.Generator().manual_seed(seed)


def draws(schedule, g, n, low=0):
    """The (t, eps) a branch draws, in the order the methods draw them."""
    t = torch.randint(low, schedule.num_steps, (n,), generator=g)
    eps = torch.randn((n, *SHAPE), generator=g)
    return t, eps


def sq(x):
    return float((x.double() ** 2).sum())


def test_registry_lists_all_five_methods_with_their_data_needs():
    assert method_names() == ["erasediff", "neggrad", "retrack", "siss", "vanilla"]
    r = method_class("retrack").requirements
    assert (r.retain, r.forget, r.neighbours) == (True, True, True)
    v = method_class("vanilla").requirements
    assert (v.retain, v.forget, v.neighbours) == (True, False, False)
    n = method_class("neggrad").requirements
    assert (n.retain, n.forget, n.neighbours) == (False, True, False)


@pytest.mark.parametrize(
    "name,params,field",
    [
        ("retrack", {"lambda": 1.5}, "lambda"),
        ("retrack", {"lambda": -0.1}, "lambda"),
        ("retrack", {"k": 0}, "k"),
        ("retrack", {"t_min": -1}, "t_min"),
        ("retrack", {"t_min": 1000}, "t_min"),
        ("siss", {"lambda": 1.0}, "lambda"),
        ("erasediff", {"eta": -1}, "eta"),
        ("vanilla", {"lr": 1}, "lr"),
    ],
)
def test_bad_params_are_refused_naming_the_field(schedule, name, params, field):
    with pytest.raises(InputError, match=field):
        build_method(name, schedule, params)


def test_retrack_t_min_beyond_a_short_schedule_is_refused():
    from diffusers import DDPMScheduler

    short = NoiseSchedule.from_scheduler(DDPMScheduler(num_train_timesteps=100))
    with pytest.raises(InputError, match="t_min 500 must be below the schedule's 100 timesteps"):
        build_method("retrack", short, {"t_min": 500})
    assert build_method("retrack", short, {"t_min": 99}).params.t_min == 99


def test_unknown_method_is_refused(schedule):
    with pytest.raises(InputError, match="unknown method 'retrak'.*retrack"):
        build_method("retrak", schedule)


def test_missing_data_is_refused(schedule):
    m = build_method("retrack", schedule)
    with pytest.raises(InputError, match="neighbours"):
        m.losses(TinyDenoiser(), UnlearnBatch(retain=make_batch().retain, forget=make_batch().forget), gen())


@pytest.mark.parametrize("t_min", [0, 900])
def test_retrack_loss_matches_transcription(schedule, t_min):
    """t_min narrows only the forget branch's timesteps; the retain branch keeps all of them."""
    lam = 0.3
    net, batch = TinyDenoiser(), make_batch()
    terms = build_method("retrack", schedule, {"lambda": lam, "k": K, "t_min": t_min}).losses(net, batch, gen())
    g = gen()
    tf, ef = draws(schedule, g, B, low=t_min)
    tr, er = draws(schedule, g, B)
    knn, van = 0.0, 0.0
    with torch.no_grad():
        for i in range(B):
            ga, sa = schedule.gamma[tf[i]], schedule.sigma[tf[i]]
            xt = ga * batch.forget[i] + sa * ef[i]
            pred = net(xt[None], tf[i : i + 1])[0]
            v = [(xt - ga * batch.neighbours[i, j]) / sa for j in range(K)]
            logits = torch.tensor([-0.5 * sq(vj) for vj in v], dtype=torch.float64)
            p = torch.exp(logits - torch.logsumexp(logits, 0))
            knn += sum(float(p[j]) * sq(pred - v[j]) for j in range(K)) / B
            gr, sr = schedule.gamma[tr[i]], schedule.sigma[tr[i]]
            pred_r = net((gr * batch.retain[i] + sr * er[i])[None], tr[i : i + 1])[0]
            van += sq(pred_r - er[i]) / B
    assert terms.logs["loss_knn"] == pytest.approx(knn, rel=1e-5)
    assert terms.logs["loss_retain"] == pytest.approx(van, rel=1e-5)
    assert float(terms.losses["loss"].detach()) == pytest.approx(lam * knn + (1 - lam) * van, rel=1e-5)


def _per_neighbour_term(schedule, pred, xt, t, neighbours):
    """sum_j p_j ||pred - v_j||^2 per sample, written the way method.md states it."""
    g, s = schedule.coefficients(t, neighbours.ndim)
    v = (xt.unsqueeze(1) - g * neighbours) / s
    p = torch.softmax(-0.5 * (v**2).flatten(2).sum(-1), dim=1).detach()
    return (p * ((pred.unsqueeze(1) - v) ** 2).flatten(2).sum(-1)).sum(1)


def test_knn_term_is_distance_to_weighted_target_plus_theta_free_constant(schedule):
    """The loss is taken as ||pred - sum_j p_j v_j||^2 + spread: the same value and the same
    gradient as the per-neighbour sum for three different thetas, with one theta-free spread."""
    batch = make_batch()
    t, eps = draws(schedule, gen(), B)
    xt = schedule.add_noise(batch.forget, t, eps)
    knn = knn_target(schedule, xt, t, batch.neighbours)
    values = []
    for seed in (0, 1, 2):  # three different thetas
        net = TinyDenoiser(seed)
        pred = net(xt, t)
        direct = _per_neighbour_term(schedule, pred, xt, t, batch.neighbours)
        torch.testing.assert_close(direct, knn.loss(pred), rtol=1e-5, atol=1e-4)
        g_direct = torch.autograd.grad(direct.mean(), list(net.parameters()), retain_graph=True)
        g_collapsed = torch.autograd.grad(knn.loss(pred).mean(), list(net.parameters()))
        for a, b in zip(g_direct, g_collapsed):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        values.append(direct.detach())
    assert not torch.allclose(values[0], values[1])  # the thetas differ, so one spread serving all is a real check


@pytest.mark.parametrize("spread", [1.0, 0.01])
def test_knn_with_k_equal_to_retain_set_is_the_full_posterior_objective(schedule, spread):
    """Also near t = 0 and for near-duplicate neighbours (spread 0.01), where the weights depend on
    small differences of large squared distances divided by sigma_t^2."""
    g = gen(3)
    retain_set = 0.5 + spread * (torch.rand((6, *SHAPE), generator=g) * 2 - 1) / 2
    t = torch.tensor([0, 5, 50, 400])
    a_u = retain_set[0] + spread * (torch.rand((len(t), *SHAPE), generator=g) * 2 - 1) / 4
    eps = torch.randn(a_u.shape, generator=g)
    xt = schedule.add_noise(a_u, t, eps)
    pred = TinyDenoiser()(xt, t).detach()
    knn = knn_target(schedule, xt, t, retain_set[None], torch.zeros(len(t), dtype=torch.long))  # one set shared by all
    per = knn.loss(pred)
    for i in range(len(t)):
        gi, si = schedule.gamma[t[i]].double(), schedule.sigma[t[i]].double()
        q = torch.distributions.Normal(gi * retain_set.double(), si)
        logw = q.log_prob(xt[i].double()).flatten(1).sum(1)  # log q_t(x_t | a) for every a in A_r
        w = torch.softmax(logw, 0)
        full = sum(float(w[a]) * sq(pred[i] - (xt[i] - gi * retain_set[a]) / si) for a in range(6))
        assert float(per[i]) == pytest.approx(full, rel=1e-4)


def test_knn_sets_stored_once_equal_one_set_per_sample(schedule):
    """The drawer stores each forget item's neighbour set once and points every sample at it:
    the same target, spread and weights as one gathered set per sample."""
    g = gen(5)
    sets = torch.rand((3, K, *SHAPE), generator=g) * 2 - 1
    of = torch.tensor([2, 0, 2, 2, 1, 0])
    t = torch.tensor([0, 3, 40, 400, 999, 7])
    xt = torch.rand((len(of), *SHAPE), generator=g) * 2 - 1
    shared, gathered = knn_target(schedule, xt, t, sets, of), knn_target(schedule, xt, t, sets[of])
    for a, b in zip(shared, gathered):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="3 neighbour sets for 6 forget samples"):
        knn_target(schedule, xt, t, sets)


def test_neighbour_sets_hold_differences_from_the_first_neighbour_and_move_once():
    g = gen(7)
    sets = torch.rand((3, K, *SHAPE), generator=g) * 2 - 1
    prepared = NeighbourSets.of(sets)
    flat = sets.flatten(2)
    torch.testing.assert_close(prepared.anchor, flat[:, 0])
    torch.testing.assert_close(prepared.diffs, flat - flat[:, :1])
    assert prepared.sq_norms.dtype == torch.float64
    torch.testing.assert_close(prepared.sq_norms, ((flat - flat[:, :1]).double() ** 2).sum(2))
    assert prepared.to("cpu") is prepared
    # Every micro-batch moves the batch to the training device: the sets are copied there once.
    moved = prepared.to("meta")
    assert moved.diffs.device.type == "meta" and moved.diffs.shape == prepared.diffs.shape
    assert prepared.to("meta") is moved


def test_knn_weights_and_targets_carry_no_gradient(schedule):
    batch = make_batch()
    t, eps = draws(schedule, gen(), B)
    xt = schedule.add_noise(batch.forget, t, eps).requires_grad_(True)
    knn = knn_target(schedule, xt, t, batch.neighbours.requires_grad_(True))
    assert not any(x.requires_grad for x in knn)
    assert torch.allclose(knn.weights.sum(1), torch.ones(B))


def test_vanilla_and_neggrad_match_transcription(schedule):
    net, batch = TinyDenoiser(), make_batch()
    van = build_method("vanilla", schedule).losses(net, batch, gen()).logs["loss"]
    neg = build_method("neggrad", schedule).losses(net, batch, gen()).logs["loss"]
    t, eps = draws(schedule, gen(), B)
    with torch.no_grad():
        exp_van = sum(sq(net(schedule.add_noise(batch.retain[i : i + 1], t[i : i + 1], eps[i : i + 1]), t[i : i + 1]) - eps[i]) for i in range(B)) / B
        exp_neg = -sum(sq(net(schedule.add_noise(batch.forget[i : i + 1], t[i : i + 1], eps[i : i + 1]), t[i : i + 1]) - eps[i]) for i in range(B)) / B
    assert van == pytest.approx(exp_van, rel=1e-5)
    assert neg == pytest.approx(exp_neg, rel=1e-5)


def test_erasediff_terms_and_projection(schedule):
    net, batch = TinyDenoiser(), make_batch()
    m = build_method("erasediff", schedule, {"eta": 1e-3})
    terms = m.losses(net, batch, gen())
    g = gen()
    tr, er = draws(schedule, g, B)
    tf, ef = draws(schedule, g, B)
    u = torch.rand((B, *SHAPE), generator=g)
    assert float(u.min()) >= 0 and float(u.max()) < 1
    with torch.no_grad():
        corr = sum(sq(net(schedule.add_noise(batch.forget[i : i + 1], tf[i : i + 1], ef[i : i + 1]), tf[i : i + 1])[0] - u[i]) for i in range(B)) / B
    assert terms.logs["loss_corr"] == pytest.approx(corr, rel=1e-5)
    g_main, g_corr = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    # <g_main, g_corr> / |g_corr|^2 = -0.5 -> coefficient eta + 0.5
    torch.testing.assert_close(m.combine({"main": g_main, "corr": g_corr}), g_main + (1e-3 + 0.5) * g_corr)
    aligned = torch.tensor([1.0, 0.0])
    torch.testing.assert_close(m.combine({"main": g_main, "corr": aligned}), g_main)  # coefficient clipped at 0


def test_siss_weights_match_formula_and_stay_finite():
    d_x = torch.tensor([0.3, 2.0, 5.0], dtype=torch.float64)
    d_a = torch.tensor([1.0, 0.1, 5.0], dtype=torch.float64)
    lam = 0.5
    w_x, w_a = importance_weights(d_x, d_a, lam)
    torch.testing.assert_close(w_x, 1 / ((1 - lam) + lam * torch.exp(d_x - d_a)))
    torch.testing.assert_close(w_a, 1 / ((1 - lam) * torch.exp(d_a - d_x) + lam))
    big_x, big_a = importance_weights(torch.tensor([1e5, 0.0]), torch.tensor([0.0, 1e5]), lam)
    assert torch.isfinite(big_x).all() and torch.isfinite(big_a).all()
    torch.testing.assert_close(big_x, torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(big_a, torch.tensor([2.0, 0.0]))


def test_siss_losses_and_rescaling_match_transcription(schedule):
    lam, scale = 0.5, 5.0
    net, batch = TinyDenoiser(), make_batch()
    m = build_method("siss", schedule, {"lambda": lam, "scale": scale})
    terms = m.losses(net, batch, gen())
    g = gen()
    t, eps = draws(schedule, g, B)
    coin = torch.rand(B, generator=g) < lam
    main = corr = 0.0
    with torch.no_grad():
        for i in range(B):
            gi, si = schedule.gamma[t[i]], schedule.sigma[t[i]]
            x, a = batch.retain[i], batch.forget[i]
            xt = gi * (a if coin[i] else x) + si * eps[i]
            pred = net(xt[None], t[i : i + 1])[0]
            dx, da = sq(xt - gi * x) / (2 * float(si) ** 2), sq(xt - gi * a) / (2 * float(si) ** 2)
            wx = 1 / ((1 - lam) + lam * math.exp(dx - da))
            wa = 1 / ((1 - lam) * math.exp(da - dx) + lam)
            main += wx * sq(pred - (xt - gi * x) / si) / B
            corr += wa * sq(pred - (xt - gi * a) / si) / B
    assert terms.logs["loss"] == pytest.approx(main, rel=1e-4)
    assert terms.logs["loss_corr"] == pytest.approx(corr, rel=1e-4)
    g_main, g_corr = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    torch.testing.assert_close(m.combine({"main": g_main, "corr": g_corr}), g_main - (scale / 5.0) * g_corr)


def test_step_clips_at_one_and_uses_adamw(schedule):
    net = TinyDenoiser()
    params = list(net.parameters())
    opt = make_optimizer(params, lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.95, 0.999)
    m = build_method("siss", schedule, {"scale": 500.0})  # a huge correction: must be clipped
    before = [p.detach().clone() for p in params]
    logs = unlearning_step(m, params, opt, net, [make_batch()], [gen()], step=0)
    assert logs["grad_norm"] > 1.0  # the pre-clip norm is reported
    assert any(not torch.equal(b, p) for b, p in zip(before, params))


def test_all_reduce_sees_each_gradient_before_the_method_combines_them(schedule):
    seen = []

    def all_reduce(g):
        seen.append(g.clone())
        return g

    net = TinyDenoiser()
    params = list(net.parameters())
    m = build_method("erasediff", schedule)
    unlearning_step(m, params, make_optimizer(params, 1e-3), net, [make_batch()], [gen()], step=0, all_reduce=all_reduce)
    assert len(seen) == 3  # main and corr reduced separately (then projected), plus the logs


def test_nan_loss_stops_with_the_step(schedule):
    net = TinyDenoiser()
    batch = make_batch()
    batch.retain[0, 0, 0, 0] = float("nan")
    params = list(net.parameters())
    with pytest.raises(TrainingDivergedError, match="step 7"):
        unlearning_step(build_method("vanilla", schedule), params, make_optimizer(params, 1e-3), net, [batch], [gen()], step=7)
