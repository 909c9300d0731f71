"""The oracle: plain eager PyTorch, the DDPM equations line by line, no fusion, no tricks.

Every fast path in ddpm_fast is tested against these functions. Conventions:

- images are NCHW tensors with data in [-1, 1];
- ``t`` is a timestep *index* 0..T-1 (t = 0 is the paper's t = 1), an int or an int64 (B,) tensor;
- the schedule's tables are float64 and all arithmetic runs in float64, whatever the input dtype; the
  result is cast back to the input's dtype. (Forming 1 - ab_t in float32 would lose ~2e-4 relative at
  small t by cancellation, and the oracle must not inherit that.)

Paper equations (Ho et al. 2020), with ab_t = alphas_cumprod[t], a_t = alphas[t]:

- q_sample      (eq. 4):  x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps
- predict_x0    (eq. 15): x0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)
- reverse_step  (Alg. 2): x_{t-1} = (x_t - (1 - a_t) / sqrt(1 - ab_t) eps) / sqrt(a_t) + sigma_t z
- training_loss (Alg. 1): || eps - eps_theta(sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, t) ||^2
- sample        (Alg. 2): x_T ~ N(0, I), then reverse_step down to t = 0 (z = 0 at the last step)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .checks import (
    check_eta,
    check_image_batch,
    check_like,
    check_step_inputs,
    check_timesteps_per_sample,
    check_variance,
    model_device,
    resolve_timesteps,
)
from .schedule import NoiseSchedule

__all__ = ["q_sample", "predict_x0", "reverse_step", "ddim_step", "training_loss", "sample", "solver_sample"]


def _coef(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[t] as a float64 (B, 1, 1, 1) tensor on like's device."""
    return table[t.cpu()].to(device=like.device, dtype=torch.float64).view(-1, 1, 1, 1)


def q_sample(x0: torch.Tensor, t, noise: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """Forward noising: x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise.

    x0, noise: (B, C, H, W) float. t: int or int64 (B,). Returns x_t in x0's dtype.
    """
    check_image_batch(x0, "x0")
    check_like(noise, x0, "noise", "x0")
    t = check_timesteps_per_sample(t, x0.shape[0], schedule.num_timesteps)
    w = torch.float64
    sqrt_ab = _coef(schedule.alphas_cumprod.sqrt(), t, x0)
    sqrt_one_minus_ab = _coef((1.0 - schedule.alphas_cumprod).sqrt(), t, x0)
    x_t = sqrt_ab * x0.to(w) + sqrt_one_minus_ab * noise.to(w)
    return x_t.to(x0.dtype)


def predict_x0(x_t: torch.Tensor, t, eps: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """The x0 implied by x_t and a noise estimate: x0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t).

    x_t, eps: (B, C, H, W) float. t: int or int64 (B,). Returns x0 in x_t's dtype.
    """
    check_image_batch(x_t, "x_t")
    check_like(eps, x_t, "eps", "x_t")
    t = check_timesteps_per_sample(t, x_t.shape[0], schedule.num_timesteps)
    w = torch.float64
    sqrt_ab = _coef(schedule.alphas_cumprod.sqrt(), t, x_t)
    sqrt_one_minus_ab = _coef((1.0 - schedule.alphas_cumprod).sqrt(), t, x_t)
    x0 = (x_t.to(w) - sqrt_one_minus_ab * eps.to(w)) / sqrt_ab
    return x0.to(x_t.dtype)


def _sigma(schedule: NoiseSchedule, variance: str) -> torch.Tensor:
    """sigma_t for every t: sqrt(beta_t) ("fixed_large") or sqrt(posterior variance) ("fixed_small")."""
    if check_variance(variance) == "fixed_large":
        return schedule.betas.sqrt()
    return schedule.posterior_variance.sqrt()


def reverse_step(
    x_t: torch.Tensor,
    t,
    eps: torch.Tensor,
    schedule: NoiseSchedule,
    noise: torch.Tensor | None,
    variance: str = "fixed_large",
    clip_x0: bool = False,
) -> torch.Tensor:
    """One ancestral step x_t -> x_{t-1} (Ho et al., Algorithm 2, line 4).

    clip_x0=False: x_{t-1} = (x_t - (1 - a_t) / sqrt(1 - ab_t) eps) / sqrt(a_t) + sigma_t z.
    clip_x0=True: the posterior mean through a predicted x0 clipped to [-1, 1] (Ho's and diffusers'
    sampling default): mean = sqrt(ab_{t-1}) beta_t / (1 - ab_t) x0 + sqrt(a_t) (1 - ab_{t-1}) / (1 - ab_t) x_t.
    Without clipping both forms are the same mean.

    x_t, eps: (B, C, H, W) float; noise: z of the same shape, or None for z = 0. t: int or int64 (B,).
    variance: "fixed_large" (sigma^2 = beta_t) or "fixed_small" (sigma^2 = posterior variance).
    Samples with t = 0 get no noise. Returns x_{t-1} in x_t's dtype.
    """
    check_step_inputs(x_t, eps, noise)
    sigma_table = _sigma(schedule, variance)
    t = check_timesteps_per_sample(t, x_t.shape[0], schedule.num_timesteps)
    w = torch.float64
    x = x_t.to(w)
    e = eps.to(w)

    a = _coef(schedule.alphas, t, x)
    ab = _coef(schedule.alphas_cumprod, t, x)
    if clip_x0:
        ab_prev = _coef(schedule.alphas_cumprod_prev, t, x)
        beta = _coef(schedule.betas, t, x)
        x0 = ((x - (1.0 - ab).sqrt() * e) / ab.sqrt()).clamp(-1.0, 1.0)
        mean = ab_prev.sqrt() * beta / (1.0 - ab) * x0 + a.sqrt() * (1.0 - ab_prev) / (1.0 - ab) * x
    else:
        mean = (x - (1.0 - a) / (1.0 - ab).sqrt() * e) / a.sqrt()

    if noise is None:
        return mean.to(x_t.dtype)
    sigma = _coef(sigma_table, t, x)
    nonzero = (t > 0).to(device=x.device, dtype=w).view(-1, 1, 1, 1)  # no noise at the last step
    return (mean + nonzero * sigma * noise.to(w)).to(x_t.dtype)


def ddim_step(
    x_t: torch.Tensor,
    t,
    eps: torch.Tensor,
    schedule: NoiseSchedule,
    noise: torch.Tensor | None,
    eta: float = 0.0,
    clip_x0: bool = False,
) -> torch.Tensor:
    """One DDIM step x_t -> x_{t-1} (Song et al. 2021, eq. 12), with prev = t - 1 on ``schedule``.

    x0 = predict_x0(x_t, eps), optionally clipped to [-1, 1], in which case eps is recomputed from the
    clipped x0 (diffusers' DDIMScheduler with use_clipped_model_output=True). Then
    s = eta sqrt((1 - ab_prev) / (1 - ab_t) (1 - ab_t / ab_prev)) and
    x_{t-1} = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - s^2) eps + s z, with ab_prev = 1 below t = 0.
    Shapes and dtypes as in :func:`reverse_step`.
    """
    check_step_inputs(x_t, eps, noise)
    check_eta(eta)
    t = check_timesteps_per_sample(t, x_t.shape[0], schedule.num_timesteps)
    w = torch.float64
    x = x_t.to(w)
    e = eps.to(w)

    ab = _coef(schedule.alphas_cumprod, t, x)
    ab_prev = _coef(schedule.alphas_cumprod_prev, t, x)
    x0 = (x - (1.0 - ab).sqrt() * e) / ab.sqrt()
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
        e = (x - ab.sqrt() * x0) / (1.0 - ab).sqrt()
    s = eta * ((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev)).sqrt()
    x_prev = ab_prev.sqrt() * x0 + (1.0 - ab_prev - s**2).clamp(min=0.0).sqrt() * e
    if noise is not None:
        x_prev = x_prev + s * noise.to(w)
    return x_prev.to(x_t.dtype)


def training_loss(model, x0: torch.Tensor, schedule: NoiseSchedule, generator: torch.Generator | None = None,
                  snr_gamma: float | None = None):
    """Ho et al.'s simple loss (Algorithm 1) for one batch: a 0-dim tensor.

    Draws t ~ U{0..T-1} and eps ~ N(0, I) (from ``generator`` if given, on the generator's device),
    forms x_t with :func:`q_sample` and returns mean((eps - model(x_t, t))^2). With ``snr_gamma`` (min-SNR
    weighting, Hang et al. 2023, eq. for eps-prediction) image b's mean squared error is weighted by
    min(SNR_t, gamma) / SNR_t, SNR_t = ab_t / (1 - ab_t), before the mean over the batch (in float64).
    x0: (B, C, H, W) float in [-1, 1]. model: callable (x_t, t int64 (B,)) -> eps (B, C, H, W).
    """
    check_image_batch(x0, "x0")
    draw_device = generator.device if generator is not None else x0.device
    t = torch.randint(0, schedule.num_timesteps, (x0.shape[0],), generator=generator, device=draw_device)
    eps = torch.randn(x0.shape, generator=generator, device=draw_device, dtype=x0.dtype)
    t, eps = t.to(x0.device), eps.to(x0.device)
    x_t = q_sample(x0, t, eps, schedule)
    eps_pred = model(x_t, t)
    if snr_gamma is None:
        return F.mse_loss(eps_pred.float(), eps.float())
    if not snr_gamma > 0:
        raise ValueError(f"snr_gamma must be > 0 (5 in Hang et al.), got {snr_gamma!r}")
    ab = schedule.alphas_cumprod.to(x0.device)[t]
    snr = ab / (1 - ab)
    weight = torch.minimum(snr, torch.full_like(snr, snr_gamma)) / snr
    per_image = ((eps_pred.double() - eps.double()) ** 2).mean(dim=(1, 2, 3))
    return (weight * per_image).mean()


@torch.no_grad()
def sample(
    model,
    schedule: NoiseSchedule,
    shape,
    generator: torch.Generator | None = None,
    variance: str = "fixed_large",
    clip_x0: bool = False,
    timesteps=None,
    eta: float | None = None,
    device=None,
    dtype: torch.dtype = torch.float32,
    noise_fn=None,
) -> torch.Tensor:
    """The full ancestral sampling loop (Ho et al., Algorithm 2): x_T ~ N(0, I), then T reverse steps.

    shape: (B, C, H, W). model: callable (x, t int64 (B,)) -> eps. timesteps: None (all T steps), an int
    (that many steps, diffusers' leading spacing) or a strictly descending list; a shorter list runs on
    the respaced schedule (beta' = 1 - ab_t / ab_prev between listed steps). eta: None for DDPM
    ancestral steps, a float for DDIM. Noise is drawn in DDPMPipeline's order (x_T first, then one z per
    step except the last) from ``generator`` on its own device. Returns x_0 (B, C, H, W) in ``dtype``.

    noise_fn: optional ``noise_fn(noise_step: int, shape) -> tensor`` replacing the generator draws,
    called with noise_step = T for x_T and with the model timestep t for the z added after visiting t
    (ddpm_fast's seed-keyed noise convention, so the oracle can be fed the fast sampler's exact noise).
    """
    check_variance(variance)
    if len(shape) != 4:
        raise ValueError(f"shape must be (B, C, H, W), got {tuple(shape)}")
    steps = resolve_timesteps(timesteps, schedule.num_timesteps)
    device = torch.device(device) if device is not None else model_device(model)
    draw_device = generator.device if generator is not None else device
    respaced = schedule if len(steps) == schedule.num_timesteps else schedule.respaced(steps)

    def draw(noise_step: int) -> torch.Tensor:
        if noise_fn is not None:
            return noise_fn(noise_step, tuple(shape)).to(device=device, dtype=dtype)
        return torch.randn(tuple(shape), generator=generator, device=draw_device, dtype=dtype).to(device)

    x = draw(schedule.num_timesteps)
    for k, t in enumerate(steps):
        j = len(steps) - 1 - k  # this step's index on the respaced schedule (t itself when not respaced)
        t_batch = torch.full((shape[0],), t, dtype=torch.int64, device=device)
        eps = model(x, t_batch).to(dtype)
        z = None
        if j > 0:
            z = draw(t)
        if eta is None:
            x = reverse_step(x, j, eps, respaced, z, variance=variance, clip_x0=clip_x0)
        else:
            x = ddim_step(x, j, eps, respaced, z, eta=eta, clip_x0=clip_x0)
    return x



# -- few-step multistep solvers ---------------------------------------------------------------------
# alpha_t = sqrt(ab_t), sigma_t = sqrt(1 - ab_t), lambda_t = log(alpha_t / sigma_t) (half the log-SNR).
# A solver steps from t_k to t_{k+1} in lambda, h = lambda_{t_{k+1}} - lambda_{t_k}; the last step ends at
# the clean image (alpha = 1, sigma = 0, lambda = inf, so e^{-h} = 0): diffusers' final_sigmas_type="zero".


def _dpmpp_update(x, x0s, lams, a_t, s_t, s_0, h, order, solver_type, noise):
    """One DPM-Solver++ step (Lu et al. 2022, "DPM-Solver++", eqs. for the multistep data-prediction
    solver): x0s / lams hold the x0 predictions and lambdas of the current and earlier points, newest last.

    ODE:  x_t = (sigma_t / sigma_s) x - alpha_t (e^{-h} - 1) D0 + [second-/third-order terms]
    SDE:  x_t = (sigma_t / sigma_s) e^{-h} x + alpha_t (1 - e^{-2h}) D0 + ... + sigma_t sqrt(1 - e^{-2h}) z
    with D0 = x0 of now, D1 = divided difference in lambda scaled by h (midpoint: weight 1/2; heun:
    the phi_2 weight), D2 the second difference (third order).
    """
    e = math.exp(-h)
    D0 = x0s[-1]
    D1 = D2 = None
    if order >= 2:
        r0 = (lams[-1] - lams[-2]) / h
        D1_0 = (x0s[-1] - x0s[-2]) / r0
        D1 = D1_0
        if order == 3:
            r1 = (lams[-2] - lams[-3]) / h
            D1_1 = (x0s[-2] - x0s[-3]) / r1
            D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
            D2 = (D1_0 - D1_1) / (r0 + r1)
    if noise is None:  # the probability-flow ODE
        x_t = s_t / s_0 * x - a_t * (e - 1.0) * D0
        if order == 2 and solver_type == "midpoint":
            x_t = x_t - 0.5 * a_t * (e - 1.0) * D1
        elif order >= 2:
            x_t = x_t + a_t * ((e - 1.0) / h + 1.0) * D1
        if order == 3:
            x_t = x_t - a_t * ((e - 1.0 + h) / h**2 - 0.5) * D2
        return x_t
    e2 = math.exp(-2.0 * h)
    x_t = s_t / s_0 * e * x + a_t * (1.0 - e2) * D0
    if order == 2 and solver_type == "midpoint":
        x_t = x_t + 0.5 * a_t * (1.0 - e2) * D1
    elif order >= 2:
        x_t = x_t + a_t * ((1.0 - e2) / (-2.0 * h) + 1.0) * D1
    if order == 3:
        x_t = x_t + a_t * ((1.0 - e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5) * D2
    return x_t + s_t * math.sqrt(1.0 - e2) * noise


def _unipc_update(x, m_new, x0s, lams, lam_t, a_t, s_t, s_0, order, solver_type, corrector):
    """One UniPC step with B(h) (Zhao et al. 2023, Algorithms "UniP-p" and "UniC-p", data prediction).

    From the point s_0 = lams[-1] (sample x, x0 prediction x0s[-1]) to lam_t:
    x_t = (sigma_t / sigma_s0) x - alpha_t h phi_1(h) x0_s0 - alpha_t B(h) sum_i rho_i D_i,
    D_i = (x0_{s_i} - x0_{s_0}) / r_i, r_i = (lambda_{s_i} - lambda_{s_0}) / h over the order - 1 older
    points; the corrector (UniC) adds the new point's difference m_new - x0_s0 with r = 1. rho solves
    R rho = b with R_ij = r_j^i and b_i = i! phi_{i+1}(-h) / B(h) (the predictor drops the new point;
    order 2 predictor and order 1 corrector use rho = 1/2). B(h) = -h (bh1) or e^{-h} - 1 (bh2).
    """
    h = lam_t - lams[-1]
    hh = -h
    rks = [(lams[-1 - i] - lams[-1]) / h for i in range(1, order)]
    D1s = [(x0s[-1 - i] - x0s[-1]) / r for i, r in zip(range(1, order), rks)]
    rks = torch.tensor(rks + [1.0], dtype=torch.float64)
    h_phi_1 = math.expm1(hh)  # h phi_1(h) with the sign of hh
    B_h = hh if solver_type == "bh1" else math.expm1(hh)
    h_phi_k, factorial, b = h_phi_1 / hh - 1.0, 1, []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / B_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    R = torch.stack([rks**i for i in range(order)])
    b = torch.tensor(b, dtype=torch.float64)
    x_t = s_t / s_0 * x - a_t * h_phi_1 * x0s[-1]
    if corrector:
        rhos = [0.5] if order == 1 else torch.linalg.solve(R, b).tolist()
        res = sum((r * d for r, d in zip(rhos[:-1], D1s)), torch.zeros_like(x))
        return x_t - a_t * B_h * (res + rhos[-1] * (m_new - x0s[-1]))
    if order == 1:
        return x_t
    rhos = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
    res = sum((r * d for r, d in zip(rhos, D1s)), torch.zeros_like(x))
    return x_t - a_t * B_h * res


@torch.no_grad()
def solver_sample(model, schedule: NoiseSchedule, x_T: torch.Tensor, solver="dpmpp-2m", timesteps=20,
                  noise_fn=None, trajectory: bool = False):
    """Sample with a multistep solver (DPM-Solver++ 2M/3M/2M-SDE or UniPC), eager, the update in float64.

    x_T: (B, C, H, W) start noise. solver: a name from ``solvers.MULTISTEP_SOLVERS`` or a ``SolverSpec``
    (options: order, solver_type, lower_order_final, corrector, spacing). timesteps: an int n (the spec's
    spacing, as diffusers' set_timesteps(n)) or a descending list. noise_fn(t, shape) gives the SDE's z
    after visiting t (dpmpp-2m-sde only; e.g. seed-keyed noise or a list of draws). The update runs in
    float64; returns x_0 in x_T's dtype, or the list of x after every step when ``trajectory``.
    model: callable (x in x_T's dtype, t int64 (B,)) -> eps.
    """
    from .solvers import _alpha_sigma_lambda, solver_orders, solver_spec, spec_timesteps

    spec = solver_spec(solver)
    if not spec.multistep:
        raise ValueError(f"solver_sample runs multistep solvers; use sample() for {spec.name!r}")
    T = schedule.num_timesteps
    if isinstance(timesteps, int) and not isinstance(timesteps, bool):
        steps = spec_timesteps(schedule, timesteps, spec)
    else:
        steps = resolve_timesteps(timesteps, T)
    check_image_batch(x_T, "x_T")
    if spec.sde and noise_fn is None:
        raise ValueError("dpmpp-2m-sde needs noise_fn(t, shape) for its per-step noise")
    ab = schedule.alphas_cumprod.tolist()
    points = [_alpha_sigma_lambda(ab[t]) for t in steps] + [_alpha_sigma_lambda(1.0)]
    pred_orders, corr_orders = solver_orders(spec, len(steps))
    x = x_T.to(torch.float64)
    x0s, lams, path = [], [], []
    last = None
    for k, t in enumerate(steps):
        a_s, s_s, l_s = points[k]
        a_t, s_t, l_t = points[k + 1]
        # the model sees x in x_T's dtype (its own); the update runs in float64
        t_batch = torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)
        eps = model(x.to(x_T.dtype), t_batch).to(torch.float64)
        m = (x - s_s * eps) / a_s  # predict_x0
        if spec.name == "unipc":
            if corr_orders[k]:  # UniC: correct x_{t_k} with the new model output, from the last sample
                x = _unipc_update(last, m, x0s, lams, l_s, a_s, s_s, points[k - 1][1], corr_orders[k],
                                  spec.solver_type, corrector=True)
            x0s.append(m)
            lams.append(l_s)
            last = x
            x = _unipc_update(x, None, x0s, lams, l_t, a_t, s_t, s_s, pred_orders[k], spec.solver_type,
                              corrector=False)
        else:
            x0s.append(m)
            lams.append(l_s)
            z = None
            if spec.sde:
                z = noise_fn(t, tuple(x.shape)).to(device=x.device, dtype=torch.float64) if k < len(steps) - 1 \
                    else torch.zeros_like(x)  # sigma_t = 0 at the clean end
            x = _dpmpp_update(x, x0s, lams, a_t, s_t, s_s, l_t - l_s, pred_orders[k], spec.solver_type, z)
        path.append(x.to(x_T.dtype))
    return path if trajectory else path[-1]
