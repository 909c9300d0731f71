"""Fused forward noising x_t = sqrt(ab[t_b]) x0 + sqrt(1 - ab[t_b]) eps, one pass, one launch.

The per-sample coefficients are gathered inside the kernel from float32 device tables, so nothing is
read back to the host. eps is either given or drawn in-kernel (seed-keyed Philox, see ``random.py``)
and written out, since the training loss needs it. ``seeded_randn`` is the standalone noise fill.
"""

import torch
import triton
import triton.language as tl

from .random import philox_randn
from .utils import (check_image, check_index_tensor, check_same_image, check_table, dense,
                    is_channels_last, launch_config, layout_index, require_dense)

__all__ = ["q_sample", "seeded_randn"]

NOISE_GIVEN, NOISE_SEEDED = 1, 2


@triton.jit
def _q_sample_kernel(
    x0_ptr, noise_ptr, out_ptr, noise_out_ptr, t_ptr, sqrt_ab_ptr, sqrt_1mab_ptr, seeds_ptr, step_ptr,
    CHW, HW,
    C: tl.constexpr, OUT_CL: tl.constexpr, X_CL: tl.constexpr, N_CL: tl.constexpr, NO_CL: tl.constexpr,
    NOISE: tl.constexpr, STEP_PER_SAMPLE: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(1)
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # position in out's layout
    mask = p < CHW
    base = b.to(tl.int64) * CHW

    t = tl.load(t_ptr + b)
    a = tl.load(sqrt_ab_ptr + t)
    s = tl.load(sqrt_1mab_ptr + t)
    x0 = tl.load(x0_ptr + base + layout_index(p, C, HW, OUT_CL, X_CL), mask=mask).to(tl.float32)
    if NOISE == 1:
        eps = tl.load(noise_ptr + base + layout_index(p, C, HW, OUT_CL, N_CL), mask=mask).to(tl.float32)
    else:
        seed = tl.load(seeds_ptr + b).to(tl.uint32)
        if STEP_PER_SAMPLE:
            step = tl.load(step_ptr + b).to(tl.uint32)
        else:
            step = tl.load(step_ptr).to(tl.uint32)
        e = layout_index(p, C, HW, OUT_CL, False).to(tl.uint32)  # logical NCHW index keys the noise
        eps = philox_randn(seed, step, e)
        tl.store(noise_out_ptr + base + layout_index(p, C, HW, OUT_CL, NO_CL),
                 eps.to(noise_out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + base + p, (a * x0 + s * eps).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _seeded_randn_kernel(out_ptr, seeds_ptr, step_ptr, CHW, HW, C: tl.constexpr, OUT_CL: tl.constexpr,
                         STEP_PER_SAMPLE: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(1)
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = p < CHW
    seed = tl.load(seeds_ptr + b).to(tl.uint32)
    if STEP_PER_SAMPLE:
        step = tl.load(step_ptr + b).to(tl.uint32)
    else:
        step = tl.load(step_ptr).to(tl.uint32)
    z = philox_randn(seed, step, layout_index(p, C, HW, OUT_CL, False).to(tl.uint32))
    tl.store(out_ptr + b.to(tl.int64) * CHW + p, z.to(out_ptr.dtype.element_ty), mask=mask)


def _step_tensor(step, batch: int, device: torch.device, name: str) -> torch.Tensor:
    """A device int tensor (1,) or (B,) holding the noise step(s); an int becomes a fresh (1,) tensor.

    Pass a device tensor inside CUDA graphs: an int is copied to the device at call time (frozen at capture).
    """
    if isinstance(step, bool):
        raise TypeError(f"{name} must be an int or an integer tensor, got a bool")
    if isinstance(step, int):
        if not 0 <= step < 2**32:
            raise ValueError(f"{name}={step} must lie in [0, 2**32)")
        return torch.full((1,), step, dtype=torch.int64, device=device)
    check_index_tensor(step, name, (1, batch), device)
    return step


def _check_seeds(seeds, batch: int, device: torch.device) -> None:
    check_index_tensor(seeds, "seeds", (batch,), device)


def _shape_args(x: torch.Tensor):
    _, c, h, w = x.shape
    return c * h * w, h * w, c


def q_sample(x0, t, sqrt_ab, sqrt_1mab, noise=None, out=None, *, seeds=None, noise_step=None, noise_out=None):
    """Fused forward noising: ``out = sqrt_ab[t_b] * x0 + sqrt_1mab[t_b] * eps``, fp32 arithmetic.

    x0: (B, C, H, W) float32/bfloat16/float16, NCHW or channels_last. t: int32/int64 (B,) device tensor
    of timestep indices (not range-checked: validate upstream, a check would sync). sqrt_ab, sqrt_1mab:
    float32 (T,) device tables (``schedule.on(device)``). eps: ``noise`` (x0's shape, any of the dtypes and
    layouts), or drawn in-kernel when ``seeds`` (int64 (B,) device tensor, values in [0, 2**32)) is given,
    keyed by (seeds[b], noise_step, logical element index); ``noise_step`` is an int or an int tensor (1,)
    or (B,) on the device, and the drawn eps is written to ``noise_out`` (default: a new tensor like x0).
    out: optional (B, C, H, W) output (default: like x0). Returns out, or (out, noise_out) when seeded.
    """
    check_image(x0, "x0")
    device = x0.device
    batch = x0.shape[0]
    check_index_tensor(t, "t", (batch,), device)
    check_table(sqrt_ab, "sqrt_ab", None, device)
    check_table(sqrt_1mab, "sqrt_1mab", None, device)
    if (noise is None) == (seeds is None):
        raise ValueError("give exactly one of noise (a tensor) or seeds (in-kernel noise)")
    x0 = dense(x0)
    if out is None:
        out = torch.empty_like(x0)
    check_same_image(out, x0, "out", "x0")
    out = require_dense(out, "out")
    if noise is not None:
        if noise_step is not None or noise_out is not None:
            raise ValueError("noise_step and noise_out only apply to in-kernel noise (seeds=...)")
        check_same_image(noise, x0, "noise", "x0")
        noise = dense(noise)
        step, noise_out_arg, mode = t, out, NOISE_GIVEN  # unused pointers: any valid tensor
    else:
        _check_seeds(seeds, batch, device)
        if noise_step is None:
            raise ValueError("in-kernel noise needs noise_step (the step part of the noise key)")
        step = _step_tensor(noise_step, batch, device, "noise_step")
        if noise_out is None:
            noise_out = torch.empty_like(x0)
        check_same_image(noise_out, x0, "noise_out", "x0")
        noise_out = require_dense(noise_out, "noise_out")
        noise, noise_out_arg, mode = x0, noise_out, NOISE_SEEDED
    per_image, hw, c = _shape_args(x0)
    block, num_warps, grid = launch_config(per_image, batch)
    _q_sample_kernel[grid](
        x0, noise, out, noise_out_arg, t, sqrt_ab, sqrt_1mab, seeds if seeds is not None else t, step,
        per_image, hw,
        C=c, OUT_CL=is_channels_last(out), X_CL=is_channels_last(x0), N_CL=is_channels_last(noise),
        NO_CL=is_channels_last(noise_out_arg), NOISE=mode, STEP_PER_SAMPLE=step.shape[0] != 1,
        BLOCK=block, num_warps=num_warps,
    )
    return out if mode == NOISE_GIVEN else (out, noise_out)


def seeded_randn(seeds, step, shape, out=None):
    """In-kernel N(0, 1) noise for a batch, keyed per image: the x_T fill of a sampler.

    seeds: int64 (B,) device tensor, values in [0, 2**32). step: int or int tensor (1,) or (B,) on the
    device, in [0, 2**32). shape: (C, H, W) of one image. out: optional (B, C, H, W) float32/bfloat16/
    float16 tensor, NCHW or channels_last (default float32 NCHW on seeds' device). Element e (logical NCHW
    index) of image b is philox_randn(seeds[b], step_b, e); ``ddpm_fast.philox`` reproduces it in torch.
    Returns out.
    """
    if not isinstance(seeds, torch.Tensor):
        raise TypeError(f"seeds must be an int64 (B,) tensor, got {type(seeds).__name__}")
    batch = seeds.shape[0] if seeds.ndim == 1 else -1
    _check_seeds(seeds, batch, seeds.device)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be one image's (C, H, W), got {shape}")
    if out is None:
        out = torch.empty((batch, *shape), dtype=torch.float32, device=seeds.device)
    check_image(out, "out")
    if tuple(out.shape) != (batch, *shape):
        raise ValueError(f"out must have shape {(batch, *shape)}, got {tuple(out.shape)}")
    if out.device != seeds.device:
        raise ValueError(f"out is on {out.device} but seeds are on {seeds.device}: move them to one device")
    out = require_dense(out, "out")
    step = _step_tensor(step, batch, seeds.device, "step")
    per_image, hw, c = _shape_args(out)
    block, num_warps, grid = launch_config(per_image, batch)
    _seeded_randn_kernel[grid](out, seeds, step, per_image, hw, C=c, OUT_CL=is_channels_last(out),
                               STEP_PER_SAMPLE=step.shape[0] != 1, BLOCK=block,
                               num_warps=num_warps)
    return out
