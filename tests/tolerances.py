"""Tolerances derived from the arithmetic that differs between the two sides of a comparison.

One place for the bounds the tests use (pytest puts tests/ on the path: ``from tolerances import ...``):

- u, the unit roundoff of each dtype, and Higham's gamma_n = n u / (1 - n u): n roundings of an
  expression relative error at most gamma_n (Higham, Accuracy and Stability of Numerical Algorithms, 3.1).
  A K-term dot product plus bias is within gamma_{K+1} (|W| |h| + |b|) of the exact value, in any order.
- the element-wise update and noising kernels against a float64 oracle: gamma_n times the sum of the
  magnitudes of the terms, n the count of roundings on the longest path (``reverse_update_bound``,
  ``q_sample_bound``), plus one rounding of the output to its dtype.
- Box-Muller noise from two libraries' log/cos (``BOX_MULLER_ATOL``).
- a network computed twice with its sums in another order (batch size, memory layout, a table instead of
  an MLP, another library's formulation): ``rounding_response`` moves the output of every Conv2d, Linear
  and GroupNorm by its own rounding bound (both sides' worth) and measures how far the result moves. A
  real difference in sum order moves each layer by less than that bound (typically ~sqrt(K) u, not K u),
  so its effect on the result stays inside the response, to first order.

A wrong implementation (another formula, a missing term, the wrong noise) misses by O(1) relative to the
values, far outside every bound here. Comparisons that are exact by construction (the same operations in
the same order) assert equality instead.
"""

import math
import os
from contextlib import contextmanager

import torch
import torch.nn.functional as F

U = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
U32 = U[torch.float32]


def gamma(n: int, u: float = U32) -> float:
    """Higham's gamma_n: the relative error bound of n roundings, n u / (1 - n u)."""
    assert n * u < 1
    return n * u / (1 - n * u)


def output_rounding(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What storing ``value`` (float64) as ``dtype`` may change it by: one ulp (<= 2u |v|: Triton's
    interpreter truncates float32 -> bf16 instead of rounding to nearest), and the subnormal spacing
    of float16 (2^-24) near zero. float32: u |v| (round to nearest)."""
    v = value.abs()
    if dtype == torch.float32:
        return U32 * v
    return 2 * U[dtype] * v + (2.0**-24 if dtype == torch.float16 else 0.0)


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound, what: str = "") -> None:
    """Every element of ``actual`` within ``bound`` (a float or a tensor broadcasting to the shape) of
    ``expected``; NaN or inf never passes."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    bound = torch.as_tensor(bound, dtype=torch.float64).cpu()
    err = (actual - expected).abs()
    if os.environ.get("DDPM_FAST_TOLERANCE_REPORT"):  # how much of each bound a run uses
        print(f"\n[tolerance] {what}: max err/bound = {(err / bound.clamp_min(1e-300)).max().item():.3g}")
    bad = ~(err <= bound)
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {err.numel()} elements outside the bound; first at "
                             f"flat index {i}: |{actual.flatten()[i].item():.9g} - {expected.flatten()[i].item():.9g}|"
                             f" = {err.flatten()[i].item():.3g} > {bound.expand_as(err).flatten()[i].item():.3g}")


# -- element-wise kernels ------------------------------------------------------------------------------
def reverse_update_bound(rows64: torch.Tensor, x, eps, z, sides: int = 1) -> torch.Tensor:
    """Per-element bound of the table update's float32 evaluation against the exact value.

    rows64: (B, 8) float64 table rows (``coefficients`` layout), one per image (or (1, 8) for all);
    x, eps, z: the inputs as both sides saw them (z None: no noise). The update is
        x0 = x * a - eps * b (optionally clamped), out = c0 x0 + c1 x + c2 eps + sigma z,
    with the coefficients rounded once to float32: the longest path (c0 x0) has 8 roundings (a, x*a, the
    difference, c0, the product, three additions), so the error is at most gamma_8 times
        S = |c0| (|x a| + |eps b|) + |c1 x| + |c2 eps| + |sigma z|
    (clamping is 1-Lipschitz, the order of the additions and FMA contraction do not matter). ``sides=2``
    when both sides are float32 evaluations. A half output adds ``output_rounding``.
    """
    from ddpm_fast import coefficients as C

    def col(j):
        return rows64[:, j].view(-1, 1, 1, 1).abs()

    x, eps = x.double().cpu().abs(), eps.double().cpu().abs()
    s = col(C.C_X0) * (x * col(C.SQRT_RECIP_AB) + eps * col(C.SQRT_RECIPM1_AB)) + col(C.C_XT) * x + col(C.C_EPS) * eps
    if z is not None:
        s = s + col(C.SIGMA) * z.double().cpu().abs()
    return sides * gamma(8) * s


def q_sample_bound(sqrt_ab64, sqrt_1mab64, x0, noise) -> torch.Tensor:
    """x_t = sqrt(ab) x0 + sqrt(1 - ab) eps in float32 with float32-rounded coefficients: 3 roundings on
    each path (coefficient, product, sum): gamma_3 (|sqrt(ab) x0| + |sqrt(1-ab) eps|). Coefficients (B,)."""
    a, b = (c.double().cpu().abs().view(-1, 1, 1, 1) for c in (sqrt_ab64, sqrt_1mab64))
    return gamma(3) * (a * x0.double().cpu().abs() + b * noise.double().cpu().abs())


# Box-Muller, z = sqrt(-2 log u1) cos(2 pi u2), u1 >= 1e-7, as the torch twin and as Triton's tl.randn
# (numpy's float32 log/cos under TRITON_INTERPRET, libdevice or approximate PTX on CUDA). The integer
# stream and the uniforms are exact on both sides; log and cos come from different libraries, whose
# last bits differ with the library and the CPU's SIMD width (numpy's AVX-512 float32 log errs up to
# 3.83 ulp, its cos 1.49; SLEEF and glibc 1; CUDA's logf 1, cosf 2; lg2.approx 2^-22.6 relative,
# cos.approx 2^-20.9 absolute). Budget per side: log 8u relative (4 ulp), cos 9u absolute (covers
# cos.approx). Then with r = sqrt(-2 log u1) <= R and |z| <= r:
#   |z_a - z_b| <= r (cos_a + cos_b) + |z| (log_a / 2 + log_b / 2 + sqrt and product roundings, 2u each side)
#               <= R u (9 + 9 + 4 + 4 + 4) = 30 R u
BOX_MULLER_R_MAX = math.sqrt(-2 * math.log(1e-7))  # 5.68
BOX_MULLER_ATOL = 30 * BOX_MULLER_R_MAX * U32  # 1.0e-5


# -- linear layers -------------------------------------------------------------------------------------
def linear_rounding(layer: torch.nn.Linear, h: torch.Tensor, dh: torch.Tensor):
    """(layer(h), bound): an input error dh passes as |W| dh; the layer's own sum errs by at most
    gamma_{K+1} (|h| |W|^T + |b|) (K inputs plus the bias)."""
    k = layer.in_features + 1
    w = layer.weight.abs()
    bias = layer.bias.abs() if layer.bias is not None else 0.0
    return layer(h), dh @ w.T + gamma(k) * (h.abs() @ w.T + bias)


def projection_rounding_bound(model, t: torch.Tensor) -> torch.Tensor:
    """Twice the float32 error bound of every resblock's time projection at timesteps t: (len(t), widths).

    The table and the per-call MLP compute the same projections with the same float32 matmuls over
    different batch sizes, so only the order of their sums differs. Each path is within Higham's bound of
    the exact value (``linear_rounding``); SiLU passes an input error as 1.1 dh (max |silu'| = 1.0998)
    plus its own rounding u |out|. The two paths differ by at most twice that.
    """
    def silu(h, dh):
        out = F.silu(h)
        return out, 1.1 * dh + U32 * out.abs()

    with torch.no_grad():
        from ddpm_fast.unet import timestep_embedding

        cfg = model.config
        emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        h, dh = linear_rounding(model.time_embedding.linear_1, emb, torch.zeros_like(emb))
        h, dh = silu(h, dh)
        h, dh = linear_rounding(model.time_embedding.linear_2, h, dh)
        h, dh = silu(h, dh)
        return 2 * torch.cat([linear_rounding(r.time_emb_proj, h, dh)[1] for r in model._resnet_order], dim=1)


# -- whole networks ------------------------------------------------------------------------------------
def _layer_bound(module: torch.nn.Module, inputs, out: torch.Tensor) -> torch.Tensor:
    """One layer's rounding bound in units of u (its own arithmetic, inputs taken as exact): n times the
    magnitudes, n the roundings of the layer (K + 1 for a K-term sum plus bias), as in gamma_n ~ n u."""
    x = inputs[0]
    if isinstance(module, torch.nn.Conv2d):
        k = module.in_channels // module.groups * math.prod(module.kernel_size) + 1
        mag = F.conv2d(x.abs(), module.weight.abs(), None if module.bias is None else module.bias.abs(),
                       module.stride, module.padding, module.dilation, module.groups)
        return k * mag
    if isinstance(module, torch.nn.Linear):
        k = module.in_features + 1
        mag = x.abs() @ module.weight.abs().T
        if module.bias is not None:
            mag = mag + module.bias.abs()
        return k * mag
    # GroupNorm: y = (x - m) / s * w + b over K = C/G * H * W elements per group. The mean errs by
    # gamma_K mean|x| and the variance by gamma_K (its sum of squares) relative, moving y by
    # |w| gamma_K (mean|x| / s + |x - m| / s); the element-wise steps add 4 roundings of |y|.
    b, c = x.shape[:2]
    xg = x.reshape(b, module.num_groups, -1)
    k = xg.shape[-1]
    mean = xg.mean(-1, keepdim=True)
    std = (xg.var(-1, unbiased=False, keepdim=True) + module.eps).sqrt()
    rel = (xg.abs().mean(-1, keepdim=True) + (xg - mean).abs()) / std
    w = module.weight.abs().view(1, c, *[1] * (x.dim() - 2)) if module.weight is not None else 1.0
    return k * w * rel.reshape(x.shape) + 4 * out.abs()


_ROUNDED = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm)


@contextmanager
def _shifted(model: torch.nn.Module, sign, scale: float):
    """Every Conv2d / Linear / GroupNorm output of ``model`` moved by sign * scale * its bound in units of
    u (sign: +1.0, -1.0, or an int seed for a random sign per element)."""
    def hook(module, inputs, out):
        with torch.no_grad():
            bound = _layer_bound(module, inputs, out)
            return out + (_random_or(sign, out) * scale * bound).to(out.dtype)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _ROUNDED)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _random_or(sign, like: torch.Tensor):
    if isinstance(sign, float):
        return sign
    gen = torch.Generator().manual_seed(sign)
    return (torch.randint(0, 2, like.shape, generator=gen) * 2.0 - 1).to(like.device)


@contextmanager
def _shifted_update(sign, scale: float, noise_atol: float = 0.0):
    """FastSampler's float32 table update (``sampler.reverse_update_torch``, the CPU path) moved by
    sign * scale * its bound: ``reverse_update_bound`` (gamma_8 S) plus u |out| for the float32 x
    that the model reads; plus sign * sigma * noise_atol where noise is added (z drawn by another
    implementation, e.g. the kernel's Philox against its torch twin: ``BOX_MULLER_ATOL``)."""
    from ddpm_fast import coefficients as C
    from ddpm_fast import sampler as sampler_module

    if scale == 0 and noise_atol == 0:
        yield
        return
    original = sampler_module.reverse_update_torch

    def shifted(x_t, eps, table, row, noise=None, clip=None):
        out = original(x_t, eps, table, row, noise, clip)
        bound = reverse_update_bound(table.index_select(0, row).double().cpu(), x_t, eps, noise)
        bound = scale * (bound + U32 * out.double().cpu().abs())
        if noise is not None and noise_atol:
            sigma = table.index_select(0, row).double().cpu()[:, C.SIGMA].abs().view(-1, 1, 1, 1)
            bound = bound + sigma * noise_atol
        return out + (_random_or(sign, out) * bound.to(out.device)).to(out.dtype)

    sampler_module.reverse_update_torch = shifted
    try:
        yield
    finally:
        sampler_module.reverse_update_torch = original


def rounding_response(run, model: torch.nn.Module, sides: int = 2, signs=(1.0, -1.0, 0),
                      max_fraction: float = 1e-2, update_sides: int = 0, noise_atol: float = 0.0) -> float:
    """How far ``run()`` (a forward or sampling chain through ``model``) moves when every Conv2d, Linear
    and GroupNorm output of ``model`` moves by ``sides`` times its own rounding bound, in either direction
    or with random signs: the bound for comparing two evaluations (``sides=2``) or one against the exact
    value (``sides=1``) of the same network whose sums differ only in order. u is that of the model's
    parameter dtype (a float64 model: 2^-53).

    To first order the output moves linearly with the perturbation (-bound mirrors +bound; random signs
    sample other alignments). A real rounding error is typically ~sqrt(K) u per sum, with random signs,
    where the perturbation uses K u: a margin of sqrt(K) >= 4 for every layer here. Asserts the response
    is finite and below ``max_fraction`` of the result (a rounding-sized perturbation: the comparison can
    still fail).

    update_sides > 0: ``run`` samples with a FastSampler on the CPU (torch update) and is compared with
    another chain (an oracle): its per-step update moves too, by update_sides times its float32 bound
    (1 against a float64 update, 2 against a float32 one). noise_atol: the other chain's z differs by up
    to this much per element (another implementation of the same noise): sigma * noise_atol per step.
    """
    dtype = next(model.parameters()).dtype
    u = U[dtype] / (1 - 5000 * U[dtype])  # gamma_n <= n times this for every n <= 5000 (the largest K here)
    with torch.no_grad():
        base = run().double()
        response = 0.0
        for sign in signs:
            with _shifted(model, sign, sides * u), _shifted_update(sign, float(update_sides), noise_atol):
                moved = run().double()
            response = max(response, (moved - base).abs().max().item())
    scale = base.abs().max().item()
    # (0 when the result does not depend on the rounding, e.g. saturated by a clamp: then equality)
    assert math.isfinite(response) and response < max_fraction * scale, (response, scale)
    return response
