"""Input checks shared by the reference and the fast paths: each raises one clear ValueError/TypeError
that names the problem and the fix, instead of a shape error from deep inside torch."""

from __future__ import annotations

import torch

__all__ = [
    "check_image_batch",
    "check_eta",
    "check_like",
    "check_step_inputs",
    "check_timesteps_per_sample",
    "check_variance",
    "host_to_device",
    "model_device",
    "resolve_timesteps",
    "timesteps_for_batch",
    "VARIANCES",
]

VARIANCES = ("fixed_large", "fixed_small")


def check_image_batch(x, name: str = "x") -> None:
    """x must be a floating-point (B, C, H, W) tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name} must be a 4-D (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_like(y, x: torch.Tensor, name: str, ref_name: str = "x") -> None:
    """y must be a floating-point tensor with x's shape (the dtype may differ)."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if tuple(y.shape) != tuple(x.shape):
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(x.shape)}, got {tuple(y.shape)}")
    if not y.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {y.dtype}")


def timesteps_for_batch(t, batch_size: int, device=None, num_timesteps: int | None = None) -> torch.Tensor:
    """Turn ``t`` (an int, or an integer tensor of shape (B,) or ()) into an int64 (B,) tensor, without a sync.

    Checks the type and the shape; a Python int is also checked against 0..num_timesteps-1 (0.. when
    num_timesteps is None). Tensor values are not read, so a CUDA tensor is never synchronised: callers
    that need the range checked use :func:`check_timesteps_per_sample`.
    """
    if isinstance(t, bool):
        raise TypeError("t must be an int or an integer tensor, got a bool")
    if isinstance(t, int):
        if t < 0 or (num_timesteps is not None and t >= num_timesteps):
            upper = "" if num_timesteps is None else f"..{num_timesteps - 1}"
            raise ValueError(f"t={t} is out of range: timestep indices run over 0{upper}")
        return torch.full((batch_size,), t, dtype=torch.int64, device=device)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be an int or an integer tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"t must hold integer timestep indices, got dtype {t.dtype}")
    if t.ndim == 0:
        t = t.reshape(1).expand(batch_size)
    if t.ndim != 1 or t.shape[0] != batch_size:
        raise ValueError(f"t must be a scalar or have one entry per sample (shape ({batch_size},)), "
                         f"got shape {tuple(t.shape)}")
    return t.to(dtype=torch.int64, device=device if device is not None else t.device)


def check_step_inputs(x_t, eps, noise=None) -> None:
    """The inputs of one reverse step: x_t a float (B, C, H, W) tensor, eps and noise (if given) of its shape."""
    check_image_batch(x_t, "x_t")
    check_like(eps, x_t, "eps", "x_t")
    if noise is not None:
        check_like(noise, x_t, "noise", "x_t")


def check_eta(eta) -> float:
    """DDIM's eta as a float >= 0 (0: deterministic DDIM, 1: DDPM-like noise)."""
    if not float(eta) >= 0.0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    return float(eta)


def check_timesteps_per_sample(t, batch_size: int, num_timesteps: int, device=None) -> torch.Tensor:
    """:func:`timesteps_for_batch` plus a check that every value lies in 0..T-1.

    Raises a ValueError naming the problem when t is out of range or has the wrong batch size.
    The range check reads the values where t already is, before any move to ``device``: a CPU t headed
    for the GPU costs no sync, a CUDA t syncs once; fast loops that must not sync validate their
    timestep lists once up front instead.
    """
    t = timesteps_for_batch(t, batch_size, None, num_timesteps)
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= num_timesteps:
        bad = lo if lo < 0 else hi
        raise ValueError(f"t={bad} is out of range: timestep indices run over 0..{num_timesteps - 1}")
    return t if device is None else host_to_device(t, device)


def host_to_device(x: torch.Tensor, device) -> torch.Tensor:
    """x on ``device``. A CPU tensor headed for CUDA is staged in pinned memory and copied with
    non_blocking=True: a copy from pageable memory makes the host wait for the GPU, which would put a
    sync in every training step. Any other move is a plain ``x.to(device)``.
    """
    device = torch.device(device)
    if x.device.type != "cpu" or device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def check_variance(variance: str) -> str:
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}: use one of {', '.join(VARIANCES)}")
    return variance


def resolve_timesteps(timesteps, num_timesteps: int) -> list[int]:
    """The descending list of timestep indices a sampler visits.

    None: all of T-1..0. An int n: diffusers' "leading" spacing, arange(n) * (T // n) reversed
    (n = 50 of T = 1000 gives 980, 960, ..., 0). A sequence: used as given, after checking it is
    strictly descending and inside 0..T-1.
    """
    if timesteps is None:
        return list(range(num_timesteps - 1, -1, -1))
    if isinstance(timesteps, bool):
        raise TypeError("timesteps must be None, an int or a descending list of ints")
    if isinstance(timesteps, int):
        if not 1 <= timesteps <= num_timesteps:
            raise ValueError(f"timesteps={timesteps} must lie in 1..{num_timesteps} (the number of sampling steps)")
        stride = num_timesteps // timesteps
        return [k * stride for k in range(timesteps - 1, -1, -1)]
    if isinstance(timesteps, torch.Tensor):
        timesteps = timesteps.tolist()
    steps = [int(s) for s in timesteps]
    if not steps:
        raise ValueError("timesteps is empty: give at least one timestep index")
    if any(a <= b for a, b in zip(steps, steps[1:])):
        raise ValueError("timesteps must be strictly descending (e.g. [999, 749, 499, 249, 0])")
    if steps[0] >= num_timesteps or steps[-1] < 0:
        raise ValueError(f"timesteps must lie in 0..{num_timesteps - 1}, got {steps[0]}..{steps[-1]}")
    return steps


def model_device(model) -> torch.device:
    """Where a model's weights live: its first parameter's device; the CPU for a plain callable."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")
