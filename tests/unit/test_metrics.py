"""Evaluation metrics: each test pins a number that a wrong implementation would get wrong."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from diffusers import UNet2DConditionModel

from retrack.embedded.benchmark import load_digits_u8
from retrack.data.corpus import to_model_space, to_unit_range
from retrack.models.schedule import NoiseSchedule, sum_sq
from retrack.errors import InputError, ModelLayoutError
from retrack.evaluation.metrics import (
    ClassifierConfig,
    FeatureClassifier,
    denoising_loss,
    feature_integrity,
    forget_frequency,
    frechet_distance,
    integrity,
    integrity_ratio,
    load_classifier,
    membership_test,
    nearest_forget_distance,
    save_classifier,
    train_classifier,
)
from retrack.models.pixel import default_scheduler
from tests.fixtures.models import tiny_pixel


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Two shared cores: a 2-thread pool competing with other processes runs ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_digits_u8()
    return to_model_space(images[..., None]), labels


@pytest.fixture(scope="module")
def trained(digits) -> tuple[FeatureClassifier, float, float]:
    images, labels = digits
    start = time.perf_counter()
    model, accuracy = train_classifier(images[:1600], labels[:1600], seed=0, steps=200)
    return model, accuracy, time.perf_counter() - start


# --- forget frequency -------------------------------------------------------------------------


def test_forget_frequency_counts_exactly_the_samples_inside_the_threshold():
    f = np.full((1, 8, 8), 0.5, np.float32)
    g = np.full((1, 8, 8), 0.05, np.float32)  # 3.6 from f: never the nearest for samples around f
    u = np.where(np.random.default_rng(0).random((1, 8, 8)) < 0.5, -1.0, 1.0).astype(np.float32) / 8.0  # unit norm
    dists = [0.0, 0.5, 0.999, 1.001, 1.5]
    samples = np.stack([f + d * u for d in dists] + [g + 0.3 * u])
    forget = np.stack([f, f, f, g])

    got = nearest_forget_distance(samples, forget)
    np.testing.assert_allclose(got, dists + [0.3], atol=1e-6)
    np.testing.assert_array_equal(got, nearest_forget_distance(samples, np.stack([g, f])))
    assert forget_frequency(samples, forget, threshold=1.0) == pytest.approx(4 / 6)
    assert forget_frequency(samples, forget, threshold=0.5) == pytest.approx(2 / 6)  # strict: 0.5 itself is out
    assert forget_frequency(samples, forget[:3], threshold=1.0) == pytest.approx(3 / 6)


def test_forget_frequency_refuses_mismatched_shapes():
    with pytest.raises(InputError, match="forget images"):
        nearest_forget_distance(np.zeros((2, 1, 8, 8)), np.zeros((1, 1, 7, 7)))
    with pytest.raises(InputError, match="empty"):
        nearest_forget_distance(np.zeros((2, 1, 8, 8)), np.zeros((0, 1, 8, 8)))


# --- classifier -------------------------------------------------------------------------------


def test_classifier_learns_digits_quickly(trained):
    _, accuracy, seconds = trained
    assert accuracy >= 0.9
    assert seconds < 15


def test_classifier_roundtrip_and_refusals(trained, digits, tmp_path: Path):
    model = trained[0]
    save_classifier(model, tmp_path / "clf")
    assert sorted(p.name for p in (tmp_path / "clf").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_classifier(tmp_path / "clf")
    x = torch.as_tensor(digits[0][:16])
    with torch.no_grad():
        torch.testing.assert_close(loaded.features(x), model.features(x), rtol=0, atol=0)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "clf" / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ModelLayoutError, match=r"no model\.safetensors \(found: \['pytorch_model\.bin'\]\)"):
        load_classifier(pickled)

    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes((tmp_path / "clf" / "model.safetensors").read_bytes())
    with pytest.raises(ModelLayoutError, match=r"missing config\.json"):
        load_classifier(no_config)

    (no_config / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(ModelLayoutError, match="expected 'FeatureClassifier'"):
        load_classifier(no_config)

    wrong = tmp_path / "wrong_shape"
    save_classifier(FeatureClassifier(ClassifierConfig(image_size=8, channels=1, num_classes=10, feature_dim=32)), wrong)
    (wrong / "model.safetensors").write_bytes((tmp_path / "clf" / "model.safetensors").read_bytes())
    with pytest.raises(ModelLayoutError, match="does not match config.json"):
        load_classifier(wrong)

    (wrong / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelLayoutError, match="not a readable safetensors file"):
        load_classifier(wrong)


# --- Fréchet distance -------------------------------------------------------------------------


def _numpy_frechet(a01: np.ndarray, b01: np.ndarray, model: FeatureClassifier) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 sqrtm(S_a S_b)), transcribed with numpy/scipy."""
    with torch.no_grad():
        fa, fb = (model.features(torch.as_tensor(x * 2.0 - 1.0, dtype=torch.float32)).double().numpy() for x in (a01, b01))
    sa, sb = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dead ReLU units make the covariances singular
        root = scipy.linalg.sqrtm(sa @ sb).real
    return float(((fa.mean(0) - fb.mean(0)) ** 2).sum() + np.trace(sa + sb - 2.0 * root))


def test_frechet_is_zero_on_itself_and_grows_with_damage(trained, digits):
    model = trained[0]
    unit = to_unit_range(digits[0])
    ref = unit[:800]
    noise = np.random.default_rng(0).standard_normal(ref.shape).astype(np.float32)
    assert abs(frechet_distance(ref, ref, model)) < 1e-6
    held_out = frechet_distance(unit[800:1600], ref, model)
    mild = frechet_distance(np.clip(ref + 0.1 * noise, 0, 1), ref, model)
    strong = frechet_distance(np.clip(ref + 0.4 * noise, 0, 1), ref, model)
    shifted = frechet_distance(np.clip(ref + 0.2, 0, 1), ref, model)
    assert 0 < held_out < strong
    assert 0 < mild < strong < shifted
    assert held_out == pytest.approx(_numpy_frechet(unit[800:1600], ref, model), rel=1e-6)
    assert frechet_distance(unit[800:1600], ref, model, batch_size=97) == pytest.approx(held_out, rel=1e-9)


def test_frechet_works_at_28x28_and_matches_the_formula():
    torch.manual_seed(0)
    model = FeatureClassifier(ClassifierConfig(image_size=28, channels=1, num_classes=10)).eval()
    rng = np.random.default_rng(1)
    a = rng.random((120, 1, 28, 28), dtype=np.float32)
    b = rng.random((100, 1, 28, 28), dtype=np.float32) ** 2
    got = frechet_distance(a, b, model)
    assert got > 0
    assert got == pytest.approx(_numpy_frechet(a, b, model), rel=1e-6)
    with pytest.raises(InputError, match="classifier expects"):
        frechet_distance(a[:, :, :8, :8], b, model)


# --- denoising loss ---------------------------------------------------------------------------


def _overfit(unet, scheduler, image: np.ndarray, steps: int) -> None:
    schedule = NoiseSchedule.from_scheduler(scheduler)
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.as_tensor(image).repeat(32, 1, 1, 1)
    unet.train()
    for _ in range(steps):
        t = torch.randint(0, schedule.num_steps, (len(x0),), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        loss = sum_sq(unet(schedule.add_noise(x0, t, eps), t).sample - eps).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_denoising_loss_is_reproducible_and_ranks_a_memorised_item_lower(digits):
    torch.manual_seed(0)
    model = tiny_pixel(8)
    unet, scheduler = model.unet, model.scheduler
    seen, unseen = digits[0][:1], digits[0][1:2]
    items = np.concatenate([seen, unseen])

    first = denoising_loss(unet, scheduler, items, n_draws=32, seed=3)
    np.testing.assert_array_equal(first, denoising_loss(unet, scheduler, items, n_draws=32, seed=3))
    np.testing.assert_allclose(first, denoising_loss(unet, scheduler, items, n_draws=32, seed=3, batch_size=7), rtol=1e-5)
    assert not np.allclose(first, denoising_loss(unet, scheduler, items, n_draws=32, seed=4))
    # Same draws for every item: duplicating an item duplicates its loss.
    np.testing.assert_allclose(denoising_loss(unet, scheduler, np.concatenate([seen, seen]), n_draws=32, seed=3), first[[0, 0]], rtol=1e-5)

    _overfit(unet, scheduler, seen, steps=40)
    after = denoising_loss(unet, scheduler, items, n_draws=32, seed=3)
    assert unet.training, "denoising_loss must restore the caller's training mode"
    assert after[0] < 0.5 * after[1]
    assert after[0] < 0.5 * first[0]


def test_denoising_loss_passes_each_items_conditioning():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=16,
        attention_head_dim=8,
    )
    image = torch.rand(1, 1, 8, 8).repeat(3, 1, 1, 1) * 2 - 1
    cond = 5.0 * torch.randn(3, 4, 16)  # large enough that an untrained cross-attention reacts
    cond[1] = cond[0]
    loss = denoising_loss(unet, default_scheduler(), image, n_draws=4, cond=cond, batch_size=5)
    assert loss[0] == pytest.approx(loss[1], rel=1e-6)
    assert loss[2] != pytest.approx(loss[0], rel=1e-2)
    permuted = denoising_loss(unet, default_scheduler(), image, n_draws=4, cond=cond[[2, 0, 1]], batch_size=12)
    np.testing.assert_allclose(permuted, loss[[2, 0, 1]], rtol=1e-6)
    with pytest.raises(InputError, match="one per item"):
        denoising_loss(unet, default_scheduler(), image, n_draws=4, cond=cond[:2])


# --- integrity --------------------------------------------------------------------------------


def test_integrity_is_zero_on_identical_sets_and_respects_exclude(trained):
    rng = np.random.default_rng(0)
    a = rng.random((5, 1, 8, 8)).astype(np.float32) * 0.5
    b = a.copy()
    assert integrity(a, b) == 0.0
    b[1] += 0.25  # L2 = 0.25 * 8 = 2 over 64 pixels
    b[3] += 0.125  # L2 = 1
    assert integrity(a, b) == pytest.approx(3 / 5)
    exclude = np.array([False, True, False, False, False])
    assert integrity(a, b, exclude=exclude) == pytest.approx(1 / 4)
    assert integrity(a, b, exclude=exclude | np.array([False, False, False, True, False])) == 0.0
    with pytest.raises(InputError, match="no sample pairs left"):
        integrity(a, b, exclude=np.ones(5, dtype=bool))
    with pytest.raises(InputError, match="boolean mask"):
        integrity(a, b, exclude=np.array([0, 1, 0, 0, 0]))

    model = trained[0]
    assert feature_integrity(a, a, model) == 0.0
    assert feature_integrity(a, b, model) > 0.0
    assert feature_integrity(a, b, model, exclude=np.array([False, True, False, True, False])) == 0.0


def test_integrity_ratio_is_on_the_scale_of_unrelated_samples():
    """0 when nothing moved, 1 when each sample became an unrelated one (the next sample of the
    original), the same for any value scale and resolution; excluded pairs are left out of both."""
    rng = np.random.default_rng(0)
    a = rng.random((40, 1, 8, 8))
    assert integrity_ratio(a, a) == 0.0
    assert integrity_ratio(a, np.roll(a, 1, axis=0)) == pytest.approx(1.0)
    assert integrity_ratio(10 * a, 10 * (a + 0.05)) == pytest.approx(integrity_ratio(a, a + 0.05))
    big = rng.random((40, 3, 32, 32))
    assert integrity_ratio(big, big + 0.05) == pytest.approx(integrity_ratio(a, a + 0.05), rel=0.1)
    moved = a.copy()
    moved[0] += 5.0  # a copy of a forgotten item: supposed to change, so excluded
    exclude = np.zeros(40, dtype=bool)
    exclude[0] = True
    assert integrity_ratio(a, moved, exclude=exclude) == 0.0 < integrity_ratio(a, moved)
    with pytest.raises(InputError, match="at least 2 sample pairs"):
        integrity_ratio(a, a, exclude=np.arange(40) > 0)
    with pytest.raises(InputError, match="all identical"):
        integrity_ratio(np.zeros((4, 1, 8, 8)), np.ones((4, 1, 8, 8)))


# --- membership -------------------------------------------------------------------------------


def test_membership_test_flags_items_below_the_reference_quantile():
    reference = np.random.default_rng(0).permutation(np.arange(1.0, 101.0))  # 1..100, order must not matter
    result = membership_test(np.array([0.5, 4.9, 5.0, 50.0, 200.0]), reference, alpha=0.05)
    assert result["threshold"] == 5.0
    np.testing.assert_allclose(result["percentiles"], [0.0, 0.04, 0.05, 0.5, 1.0])
    np.testing.assert_array_equal(result["remembered"], [True, True, False, False, False])
    assert result["remembered_count"] == 2
    assert result["n_reference"] == 100
    with pytest.raises(InputError, match="at least 20"):
        membership_test(np.array([1.0]), np.arange(10.0), alpha=0.05)
    with pytest.raises(InputError, match="alpha"):
        membership_test(np.array([1.0]), reference, alpha=1.5)
    with pytest.raises(InputError, match="finite"):
        membership_test(np.array([np.nan]), reference)
