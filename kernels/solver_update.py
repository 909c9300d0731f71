"""One fused, graph-safe kernel for a step of the multistep solvers (DPM-Solver++, UniPC), driven by a
``ddpm_fast.solvers`` table row and the solver's history buffers, all updated in place:

    m      = x * SQRT_RECIP_AB - eps * SQRT_RECIPM1_AB                    (x0 prediction)
    xc     = K_X x + K_LAST last + K_M m + sum_j K_Hj h_j                 (only with CORRECTOR; else xc = x)
    last   = xc                                                           (only with CORRECTOR)
    x      = C_X0 m + C_XT xc + C_EPS eps + sum_j C_Hj h_j + SIGMA z
    h_3, h_2, h_1 = h_2, h_1, m                                           (the first NUM_HIST of them)

Every element is read and written by the same program, so the in-place update is safe. The row (the
step) is read from device memory and the grid depends on shapes only, so one captured CUDA graph replays
for every step; lower-order warm-up and final steps are rows with zero history coefficients.

Specialisations ``solver_update`` can launch (for compile tests): pointers x, h1, h2, h3, last, z: *fp32;
eps: *fp32, *bf16 or *fp16; table: *fp32; row, seeds: *i64 (or *i32); CHW, HW: i32; constexprs
C (channels, e.g. 1 or 3), CL (x/history layout channels-last 0/1), E_CL (eps layout 0/1), Z_CL (0/1),
NOISE in {0 none, 1 given tensor, 2 seed-keyed Philox}, NUM_HIST in {0, 1, 2, 3}, CORRECTOR in {0, 1},
NUM_COLS = 24, BLOCK a power of two in 128..1024 (4096 under the interpreter).
"""

import torch
import triton
import triton.language as tl

from .random import philox_randn
from .utils import (check_image, check_index_tensor, check_same_image, check_table, dense, is_channels_last,
                    launch_config, layout_index, noise_source, require_dense)

__all__ = ["solver_update", "NUM_SOLVER_COLUMNS"]

# ddpm_fast.solvers' layout: 0 t, 1 sqrt(1/ab), 2 sqrt(1/ab - 1), 3 c_x0, 4 c_xt, 5 c_eps, 6 sigma,
# 8..10 c_h1..c_h3, 11 k_x, 12 k_last, 13 k_m, 14..16 k_h1..k_h3
NUM_SOLVER_COLUMNS = 24


@triton.jit
def _solver_update_kernel(
    x_ptr, eps_ptr, z_ptr, h1_ptr, h2_ptr, h3_ptr, last_ptr, table_ptr, row_ptr, seeds_ptr,
    CHW, HW,
    C: tl.constexpr, CL: tl.constexpr, E_CL: tl.constexpr, Z_CL: tl.constexpr, NOISE: tl.constexpr,
    NUM_HIST: tl.constexpr, CORRECTOR: tl.constexpr, NUM_COLS: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(1)
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # position in x's layout (history and last share it)
    mask = p < CHW
    at = b.to(tl.int64) * CHW + p

    row = tl.load(row_ptr)
    coef = table_ptr + row.to(tl.int64) * NUM_COLS
    x = tl.load(x_ptr + at, mask=mask)
    eps = tl.load(eps_ptr + b.to(tl.int64) * CHW + layout_index(p, C, HW, CL, E_CL), mask=mask).to(tl.float32)
    m = x * tl.load(coef + 1) - eps * tl.load(coef + 2)

    h1 = tl.zeros_like(x)
    h2 = tl.zeros_like(x)
    h3 = tl.zeros_like(x)
    if NUM_HIST >= 1:
        h1 = tl.load(h1_ptr + at, mask=mask)
    if NUM_HIST >= 2:
        h2 = tl.load(h2_ptr + at, mask=mask)
    if NUM_HIST >= 3:
        h3 = tl.load(h3_ptr + at, mask=mask)

    xc = x
    if CORRECTOR:
        last = tl.load(last_ptr + at, mask=mask)
        xc = tl.load(coef + 11) * x + tl.load(coef + 12) * last + tl.load(coef + 13) * m
        xc += tl.load(coef + 14) * h1 + tl.load(coef + 15) * h2 + tl.load(coef + 16) * h3
        tl.store(last_ptr + at, xc, mask=mask)

    x_next = tl.load(coef + 3) * m + tl.load(coef + 4) * xc + tl.load(coef + 5) * eps
    x_next += tl.load(coef + 8) * h1 + tl.load(coef + 9) * h2 + tl.load(coef + 10) * h3
    if NOISE == 1:
        z = tl.load(z_ptr + b.to(tl.int64) * CHW + layout_index(p, C, HW, CL, Z_CL), mask=mask).to(tl.float32)
        x_next += tl.load(coef + 6) * z
    elif NOISE == 2:
        seed = tl.load(seeds_ptr + b).to(tl.uint32)
        step = tl.load(coef + 0).to(tl.int32).to(tl.uint32)  # the model timestep keys the noise
        z = philox_randn(seed, step, layout_index(p, C, HW, CL, False).to(tl.uint32))
        x_next += tl.load(coef + 6) * z
    tl.store(x_ptr + at, x_next, mask=mask)

    if NUM_HIST >= 3:
        tl.store(h3_ptr + at, h2, mask=mask)
    if NUM_HIST >= 2:
        tl.store(h2_ptr + at, h1, mask=mask)
    if NUM_HIST >= 1:
        tl.store(h1_ptr + at, m, mask=mask)


def solver_update(x, eps, table, row, history=(), last=None, *, seeds=None, noise=None):
    """One multistep-solver step on x in place (and on ``history`` and ``last``); one launch. Returns x.

    x: (B, C, H, W) float32, NCHW-contiguous or channels_last. eps: same shape, float32/bfloat16/float16,
    either layout. table: (S, 24) float32 device tensor (``ddpm_fast.solvers`` layout). row: int32/int64
    (1,) device tensor (the step counter; not range-checked, that would sync). history: 0 to 3 float32
    tensors like x (same layout), h_1 newest; last: a float32 tensor like x when the solver corrects
    (UniPC), else None. Noise z: ``seeds`` (int64 (B,), keyed by (seeds[b], int(table[row, 0]), logical
    element index)), ``noise`` (a tensor like x) or neither (z = 0). Arithmetic is float32.
    """
    check_image(x, "x")
    if x.dtype != torch.float32:
        raise TypeError(f"x must be float32 (the solver state), got {x.dtype}")
    require_dense(x, "x")
    device, batch, cl = x.device, x.shape[0], is_channels_last(x)
    check_same_image(eps, x, "eps", "x")
    check_table(table, "table", NUM_SOLVER_COLUMNS, device)
    check_index_tensor(row, "row", (1,), device)
    history = tuple(history)
    if len(history) > 3:
        raise ValueError(f"history holds at most 3 x0 predictions, got {len(history)}")
    state = list(history) + ([last] if last is not None else [])
    for i, h in enumerate(state):
        name = "last" if i == len(history) else f"history[{i}]"
        check_same_image(h, x, name, "x")
        if h.dtype != torch.float32 or not h.is_contiguous(memory_format=torch.channels_last if cl else
                                                            torch.contiguous_format):
            raise ValueError(f"{name} must be float32 in x's memory layout (it is updated in place)")
    eps = dense(eps)
    mode, z = noise_source(x, seeds, noise)
    slots = list(history) + [x] * (3 - len(history))  # unused history pointers are never read
    _, c, h, w = x.shape
    block, num_warps, grid = launch_config(c * h * w, batch)
    _solver_update_kernel[grid](
        x, eps, z, slots[0], slots[1], slots[2], last if last is not None else x, table, row,
        seeds if seeds is not None else row,
        c * h * w, h * w,
        C=c, CL=cl, E_CL=is_channels_last(eps), Z_CL=is_channels_last(z), NOISE=mode, NUM_HIST=len(history),
        CORRECTOR=last is not None, NUM_COLS=NUM_SOLVER_COLUMNS, BLOCK=block, num_warps=num_warps,
    )
    return x
