"""ddpm-fast: fast, reference-checked DDPM training and sampling.

Heavy pieces (the U-Net, the sampler, the Triton kernels) load on first use, so ``import ddpm_fast``
stays cheap and never needs a GPU.
"""

from __future__ import annotations

import importlib

from .schedule import NoiseSchedule

__version__ = "0.1.0"

_LAZY = {
    "UNet": "ddpm_fast.unet",
    "UNetConfig": "ddpm_fast.unet",
    "load_diffusers_unet": "ddpm_fast.diffusers_io",
    "save_diffusers_unet": "ddpm_fast.diffusers_io",
    "FastSampler": "ddpm_fast.sampler",
    "FastDDPMPipeline": "ddpm_fast.pipeline",
}

__all__ = ["NoiseSchedule", "__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ddpm_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
