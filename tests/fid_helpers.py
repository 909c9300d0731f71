"""Shared pieces of the FID tests: a small deterministic feature extractor and the float64 round-off
bound of the running statistics."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from tolerances import U
from tolerances import gamma as _gamma

U64 = U[torch.float64]


class TinyExtractor:
    """A fixed random feature map standing in for Inception: uint8 (B, C, H, W) of any C in (1, 3) and any
    size -> float32 (B, dim). Average-pools to 4x4, repeats grayscale to RGB, projects with a seeded
    matrix and applies tanh (a nonlinearity, so the features are not Gaussian)."""

    def __init__(self, dim: int = 8, seed: int = 0):
        self.dim = dim
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(3 * 4 * 4, dim, generator=g) / 4.0
        self.calls = 0
        self.info = {"feature_extractor": "tiny test extractor", "weights": "none", "weights_sha256": "0" * 64}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dtype == torch.uint8 and images.ndim == 4, (images.dtype, images.shape)
        self.calls += 1
        x = images.float() / 127.5 - 1.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.adaptive_avg_pool2d(x, 4).flatten(1)
        return torch.tanh(x @ self.weight * 2.0)


def gamma(n: int) -> float:
    """Higham's gamma_n in float64 (tolerances.gamma with u = 2^-53): a float64 sum of n terms in any order."""
    return _gamma(n, U64)


def exact_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance in extended precision (np.longdouble), two-pass: the reference the
    float64 running sums are held to."""
    f = np.asarray(features, dtype=np.longdouble)
    mu = f.mean(0)
    c = f - mu
    return mu, (c.T @ c) / (f.shape[0] - 1)


def stats_bounds(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-entry error bounds of RunningStats' (mu, sigma) from float64 features (N, D).

    mu = S1 / n: |err| <= gamma_{n+1} sum|x| / n. sigma = (S2 - n mu mu^T) / (n - 1), with S2 a sum of n
    products (one rounding each) and n mu_i mu_j bounded by (sum|x_i|)(sum|x_j|) / n:
    |err_ij| <= 4 gamma_{n+2} (sum_k |x_ki x_kj| + (sum|x_i|)(sum|x_j|) / n) / (n - 1)
    (4: the products, the subtraction, the division and the symmetrisation each round once more).
    """
    a = np.abs(np.asarray(features, dtype=np.float64))
    n = a.shape[0]
    s1 = a.sum(0)
    mu_bound = gamma(n + 1) * s1 / n
    sigma_bound = 4 * gamma(n + 2) * (a.T @ a + np.outer(s1, s1) / n) / (n - 1)
    return mu_bound, sigma_bound


def random_inception_weights(path):
    """torch-fidelity's Inception network with seeded random weights (He-initialised convolutions, so the
    activations neither vanish nor explode over its depth), saved to ``path`` as a weights file its
    ``feature_extractor_weights_path`` loads. Needs torch-fidelity; the global RNG is left as it was."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    cls = fe.FeatureExtractorInceptionV3
    saved_load, saved_url = cls.load_state_dict, fe.load_state_dict_from_url
    # build the network without weights: skip the download and the load, keep the layers' random init
    cls.load_state_dict = lambda self, state, *a, **k: None
    fe.load_state_dict_from_url = lambda *a, **k: {}
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = cls("inception-v3-compat", ["2048"])
            for m in net.modules():
                if isinstance(m, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    finally:
        cls.load_state_dict, fe.load_state_dict_from_url = saved_load, saved_url
    torch.save(net.state_dict(), path)
    return path
