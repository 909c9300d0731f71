"""The standard FID feature space: torch-fidelity's Inception-v3 ("inception-v3-compat", 2048-d pool3).

torch-fidelity ports the TF Inception graph that FID was defined with (weights converted from
``inception-2015-12-05``) including TF 1.x's bilinear resize to 299x299, and takes uint8 images as they
are. It is an optional extra (``pip install -e ".[fid]"``); nothing else in ddpm-fast imports it.

Weights, in this order: an explicit path (``--inception-weights PATH``), the environment variable
``DDPM_FAST_INCEPTION_WEIGHTS``, the file already in torch.hub's cache, else torch-fidelity downloads it
into that cache (online machines only). Offline with none of these, :func:`load_inception` raises one
line naming the file and where to put it.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

import torch

from .errors import DDPMFastError
from .integrity import file_sha256 as sha256_file  # the Inception weights' hash, as fid.json records it

__all__ = ["InceptionFeatures", "load_inception", "WEIGHTS_FILE", "WEIGHTS_ENV", "sha256_file"]

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's name for the TF-ported weights
WEIGHTS_ENV = "DDPM_FAST_INCEPTION_WEIGHTS"
FEATURE = "2048"  # pool3, the layer FID is defined on
NAME = "inception-v3-compat"


def _hub_cache_file() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def _import_extractor():
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as exc:
        raise DDPMFastError(f"FID needs torch-fidelity, which is not importable here ({exc}): "
                            'pip install -e ".[fid]"') from None
    except RuntimeError as exc:  # e.g. a torchvision built for another torch: "operator torchvision::nms ..."
        raise DDPMFastError(f"torch-fidelity failed to import ({str(exc).splitlines()[0]}): install a torchvision "
                            "built for this torch, e.g. in a fresh venv (see the README's FID section)") from None
    return FeatureExtractorInceptionV3


class InceptionFeatures:
    """torch-fidelity's Inception as a FID feature extractor: uint8 (B, C, H, W) -> float32 (B, 2048).

    C = 1 is repeated to 3 channels (Inception is an RGB network); any H, W is resized by torch-fidelity
    as TF does. ``info`` records the network and the weights file (path and sha256) for result files.
    """

    dim = 2048

    def __init__(self, network: torch.nn.Module, weights_path: Path, device=None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.network = network.to(self.device).eval().requires_grad_(False)
        self.weights_path = Path(weights_path)
        self.info = {"feature_extractor": f"torch-fidelity {NAME} pool3 ({FEATURE}-d)",
                     "weights": str(self.weights_path), "weights_sha256": sha256_file(self.weights_path)}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Inception features need uint8 (B, 1 or 3, H, W) images, got {images.dtype} "
                             f"{tuple(images.shape)}")
        x = images.to(self.device)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        (features,) = self.network(x.contiguous())
        return features.reshape(features.shape[0], self.dim).float()


def load_inception(weights=None, device=None) -> InceptionFeatures:
    """torch-fidelity's Inception with weights from ``weights`` (a path), ``$DDPM_FAST_INCEPTION_WEIGHTS``,
    torch.hub's cache, or torch-fidelity's download (see the module docstring).

    Raises DDPMFastError (one line) when torch-fidelity is missing, the given file does not exist or
    does not load, or no weights are found and the download fails.
    """
    extractor = _import_extractor()
    origin = "--inception-weights"
    if weights is None and os.environ.get(WEIGHTS_ENV):
        weights, origin = os.environ[WEIGHTS_ENV], WEIGHTS_ENV
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise DDPMFastError(f"Inception weights {path} (from {origin}) do not exist: pass the path of "
                                f"{WEIGHTS_FILE}")
    else:
        path = _hub_cache_file()
    try:
        if path.is_file():
            network = extractor(NAME, [FEATURE], feature_extractor_weights_path=str(path))
        else:  # torch-fidelity downloads the weights into torch.hub's cache (the path above)
            with contextlib.redirect_stderr(io.StringIO()):  # torch.hub's progress lines: errors get one line
                network = extractor(NAME, [FEATURE])
    except (OSError, RuntimeError, ValueError, EOFError) as exc:
        if path.is_file():
            raise DDPMFastError(f"cannot load Inception weights from {path}: {str(exc).splitlines()[0]}; "
                                f"it should be torch-fidelity's {WEIGHTS_FILE}") from None
        url = getattr(sys.modules.get(extractor.__module__), "URL_INCEPTION_V3", "torch-fidelity's release files")
        raise DDPMFastError(f"no Inception weights and the download failed ({type(exc).__name__}): get "
                            f"{WEIGHTS_FILE} ({url}) and put it at {path}, or pass "
                            f"--inception-weights PATH / set {WEIGHTS_ENV}") from None
    if not path.is_file():
        raise DDPMFastError(f"torch-fidelity loaded Inception but {path} is missing: pass --inception-weights PATH")
    return InceptionFeatures(network, path, device=device)
