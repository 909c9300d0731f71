"""The torch-fidelity adapter for real, and the cross-check against pytorch-fid (marker ``fidelity``).

These need torch-fidelity and pytorch-fid, which need a torchvision matching the installed torch; CI runs
them in a second environment (``.ci/fid-tests``). Elsewhere they are skipped with the reason, unless
DDPM_FAST_REQUIRE_FIDELITY=1 (set by that script), which turns a missing library into a failure.

No download: the Inception here is torch-fidelity's own network with random weights (He-initialised
convolutions, so the activations neither vanish nor explode over its depth), saved to a weights file.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import urllib.error

import numpy as np
import pytest
import torch

try:
    import pytorch_fid.fid_score as pytorch_fid_score
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
except Exception as exc:  # ImportError, or torchvision's "operator torchvision::nms does not exist"
    if os.environ.get("DDPM_FAST_REQUIRE_FIDELITY") == "1":
        raise
    pytest.skip(f"torch-fidelity / pytorch-fid not importable here ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); .ci/fid-tests runs these in their own venv",
                allow_module_level=True)

from cli_helpers import error_line as _error_line
from ddpm_fast.cli import main
from fid_helpers import gamma, random_inception_weights, stats_bounds
from ddpm_fast.fid_stats import frechet_distance, load_stats
from ddpm_fast.inception import WEIGHTS_ENV, WEIGHTS_FILE, load_inception, sha256_file

pytestmark = pytest.mark.fidelity


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A weights file for torch-fidelity's FeatureExtractorInceptionV3 holding seeded random weights."""
    return random_inception_weights(tmp_path_factory.mktemp("inception") / "random-inception.pth")


def _images(n, seed, hi=256, channels=3, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, hi, (n, channels, size, size), generator=g, dtype=torch.uint8)


def test_adapter_features_equal_torch_fidelity_called_directly(weights):
    ours = load_inception(weights)
    direct = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                      feature_extractor_weights_path=str(weights))
    x = _images(4, 0)
    (expected,) = direct(x)
    got = ours(x)
    assert got.shape == (4, 2048) and got.dtype == torch.float32
    assert torch.isfinite(got).all() and got.std() > 0.01  # a live network, not a constant
    torch.testing.assert_close(got, expected.reshape(4, 2048), rtol=0, atol=0)  # the same computation
    gray = _images(2, 1, channels=1)  # grayscale goes in as RGB with equal channels
    (expected_gray,) = direct(gray.expand(-1, 3, -1, -1).contiguous())
    torch.testing.assert_close(ours(gray), expected_gray.reshape(2, 2048), rtol=0, atol=0)
    assert ours.info["weights_sha256"] == sha256_file(weights)


def test_weights_from_the_environment_and_the_hub_cache(weights, tmp_path, monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, str(weights))
    assert load_inception().weights_path == weights
    monkeypatch.delenv(WEIGHTS_ENV)
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    shutil.copy(weights, hub / "checkpoints" / WEIGHTS_FILE)
    saved = torch.hub.get_dir()
    torch.hub.set_dir(str(hub))
    try:
        assert load_inception().weights_path == hub / "checkpoints" / WEIGHTS_FILE
    finally:
        torch.hub.set_dir(saved)



def test_missing_weights_offline_is_one_line(tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", offline)
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    saved = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "empty-hub"))
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    try:
        assert main(["fid", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz")]) == 2
    finally:
        torch.hub.set_dir(saved)
    line = _error_line(capsys)
    assert WEIGHTS_FILE in line and str(tmp_path / "empty-hub" / "checkpoints") in line
    assert main(["fid", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"),
                 "--inception-weights", str(tmp_path / "nope.pth")]) == 2
    assert "nope.pth" in _error_line(capsys)


def _random_spd(d, rng, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / d


@pytest.mark.parametrize("d, rank", [(64, None), (64, 10)])
def test_frechet_distance_equals_pytorch_fid_on_synthetic_statistics(d, rank):
    rng = np.random.default_rng(d + (rank or 0))
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_spd(d, rng, rank), _random_spd(d, rng, rank)
    expected = pytorch_fid_score.calculate_frechet_distance(mu1, s1, mu2, s2)
    # the same float64 operations in the same order: the same number
    assert frechet_distance(mu1, s1, mu2, s2) == float(expected)


def _cifar_folder(path, images):
    """A CIFAR-10 python-batch folder holding ``images`` (uint8 NCHW 32x32) as data_batch_1."""
    path.mkdir()
    with open(path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": images.reshape(len(images), -1).numpy(), b"labels": [0] * len(images)}, f)
    return path


def test_commands_offline_with_a_weights_file_and_the_pytorch_fid_cross_check(weights, tmp_path, capsys):
    """fid-stats of a CIFAR-10 batch folder and of a samples.npz, then fid: the figure equals pytorch-fid's
    calculate_frechet_distance on the same two statistics files (2048-d, fewer images than dimensions,
    so the covariances are singular: the near-singular path of both)."""
    ref_images, sample_images = _images(6, 2), _images(5, 3, hi=200)
    cifar = _cifar_folder(tmp_path / "cifar", ref_images)
    np.savez(tmp_path / "samples.npz", arr_0=sample_images.permute(0, 2, 3, 1).numpy())
    w = ["--inception-weights", str(weights), "--device", "cpu"]
    assert main(["fid-stats", str(cifar), "--out", str(tmp_path / "ref.npz"), *w]) == 0
    assert main(["fid-stats", str(tmp_path / "samples.npz"), "--out", str(tmp_path / "s.npz"), *w]) == 0
    capsys.readouterr()
    # the statistics are those of the features torch-fidelity gives for the same uint8 images
    direct = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                      feature_extractor_weights_path=str(weights))
    (f,) = direct(ref_images)
    mu_ref, sigma_ref = load_stats(tmp_path / "ref.npz")
    mu_bound, _ = stats_bounds(f.double().numpy())  # both means are float64 sums of the same 6 values
    assert (np.abs(mu_ref - f.double().mean(0).numpy()) <= 2 * mu_bound).all()
    assert main(["fid", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"), "--json", *w]) == 0
    out = json.loads(capsys.readouterr().out)
    mu_s, sigma_s = load_stats(tmp_path / "s.npz")
    expected = float(pytorch_fid_score.calculate_frechet_distance(mu_s, sigma_s, mu_ref, sigma_ref))
    assert np.isfinite(expected) and expected > 0
    assert out["fid"] == expected
    assert out["weights_sha256"] == sha256_file(weights) and out["n_samples"] == 5


def test_kid_equals_torch_fidelity_on_the_same_features():
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    from ddpm_fast.fid_stats import kernel_inception_distance

    g = torch.Generator().manual_seed(9)
    x = torch.rand(50, 16, generator=g, dtype=torch.float64)
    y = torch.rand(45, 16, generator=g, dtype=torch.float64) * 1.2
    theirs = kid_features_to_metric(x, y, kid_subsets=10, kid_subset_size=20, verbose=False)
    ours = kernel_inception_distance(x, y, subsets=10, subset_size=20)
    # the same subsets (the same RandomState draws) and kernel in float64; only the summation order
    # differs. A kernel value is at most (16 * 1.2^2 / 16 + 1)^3 < 14.6, and each of the three kernel
    # means (sums of <= 400 values of 16-term dot products) errs by <= gamma_416 * 14.6, the cross term
    # counting twice: <= 4 * gamma_416 * 14.6 per side, twice that between the two implementations
    bound = 2 * 4 * gamma(416) * 14.6
    assert abs(ours["kid"] - theirs[KEY_METRIC_KID_MEAN]) <= bound
    assert abs(ours["kid_std"] - theirs[KEY_METRIC_KID_STD]) <= 2 * bound
    assert theirs[KEY_METRIC_KID_MEAN] > 0
