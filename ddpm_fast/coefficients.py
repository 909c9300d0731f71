"""Per-step coefficient tables for the fused reverse update: one table per sampler.

Every sampler in the DDPM family is the same element-wise update with different numbers:

    x0     = x_t * SQRT_RECIP_AB - eps * SQRT_RECIPM1_AB       (predict_x0)
    x0     = clamp(x0, -r, r)                                  (only when clipping)
    x_prev = C_X0 * x0 + C_XT * x_t + C_EPS * eps + SIGMA * z

Row k of a table belongs to the k-th visited step (timesteps descending); column T holds the model's
timestep index, which is also the step part of the in-kernel noise key. Tables are built in float64 from
the schedule, then rounded to float32 once for the device (never fp16/bf16).
"""

from __future__ import annotations

import torch

from .checks import check_eta, check_variance, resolve_timesteps
from .schedule import NoiseSchedule

__all__ = ["T", "SQRT_RECIP_AB", "SQRT_RECIPM1_AB", "C_X0", "C_XT", "C_EPS", "SIGMA", "NUM_COLUMNS",
           "reverse_table"]

# column indices
T, SQRT_RECIP_AB, SQRT_RECIPM1_AB, C_X0, C_XT, C_EPS, SIGMA = range(7)
NUM_COLUMNS = 8  # one spare column keeps rows 32-byte aligned


def reverse_table(
    schedule: NoiseSchedule,
    timesteps=None,
    variance: str = "fixed_large",
    clip_x0: bool = False,
    eta: float | None = None,
    recompute_eps: bool = True,
) -> torch.Tensor:
    """The (S, NUM_COLUMNS) float64 CPU table of one sampler; S = number of visited steps.

    timesteps: None, an int or a descending list (see ``checks.resolve_timesteps``). eta=None gives
    DDPM ancestral steps (variance "fixed_large" or "fixed_small"; clip_x0 chooses the clipped
    posterior-mean form, otherwise the paper's eps form); a float gives DDIM with that eta.
    SIGMA is 0 on the last row: no noise at the last step. recompute_eps (DDIM with clipping): the
    direction term uses eps recomputed from the clipped x0 (True) or the model's eps (False, diffusers'
    DDIMScheduler.step default use_clipped_model_output=False).
    """
    check_variance(variance)
    steps = resolve_timesteps(timesteps, schedule.num_timesteps)
    sched = schedule if len(steps) == schedule.num_timesteps else schedule.respaced(steps)
    # sched's index j runs ascending over the visited steps; row k visits j = S - 1 - k
    order = torch.arange(len(steps) - 1, -1, -1)
    beta = sched.betas[order]
    a = 1.0 - beta
    ab = sched.alphas_cumprod[order]
    ab_prev = sched.alphas_cumprod_prev[order]

    table = torch.zeros(len(steps), NUM_COLUMNS, dtype=torch.float64)
    table[:, T] = torch.tensor(steps, dtype=torch.float64)
    table[:, SQRT_RECIP_AB] = (1.0 / ab).sqrt()
    table[:, SQRT_RECIPM1_AB] = (1.0 / ab - 1.0).sqrt()

    if eta is None:
        if clip_x0:
            table[:, C_X0] = ab_prev.sqrt() * beta / (1.0 - ab)
            table[:, C_XT] = a.sqrt() * (1.0 - ab_prev) / (1.0 - ab)
        else:
            table[:, C_XT] = 1.0 / a.sqrt()
            table[:, C_EPS] = -(1.0 - a) / ((1.0 - ab).sqrt() * a.sqrt())
        var = beta if variance == "fixed_large" else beta * (1.0 - ab_prev) / (1.0 - ab)
        table[:, SIGMA] = var.sqrt()
    else:
        s = check_eta(eta) * ((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev)).sqrt()
        direction = (1.0 - ab_prev - s**2).clamp(min=0.0).sqrt()
        if clip_x0 and recompute_eps:
            # eps is recomputed from the clipped x0: eps' = (x_t - sqrt(ab) x0) / sqrt(1 - ab)
            table[:, C_X0] = ab_prev.sqrt() - direction * ab.sqrt() / (1.0 - ab).sqrt()
            table[:, C_XT] = direction / (1.0 - ab).sqrt()
        else:
            table[:, C_X0] = ab_prev.sqrt()
            table[:, C_EPS] = direction
        table[:, SIGMA] = s
    table[-1, SIGMA] = 0.0
    return table
