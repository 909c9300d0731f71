"""The multistep solvers (DPM-Solver++, UniPC): the oracle against diffusers' schedulers step by step, the
coefficient tables against the oracle, and the options' checks.

Tolerance against diffusers: both sides use the same float32-rounded alpha-bar (the schedule is built from
the scheduler's own ``alphas_cumprod``); diffusers then rounds its sigmas to float32 (6e-8 relative) and
DPMSolverMultistepScheduler casts the sample to float32 inside each step (6e-8 relative per step), so over
at most 20 steps the difference stays well below the issue's bound of 1e-5 relative (seen: under 1e-6).
"""

import itertools

import pytest
import torch

from ddpm_fast import reference
from ddpm_fast.schedule import NoiseSchedule
from ddpm_fast.solvers import (C_H, K_H, K_LAST, K_M, K_X, MULTISTEP_SOLVERS, clipped_last_timestep, solver_orders,
                               solver_spec, solver_table, solver_timesteps, spec_timesteps)

diffusers = pytest.importorskip("diffusers")

BOUND = 1e-5  # the bound, relative to the largest |x| of each step


def toy_model(x, t):
    """A deterministic eps model, nonlinear in x and t so every history term matters (float64)."""
    tt = t.to(torch.float64).view(-1, 1, 1, 1)
    return 0.6 * x * torch.cos(tt / 400) + 0.2 * torch.sin(3 * x + tt / 100)


def _schedule_of(scheduler) -> NoiseSchedule:
    """Our schedule with exactly the scheduler's (float32-rounded) alpha-bar."""
    ab = scheduler.alphas_cumprod.double()
    return NoiseSchedule.from_betas(1 - ab / torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]]))


def _diffusers_path(scheduler, x, noises=None):
    path = []
    for k, t in enumerate(scheduler.timesteps):
        eps = toy_model(x, t.view(1).expand(x.shape[0]))
        kwargs = {} if noises is None else {"variance_noise": noises[k]}
        x = scheduler.step(eps, t, x, **kwargs).prev_sample
        path.append(x)
    return path


def _compare(cls, config, spec, n, shape=(2, 3, 5, 7)):
    """Largest per-step relative difference between reference.solver_sample and diffusers' scheduler."""
    scheduler = cls(**config)
    scheduler.set_timesteps(n)
    steps = [int(t) for t in scheduler.timesteps]
    assert steps == spec_timesteps(_schedule_of(scheduler), n, spec)
    gen = torch.Generator().manual_seed(n)
    x_T = torch.randn(shape, generator=gen, dtype=torch.float64)
    noises = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in steps] if spec.sde else None
    noise_fn = (lambda t, _shape: noises[steps.index(t)]) if spec.sde else None
    ours = reference.solver_sample(toy_model, _schedule_of(scheduler), x_T, spec, n, noise_fn=noise_fn,
                                   trajectory=True)
    theirs = _diffusers_path(scheduler, x_T, noises)
    assert len(ours) == len(theirs) == len(steps)  # n, but for trailing spacing with lambda_min_clipped
    if spec.name == "unipc" and spec.solver_type == "bh1" and not torch.isfinite(theirs[-1]).all():
        # diffusers 0.42's bh1 ends in NaN with final sigma zero: B(h) = -h = -inf times a zero residual
        # (order 1 has no differences). The limit is the last x0 prediction, which our last step returns.
        ours, theirs = ours[:-1], theirs[:-1]
    worst = 0.0
    for a, b in zip(ours, theirs):
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        worst = max(worst, float((a - b).abs().max() / b.abs().max()))
    return worst


DPM = diffusers.DPMSolverMultistepScheduler
UNIPC = diffusers.UniPCMultistepScheduler


@pytest.mark.parametrize("n", [5, 12, 16])  # 12: lower_order_second applies (< 15 steps); 16: it does not
@pytest.mark.parametrize("order,solver_type,sde", list(itertools.product([1, 2, 3], ["midpoint", "heun"],
                                                                         [False, True])))
def test_dpmpp_matches_diffusers_step_by_step(n, order, solver_type, sde):
    config = dict(solver_order=order, solver_type=solver_type)
    if sde:
        config["algorithm_type"] = "sde-dpmsolver++"
    spec = solver_spec("dpmpp-2m-sde" if sde else "dpmpp-2m", order=order, solver_type=solver_type)
    assert _compare(DPM, config, spec, n) < BOUND


@pytest.mark.parametrize("n", [5, 12])
@pytest.mark.parametrize("order,solver_type,corrector", list(itertools.product([1, 2, 3], ["bh1", "bh2"],
                                                                               [True, False])))
def test_unipc_matches_diffusers_step_by_step(n, order, solver_type, corrector):
    config = dict(solver_order=order, solver_type=solver_type, disable_corrector=[] if corrector else list(range(n)))
    spec = solver_spec("unipc", order=order, solver_type=solver_type, corrector=corrector)
    assert _compare(UNIPC, config, spec, n) < BOUND


@pytest.mark.parametrize("spacing,offset", [("linspace", 0), ("leading", 1), ("trailing", 0)])
@pytest.mark.parametrize("cls,name", [(DPM, "dpmpp-3m"), (UNIPC, "unipc")])
def test_timestep_spacings_match_diffusers(cls, name, spacing, offset):
    config = dict(solver_order=3, timestep_spacing=spacing, steps_offset=offset)
    spec = solver_spec(name, order=3, timestep_spacing=spacing, steps_offset=offset)
    assert _compare(cls, config, spec, 7, shape=(1, 1, 3, 3)) < BOUND


@pytest.mark.parametrize("clip", [-5.1, -4.0, -2.5])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("beta_schedule", ["squaredcos_cap_v2", "linear"])
def test_lambda_min_clipped_matches_diffusers(clip, spacing, beta_schedule):
    """DPMSolverMultistepScheduler(lambda_min_clipped=...): the same shortened range of timesteps and the
    same path, on the cosine schedule (where diffusers recommends it) and the linear one."""
    config = dict(lambda_min_clipped=clip, timestep_spacing=spacing, beta_schedule=beta_schedule)
    spec = solver_spec("dpmpp-2m", lambda_min_clipped=clip, timestep_spacing=spacing)
    assert _compare(DPM, config, spec, 10, shape=(1, 2, 3, 3)) < BOUND
    scheduler = DPM(**config)
    scheduler.set_timesteps(10)
    # where the range ends: T minus the count of diffusers' own lambdas below the clip
    below = int(torch.searchsorted(torch.flip(scheduler.lambda_t, [0]), torch.tensor(clip)))
    assert clipped_last_timestep(_schedule_of(scheduler), clip) == 1000 - below
    assert below > 0 or beta_schedule == "linear"  # the linear schedule's lowest lambda is -5.06


@pytest.mark.parametrize("k", [0, 1, 68, 500, 937, 990, 998])
def test_a_clip_exactly_at_a_timesteps_lambda_ends_where_diffusers_does(k):
    """The clip equal to one timestep's float32 lambda: the range ends exactly where diffusers' does (its
    alpha-bar is a float32 cumulative product; a float64 one ends a step early for most such clips)."""
    scheduler = DPM(beta_schedule="squaredcos_cap_v2")
    clip = float(scheduler.lambda_t[k])
    config = dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=clip)
    scheduler = DPM(**config)
    scheduler.set_timesteps(5)
    spec = solver_spec("dpmpp-2m", lambda_min_clipped=clip)
    ours = spec_timesteps(NoiseSchedule.cosine(1000), 5, spec) if k >= 5 else None
    if ours is not None:
        assert ours == [int(t) for t in scheduler.timesteps]
    assert clipped_last_timestep(NoiseSchedule.cosine(1000), clip) == k + 1


def test_a_clip_that_leaves_too_few_timesteps_says_so():
    last = clipped_last_timestep(NoiseSchedule.cosine(1000), 3.0)
    assert 0 < last < 50
    with pytest.raises(ValueError, match=rf"in 0\.\.{last - 1} \(where lambda_min_clipped ends the range\).*lower"):
        spec_timesteps(NoiseSchedule.cosine(1000), 50, solver_spec("dpmpp-2m", lambda_min_clipped=3.0))


def test_lambda_min_clipped_counts_the_timesteps_below_it():
    schedule = NoiseSchedule.cosine(1000)
    ab = schedule.alphas_cumprod
    lam = 0.5 * (ab.log() - (1 - ab).log())
    for clip in (-5.1, -4.0, 0.0, 3.0):
        # every timestep at or after the returned end has lambda below the clip, none before it
        last = clipped_last_timestep(schedule, clip)
        assert (lam[last:] < clip).all() and (lam[:last] >= clip).all()
    assert clipped_last_timestep(schedule, float("-inf")) == 1000
    with pytest.raises(ValueError, match="above every timestep"):
        clipped_last_timestep(schedule, 100.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "x", True])
def test_lambda_min_clipped_is_checked(bad):
    with pytest.raises(ValueError, match="lambda_min_clipped must be"):
        solver_spec("dpmpp-2m", lambda_min_clipped=bad)


@pytest.mark.parametrize("name", ["unipc", "ddim", "ddpm"])
def test_lambda_min_clipped_is_dpmpp_only(name):
    with pytest.raises(ValueError, match="applies to the DPM-Solver\\+\\+ solvers"):
        solver_spec(name, lambda_min_clipped=-5.1)
    assert solver_spec("dpmpp-3m", lambda_min_clipped=-5).as_dict()["lambda_min_clipped"] == -5.0
    assert "lambda_min_clipped" not in solver_spec("dpmpp-3m").as_dict()


def test_other_options_match_diffusers():
    assert _compare(DPM, dict(solver_order=3, lower_order_final=False), solver_spec("dpmpp-3m", lower_order_final=False), 8) < BOUND
    assert _compare(UNIPC, dict(disable_corrector=[1, 3]), solver_spec("unipc", disable_corrector=[1, 3]), 8) < BOUND


def test_defaults_are_diffusers_defaults():
    """dpmpp-2m = DPMSolverMultistepScheduler(), unipc = UniPCMultistepScheduler() (bh2 with its corrector)."""
    assert _compare(DPM, {}, solver_spec("dpmpp-2m"), 20, shape=(1, 2, 4, 4)) < BOUND
    assert _compare(DPM, dict(solver_order=3), solver_spec("dpmpp-3m"), 20, shape=(1, 2, 4, 4)) < BOUND
    assert _compare(DPM, dict(algorithm_type="sde-dpmsolver++"), solver_spec("dpmpp-2m-sde"), 20, shape=(1, 2, 4, 4)) < BOUND
    assert _compare(UNIPC, {}, solver_spec("unipc"), 20, shape=(1, 2, 4, 4)) < BOUND


# -- the tables: one row per step, the same mathematics as the oracle -----------------------------------
def _table_path(schedule, spec, steps, x_T, noise_fn=None):
    """Apply the table's rows with plain float64 tensor arithmetic (the layout documented in solvers.py)."""
    table = solver_table(schedule, steps, spec)
    x, last = x_T.clone(), torch.zeros_like(x_T)
    hist = [torch.full_like(x_T, 0.0) for _ in range(3)]
    path = []
    for k, t in enumerate(steps):
        r = table[k].tolist()
        eps = toy_model(x, torch.full((x.shape[0],), t))
        m = x * r[1] - eps * r[2]
        xc = r[K_X] * x + r[K_LAST] * last + r[K_M] * m + sum(r[K_H[j]] * hist[j] for j in range(3))
        last = xc
        x = r[3] * m + r[4] * xc + r[5] * eps + sum(r[C_H[j]] * hist[j] for j in range(3))
        if r[6]:
            x = x + r[6] * noise_fn(t, x.shape)
        hist = [m, hist[0], hist[1]]
        path.append(x)
    return path


@pytest.mark.parametrize("name,order,solver_type", [("dpmpp-2m", 2, "midpoint"), ("dpmpp-2m", 2, "heun"),
                                                    ("dpmpp-3m", 3, "midpoint"), ("dpmpp-2m-sde", 2, "midpoint"),
                                                    ("dpmpp-2m-sde", 3, "heun"), ("unipc", 2, "bh2"),
                                                    ("unipc", 3, "bh1"), ("unipc", 1, "bh2")])
def test_table_rows_equal_the_oracle(name, order, solver_type):
    schedule = NoiseSchedule.linear(1000)
    spec = solver_spec(name, order=order, solver_type=solver_type)
    steps = solver_timesteps(1000, 9, "linspace")
    gen = torch.Generator().manual_seed(3)
    x_T = torch.randn(2, 2, 3, 5, generator=gen, dtype=torch.float64)
    noises = {t: torch.randn(x_T.shape, generator=gen, dtype=torch.float64) for t in steps}
    noise_fn = lambda t, _shape: noises[t]  # noqa: E731
    ours = _table_path(schedule, spec, steps, x_T, noise_fn)
    oracle = reference.solver_sample(toy_model, schedule, x_T, spec, steps, noise_fn=noise_fn, trajectory=True)
    for a, b in zip(ours, oracle):
        assert torch.isfinite(a).all()
        # float64 both ways, different summation order: rounding of ~1e-16 amplified by at most 1/alpha ~ 157
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_lower_orders_are_rows():
    """Warm-up and final steps: the history columns of the first rows and the last row are zero."""
    schedule = NoiseSchedule.linear(1000)
    spec = solver_spec("dpmpp-3m")
    steps = solver_timesteps(1000, 10)
    table = solver_table(schedule, steps, spec)
    assert solver_orders(spec, 10)[0] == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]
    assert table[0, C_H[0]] == 0 and table[0, C_H[1]] == 0
    assert table[1, C_H[0]] != 0 and table[1, C_H[1]] == 0
    assert table[2, C_H[1]] != 0
    assert table[-1, C_H[0]] == 0 and table[-1, 4] == 0 and table[-1, 3] == 1  # x_0 = the last x0 prediction
    unipc = solver_table(schedule, steps, solver_spec("unipc"))
    assert unipc[0, K_X] == 1 and unipc[0, K_LAST] == 0  # no corrector before the first model output
    assert unipc[1, K_X] == 0 and unipc[1, K_LAST] != 0 and unipc[1, K_M] != 0
    assert torch.isfinite(table).all() and torch.isfinite(unipc).all()


def test_bad_options_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown solver"):
        solver_spec("euler")
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        solver_spec("dpmpp-2m", order=4)
    with pytest.raises(ValueError, match="solver_type 'bh2' does not fit dpmpp-2m"):
        solver_spec("dpmpp-2m", solver_type="bh2")
    with pytest.raises(ValueError, match="timestep_spacing"):
        solver_spec("unipc", timestep_spacing="karras")
    with pytest.raises(ValueError, match="corrector options apply to the 'unipc'"):
        solver_spec("dpmpp-2m", corrector=False)
    with pytest.raises(ValueError, match="lower_order_final=True"):
        solver_spec("unipc", lower_order_final=False)
    with pytest.raises(ValueError, match="eta applies to the 'ddim' solver only"):
        solver_spec("dpmpp-2m", eta=0.5)
    with pytest.raises(ValueError, match="distinct"):
        solver_timesteps(10, 10, "leading")
    assert set(MULTISTEP_SOLVERS) <= {"dpmpp-2m", "dpmpp-3m", "dpmpp-2m-sde", "unipc"}


def test_unipc_bh1_final_step_is_the_x0_limit():
    """bh1's final step (order 1 to sigma 0) returns the last x0 prediction, finite, where diffusers 0.42
    computes -inf * 0."""
    schedule = NoiseSchedule.linear(1000)
    x_T = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    path = reference.solver_sample(toy_model, schedule, x_T, solver_spec("unipc", solver_type="bh1"), 5, trajectory=True)
    t_last = solver_timesteps(1000, 5)[-1]
    ab = schedule.alphas_cumprod[t_last]
    eps = toy_model(path[-2], torch.full((1,), t_last))
    x0 = (path[-2] - (1 - ab).sqrt() * eps) / ab.sqrt()
    # the corrector moved path[-2] before the last prediction; with it off the last step is exactly x0
    no_corr = reference.solver_sample(toy_model, schedule, x_T, solver_spec("unipc", solver_type="bh1", corrector=False), 5,
                                      trajectory=True)
    eps = toy_model(no_corr[-2], torch.full((1,), t_last))
    torch.testing.assert_close(no_corr[-1], (no_corr[-2] - (1 - ab).sqrt() * eps) / ab.sqrt(), rtol=1e-12, atol=1e-12)
    assert torch.isfinite(path[-1]).all() and torch.isfinite(x0).all()
