"""The torch twin of the kernels' in-kernel noise (``kernels/random.py``): Triton's Philox ``randn``.

Philox4x32-10 (Salmon et al. 2011) on the counter (offset, 0, 0, 0) with key (seed, step), i.e.
``tl.randn((step << 32) | seed, offset)``; the first two output words become uniforms in [0, 1) as in
Triton's ``uint_to_uniform_float`` and the first Box-Muller output is returned. The integer part is
exact on any device (uint32 arithmetic emulated in int64, products split so nothing overflows); the float
part is the same float32 operations, so it agrees to float rounding of log/cos (~1e-6).
"""

from __future__ import annotations

import torch

__all__ = ["philox4x32", "randint4x", "uniform_from_uint32", "randn", "seeded_normal"]

MASK32 = 0xFFFFFFFF
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
UNIFORM_SCALE = 4.6566127342e-10
NUM_ROUNDS = 10


def _mul_hi_lo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product a * m for uint32 values held in int64.

    a * m can reach 2^64 and overflow int64, so m is split into 16-bit halves: each partial product
    stays below 2^48.
    """
    lo_part = a * (m & 0xFFFF)
    hi_part = a * (m >> 16)
    high = (hi_part + (lo_part >> 16)) >> 16
    low = (((hi_part & 0xFFFF) << 16) + lo_part) & MASK32
    return high, low


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = NUM_ROUNDS):
    """Philox4x32 on uint32 words held in int64 tensors (broadcastable); returns the four output words."""
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(c2, PHILOX_ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def randint4x(seed: torch.Tensor, step: torch.Tensor, offset: torch.Tensor):
    """Triton's ``randint4x((step << 32) | seed, offset)`` for int64 tensors of uint32 values (broadcast)."""
    offset = offset.to(torch.int64) & MASK32
    zero = torch.zeros_like(offset)
    # a tensor already on offset's device passes through as_tensor without a copy (graph-safe)
    seed = torch.as_tensor(seed, dtype=torch.int64, device=offset.device) & MASK32
    step = torch.as_tensor(step, dtype=torch.int64, device=offset.device) & MASK32
    return philox4x32(offset, zero, zero, zero, seed, step)


def uniform_from_uint32(x: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float`` for uint32 words in int64: float32 in [0, 1)."""
    folded = torch.where(x >= 2**31, MASK32 - x, x)  # int32 bitcast, then ~x for negatives
    return folded.to(torch.float32) * UNIFORM_SCALE


def randn(seed, step, offset: torch.Tensor) -> torch.Tensor:
    """float32 N(0, 1) values equal to the kernels' ``philox_randn(seed, step, offset)`` (Box-Muller).

    The constants are Python scalars, not tensors: a float32 tensor op rounds a scalar operand to
    float32, as the kernel rounds its literals, and no host-to-device copy is made, so the function can
    be captured in a CUDA graph (the sampler's ``fused_update=False`` path).
    """
    i1, i2, _, _ = randint4x(seed, step, offset)
    u1 = uniform_from_uint32(i1).clamp_min(1.0e-7)
    u2 = uniform_from_uint32(i2)
    th = u2 * 6.283185307179586
    r = torch.sqrt(torch.log(u1) * -2.0)
    return r * torch.cos(th)


def seeded_normal(seeds: torch.Tensor, steps: torch.Tensor, numel: int, chunk: int = 1 << 22) -> torch.Tensor:
    """(B, numel) float32: row b is ``randn(seeds[b], steps[b], arange(numel))`` on seeds' device.

    seeds, steps: int64 (B,) tensors on one device (steps may be (1,)). Works in chunks of ``chunk``
    elements to bound the int64 temporaries.
    """
    device = seeds.device
    seeds = seeds.to(torch.int64).view(-1, 1)
    steps = steps.to(device=device, dtype=torch.int64).view(-1, 1)
    out = torch.empty((seeds.shape[0], numel), dtype=torch.float32, device=device)
    per_row = max(1, chunk // max(1, seeds.shape[0]))
    for start in range(0, numel, per_row):
        offsets = torch.arange(start, min(numel, start + per_row), dtype=torch.int64, device=device)
        out[:, start:start + offsets.numel()] = randn(seeds, steps, offsets.view(1, -1))
    return out
