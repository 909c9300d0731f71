"""Fast element-wise DDPM operations with a backend switch: the fused Triton kernels or plain torch.

Same arguments, maths and validation as the twins in ``ddpm_fast.reference``, plus ``backend``:

- ``"auto"`` (default): ``"triton"`` for CUDA tensors of a kernel dtype (float32/bfloat16/float16),
  ``"torch"`` otherwise; the environment variable ``DDPM_FAST_BACKEND`` overrides it;
- ``"triton"``: the kernels in ``ddpm_fast.kernels`` (CUDA tensors, or CPU tensors under
  TRITON_INTERPRET=1); a clear error when triton is missing;
- ``"torch"``: the reference implementation.

The ``*_seeded`` variants draw their noise from per-image seeds (the seed-keyed contract: image b's
noise at noise step s, logical NCHW element e, is Triton's Philox ``randn((s << 32) | seeds[b], e)``),
so an image's noise depends neither on its batch position nor on the batch size nor on the layout.
Their torch path uses :func:`seeded_noise`, which reproduces the kernels' noise on any device.
"""

from __future__ import annotations

import math
import os
import weakref

import torch

from . import reference
from .checks import (check_eta, check_image_batch, check_like, check_step_inputs, check_timesteps_per_sample,
                     check_variance, host_to_device)
from .coefficients import reverse_table
from .philox import seeded_normal
from .schedule import NoiseSchedule

__all__ = ["q_sample", "reverse_step", "ddim_step", "q_sample_seeded", "reverse_step_seeded",
           "seeded_noise", "resolve_backend", "triton_available", "BACKENDS"]

BACKENDS = ("auto", "triton", "torch")
ENV_BACKEND = "DDPM_FAST_BACKEND"
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (variance, clip_x0, eta, device) -> float32 (T, 8) reverse table, per schedule
_TABLES: "weakref.WeakKeyDictionary[NoiseSchedule, dict]" = weakref.WeakKeyDictionary()


def triton_available() -> bool:
    """Whether ``ddpm_fast.kernels`` (and so triton) can be imported here."""
    try:
        _kernels()
    except ImportError:
        return False
    return True


def _kernels():
    from . import kernels  # imports triton; kept lazy so ddpm_fast works without it

    return kernels


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """"triton" or "torch" for tensor x: the env override first, then ``backend``; "auto" picks by device.

    Raises ValueError for unknown names, and for "triton" on a machine without triton.
    """
    override = os.environ.get(ENV_BACKEND, "").strip()
    choice = override or backend
    if choice not in BACKENDS:
        source = f"environment variable {ENV_BACKEND}" if override else "backend"
        raise ValueError(f"unknown {source} {choice!r}: use one of {', '.join(BACKENDS)}")
    if choice == "auto":
        use_triton = x.is_cuda and x.dtype in _KERNEL_DTYPES and triton_available()
        return "triton" if use_triton else "torch"
    if choice == "triton":
        if not triton_available():
            raise ValueError("backend 'triton' needs the triton package (pip install triton) and ddpm_fast.kernels; "
                             "use backend='torch'")
        if not x.is_cuda and not _kernels().utils.interpreting():
            raise ValueError(f"backend 'triton' runs on CUDA tensors, got a tensor on {x.device}: move it to CUDA, "
                             "use backend='torch', or set TRITON_INTERPRET=1 before triton is imported")
        if x.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"backend 'triton' takes float32, bfloat16 or float16 tensors, got {x.dtype}: "
                            "use backend='torch' (e.g. for float64)")
    return choice


def _timesteps(t, x: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    return check_timesteps_per_sample(t, x.shape[0], schedule.num_timesteps, device=x.device)


def _reverse_table(schedule: NoiseSchedule, variance: str, clip_x0: bool, eta, device) -> torch.Tensor:
    """The full-schedule reverse table in float32 on ``device``, made once; row T-1-t belongs to t."""
    per_schedule = _TABLES.setdefault(schedule, {})
    key = (variance, bool(clip_x0), None if eta is None else float(eta), str(device))
    table = per_schedule.get(key)
    if table is None:
        table = reverse_table(schedule, None, variance=variance, clip_x0=clip_x0, eta=eta)
        table = table.to(device=device, dtype=torch.float32).contiguous()
        per_schedule[key] = table
    return table


def _rows(t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    return (schedule.num_timesteps - 1) - t


# ------------------------------------------------------------------------------------------------
# forward noising


def q_sample(x0: torch.Tensor, t, noise: torch.Tensor, schedule: NoiseSchedule, backend: str = "auto"):
    """Forward noising x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise (see ``reference.q_sample``).

    x0, noise: (B, C, H, W) float (triton: float32/bfloat16/float16, NCHW or channels_last). t: int or
    int64 (B,). Returns x_t in x0's dtype (and x0's memory layout on the triton path).
    """
    check_image_batch(x0, "x0")
    check_like(noise, x0, "noise", "x0")
    if resolve_backend(backend, x0) == "torch":
        return reference.q_sample(x0, t, noise, schedule)
    t = _timesteps(t, x0, schedule)
    tables = schedule.on(x0.device)
    return _kernels().q_sample(x0, t, tables.sqrt_alphas_cumprod, tables.sqrt_one_minus_alphas_cumprod,
                               noise.to(x0.device))


def q_sample_seeded(x0: torch.Tensor, t, schedule: NoiseSchedule, seeds, step, backend: str = "auto"):
    """Forward noising with eps drawn from per-image seeds; returns (x_t, eps), both in x0's dtype.

    x0: (B, C, H, W) float. t: int or int64 (B,). seeds: B ints or an int64 (B,) tensor in [0, 2**32);
    step: the noise step, an int or int64 (B,) in [0, 2**32) (e.g. the training iteration).
    eps equals ``seeded_noise(seeds, step, x0.shape[1:])`` on every backend.
    """
    check_image_batch(x0, "x0")
    batch = x0.shape[0]
    seeds_t = _seed_tensor(seeds, batch, x0.device)
    step_t = _step_tensor(step, batch, x0.device)
    if resolve_backend(backend, x0) == "torch":
        eps = seeded_noise(seeds_t, step_t, x0.shape[1:], device=x0.device, dtype=x0.dtype)
        return reference.q_sample(x0, t, eps, schedule), eps
    t = _timesteps(t, x0, schedule)
    tables = schedule.on(x0.device)
    return _kernels().q_sample(x0, t, tables.sqrt_alphas_cumprod, tables.sqrt_one_minus_alphas_cumprod,
                               seeds=seeds_t, noise_step=step_t)


# ------------------------------------------------------------------------------------------------
# reverse steps


def reverse_step(x_t: torch.Tensor, t, eps: torch.Tensor, schedule: NoiseSchedule, noise: torch.Tensor | None,
                 variance: str = "fixed_large", clip_x0: bool = False, backend: str = "auto") -> torch.Tensor:
    """One ancestral step x_t -> x_{t-1} (see ``reference.reverse_step``); one fused kernel on triton.

    x_t, eps: (B, C, H, W) float; noise: z of that shape or None (z = 0). t: int or int64 (B,); no noise
    where t == 0. variance: "fixed_large" or "fixed_small". clip_x0: clip the predicted x0 to [-1, 1].
    Returns x_{t-1} in x_t's dtype.
    """
    check_step_inputs(x_t, eps, noise)
    check_variance(variance)
    if resolve_backend(backend, x_t) == "torch":
        return reference.reverse_step(x_t, t, eps, schedule, noise, variance=variance, clip_x0=clip_x0)
    t = _timesteps(t, x_t, schedule)
    table = _reverse_table(schedule, variance, clip_x0, None, x_t.device)
    return _kernels().reverse_update(x_t, eps, table, _rows(t, schedule), noise=noise,
                                     clip=1.0 if clip_x0 else None)


def ddim_step(x_t: torch.Tensor, t, eps: torch.Tensor, schedule: NoiseSchedule, noise: torch.Tensor | None,
              eta: float = 0.0, clip_x0: bool = False, backend: str = "auto") -> torch.Tensor:
    """One DDIM step x_t -> x_{t-1} (see ``reference.ddim_step``); the same fused kernel on triton.

    Shapes and dtypes as in :func:`reverse_step`; eta >= 0 scales the noise (0: deterministic DDIM).
    """
    check_step_inputs(x_t, eps, noise)
    check_eta(eta)
    if resolve_backend(backend, x_t) == "torch":
        return reference.ddim_step(x_t, t, eps, schedule, noise, eta=eta, clip_x0=clip_x0)
    t = _timesteps(t, x_t, schedule)
    table = _reverse_table(schedule, "fixed_large", clip_x0, eta, x_t.device)
    return _kernels().reverse_update(x_t, eps, table, _rows(t, schedule), noise=noise,
                                     clip=1.0 if clip_x0 else None)


def reverse_step_seeded(x_t: torch.Tensor, t, eps: torch.Tensor, schedule: NoiseSchedule, seeds,
                        variance: str = "fixed_large", clip_x0: bool = False, backend: str = "auto") -> torch.Tensor:
    """:func:`reverse_step` with z drawn from per-image seeds at noise step t (the model timestep).

    seeds: B ints or an int64 (B,) tensor in [0, 2**32). z for image b equals
    ``seeded_noise(seeds[b:b+1], t_b, x_t.shape[1:])``; samples with t == 0 get no noise.
    """
    check_step_inputs(x_t, eps, None)
    check_variance(variance)
    seeds_t = _seed_tensor(seeds, x_t.shape[0], x_t.device)
    t = _timesteps(t, x_t, schedule)
    if resolve_backend(backend, x_t) == "torch":
        z = seeded_noise(seeds_t, t, x_t.shape[1:], device=x_t.device)
        return reference.reverse_step(x_t, t, eps, schedule, z, variance=variance, clip_x0=clip_x0)
    table = _reverse_table(schedule, variance, clip_x0, None, x_t.device)
    return _kernels().reverse_update(x_t, eps, table, _rows(t, schedule), seeds=seeds_t,
                                     clip=1.0 if clip_x0 else None)


# ------------------------------------------------------------------------------------------------
# seed-keyed noise


def seeded_noise(seeds, step, shape, device=None, dtype: torch.dtype = torch.float32,
                 backend: str = "torch") -> torch.Tensor:
    """The seed-keyed noise of the kernels, (B, *shape): image b is keyed by (seeds[b], step_b).

    seeds: B ints or an int64 (B,) tensor in [0, 2**32). step: an int or int64 (B,) in [0, 2**32).
    shape: one image's (C, H, W) (any shape works: element e is the flat row-major index). device:
    default seeds' device (CPU for a list). The default backend "torch" computes it with torch ops
    (``ddpm_fast.philox``), the same on every device; "auto"/"triton" use ``kernels.seeded_randn`` when
    possible (CUDA), equal to float rounding of log/cos.
    """
    if device is None:
        device = seeds.device if isinstance(seeds, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    shape = tuple(int(s) for s in shape)
    if any(s < 1 for s in shape):
        raise ValueError(f"shape must have positive sizes, got {shape}")
    seeds_t = _seed_tensor(seeds, None, device)
    step_t = _step_tensor(step, seeds_t.shape[0], device)
    probe = torch.empty(0, device=device, dtype=dtype)
    if len(shape) == 3 and dtype in _KERNEL_DTYPES and resolve_backend(backend, probe) == "triton":
        out = torch.empty((seeds_t.shape[0], *shape), device=device, dtype=dtype)
        return _kernels().seeded_randn(seeds_t, step_t, shape, out=out)
    noise = seeded_normal(seeds_t, step_t, math.prod(shape))
    return noise.view(seeds_t.shape[0], *shape).to(dtype)


def _seed_tensor(seeds, batch: int | None, device) -> torch.Tensor:
    """seeds as an int64 (B,) tensor on device, checked to lie in [0, 2**32) (reads the values)."""
    if isinstance(seeds, torch.Tensor):
        if seeds.is_floating_point() or seeds.is_complex() or seeds.dtype == torch.bool:
            raise TypeError(f"seeds must hold integers, got dtype {seeds.dtype}")
        values = seeds.to(torch.int64)
    else:
        try:
            values = torch.tensor([_as_int(s, "seeds") for s in seeds], dtype=torch.int64)
        except TypeError as err:
            if "iterable" in str(err):
                raise TypeError(f"seeds must be a list of ints or an int64 (B,) tensor, got "
                                f"{type(seeds).__name__}") from None
            raise
    if values.ndim != 1 or values.numel() == 0:
        raise ValueError(f"seeds must be a non-empty 1-D list/tensor with one seed per image, got shape "
                         f"{tuple(values.shape)}")
    if batch is not None and values.shape[0] != batch:
        raise ValueError(f"seeds must have one entry per image ({batch}), got {values.shape[0]}")
    if int(values.min()) < 0 or int(values.max()) >= 2**32:
        raise ValueError("seeds must lie in [0, 2**32)")
    return host_to_device(values.contiguous(), device)


def _step_tensor(step, batch: int, device) -> torch.Tensor:
    """the noise step as an int64 (1,) or (B,) tensor on device, checked to lie in [0, 2**32)."""
    if isinstance(step, torch.Tensor):
        if step.is_floating_point() or step.is_complex() or step.dtype == torch.bool:
            raise TypeError(f"step must hold integers, got dtype {step.dtype}")
        values = step.to(torch.int64).reshape(-1) if step.ndim == 0 else step.to(torch.int64)
        if values.ndim != 1 or values.shape[0] not in (1, batch):
            raise ValueError(f"step must be an int or have shape ({batch},), got {tuple(step.shape)}")
    else:
        values = torch.tensor([_as_int(step, "step")], dtype=torch.int64)
    if int(values.min()) < 0 or int(values.max()) >= 2**32:
        raise ValueError("step must lie in [0, 2**32)")
    return host_to_device(values.contiguous(), device)


def _as_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np

            if isinstance(value, np.integer):
                return int(value)
        except ImportError:  # pragma: no cover
            pass
        raise TypeError(f"{name} must be ints, got {type(value).__name__}")
    return value
