"""The FID machinery with a small feature extractor made here (offline, no torch-fidelity): running
float64 statistics against extended-precision ones, batch-size and process-count invariance, stats
files, the distance's checks, and the fid-stats / fid / sample --fid / train --fid-every commands.

The torch-fidelity adapter itself is tested in tests/test_fid_fidelity.py (the second environment)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm_fast.fid as fid_module
from cli_helpers import error_line as _error_line
from ddpm_fast.cli import main
from ddpm_fast.errors import DataError
from ddpm_fast.fid import FIDCollector, compute_stats, fid_input, uint8_nchw
from ddpm_fast.fid_stats import RunningStats, frechet_distance, is_stats_file, load_stats, save_stats
from fid_helpers import TinyExtractor, exact_stats, stats_bounds

pytestmark = pytest.mark.usefixtures("single_thread")


def _features(n=300, d=6, seed=0):
    """Non-negative, offset features (like Inception's pool3: mean of the order of the spread)."""
    rng = np.random.default_rng(seed)
    return np.abs(rng.normal(1.0, 0.7, size=(n, d)) @ rng.normal(size=(d, d)))


def _stats_in_batches(features, batch):
    rs = RunningStats(features.shape[1])
    for lo in range(0, len(features), batch):
        rs.update(torch.from_numpy(features[lo:lo + batch]))
    return rs


def _assert_within(got, exact, bound):
    err = np.abs(np.asarray(got, dtype=np.longdouble) - exact).astype(np.float64)
    assert np.isfinite(got).all()
    assert (err <= bound).all(), f"max error {err.max():.3g}, bound there {bound.flat[np.argmax(err - bound)]:.3g}"


# --------------------------------------------------------------------------------------------------
# running statistics


@pytest.mark.parametrize("batch", [1, 7, 64, 300])
def test_running_stats_match_extended_precision(batch):
    f = _features()
    mu, sigma = _stats_in_batches(f, batch).mean_cov()
    assert mu.dtype == np.float64 and sigma.dtype == np.float64 and sigma.shape == (6, 6)
    exact_mu, exact_sigma = exact_stats(f)
    mu_bound, sigma_bound = stats_bounds(f)
    _assert_within(mu, exact_mu, mu_bound)
    _assert_within(sigma, exact_sigma, sigma_bound)
    np.testing.assert_array_equal(sigma, sigma.T)


def test_batch_size_changes_only_the_sum_order():
    f = _features(n=257, seed=1)
    a, b = _stats_in_batches(f, 5).mean_cov(), _stats_in_batches(f, 100).mean_cov()
    mu_bound, sigma_bound = stats_bounds(f)
    # both lie within the bound of the exact statistics, so within twice it of each other
    assert (np.abs(a[0] - b[0]) <= 2 * mu_bound).all()
    assert (np.abs(a[1] - b[1]) <= 2 * sigma_bound).all()


def test_merge_equals_one_accumulator():
    f = _features(n=100, seed=2)
    whole = _stats_in_batches(f, 100)
    merged = _stats_in_batches(f[:37], 10).merge(_stats_in_batches(f[37:], 10))
    assert merged.n == 100
    mu_bound, sigma_bound = stats_bounds(f)
    assert (np.abs(merged.mean_cov()[1] - whole.mean_cov()[1]) <= 2 * sigma_bound).all()
    with pytest.raises(ValueError, match="dimension"):
        whole.merge(RunningStats(3))


def test_running_stats_refuse_bad_features():
    rs = RunningStats(4)
    with pytest.raises(ValueError, match="NaN"):
        rs.update(torch.tensor([[0.0, float("nan"), 1.0, 2.0]]))
    assert rs.n == 0  # nothing half-added
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        rs.update(torch.zeros(3, 5))
    rs.update(torch.zeros(1, 4))
    with pytest.raises(DataError, match="N >= 2"):
        rs.mean_cov()


# --------------------------------------------------------------------------------------------------
# the distance


def _image_set(n, seed, lo=0, hi=256, size=8, channels=3):
    rng = np.random.default_rng(seed)
    return rng.integers(lo, hi, size=(n, size, size, channels), dtype=np.uint8)


def test_fid_of_a_set_against_itself_is_zero_and_of_different_sets_positive(tmp_path):
    ext = TinyExtractor()
    a, b = _image_set(200, 0), _image_set(200, 1, hi=160)  # b: darker images
    mu_a, s_a, _ = compute_stats(fid_input(_npz(tmp_path / "a.npz", a)).dataset, ext, batch_size=64)
    mu_a2, s_a2, _ = compute_stats(fid_input(_npz(tmp_path / "a2.npz", a)).dataset, ext, batch_size=13)
    mu_b, s_b, _ = compute_stats(fid_input(_npz(tmp_path / "b.npz", b)).dataset, ext, batch_size=64)
    assert abs(frechet_distance(mu_a, s_a, mu_a, s_a)) < 1e-6
    assert abs(frechet_distance(mu_a, s_a, mu_a2, s_a2)) < 1e-6  # other batch size: same figure
    d_ab = frechet_distance(mu_a, s_a, mu_b, s_b)
    assert d_ab > 0.1  # the mean shift alone: |mu_a - mu_b|^2
    assert d_ab >= float(((mu_a - mu_b) ** 2).sum()) * 0.999


def test_frechet_distance_closed_form_and_checks():
    rng = np.random.default_rng(3)
    d = 5
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3, size=d), rng.uniform(0.1, 3, size=d)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # a "covariance" with a negative eigenvalue: sqrtm is complex with a large imaginary part -> error
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(mu1, np.diag([1.0, -1.0, 1.0, 1.0, 1.0]), mu2, np.eye(d))
    with pytest.raises(DataError, match="NaN"):
        frechet_distance(mu1, np.diag(a), mu2 * np.nan, np.diag(b))
    with pytest.raises(DataError, match="different dimensions"):
        frechet_distance(mu1, np.diag(a), mu2[:3], np.eye(3))


# --------------------------------------------------------------------------------------------------
# statistics files and inputs


def _npz(path, arr):
    np.savez(path, arr_0=arr)
    return path


def test_stats_file_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    mu, a = rng.normal(size=7), rng.normal(size=(7, 7))
    path = save_stats(tmp_path / "ref.npz", mu, a @ a.T, n=123)
    assert is_stats_file(path) and not list(tmp_path.glob(".*tmp"))
    with np.load(path) as z:  # pytorch-fid's keys and dtype
        assert z["mu"].dtype == np.float64 and z["sigma"].dtype == np.float64 and int(z["n"]) == 123
    mu2, sigma2 = load_stats(path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, a @ a.T)
    with pytest.raises(DataError, match="must end in .npz"):
        save_stats(tmp_path / "ref.npy", mu, a @ a.T)
    with pytest.raises(DataError, match="not a statistics file"):
        load_stats(_npz(tmp_path / "s.npz", _image_set(2, 0)))


def test_uint8_sources_reach_the_extractor_unchanged(tmp_path):
    imgs = _image_set(5, 6)
    seen = []

    class Spy(TinyExtractor):
        def __call__(self, images):
            seen.append(images.clone())
            return super().__call__(images)

    compute_stats(fid_input(_npz(tmp_path / "x.npz", imgs)).dataset, Spy(), batch_size=2)
    np.testing.assert_array_equal(torch.cat(seen).permute(0, 2, 3, 1).numpy(), imgs)
    v = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert torch.equal(uint8_nchw(v.float() / 127.5 - 1.0), v)  # samples' rounding inverts the loader's


def test_fid_input_errors(tmp_path):
    np.savez(tmp_path / "other.npz", x=np.zeros((2, 8, 8, 3), np.uint8), y=np.zeros(3))
    with pytest.raises(DataError, match="needs 'arr_0'.*'mu' and 'sigma'"):
        fid_input(tmp_path / "other.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        fid_input(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        fid_input(tmp_path / "missing.npz")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(_image_set(1, 0, size=8)[0]).save(mixed / "a.png")
    Image.fromarray(_image_set(1, 0, size=12)[0]).save(mixed / "b.png")
    with pytest.raises(DataError, match="different sizes"):
        fid_input(mixed)
    assert fid_input(mixed, image_size=8).dataset.num_images == 2


# --------------------------------------------------------------------------------------------------
# two processes (torchrun, gloo) equal one


_DIST_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    import torch.distributed as dist
    from ddpm_fast.fid_stats import RunningStats
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    f = np.load(sys.argv[1])
    rs = RunningStats(f.shape[1])
    mine = f[rank::world]  # EDM's round-robin split
    for lo in range(0, len(mine), 16):
        rs.update(torch.from_numpy(mine[lo:lo + 16]))
    mu, sigma = rs.all_reduce().mean_cov()
    # a whole dataset read by every rank (a --fid-ref of images) must not be counted once per rank
    sys.path.insert(0, sys.argv[3])
    from fid_helpers import TinyExtractor
    from ddpm_fast.fid import compute_stats, fid_input
    images = np.random.default_rng(0).integers(0, 256, (13, 8, 8, 3), dtype=np.uint8)
    np.savez(sys.argv[2] + f".images{rank}.npz", arr_0=images)
    _, _, n_whole = compute_stats(fid_input(sys.argv[2] + f".images{rank}.npz").dataset, TinyExtractor(), 5)
    np.savez(sys.argv[2] + f".{rank}.npz", mu=mu, sigma=sigma, n=rs.n, n_whole=n_whole)
    dist.destroy_process_group()
""")


def test_two_gloo_processes_equal_one(tmp_path):
    f = _features(n=101, seed=5)
    np.save(tmp_path / "f.npy", f)
    (tmp_path / "script.py").write_text(_DIST_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "script.py"), str(tmp_path / "f.npy"), str(tmp_path / "out"), str(Path(__file__).parent)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mu_bound, sigma_bound = stats_bounds(f)
    exact_mu, exact_sigma = exact_stats(f)
    for rank in (0, 1):  # every rank holds the combined statistics
        with np.load(tmp_path / f"out.{rank}.npz") as z:
            assert int(z["n"]) == 101
            assert int(z["n_whole"]) == 13  # compute_stats keeps a whole dataset's statistics local
            _assert_within(z["mu"], exact_mu, mu_bound)
            _assert_within(z["sigma"], exact_sigma, sigma_bound)


# --------------------------------------------------------------------------------------------------
# the commands, with the tiny extractor in place of Inception


@pytest.fixture
def tiny_inception(monkeypatch):
    ext = TinyExtractor()
    monkeypatch.setattr(fid_module, "load_extractor", lambda weights=None, device=None: ext)
    return ext



def test_fid_stats_and_fid_commands(tmp_path, tiny_inception, capsys):
    a, b = _image_set(40, 0), _image_set(30, 1, hi=160)
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, img in enumerate(b):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    _npz(tmp_path / "samples.npz", a)
    assert main(["fid-stats", str(folder), "--out", str(tmp_path / "ref.npz"), "--batch-size", "7"]) == 0
    assert "30 images" in capsys.readouterr().out
    mu_ref, sigma_ref = load_stats(tmp_path / "ref.npz")
    mu_b, sigma_b, n = compute_stats(fid_input(folder).dataset, tiny_inception, batch_size=30)
    np.testing.assert_allclose(mu_ref, mu_b, rtol=0, atol=1e-12)

    # samples.npz vs a statistics file, vs the folder itself, and two statistics files (no extractor)
    assert main(["fid", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    mu_a, sigma_a, _ = compute_stats(fid_input(tmp_path / "samples.npz").dataset, tiny_inception)
    assert out["fid"] == pytest.approx(frechet_distance(mu_a, sigma_a, mu_ref, sigma_ref), rel=1e-9)
    assert out["n_samples"] == 40 and out["n_ref"] is None and out["feature_dim"] == 8
    assert main(["fid", str(tmp_path / "samples.npz"), "--ref", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fid"] == pytest.approx(out["fid"], rel=1e-9)
    tiny_inception.calls = 0
    assert main(["fid", str(tmp_path / "ref.npz"), "--ref", str(tmp_path / "ref.npz")]) == 0
    assert capsys.readouterr().out.startswith("FID ") and tiny_inception.calls == 0

    # one-line errors: an npz with neither arr_0 nor mu/sigma, an empty folder, mixed sizes, bad --out
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    assert main(["fid", str(tmp_path / "other.npz"), "--ref", str(tmp_path / "ref.npz")]) == 2
    assert "arr_0" in _error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["fid", str(tmp_path / "empty"), "--ref", str(tmp_path / "ref.npz")]) == 2
    assert "no images found" in _error_line(capsys)
    Image.fromarray(_image_set(1, 0, size=12)[0]).save(folder / "odd.png")
    assert main(["fid-stats", str(folder), "--out", str(tmp_path / "r2.npz")]) == 2
    assert "different sizes" in _error_line(capsys)
    assert main(["fid-stats", str(tmp_path / "samples.npz"), "--out", str(tmp_path / "r2.txt")]) == 2
    assert ".npz" in _error_line(capsys)


def test_fid_without_torch_fidelity_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    _npz(tmp_path / "s.npz", _image_set(4, 0))
    assert main(["fid", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz")]) == 2
    assert 'pip install -e ".[fid]"' in _error_line(capsys)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("fidrun") / "run"
    assert main(["train", "--data", "digits", "--out", str(run), "--steps", "2", "--save-every", "0",
                 "--preset", "tiny", "--unet-channels", "8,16", "--batch-size", "8", "--no-progress"]) == 0
    return run


def test_sample_with_fid_scores_the_finished_images_and_writes_fid_json(tiny_run, tmp_path, tiny_inception, capsys):
    from ddpm_fast.data import load_digits_images

    ref = tmp_path / "ref.npz"
    digits = ((load_digits_images()[0][:64] + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    _npz(tmp_path / "digits.npz", digits)
    assert main(["fid-stats", str(tmp_path / "digits.npz"), "--out", str(ref)]) == 0
    batches = []
    original = FIDCollector.add_uint8
    FIDCollector.add_uint8 = lambda self, images: (batches.append(images.shape[0]), original(self, images))[1]
    try:
        assert main(["sample", str(tiny_run), "--out", str(tmp_path / "s"), "--seeds", "0-9", "--steps", "3",
                     "--batch-size", "4", "--fid", str(ref)]) == 0
    finally:
        FIDCollector.add_uint8 = original
    # features of the finished images in fixed batches of DEFAULT_FID_BATCH, whatever the sampler's batches
    assert batches == [10]
    assert "FID " in capsys.readouterr().out
    record = json.loads((tmp_path / "s" / "fid.json").read_text())
    # the same figure from the written samples.npz
    mu_s, sigma_s, n = compute_stats(fid_input(tmp_path / "s" / "samples.npz").dataset, tiny_inception)
    assert n == 10 and record["num_samples"] == 10
    # exactly: the same images in the same batches
    assert record["fid"] == frechet_distance(mu_s, sigma_s, *load_stats(ref))
    assert record["seeds"] == "0-9" and record["steps"] == 3 and record["variance"] == "fixed_large"
    assert record["inception_weights_sha256"] == "0" * 64 and record["sample_seconds"] >= 0
    # a bad reference fails before any sampling
    assert main(["sample", str(tiny_run), "--out", str(tmp_path / "s2"), "--seeds", "0-3",
                 "--fid", str(tmp_path / "missing.npz")]) == 2
    assert "does not exist" in _error_line(capsys) and not (tmp_path / "s2").exists()


def test_train_logs_fid(tmp_path, tiny_inception):
    from ddpm_fast.data import load_digits_images

    digits = ((load_digits_images()[0][:64] + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    ref = save_stats(tmp_path / "ref.npz", *compute_stats(fid_input(_npz(tmp_path / "d.npz", digits)).dataset,
                                                           tiny_inception)[:2])
    run = tmp_path / "run"
    assert main(["train", "--data", "digits", "--out", str(run), "--steps", "4", "--save-every", "0",
                 "--preset", "tiny", "--unet-channels", "8,16", "--batch-size", "8", "--no-progress",
                 "--fid-every", "2", "--fid-ref", str(ref), "--fid-samples", "6"]) == 0
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    fids = [r for r in records if r.get("event") == "fid"]
    assert [r["step"] for r in fids] == [2, 4]
    assert all(np.isfinite(r["fid"]) and r["fid"] > 0 and r["n_samples"] == 6 for r in fids)
    with pytest.raises(ValueError, match="--fid-ref"):
        from ddpm_fast.training import TrainConfig

        TrainConfig(out=str(tmp_path / "r2"), preset="tiny", fid_every=2).resolved()


# --------------------------------------------------------------------------------------------------
# KID


def _kid_reference(x, y):
    """Unbiased MMD^2 with the cubic polynomial kernel, from the definition, in extended precision."""
    x, y = np.asarray(x, np.longdouble), np.asarray(y, np.longdouble)
    m, d = x.shape

    def k(a, b):
        return (a @ b.T / d + 1) ** 3

    off = ~np.eye(m, dtype=bool)
    return (k(x, x)[off].sum() + k(y, y)[off].sum()) / (m * (m - 1)) - 2 * k(x, y).sum() / (m * m)


def test_kid_matches_its_definition_and_orders_sets():
    from ddpm_fast.fid_stats import kernel_inception_distance

    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(40, 6)), rng.normal(0.5, 1.0, size=(40, 6))
    # one subset of all 40: the draw is a permutation, which the statistic does not see
    got = kernel_inception_distance(x, y, subsets=1, subset_size=40)
    expected = _kid_reference(x, y)
    # kernel entries are sums of d products then cubed; the three sums run over m^2 entries
    bound = 8 * (40 * 40 + 6) * 2.0 ** -53 * float(
        (np.abs((x @ x.T) / 6 + 1) ** 3).sum() + (np.abs((y @ y.T) / 6 + 1) ** 3).sum()
        + 2 * (np.abs((x @ y.T) / 6 + 1) ** 3).sum()) / (40 * 39)
    assert abs(got["kid"] - float(expected)) <= bound
    assert got["kid_subset_size"] == 40 and got["kid_std"] == 0.0
    same = kernel_inception_distance(x, rng.normal(size=(40, 6)), subsets=20, subset_size=30)
    shifted = kernel_inception_distance(x, y, subsets=20, subset_size=30)
    assert shifted["kid"] > 10 * abs(same["kid"])  # a mean shift of 0.5 stands far above the noise
    with pytest.raises(DataError, match="NaN"):
        kernel_inception_distance(x * np.nan, y)


def test_fid_command_with_kid(tmp_path, tiny_inception, capsys):
    _npz(tmp_path / "a.npz", _image_set(30, 0))
    _npz(tmp_path / "b.npz", _image_set(30, 1, hi=160))
    assert main(["fid", str(tmp_path / "a.npz"), "--ref", str(tmp_path / "b.npz"), "--kid", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kid"] > 0 and out["kid_subset_size"] == 30 and out["kid_subsets"] == 100
    save_stats(tmp_path / "s.npz", np.zeros(8), np.eye(8))
    assert main(["fid", str(tmp_path / "a.npz"), "--ref", str(tmp_path / "s.npz"), "--kid"]) == 2
    assert "images on both sides" in _error_line(capsys)


_SAMPLE_FID_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import torch.distributed as dist
    sys.path.insert(0, sys.argv[1])  # tests/, for the tiny extractor
    import ddpm_fast.fid as fid
    import ddpm_fast.fid_stats as fid_stats
    from fid_helpers import TinyExtractor
    fid.load_extractor = lambda weights=None, device=None: TinyExtractor()
    mean_cov = fid_stats.RunningStats.mean_cov

    def recording_mean_cov(self):  # the statistics the FID is computed from, by rank
        mu, sigma = mean_cov(self)
        np.savez(sys.argv[2] + f".{dist.get_rank()}.npz", mu=mu, sigma=sigma, n=self.n)
        return mu, sigma

    fid_stats.RunningStats.mean_cov = recording_mean_cov
    from ddpm_fast.cli import main
    sys.exit(main(sys.argv[3:]))
""")


def test_sample_fid_under_torchrun_combines_the_ranks(tiny_run, tmp_path, tiny_inception):
    """Two gloo processes sample; rank 0 takes the features of the finished images (all of them, in seed
    order), so the statistics are those of samples.npz, checked in extended precision."""
    digits = _image_set(30, 3)
    ref = save_stats(tmp_path / "ref.npz", *compute_stats(fid_input(_npz(tmp_path / "d.npz", digits)).dataset,
                                                          tiny_inception)[:2])
    (tmp_path / "script.py").write_text(_SAMPLE_FID_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "s"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "script.py"), str(Path(__file__).parent), str(tmp_path / "stats"),
           "sample", str(tiny_run), "--out", str(out), "--seeds", "0-8", "--steps", "2", "--batch-size", "2",
           "--device", "cpu", "--no-progress", "--fid", str(ref)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "fid.json").read_text())
    run = json.loads((out / "run.json").read_text())
    assert record["num_samples"] == 9 and run["sessions"][-1]["world_size"] == 2 and run["fid"] == record["fid"]
    assert record["samples_sha256"] == run["samples_sha256"]
    with np.load(out / "samples.npz") as z:
        pixels = torch.from_numpy(z["arr_0"]).permute(0, 3, 1, 2)
    f = tiny_inception(pixels).double().numpy()  # the same images' features, in one process
    exact_mu, exact_sigma = exact_stats(f)
    mu_bound, sigma_bound = stats_bounds(f)
    assert not (tmp_path / "stats.1.npz").exists()  # rank 1 computed no statistics
    for rank in (0,):
        with np.load(tmp_path / f"stats.{rank}.npz") as z:
            assert int(z["n"]) == 9
            _assert_within(z["mu"], exact_mu, mu_bound)
            _assert_within(z["sigma"], exact_sigma, sigma_bound)
    with np.load(tmp_path / "stats.0.npz") as z:
        assert record["fid"] == frechet_distance(z["mu"], z["sigma"], *load_stats(ref))
