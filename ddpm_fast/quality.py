"""The quality figure for the bundled digits: a Frechet distance in the feature space of a small digit
classifier, printed next to the same distance for held-out real digits (the floor) and for a Gaussian
fitted to the real pixels (what a non-model gets), plus how the samples spread over the ten digits.

How it is measured (all fixed, so the numbers are comparable between runs and machines):

- The 1,797 sklearn digits are split once by a seeded permutation: 1,200 "reference" digits train the
  classifier and are the set every distance is measured against; the other 597 are held out.
- :class:`DigitsFeatureNet`, a small CNN, is trained on the reference digits with fixed seeds, one
  thread and full determinism (about 2 s on a CPU core); its 64-d penultimate layer is the feature space.
- ``fd_model``: samples vs the reference digits. ``fd_heldout_real``: min(N, 597) held-out real digits vs
  the reference digits (the floor a perfect model reaches at this sample count: FD is biased upwards at
  small N, so the floor uses the samples' count). ``fd_gaussian``: N draws from a Gaussian with the
  reference digits' pixel mean and covariance, clipped to [-1, 1], vs the reference digits.
- ``class_histogram``: how many samples the classifier assigns to each digit 0..9 (real digits are
  near uniform; a collapsed model piles up on a few).

Use at least a few hundred samples: the distance from fewer is dominated by estimation noise.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn as nn

from .errors import DataError
from .fid_stats import RunningStats, frechet_distance  # the FID's statistics and distance, shared

__all__ = [
    "DigitsFeatureNet",
    "train_digits_classifier",
    "digits_classifier",
    "digits_split",
    "feature_statistics",
    "frechet_distance",
    "digits_quality_report",
    "format_quality_report",
    "NUM_REFERENCE",
    "FEATURE_DIM",
]

NUM_REFERENCE = 1200  # digits that train the classifier and form the reference set; the other 597 are held out
FEATURE_DIM = 64
_SPLIT_SEED = 0
_TRAIN_SEED = 0
_EPOCHS = 20
_BATCH = 64


class DigitsFeatureNet(nn.Module):
    """A small CNN digit classifier for (N, 1, 8, 8) float inputs in [-1, 1].

    ``features(x)`` -> (N, 64) penultimate activations (the space the Frechet distance is measured in);
    ``forward(x)`` -> (N, 10) logits.
    """

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 128), nn.ReLU(),
            nn.Linear(128, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from .data import load_digits_images

    return load_digits_images()


def digits_split() -> tuple[np.ndarray, np.ndarray]:
    """The fixed split of the 1,797 digits: (reference indices (1200,), held-out indices (597,)), int64.

    A seeded permutation rather than the file order, so both halves hold the same writers' styles.
    """
    n = _digits()[0].shape[0]
    order = np.random.default_rng(_SPLIT_SEED).permutation(n)
    return order[:NUM_REFERENCE], order[NUM_REFERENCE:]


class _OneThread:
    """Run with one intra-op thread, so training takes the same float path whatever the machine's thread count."""

    def __enter__(self):
        self.saved = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


def train_digits_classifier(seed: int = _TRAIN_SEED) -> DigitsFeatureNet:
    """Train a fresh :class:`DigitsFeatureNet` on the reference digits (deterministic for a given seed).

    Returns the model in eval mode, float64 (features are then computed in float64), on the CPU.
    Prefer :func:`digits_classifier`, which trains once per process.
    """
    images, labels = _digits()
    train_idx, _ = digits_split()
    x, y = images[train_idx], labels[train_idx]
    with _OneThread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitsFeatureNet()
        opt = torch.optim.Adam(net.parameters(), lr=2e-3, weight_decay=1e-4)
        g = torch.Generator().manual_seed(seed)
        for _ in range(_EPOCHS):
            perm = torch.randperm(len(x), generator=g)
            for lo in range(0, len(x), _BATCH):
                idx = perm[lo:lo + _BATCH]
                loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return net.double().eval().requires_grad_(False)


@functools.lru_cache(maxsize=1)
def digits_classifier() -> DigitsFeatureNet:
    """The classifier every report uses, trained on first use and cached for the process (do not modify it)."""
    return train_digits_classifier()


def _features(net: DigitsFeatureNet, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, 64) float64, predicted digits (N,) int64) for float (N, 1, 8, 8) images."""
    with torch.no_grad(), _OneThread():
        f = net.features(x.to(torch.float64))
        return f.numpy(), net.head(f).argmax(1).numpy()


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D), float64, of (N, D) features (N >= 2).

    The same running float64 sums as the Inception FID (:class:`ddpm_fast.fid_stats.RunningStats`).
    """
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {f.shape}")
    return RunningStats(f.shape[1]).update(f).mean_cov()


def _as_digit_batch(samples) -> torch.Tensor:
    """Samples -> float32 (N, 1, 8, 8) in [-1, 1]; accepts float NCHW or the uint8 NHWC of samples.npz."""
    if isinstance(samples, np.ndarray):
        samples = torch.from_numpy(np.ascontiguousarray(samples))
    if not isinstance(samples, torch.Tensor):
        raise DataError(f"samples must be a tensor or array of digit images, got {type(samples).__name__}")
    x = samples.detach().cpu()
    if x.dtype == torch.uint8 and x.ndim == 4 and tuple(x.shape[1:]) == (8, 8, 1):
        x = x.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0
    if not x.is_floating_point() or x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8):
        raise DataError(f"the digits quality report needs float (N, 1, 8, 8) samples in [-1, 1] (or uint8 "
                        f"(N, 8, 8, 1)), got {x.dtype} {tuple(x.shape)}; it only measures models of the digits dataset")
    if x.shape[0] < 2:
        raise DataError(f"the digits quality report needs at least 2 samples (a few hundred for a stable "
                        f"figure), got {x.shape[0]}")
    x = x.to(torch.float32)
    if not torch.isfinite(x).all():
        raise DataError("the samples contain NaN or infinite values (a diverged model?); check the model first")
    return x.clamp(-1.0, 1.0)  # the same clamp as when samples are saved as images


@functools.lru_cache(maxsize=1)
def _reference() -> dict:
    """Everything about the real digits that does not depend on the samples (computed once per process)."""
    net = digits_classifier()
    images, labels = _digits()
    train_idx, heldout_idx = digits_split()
    ref_feats, _ = _features(net, images[train_idx])
    heldout_feats, heldout_pred = _features(net, images[heldout_idx])
    pixels = images[train_idx].reshape(len(train_idx), -1).to(torch.float64).numpy()
    return {
        "stats": feature_statistics(ref_feats),
        "heldout_feats": heldout_feats,
        "heldout_pred": heldout_pred,
        "accuracy": float((torch.from_numpy(heldout_pred) == labels[heldout_idx]).double().mean()),
        "pixel_mean": pixels.mean(0),
        "pixel_cov": np.cov(pixels, rowvar=False),
    }


def digits_quality_report(samples, *, seed: int = 0) -> dict:
    """Measure digit samples against real digits (see the module docstring for the method).

    Args:
        samples: float (N, 1, 8, 8) tensor or array in [-1, 1] (values outside are clamped), or uint8
            (N, 8, 8, 1) as in samples.npz; N >= 2, a few hundred or more for a stable figure.
        seed: seeds the held-out subset and the Gaussian draws (the figures are deterministic).

    Returns a dict: ``fd_model``, ``fd_heldout_real`` (the floor), ``fd_gaussian`` (the non-model) as
    floats; ``class_histogram`` and ``heldout_class_histogram`` (10 counts each, by the classifier's
    argmax); ``classifier_test_accuracy`` (on all 597 held-out digits); ``n_samples``, ``n_heldout``,
    ``n_reference``, ``feature_dim``.
    """
    x = _as_digit_batch(samples)
    n = x.shape[0]
    ref = _reference()
    net = digits_classifier()
    mu_ref, sigma_ref = ref["stats"]
    rng = np.random.default_rng(seed)

    feats, pred = _features(net, x)
    pick = rng.permutation(len(ref["heldout_feats"]))[:n]
    gauss = rng.multivariate_normal(ref["pixel_mean"], ref["pixel_cov"], size=n, method="eigh")
    gauss = torch.from_numpy(np.clip(gauss, -1.0, 1.0)).view(n, 1, 8, 8)
    gauss_feats, _ = _features(net, gauss)

    return {
        "fd_model": frechet_distance(*feature_statistics(feats), mu_ref, sigma_ref),
        "fd_heldout_real": frechet_distance(*feature_statistics(ref["heldout_feats"][pick]), mu_ref, sigma_ref),
        "fd_gaussian": frechet_distance(*feature_statistics(gauss_feats), mu_ref, sigma_ref),
        "class_histogram": np.bincount(pred, minlength=10).tolist(),
        "heldout_class_histogram": np.bincount(ref["heldout_pred"][pick], minlength=10).tolist(),
        "classifier_test_accuracy": ref["accuracy"],
        "n_samples": n,
        "n_heldout": int(len(pick)),
        "n_reference": NUM_REFERENCE,
        "feature_dim": FEATURE_DIM,
    }


def format_quality_report(report: dict) -> str:
    """A small readable table of :func:`digits_quality_report`'s dict."""
    n, nh = report["n_samples"], report["n_heldout"]
    rows = [
        ("samples (this model)", report["fd_model"], f"n={n}"),
        ("held-out real digits", report["fd_heldout_real"], f"n={nh}, the floor"),
        ("Gaussian fit to pixels", report["fd_gaussian"], f"n={n}, what a non-model gets"),
    ]
    lines = [f"Frechet distance to {report['n_reference']} real digits in a digit classifier's "
             f"{report['feature_dim']}-d feature space (lower is better)"]
    lines += [f"  {name:<24}{fd:>10.2f}   ({note})" for name, fd, note in rows]
    lines.append(f"  {'digit':<24}" + "".join(f"{d:>5}" for d in range(10)))
    lines.append(f"  {'samples per digit':<24}" + "".join(f"{c:>5}" for c in report["class_histogram"]))
    lines.append(f"  {'held-out per digit':<24}" + "".join(f"{c:>5}" for c in report["heldout_class_histogram"]))
    lines.append(f"classifier accuracy on the {len(digits_split()[1])} held-out digits: "
                 f"{100 * report['classifier_test_accuracy']:.1f}%")
    return "\n".join(lines)
