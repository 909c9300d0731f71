"""Feature statistics and the Frechet distance, written once for every feature space in the project
(torch-fidelity's Inception for FID, the digit classifier of ``quality.py`` for the offline demo).

- :class:`RunningStats` accumulates, batch by batch and in float64, the count, the sum and the sum of
  outer products of (N, D) features, so 50,000 images never sit in memory; two accumulators merge by
  adding, and under ``torch.distributed`` :meth:`RunningStats.all_reduce` sums them over every process.
  ``mean_cov()`` turns them into the mean (D,) and the unbiased covariance (D, D).
- A statistics file is an ``.npz`` with ``mu`` (D,) and ``sigma`` (D, D), float64: the keys pytorch-fid
  reads and writes, so reference statistics made elsewhere can be used here and ours there.
- :func:`frechet_distance` handles near-singular covariances and the imaginary round-off of the matrix
  square root the way pytorch-fid's ``calculate_frechet_distance`` does, so both give the same figure
  on the same statistics (a test checks it).

Why raw sums and not Welford: sums merge across batches and processes by plain addition (an all_reduce),
and in float64 the cancellation in ``S2/n - mu mu^T`` costs about ``eps64 * E[x^2] / var(x)`` relative
error per covariance entry, ~1e-15 for Inception's pool3 features (non-negative, mean of the order of
their spread): far below the statistical noise of any FID.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch

from .distributed import collective_errors
from .errors import DataError

__all__ = ["RunningStats", "frechet_distance", "kernel_inception_distance", "save_stats", "load_stats",
           "is_stats_file", "FID_EPS"]

# The diagonal offset pytorch-fid adds to both covariances when sqrtm of their product is not finite.
FID_EPS = 1e-6
# pytorch-fid refuses a square root whose diagonal has an imaginary part above this (absolute).
_IMAG_ATOL = 1e-3


class RunningStats:
    """Float64 running sums of D-dimensional features: count, sum (D,) and sum of outer products (D, D).

    ``update(features)`` takes an (N, D) float tensor or array (any float dtype, any device; it is moved
    to the accumulators' device and cast to float64 first). The accumulators live on ``device`` (CPU by
    default; a CUDA device makes the D x D product run there).
    """

    def __init__(self, dim: int, device=None):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"the feature dimension must be an int >= 1, got {dim!r}")
        self.dim = dim
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    @property
    def n(self) -> int:
        """How many feature vectors have been added (in all merged processes after all_reduce)."""
        return int(self.count.item())

    def update(self, features) -> "RunningStats":
        """Add (N, D) features. Non-finite features are refused (a NaN must never reach a figure)."""
        f = torch.as_tensor(features).detach()
        if f.ndim != 2 or f.shape[1] != self.dim or not (f.is_floating_point() or f.dtype == torch.uint8):
            raise ValueError(f"features must be (N, {self.dim}) floats, got {f.dtype} {tuple(f.shape)}")
        f = f.to(self.sum.device, torch.float64)
        if not torch.isfinite(f).all():
            raise ValueError("the features contain NaN or infinite values (a broken feature extractor or "
                             "non-finite images); nothing was added")
        self.count += f.shape[0]
        self.sum += f.sum(0)
        self.outer.addmm_(f.T, f)
        return self

    def merge(self, other: "RunningStats") -> "RunningStats":
        """Add another accumulator's sums (the statistics of the union of both sets)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {other.dim} into {self.dim}")
        self.count += other.count.to(self.count.device)
        self.sum += other.sum.to(self.sum.device)
        self.outer += other.outer.to(self.outer.device)
        return self

    def all_reduce(self) -> "RunningStats":
        """Sum the accumulators over all processes when torch.distributed is initialised (else a no-op).

        Every rank then holds the statistics of every rank's features. With the NCCL backend the sums
        travel through the current CUDA device; gloo reduces CPU tensors directly.
        """
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return self
        nccl = dist.get_backend() == "nccl"
        for name in ("count", "sum", "outer"):
            t = getattr(self, name)
            buf = t.to(f"cuda:{torch.cuda.current_device()}") if nccl and t.device.type != "cuda" else t
            with collective_errors("all_reduce of the FID statistics"):  # a dead peer: one line, no traceback
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            if buf is not t:
                t.copy_(buf)
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu (D,), sigma (D, D)) as float64 NumPy arrays; sigma is the unbiased (N - 1) covariance."""
        n = self.n
        if n < 2:
            raise DataError(f"statistics need N >= 2 images (feature vectors), got {n}")
        mu = self.sum / n
        sigma = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        sigma = (sigma + sigma.T) * 0.5  # exact symmetry (addmm's blocking can differ by an ulp)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def _check_stats(mu, sigma, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    d = mu.shape[0]
    if mu.ndim != 1 or sigma.shape != (d, d):
        raise DataError(f"{name}: mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise DataError(f"{name}: the statistics contain NaN or infinite values")
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2, *, eps: float = FID_EPS) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64.

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2)), with pytorch-fid's handling:
    when sqrtm(S1 S2) is not finite (near-singular covariances) it is recomputed from
    (S1 + eps I)(S2 + eps I); a complex result whose diagonal has an imaginary part above 1e-3 is an
    error, otherwise the (round-off) imaginary part is dropped. mu: (D,), sigma: (D, D).
    Raises DataError for mismatched shapes or non-finite statistics, ValueError for a large imaginary part.
    """
    from scipy import linalg

    mu1, sigma1 = _check_stats(mu1, sigma1, "the first statistics")
    mu2, sigma2 = _check_stats(mu2, sigma2, "the second statistics")
    if mu1.shape != mu2.shape:
        raise DataError(f"the statistics have different dimensions ({mu1.shape[0]} and {mu2.shape[0]}): "
                        "they come from different feature extractors")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # scipy warns on singular products (rank-deficient covariances: fewer images than dimensions, dead
        # features); the checks below are what decide, as in pytorch-fid
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0.0, atol=_IMAG_ATOL):
            raise ValueError(f"the matrix square root in the Frechet distance has an imaginary part of "
                             f"{np.abs(covmean.imag).max():.3g}: the covariances are too ill-conditioned "
                             "(use more images than feature dimensions)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def kernel_inception_distance(features1, features2, *, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 2020) -> dict:
    """KID (Binkowski et al.): the unbiased MMD^2 with the kernel k(x, y) = (x.y / D + 1)^3, averaged over
    ``subsets`` random subsets of ``subset_size`` features from each side (torch-fidelity's defaults:
    100 subsets of 1000, the subsets drawn by ``np.random.RandomState(2020)`` in its order).

    features1 / features2: (N1, D), (N2, D) float tensors or arrays; computed in float64 on their device
    (a GPU makes the 3 x subsets products of (m, D) x (D, m) cheap). subset_size is lowered to
    min(N1, N2) when a side has fewer features. Returns {"kid", "kid_std", "kid_subset_size", "kid_subsets"}.
    Unlike FID it needs the features themselves, not only their statistics.
    """
    x = torch.as_tensor(features1).detach().to(torch.float64)
    y = torch.as_tensor(features2).detach().to(x.device, torch.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise DataError(f"KID needs (N, D) features of one D, got {tuple(x.shape)} and {tuple(y.shape)}")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise DataError("KID: the features contain NaN or infinite values")
    m = min(int(subset_size), x.shape[0], y.shape[0])
    if m < 2:
        raise DataError(f"KID needs at least 2 images on each side, got {x.shape[0]} and {y.shape[0]}")
    d = x.shape[1]
    rng = np.random.RandomState(seed)
    values = np.empty(subsets)
    for i in range(subsets):
        a = x[torch.from_numpy(rng.choice(x.shape[0], m, replace=False)).to(x.device)]
        b = y[torch.from_numpy(rng.choice(y.shape[0], m, replace=False)).to(x.device)]
        k_xx, k_yy, k_xy = ((u @ v.T / d + 1.0) ** 3 for u, v in ((a, a), (b, b), (a, b)))
        within = (k_xx.sum() - k_xx.diagonal().sum()) + (k_yy.sum() - k_yy.diagonal().sum())
        values[i] = float(within / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))
    return {"kid": float(values.mean()), "kid_std": float(values.std()), "kid_subset_size": m,
            "kid_subsets": int(subsets)}


# --------------------------------------------------------------------------------------------------
# statistics files


def save_stats(path, mu, sigma, **extra) -> Path:
    """Write ``mu`` and ``sigma`` (float64) to an .npz, atomically (temp file + rename).

    extra: further arrays or scalars stored beside them (e.g. ``n``, the image count); pytorch-fid ignores them.
    """
    from .checkpoint import atomic_write

    mu, sigma = _check_stats(mu, sigma, str(path))
    path = Path(path)
    if path.suffix != ".npz":
        raise DataError(f"a statistics file must end in .npz (pytorch-fid's format), got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, mu=mu, sigma=sigma, **{k: np.asarray(v) for k, v in extra.items()})

    return atomic_write(path, write)


def is_stats_file(path) -> bool:
    """Whether ``path`` is an .npz holding ``mu`` and ``sigma`` (it is not loaded)."""
    path = Path(path)
    if path.suffix.lower() != ".npz" or not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            return "mu" in z.files and "sigma" in z.files
    except Exception:  # not a readable npz: let the image reader produce the error
        return False


def load_stats(path) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D,), sigma (D, D)) float64 from an .npz with those keys (ours or pytorch-fid's)."""
    path = Path(os.fspath(path)).expanduser()
    if not path.is_file():
        raise DataError(f"statistics file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "mu" not in z.files or "sigma" not in z.files:
                raise DataError(f"{path} holds {z.files}, not 'mu' and 'sigma': it is not a statistics file")
            return _check_stats(z["mu"], z["sigma"], str(path))
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read statistics file {path}: {exc}") from None
