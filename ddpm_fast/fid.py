"""FID from images to a number: feed uint8 image batches through a feature extractor into
:class:`~ddpm_fast.fid_stats.RunningStats`, then the Frechet distance between two sets' statistics.

The feature extractor is a parameter everywhere: any object with ``dim`` (int) and
``__call__(uint8 (B, C, H, W) tensor) -> (B, dim) float tensor``. For the standard FID it is
:func:`ddpm_fast.inception.load_inception` (torch-fidelity's Inception); tests pass a small one.

An input (``fid`` command, ``--ref``) is one of:

- a statistics ``.npz`` with ``mu`` and ``sigma`` (ours or pytorch-fid's),
- an images ``.npz`` with ``arr_0`` (uint8 NHWC: ``samples.npz`` from ``ddpm-fast sample`` or
  guided-diffusion), or any other source ``--data`` accepts (an image folder, CIFAR-10 batches, ``.npy``).

Images from 8-bit sources reach the extractor as they are stored; float sources (the digits) are
rounded to uint8 as ``samples.npz`` is written (``data.to_uint8_nhwc``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .fid_stats import RunningStats, frechet_distance, is_stats_file, kernel_inception_distance, load_stats

__all__ = ["FIDCollector", "FIDInput", "image_batches", "collect", "compute_stats", "fid_input", "stats_of", "fid_between",
           "load_extractor", "reference_stats", "sample_fid", "uint8_nchw", "DEFAULT_FID_BATCH"]

DEFAULT_FID_BATCH = 200


def uint8_nchw(images: torch.Tensor) -> torch.Tensor:
    """Float (B, C, H, W) images in [-1, 1] -> uint8 (B, C, H, W), rounded exactly as samples.npz is."""
    from .data import to_uint8_nhwc

    return torch.from_numpy(to_uint8_nhwc(images)).permute(0, 3, 1, 2)


class FIDCollector:
    """Statistics of images fed batch by batch: ``add_uint8`` (uint8 NCHW) or ``add_float`` (float NCHW
    in [-1, 1], e.g. straight off the sampler). Only the float64 sums are kept, never the images.

    ``finish()`` sums the accumulators over all processes when torch.distributed is initialised (every
    rank calls it) and returns (mu, sigma).
    """

    def __init__(self, extractor, stats_device=None, keep_features: bool = False):
        self.extractor = extractor
        # KID needs the features themselves: kept (float32, on the CPU) only when asked for
        self.features: list[torch.Tensor] | None = [] if keep_features else None
        # the sums live where the features come out (an Inception on CUDA: the 2048 x 2048 product runs there)
        stats_device = stats_device if stats_device is not None else getattr(extractor, "device", None)
        self.stats = RunningStats(int(extractor.dim), device=stats_device)
        self.seconds = 0.0  # time spent in the extractor and the sums (the caller times everything else)

    def add_uint8(self, images: torch.Tensor) -> None:
        import time

        start = time.perf_counter()
        features = self.extractor(images)
        self.stats.update(features)
        if self.features is not None:
            self.features.append(features.detach().to("cpu", torch.float32))
        self.seconds += time.perf_counter() - start

    def add_float(self, images: torch.Tensor) -> None:
        self.add_uint8(uint8_nchw(images))

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        return self.stats.all_reduce().mean_cov()


def image_batches(dataset, batch_size: int = DEFAULT_FID_BATCH):
    """Yield uint8 (B, C, H, W) batches of an ``ImageDataset`` in order (8-bit storage is passed as is)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be an int >= 1, got {batch_size!r}")
    n = dataset.num_images
    for lo in range(0, n, batch_size):
        idx = torch.arange(lo, min(lo + batch_size, n))
        # gather() serves floats (v / 127.5 - 1 for 8-bit storage); uint8_nchw rounds them back to exactly v
        yield uint8_nchw(dataset.gather(idx))


def collect(dataset, extractor, batch_size: int = DEFAULT_FID_BATCH, keep_features: bool = False) -> FIDCollector:
    """Feed an ``ImageDataset`` through ``extractor`` batch by batch; the filled :class:`FIDCollector`."""
    collector = FIDCollector(extractor, keep_features=keep_features)
    for batch in image_batches(dataset, batch_size):
        collector.add_uint8(batch)
    return collector


def compute_stats(dataset, extractor, batch_size: int = DEFAULT_FID_BATCH) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, n) of an ``ImageDataset`` in ``extractor``'s feature space, batch by batch."""
    collector = collect(dataset, extractor, batch_size)
    # local statistics: the dataset is whole on every rank, so summing over ranks would count it W times
    mu, sigma = collector.stats.mean_cov()
    return mu, sigma, collector.stats.n


@dataclass
class FIDInput:
    """A resolved input: either statistics (mu, sigma) or images (an ImageDataset) to extract."""

    path: str
    stats: tuple[np.ndarray, np.ndarray] | None = None
    dataset: object = None

    @property
    def kind(self) -> str:
        return "statistics" if self.stats is not None else "images"


def fid_input(source, *, image_size=None, strict_npz: bool = True) -> FIDInput:
    """Resolve ``source`` (see the module docstring) without running any network.

    strict_npz: an .npz must hold ``mu``/``sigma`` or ``arr_0`` (True, for ``fid``); False lets
    ``fid-stats`` read any .npz ``--data`` reads (e.g. a single array of another name).
    Raises DataError (one line) for a missing path, an .npz with neither, an empty folder, images of
    mismatched sizes (without image_size) and the other errors of ``data.load_dataset``.
    """
    from .data import load_dataset

    path = Path(str(source)).expanduser()
    if str(source) != "digits" and not path.exists():
        raise DataError(f"{path} does not exist: pass a statistics .npz (mu, sigma), a samples.npz (arr_0), "
                        "an image folder or a CIFAR-10 batch folder")
    if path.suffix.lower() == ".npz" and path.is_file():
        if is_stats_file(path):
            return FIDInput(str(path), stats=load_stats(path))
        if strict_npz:
            try:
                with np.load(path, allow_pickle=False) as z:
                    keys = list(z.files)
            except Exception as exc:
                raise DataError(f"cannot read {path}: {exc}") from None
            if "arr_0" not in keys:
                raise DataError(f"{path} holds {keys}: a FID input .npz needs 'arr_0' (uint8 NHWC images, as in "
                                "samples.npz) or 'mu' and 'sigma' (statistics)")
    dataset = load_dataset(str(source), image_size=image_size)
    return FIDInput(str(path), dataset=dataset)


def stats_of(item: FIDInput, extractor, batch_size: int = DEFAULT_FID_BATCH) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(mu, sigma, n) of a resolved input; n is None for a statistics file (its count is not known)."""
    if item.stats is not None:
        return (*item.stats, None)
    return compute_stats(item.dataset, extractor, batch_size)


def fid_between(a: FIDInput, b: FIDInput, extractor, batch_size: int = DEFAULT_FID_BATCH, *,
                kid: bool = False) -> dict:
    """FID of two resolved inputs: {"fid", "n_samples", "n_ref", "feature_dim"} (n None for statistics).

    kid: also KID (torch-fidelity's settings, see ``fid_stats.kernel_inception_distance``), which needs
    both inputs to be images: their features are then kept in memory (N x D float32 each).
    """
    if not kid:
        mu1, s1, n1 = stats_of(a, extractor, batch_size)
        mu2, s2, n2 = stats_of(b, extractor, batch_size)
        return {"fid": frechet_distance(mu1, s1, mu2, s2), "n_samples": n1, "n_ref": n2,
                "feature_dim": int(mu1.shape[0])}
    if a.stats is not None or b.stats is not None:
        raise DataError("KID needs images on both sides (it is computed from the features, not from mu and sigma): "
                        "pass samples.npz files or image folders, or drop --kid")
    ca, cb = (collect(item.dataset, extractor, batch_size, keep_features=True) for item in (a, b))
    (mu1, s1), (mu2, s2) = ca.stats.mean_cov(), cb.stats.mean_cov()  # whole datasets: local, no all_reduce
    result = {"fid": frechet_distance(mu1, s1, mu2, s2), "n_samples": ca.stats.n, "n_ref": cb.stats.n,
              "feature_dim": int(mu1.shape[0])}
    x, y = torch.cat(ca.features), torch.cat(cb.features)
    device = getattr(extractor, "device", None)
    result.update(kernel_inception_distance(x if device is None else x.to(device), y))
    return result


def load_extractor(weights=None, device=None):
    """The standard FID feature extractor: torch-fidelity's Inception (see :mod:`ddpm_fast.inception`)."""
    from .inception import load_inception

    return load_inception(weights, device=device)


def reference_stats(ref, extractor, batch_size: int = DEFAULT_FID_BATCH, *, image_size=None) -> dict:
    """Statistics of a reference (stats .npz, samples.npz, image folder, ...): {"mu", "sigma", "n", "path"}."""
    item = fid_input(ref, image_size=image_size)
    mu, sigma, n = stats_of(item, extractor, batch_size)
    return {"mu": mu, "sigma": sigma, "n": n, "path": item.path, "kind": item.kind}


def sample_fid(model, schedule, ref: dict, extractor, seeds, *, steps=None, variance="fixed_large",
               clip_x0: bool = True, batch_size: int | None = None, device=None,
               sampler_options: dict | None = None) -> dict:
    """FID of one sample per seed against ``ref`` (from :func:`reference_stats`), features taken batch by
    batch as images come off the sampler (each batch is dropped after its features). Under an initialized
    process group every rank must call it: the seeds are dealt to the ranks and the sums combined.

    Returns {"fid", "n_samples", "sample_seconds", "feature_seconds"}.
    """
    import time

    from .distributed import current_group
    from .generate import _generate_dealt

    collector = FIDCollector(extractor)
    start = time.perf_counter()
    _generate_dealt(model, schedule, [int(s) for s in seeds], batch_size=batch_size, group=current_group(),
                    progress=False, on_batch=lambda images, _seeds: collector.add_float(images), keep=False,
                    steps=steps, variance=variance, clip_x0=clip_x0, reference=False, device=device,
                    sampler_options=sampler_options)
    total = time.perf_counter() - start
    mu, sigma = collector.finish()
    return {"fid": frechet_distance(mu, sigma, ref["mu"], ref["sigma"]), "n_samples": collector.stats.n,
            "sample_seconds": total - collector.seconds, "feature_seconds": collector.seconds}
