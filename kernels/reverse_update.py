"""One fused kernel for the reverse update of every sampler in the DDPM family (DDPM eps form, clipped
DDPM, respaced, DDIM with any eta), driven by a coefficient table (``ddpm_fast.coefficients``):

    x0     = x_t * SQRT_RECIP_AB - eps * SQRT_RECIPM1_AB ; optionally clamp(x0, -r, r)
    x_prev = C_X0 * x0 + C_XT * x_t + C_EPS * eps + SIGMA * z

Graph safety: the table row (the step), the table and the seeds are read from device memory and the
grid depends on shapes only, so one CUDA-graph capture replays correctly at every step; the caller
advances its step counter on the device between replays (``row.add_(1)``, itself a captured op).
"""

import torch
import triton
import triton.language as tl

from .random import philox_randn
from .utils import (check_image, check_index_tensor, check_same_image, check_table, dense, is_channels_last,
                    launch_config, layout_index, noise_source, require_dense)

__all__ = ["reverse_update", "NUM_COLUMNS"]

# The table's columns, as ddpm_fast.coefficients lays them out (kernels know tables, not schedules):
# 0 model timestep t (keys the noise), 1 sqrt(1/ab), 2 sqrt(1/ab - 1), 3 c_x0, 4 c_xt, 5 c_eps, 6 sigma;
# the kernel loads them by these offsets.
NUM_COLUMNS = 8


@triton.jit
def _reverse_update_kernel(
    x_ptr, eps_ptr, z_ptr, out_ptr, table_ptr, row_ptr, seeds_ptr,
    CHW, HW,
    C: tl.constexpr, OUT_CL: tl.constexpr, X_CL: tl.constexpr, E_CL: tl.constexpr, Z_CL: tl.constexpr,
    ROW_PER_SAMPLE: tl.constexpr, NOISE: tl.constexpr, CLIP: tl.constexpr, CLIP_R: tl.constexpr,
    NUM_COLS: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(1)
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # position in out's layout
    mask = p < CHW
    base = b.to(tl.int64) * CHW

    if ROW_PER_SAMPLE:
        row = tl.load(row_ptr + b)
    else:
        row = tl.load(row_ptr)
    coef = table_ptr + row.to(tl.int64) * NUM_COLS
    sqrt_recip_ab = tl.load(coef + 1)
    sqrt_recipm1_ab = tl.load(coef + 2)
    c_x0 = tl.load(coef + 3)
    c_xt = tl.load(coef + 4)
    c_eps = tl.load(coef + 5)

    x = tl.load(x_ptr + base + layout_index(p, C, HW, OUT_CL, X_CL), mask=mask).to(tl.float32)
    eps = tl.load(eps_ptr + base + layout_index(p, C, HW, OUT_CL, E_CL), mask=mask).to(tl.float32)
    x0 = x * sqrt_recip_ab - eps * sqrt_recipm1_ab
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -CLIP_R), CLIP_R)
    x_prev = c_x0 * x0 + c_xt * x + c_eps * eps
    if NOISE == 1:
        sigma = tl.load(coef + 6)
        z = tl.load(z_ptr + base + layout_index(p, C, HW, OUT_CL, Z_CL), mask=mask).to(tl.float32)
        x_prev += sigma * z
    elif NOISE == 2:
        sigma = tl.load(coef + 6)
        seed = tl.load(seeds_ptr + b).to(tl.uint32)
        step = tl.load(coef + 0).to(tl.int32).to(tl.uint32)  # the model timestep keys the noise
        z = philox_randn(seed, step, layout_index(p, C, HW, OUT_CL, False).to(tl.uint32))
        x_prev += sigma * z
    tl.store(out_ptr + base + p, x_prev.to(out_ptr.dtype.element_ty), mask=mask)


def reverse_update(x_t, eps, table, row, out=None, *, seeds=None, noise=None, clip=None):
    """x_prev for a batch from x_t and the model's eps, coefficients from ``table[row]``; one launch.

    x_t, eps: (B, C, H, W) float32/bfloat16/float16, NCHW-contiguous or channels_last (they may differ).
    table: (S, 8) float32 device tensor in ``ddpm_fast.coefficients`` layout. row: int32/int64 device
    tensor, (1,) (one row for the whole batch: a sampler's step counter) or (B,) (a row per sample); rows
    are not range-checked (that would sync). Noise z: ``seeds`` (int64 (B,) device tensor, values in
    [0, 2**32)) draws it in-kernel keyed by (seeds[b], int(table[row, T]), logical element index);
    ``noise`` gives it as a (B, C, H, W) tensor; neither means z = 0. clip: None or r > 0 to clamp the
    predicted x0 to [-r, r] (a compile-time constant). out: optional (B, C, H, W) output in either layout
    (default: like x_t; out=x_t updates in place). Arithmetic is float32. Returns out.
    """
    check_image(x_t, "x_t")
    device = x_t.device
    batch = x_t.shape[0]
    check_same_image(eps, x_t, "eps", "x_t")
    check_table(table, "table", NUM_COLUMNS, device)
    check_index_tensor(row, "row", (1, batch), device)
    if clip is not None:
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not float(clip) > 0:
            raise ValueError(f"clip must be None or a positive float (the x0 range [-r, r]), got {clip!r}")
        clip = float(clip)
    x_t, eps = dense(x_t), dense(eps)
    if out is None:
        out = torch.empty_like(x_t)
    check_same_image(out, x_t, "out", "x_t")
    require_dense(out, "out")
    mode, z = noise_source(x_t, seeds, noise, "x_t")
    _, c, h, w = x_t.shape
    block, num_warps, grid = launch_config(c * h * w, batch)
    _reverse_update_kernel[grid](
        x_t, eps, z, out, table, row, seeds if seeds is not None else row,
        c * h * w, h * w,
        C=c, OUT_CL=is_channels_last(out), X_CL=is_channels_last(x_t), E_CL=is_channels_last(eps),
        Z_CL=is_channels_last(z), ROW_PER_SAMPLE=row.shape[0] != 1, NOISE=mode, CLIP=clip is not None,
        CLIP_R=clip if clip is not None else 0.0, NUM_COLS=NUM_COLUMNS, BLOCK=block, num_warps=num_warps,
    )
    return out
