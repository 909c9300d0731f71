"""The oracle against diffusers' DDPMScheduler, against published values, and against its own identities."""

import pytest
import torch

from ddpm_fast import NoiseSchedule
from ddpm_fast import reference as R

diffusers = pytest.importorskip("diffusers")

SHAPE = (4, 3, 8, 8)


def _z(seed, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _diffusers_scheduler(variance, clip, num_inference_steps=None):
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, variance_type=variance, clip_sample=clip)
    if num_inference_steps is not None:
        sched.set_timesteps(num_inference_steps)
    return sched


# Where float32 (diffusers) and float64 (ours) differ: diffusers builds betas with a float32 linspace and
# alpha-bar with a float32 cumprod (<= 3.6e-7 relative apart from ours, see test_schedule), then runs the
# step in float32. Its coefficients divide by 1 - ab_t, which float32 forms by cancellation: ab_t is known
# to one ulp (2^-24), so 1 - ab_t carries a relative error of about 2^-24 / (1 - ab_t) -- 2.7e-4 at t = 1,
# where 1 - ab_t = 2.2e-4. Those coefficients multiply x_t (|x_t| up to ~6 here), so the two steps may
# differ by |x_t| * 2^-24 / (1 - ab_t), plus a few float32 ulps of the result. Measured worst cases:
# 4.6e-4 at t = 2 against a bound of 1.0e-3; 3e-7 at t = 999 against 4.4e-6.
def step_atol(x: torch.Tensor, ab_t: float) -> float:
    return 4e-6 + x.abs().max().item() * 2**-24 / (1.0 - ab_t)


STEP_ATOL = 2e-5  # for steps whose 1 - ab_t is not small (the 50-step and 25-step lists below)


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
@pytest.mark.parametrize("clip", [False, True])
def test_reverse_step_matches_diffusers_step_all_1000_steps(variance, clip):
    schedule = NoiseSchedule.linear()
    sched = _diffusers_scheduler(variance, clip)
    gen = torch.Generator().manual_seed(1234)
    for t in range(999, -1, -1):
        x = torch.randn(SHAPE, generator=gen) * 1.5
        eps = torch.randn(SHAPE, generator=gen)
        theirs = sched.step(eps, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        ours = R.reverse_step(x.double(), t, eps.double(), schedule, _z(t).double(), variance=variance, clip_x0=clip)
        assert torch.isfinite(ours).all()
        atol = step_atol(x, schedule.alphas_cumprod[t].item())
        assert (ours - theirs.double()).abs().max().item() < atol, f"t={t}"


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
@pytest.mark.parametrize("clip", [False, True])
def test_respaced_reverse_step_matches_diffusers_set_timesteps(variance, clip):
    schedule = NoiseSchedule.linear()
    sched = _diffusers_scheduler(variance, clip, num_inference_steps=50)
    steps = sched.timesteps.tolist()
    assert steps[:3] == [980, 960, 940] and steps[-1] == 0
    respaced = schedule.respaced(steps)
    gen = torch.Generator().manual_seed(99)
    for k, t in enumerate(steps):
        x = torch.randn(SHAPE, generator=gen)
        eps = torch.randn(SHAPE, generator=gen)
        theirs = sched.step(eps, t, x, generator=torch.Generator().manual_seed(k)).prev_sample
        j = len(steps) - 1 - k
        ours = R.reverse_step(x.double(), j, eps.double(), respaced, _z(k).double(), variance=variance, clip_x0=clip)
        torch.testing.assert_close(ours, theirs.double(), rtol=0, atol=STEP_ATOL)


def _known_value_model(x, t):
    """diffusers' test model: model(x, t) = x * t / (t + 1)."""
    t = t if isinstance(t, int) else t.view(-1, 1, 1, 1).to(x.dtype)
    return x * t / (t + 1)


def _known_value_sample():
    return (torch.arange(768, dtype=torch.float32).reshape(3, 8, 8, 4) / 768).permute(3, 0, 1, 2)


def test_diffusers_published_full_loop_value():
    """tests/schedulers/test_scheduler_ddpm.py: full 1000-step loop gives sum|x| = 258.9606, mean 0.3372."""
    schedule = NoiseSchedule.linear()
    generator = torch.manual_seed(0)
    x = _known_value_sample().double()
    for t in range(999, -1, -1):
        eps = _known_value_model(x, t)
        z = torch.randn(x.shape, generator=generator).double() if t > 0 else None  # diffusers: noise only for t > 0
        x = R.reverse_step(x, t, eps, schedule, z, variance="fixed_small", clip_x0=True)
    assert x.abs().sum().item() == pytest.approx(258.9606, abs=1e-2)
    assert x.abs().mean().item() == pytest.approx(0.3372, abs=1e-3)


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("num_steps", [1000, 20])
def test_sample_matches_a_diffusers_scheduler_loop(variance, clip, num_steps):
    """reference.sample draws its noise in DDPMPipeline's order, so the same generator gives the same run."""
    schedule = NoiseSchedule.linear()
    sched = _diffusers_scheduler(variance, clip)
    sched.set_timesteps(num_steps)
    shape = (2, 3, 4, 4)

    g = torch.manual_seed(7)
    x = torch.randn(shape, generator=g)
    for t in sched.timesteps:
        x = sched.step(_known_value_model(x, int(t)), t, x, generator=g).prev_sample

    # float32 like DDPMPipeline (torch.randn draws a different stream for float64)
    ours = R.sample(_known_value_model, schedule, shape, generator=torch.manual_seed(7), variance=variance,
                    clip_x0=clip, timesteps=num_steps)
    assert torch.isfinite(ours).all()
    # Both loops run in float32; their coefficients are rounded from float64 (ours) and float32 (diffusers)
    # tables, and the small-t steps amplify that (see step_atol). Measured worst over the trajectory:
    # 1.7e-4 (20 steps, clipped), 4e-5 (1000 steps); |x| ~ 1.
    torch.testing.assert_close(ours, x, rtol=0, atol=5e-4)


def test_sample_noise_fn_and_ddim_eta0_is_deterministic():
    schedule = NoiseSchedule.linear(100)
    shape = (2, 1, 4, 4)
    calls = []

    def noise_fn(step, shp):
        calls.append(step)
        return torch.randn(shp, generator=torch.Generator().manual_seed(step))

    R.sample(_known_value_model, schedule, shape, noise_fn=noise_fn, timesteps=[99, 50, 10, 0])
    assert calls == [100, 99, 50, 10]  # x_T at noise step T, then one z after each step but the last
    a = R.sample(_known_value_model, schedule, shape, generator=torch.manual_seed(1), timesteps=10, eta=0.0)
    b = R.sample(_known_value_model, schedule, shape, generator=torch.manual_seed(2), timesteps=10, eta=0.0)
    assert not torch.equal(a, b)  # x_T differs; but eta=0 adds no noise after it:
    c = R.sample(_known_value_model, schedule, shape, noise_fn=lambda s, shp: torch.zeros(shp) if s < 100 else
                 torch.randn(shp, generator=torch.Generator().manual_seed(1)), timesteps=10, eta=0.0)
    d = R.sample(_known_value_model, schedule, shape, noise_fn=lambda s, shp: torch.ones(shp) if s < 100 else
                 torch.randn(shp, generator=torch.Generator().manual_seed(1)), timesteps=10, eta=0.0)
    torch.testing.assert_close(c, d, rtol=0, atol=0)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_matches_diffusers_ddim(clip, eta):
    schedule = NoiseSchedule.linear()
    # set_alpha_to_one: the last step goes to ab_prev = 1, as ours does below t = 0
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=clip, set_alpha_to_one=True,
                                    timestep_spacing="leading", steps_offset=0)
    sched.set_timesteps(25)
    steps = sched.timesteps.tolist()
    respaced = schedule.respaced(steps)
    gen = torch.Generator().manual_seed(5)
    for k, t in enumerate(steps):
        x = torch.randn(SHAPE, generator=gen)
        eps = torch.randn(SHAPE, generator=gen)
        z = torch.randn(SHAPE, generator=gen)
        theirs = sched.step(eps, t, x, eta=eta, variance_noise=z, use_clipped_model_output=clip).prev_sample
        ours = R.ddim_step(x.double(), len(steps) - 1 - k, eps.double(), respaced, z.double(), eta=eta, clip_x0=clip)
        torch.testing.assert_close(ours, theirs.double(), rtol=0, atol=STEP_ATOL)


def test_ddim_eta1_with_clip_equals_clipped_ddpm_step():
    """ANCHORS section 2: eta = 1 with the clipped eps recomputed matches DDPM (fixed_small variance)."""
    schedule = NoiseSchedule.linear(1000)
    x, eps, z = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    for t in (999, 500, 1):
        a = R.ddim_step(x, t, eps, schedule, z, eta=1.0, clip_x0=True)
        b = R.reverse_step(x, t, eps, schedule, z, variance="fixed_small", clip_x0=True)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# --- identities --------------------------------------------------------------------------------------


def test_q_sample_mean_and_variance():
    schedule = NoiseSchedule.linear()
    n = 200_000
    x0 = torch.full((n, 1, 1, 1), 0.7, dtype=torch.float64)
    for t in (0, 250, 999):
        noise = torch.randn(x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(t))
        x_t = R.q_sample(x0, t, noise, schedule)
        ab = schedule.alphas_cumprod[t].item()
        # sample mean within 5 standard errors, sample variance within 5 standard errors (sd of s^2 ~ sqrt(2/n) var)
        assert abs(x_t.mean().item() - ab**0.5 * 0.7) < 5 * ((1 - ab) / n) ** 0.5
        assert abs(x_t.var().item() - (1 - ab)) < 5 * (2 / n) ** 0.5 * (1 - ab)


def test_predict_x0_inverts_q_sample():
    schedule = NoiseSchedule.cosine(1000)
    x0 = torch.rand(SHAPE, dtype=torch.float64) * 2 - 1
    eps = torch.randn(SHAPE, dtype=torch.float64)
    t = torch.tensor([0, 1, 500, 999])
    back = R.predict_x0(R.q_sample(x0, t, eps, schedule), t, eps, schedule)
    torch.testing.assert_close(back, x0, rtol=0, atol=1e-9)


@pytest.mark.parametrize("clip", [False, True])
def test_reverse_step_with_true_noise_returns_posterior_mean(clip):
    schedule = NoiseSchedule.linear()
    x0 = torch.rand(SHAPE, dtype=torch.float64) * 2 - 1  # inside [-1, 1], so clipping changes nothing
    eps = torch.randn(SHAPE, dtype=torch.float64)
    t = torch.tensor([1, 10, 400, 999])
    x_t = R.q_sample(x0, t, eps, schedule)
    ab = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    ab_prev = schedule.alphas_cumprod_prev[t].view(-1, 1, 1, 1)
    beta = schedule.betas[t].view(-1, 1, 1, 1)
    posterior_mean = ab_prev.sqrt() * beta / (1 - ab) * x0 + (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab) * x_t
    got = R.reverse_step(x_t, t, eps, schedule, None, clip_x0=clip)
    torch.testing.assert_close(got, posterior_mean, rtol=0, atol=1e-9)


def test_no_noise_at_t0_per_sample():
    schedule = NoiseSchedule.linear()
    x, eps = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    z = torch.randn(SHAPE, dtype=torch.float64)
    t = torch.tensor([0, 5, 0, 999])
    with_noise = R.reverse_step(x, t, eps, schedule, z)
    without = R.reverse_step(x, t, eps, schedule, None)
    torch.testing.assert_close(with_noise[[0, 2]], without[[0, 2]], rtol=0, atol=0)
    assert (with_noise[[1, 3]] - without[[1, 3]]).abs().min() > 0


def test_training_loss_draws_t_and_eps_from_the_generator():
    schedule = NoiseSchedule.linear()
    x0 = torch.rand(SHAPE) * 2 - 1
    seen = {}

    def model(x_t, t):
        seen["x_t"], seen["t"] = x_t, t
        return torch.zeros_like(x_t)

    loss = R.training_loss(model, x0, schedule, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (SHAPE[0],), generator=g)
    eps = torch.randn(SHAPE, generator=g)
    assert torch.equal(seen["t"], t)
    torch.testing.assert_close(seen["x_t"], R.q_sample(x0, t, eps, schedule))
    torch.testing.assert_close(loss, (eps**2).mean())
    assert loss.ndim == 0


def test_min_snr_loss_weights_known_values():
    """Hang et al.'s min(SNR, gamma) / SNR on Ho's linear schedule, by hand: SNR_0 = (1 - 1e-4) / 1e-4."""
    schedule = NoiseSchedule.linear()
    w = schedule.min_snr_weights(5.0)
    assert w.dtype == torch.float64 and w.shape == (1000,)
    torch.testing.assert_close(w[0], torch.tensor(5.0 / 9999.0, dtype=torch.float64), rtol=1e-12, atol=0)
    snr = schedule.snr
    assert (w[snr <= 5] == 1).all() and (w[snr > 5] < 1).all() and (snr > 5).any() and (snr <= 5).any()
    # the crossing point: SNR falls through 5 once (ab = 5/6), between t = 35 and 36 for this schedule
    ab = schedule.alphas_cumprod
    first = int((snr <= 5).nonzero()[0])
    assert ab[first] <= 5 / 6 < ab[first - 1]


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_min_snr_gamma_must_be_positive(bad):
    with pytest.raises(ValueError, match="gamma must be"):
        NoiseSchedule.linear().min_snr_weights(bad)
    if bad == bad and bad != float("inf"):  # the oracle refuses what would weight by 0 or below
        with pytest.raises(ValueError, match="snr_gamma must be > 0"):
            R.training_loss(lambda x, t: x, torch.zeros(1, 1, 2, 2), NoiseSchedule.linear(), snr_gamma=bad)


def test_training_loss_with_min_snr_weights_each_image():
    schedule = NoiseSchedule.linear()
    x0 = torch.rand(SHAPE, dtype=torch.float64) * 2 - 1

    def model(x_t, t):
        return 0.5 * x_t  # any eps model; its error differs per image

    loss = R.training_loss(model, x0, schedule, generator=torch.Generator().manual_seed(4), snr_gamma=5.0)
    g = torch.Generator().manual_seed(4)
    t = torch.randint(0, 1000, (SHAPE[0],), generator=g)
    eps = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    err = ((0.5 * R.q_sample(x0, t, eps, schedule) - eps) ** 2).mean(dim=(1, 2, 3))
    ab = schedule.alphas_cumprod[t]
    snr = ab / (1 - ab)
    torch.testing.assert_close(loss, (err * torch.clamp(snr, max=5.0) / snr).mean())
    # a gamma above every SNR weights nothing: Ho's loss
    huge = R.training_loss(model, x0, schedule, generator=torch.Generator().manual_seed(4), snr_gamma=1e9)
    plain = R.training_loss(model, x0, schedule, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(huge.double(), plain.double())


# --- bad input ---------------------------------------------------------------------------------------

S = NoiseSchedule.linear(10)
X = torch.randn(2, 3, 4, 4)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: R.q_sample(torch.randn(3, 4, 4), 1, torch.randn(3, 4, 4), S), ValueError, "4-D"),
        (lambda: R.q_sample(X, 1, torch.randn(2, 3, 4, 5), S), ValueError, "noise must have the shape"),
        (lambda: R.q_sample(X.long(), 1, X, S), TypeError, "floating-point"),
        (lambda: R.q_sample(X, 10, X, S), ValueError, "t=10 is out of range"),
        (lambda: R.q_sample(X, -1, X, S), ValueError, "out of range"),
        (lambda: R.q_sample(X, torch.tensor([1, 2, 3]), X, S), ValueError, "one entry per sample"),
        (lambda: R.q_sample(X, torch.tensor([1.0, 2.0]), X, S), TypeError, "integer"),
        (lambda: R.predict_x0(X, 1, X[:1], S), ValueError, "eps must have the shape"),
        (lambda: R.reverse_step(X, 1, X, S, X, variance="learned"), ValueError, "unknown variance"),
        (lambda: R.reverse_step(X, 1, X, S, X[:, :2]), ValueError, "noise must have the shape"),
        (lambda: R.ddim_step(X, 1, X, S, None, eta=-1.0), ValueError, "eta"),
        (lambda: R.sample(_known_value_model, S, (2, 3, 4), timesteps=3), ValueError, "shape"),
        (lambda: R.sample(_known_value_model, S, (2, 3, 4, 4), timesteps=[3, 5]), ValueError, "descending"),
        (lambda: R.sample(_known_value_model, S, (2, 3, 4, 4), timesteps=11), ValueError, "timesteps=11"),
    ],
)
def test_bad_input_names_the_problem(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
