"""ddpm_fast.quality: the Frechet distance against closed forms and SciPy, and the digits report's
floor / non-model figures, class spread, accuracy, determinism and input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpm_fast.errors import DataError
from ddpm_fast.quality import (
    digits_classifier,
    digits_quality_report,
    digits_split,
    feature_statistics,
    format_quality_report,
    frechet_distance,
    train_digits_classifier,
)


def _random_spd(d, rng, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / d + (0 if rank else 0.1) * np.eye(d)


def _heldout_digits():
    from ddpm_fast.data import load_digits_images

    images, _ = load_digits_images()
    return images[torch.from_numpy(digits_split()[1])]


# --------------------------------------------------------------------------------------------------
# frechet_distance


@pytest.mark.parametrize("d", [1, 5, 64])
def test_identical_gaussians_are_at_distance_zero(d):
    rng = np.random.default_rng(d)
    mu, s = rng.normal(size=d), _random_spd(d, rng)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-8 * np.trace(s))


@pytest.mark.parametrize("d", [1, 7, 32])
def test_diagonal_closed_form(d):
    # for diagonal covariances FD = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2
    rng = np.random.default_rng(100 + d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("d, rank", [(6, None), (40, None), (40, 10)])
def test_matches_scipy_sqrtm(d, rank):
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(7 * d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_spd(d, rng, rank), _random_spd(d, rng)
    cross = linalg.sqrtm(s1 @ s2)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(cross).real
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    # symmetric in its two arguments
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_shape_checks():
    with pytest.raises(ValueError, match="different dimensions"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(np.zeros((1, 4)))


# --------------------------------------------------------------------------------------------------
# the digits report


def test_classifier_accuracy():
    report = digits_quality_report(_heldout_digits()[:100])
    assert report["classifier_test_accuracy"] > 0.9
    train_idx, heldout_idx = digits_split()
    assert len(train_idx) == 1200 and len(heldout_idx) == 597
    assert not set(train_idx.tolist()) & set(heldout_idx.tolist())


def test_heldout_floor_far_below_gaussian_and_noise():
    real = _heldout_digits()
    report = digits_quality_report(real[:500])
    assert report["n_samples"] == report["n_heldout"] == 500
    assert 0 < report["fd_heldout_real"] * 5 < report["fd_gaussian"]
    # real digits as "samples" score near the floor; uniform noise scores far above the Gaussian
    assert report["fd_model"] * 5 < report["fd_gaussian"]
    noise = digits_quality_report(torch.rand(500, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert noise["fd_model"] > noise["fd_gaussian"] > noise["fd_heldout_real"]
    # with every held-out digit as the samples, the model figure is the floor itself
    full = digits_quality_report(real)
    assert full["n_heldout"] == 597
    assert full["fd_model"] == pytest.approx(full["fd_heldout_real"], rel=1e-5)


def test_heldout_class_histogram_is_near_uniform():
    report = digits_quality_report(_heldout_digits())
    hist = report["class_histogram"]
    assert len(hist) == 10 and sum(hist) == 597
    assert min(hist) >= 0.7 * 59.7 and max(hist) <= 1.3 * 59.7
    assert report["heldout_class_histogram"] == hist  # same digits, same counts


def test_collapsed_model_shows_in_histogram_and_distance():
    from ddpm_fast.data import load_digits_images

    images, labels = load_digits_images()
    sevens = images[labels == 7][:100]  # a "model" that only ever draws a 7
    collapsed = digits_quality_report(sevens)
    assert collapsed["class_histogram"][7] >= 90
    assert collapsed["fd_model"] > 3 * collapsed["fd_heldout_real"]


def test_report_is_deterministic():
    x = _heldout_digits()[:300] + 0.1 * torch.randn(300, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    first, second = digits_quality_report(x), digits_quality_report(x.clone())
    assert first == second
    # a retrained classifier is bit-identical to the cached one
    fresh, cached = train_digits_classifier().state_dict(), digits_classifier().state_dict()
    assert fresh.keys() == cached.keys()
    for name in fresh:
        assert torch.equal(fresh[name], cached[name]), name


def test_uint8_nhwc_samples_are_accepted():
    from ddpm_fast.data import to_uint8_nhwc

    x = _heldout_digits()[:200]
    as_float, as_uint8 = digits_quality_report(x), digits_quality_report(to_uint8_nhwc(x))
    assert as_uint8["class_histogram"] == as_float["class_histogram"]
    assert as_uint8["fd_model"] == pytest.approx(as_float["fd_model"], rel=0.05)


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(10, 3, 8, 8), "float \\(N, 1, 8, 8\\).*got torch.float32 \\(10, 3, 8, 8\\)"),
    (torch.zeros(10, 1, 32, 32), "\\(10, 1, 32, 32\\)"),
    (torch.zeros(10, 8, 8), "\\(N, 1, 8, 8\\)"),
    (torch.zeros(1, 1, 8, 8), "at least 2 samples"),
    (torch.full((4, 1, 8, 8), float("nan")), "NaN"),
    ([1, 2, 3], "tensor or array"),
])
def test_bad_samples(bad, match):
    with pytest.raises(DataError, match=match):
        digits_quality_report(bad)


def test_format_quality_report():
    report = digits_quality_report(_heldout_digits()[:100])
    text = format_quality_report(report)
    assert f"{report['fd_model']:.2f}" in text and f"{report['fd_gaussian']:.2f}" in text
    assert "the floor" in text and "non-model" in text
    assert " ".join(str(c) for c in report["class_histogram"]) in " ".join(text.split())
