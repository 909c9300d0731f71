"""In-kernel Gaussian noise: Triton's Philox4x32-10 ``randn``, keyed by (per-image seed, step).

``philox_randn(seed, step, offset)`` computes exactly what ``tl.randn(seed64, offset)`` computes for
``seed64 = (step << 32) | seed`` and a 32-bit ``offset`` (Triton 3.x ``triton/language/random.py``):
Philox4x32 with 10 rounds on the counter (offset, 0, 0, 0) and key (seed, step), the first two output
words mapped to uniforms by ``uint_to_uniform_float`` and the first Box-Muller output returned.

It is written out here instead of calling ``tl.randn`` so the stream is pinned by this file, not by the
installed Triton version, and so the key halves enter as uint32 scalars without a 64-bit detour.
``ddpm_fast.philox`` is its torch twin (tested bit-for-bit on the integers).
"""

import inspect

import triton
import triton.language as tl

# Philox4x32 constants (Salmon et al. 2011), the same as Triton's and cuRAND's.
PHILOX_KEY_A = tl.constexpr(0x9E3779B9)
PHILOX_KEY_B = tl.constexpr(0xBB67AE85)
PHILOX_ROUND_A = tl.constexpr(0xD2511F53)
PHILOX_ROUND_B = tl.constexpr(0xCD9E8D57)
# largest scale with MAX_INT32 * scale < 1.0 after float rounding (Triton's uint_to_uniform_float)
UNIFORM_SCALE = tl.constexpr(4.6566127342e-10)


# Philox relies on uint32 wrap-around; Triton's debug mode (sanitize_overflow) would flag it as overflow,
# so use the non-sanitising forms where this Triton has them (as triton/language/random.py does).
if all(hasattr(tl, op) and "sanitize_overflow" in inspect.signature(getattr(tl, op)).parameters
       for op in ("mul", "add")):
    @triton.jit
    def _wrap_mul(a, b):
        return tl.mul(a, b, sanitize_overflow=False)

    @triton.jit
    def _wrap_add(a, b):
        return tl.add(a, b, sanitize_overflow=False)
else:  # pragma: no cover - older Triton without overflow sanitising
    @triton.jit
    def _wrap_mul(a, b):
        return a * b

    @triton.jit
    def _wrap_add(a, b):
        return a + b


@triton.jit
def philox_randn(seed, step, offset):
    """N(0, 1) float32 block for uint32 scalars ``seed``, ``step`` and a uint32 ``offset`` block."""
    c0 = offset
    zero = offset * 0
    c1 = zero
    c2 = zero
    c3 = zero
    k0 = seed
    k1 = step
    for _ in tl.static_range(10):
        _c0 = c0
        _c2 = c2
        c0 = tl.umulhi(PHILOX_ROUND_B, _c2) ^ c1 ^ k0
        c2 = tl.umulhi(PHILOX_ROUND_A, _c0) ^ c3 ^ k1
        c1 = _wrap_mul(PHILOX_ROUND_B, _c2)
        c3 = _wrap_mul(PHILOX_ROUND_A, _c0)
        k0 = _wrap_add(k0, PHILOX_KEY_A)
        k1 = _wrap_add(k1, PHILOX_KEY_B)
    # uint_to_uniform_float: fold the sign half onto [0, 2^31) so u lies in [0, 1)
    i1 = c0.to(tl.int32, bitcast=True)
    i2 = c1.to(tl.int32, bitcast=True)
    i1 = tl.where(i1 < 0, ~i1, i1)
    i2 = tl.where(i2 < 0, ~i2, i2)
    u1 = i1.to(tl.float32) * UNIFORM_SCALE
    u2 = i2.to(tl.float32) * UNIFORM_SCALE
    # Box-Muller, first output
    u1 = tl.maximum(1.0e-7, u1)
    th = 6.283185307179586 * u2
    r = tl.sqrt(-2.0 * tl.log(u1))
    return r * tl.cos(th)
