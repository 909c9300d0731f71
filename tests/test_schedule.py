"""NoiseSchedule: tables against their closed forms in float64, and against diffusers' schedules."""

import math

import pytest
import torch

from ddpm_fast import NoiseSchedule


@pytest.mark.parametrize("T", [1, 2, 10, 1000])
def test_linear_tables_match_closed_forms(T):
    s = NoiseSchedule.linear(T, 1e-4, 0.02)
    assert s.betas.dtype == torch.float64 and s.betas.device.type == "cpu" and s.betas.shape == (T,)
    for i in range(T):
        beta = 1e-4 + (0.02 - 1e-4) * i / (T - 1) if T > 1 else 1e-4
        assert s.betas[i].item() == pytest.approx(beta, rel=1e-13)
    expected_ab = 1.0
    for i in range(T):
        expected_ab *= 1.0 - s.betas[i].item()
        assert s.alphas[i].item() == 1.0 - s.betas[i].item()
        assert s.alphas_cumprod[i].item() == pytest.approx(expected_ab, rel=1e-12)
    assert s.alphas_cumprod_prev[0].item() == 1.0
    torch.testing.assert_close(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1], rtol=0, atol=0)


def test_linear_defaults_are_hos():
    s = NoiseSchedule.linear()
    assert s.num_timesteps == 1000
    assert s.betas[0].item() == 1e-4 and s.betas[-1].item() == pytest.approx(0.02, rel=1e-15)
    # Ho et al. / diffusers: alpha-bar at the last step is about 4.04e-5
    assert s.alphas_cumprod[-1].item() == pytest.approx(4.0358e-5, rel=1e-3)


def test_posterior_variance_closed_form():
    s = NoiseSchedule.linear(50)
    ab, ab_prev, beta = s.alphas_cumprod, s.alphas_cumprod_prev, s.betas
    torch.testing.assert_close(s.posterior_variance, beta * (1 - ab_prev) / (1 - ab), rtol=1e-14, atol=0)
    assert s.posterior_variance[0].item() == 0.0
    assert (s.posterior_variance[1:] < beta[1:]).all()


def test_cosine_matches_improved_diffusion_formula():
    T = 1000
    s = NoiseSchedule.cosine(T)

    def f(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    for i in (0, 1, 500, 998, 999):
        assert s.betas[i].item() == pytest.approx(min(1 - f((i + 1) / T) / f(i / T), 0.999), rel=1e-12)
    assert s.betas.max().item() == pytest.approx(0.999)  # the cap binds at the very end


def test_cosine_matches_diffusers_squaredcos_cap_v2():
    from diffusers import DDPMScheduler

    ours = NoiseSchedule.cosine(1000)
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    # diffusers builds the same formula in float64 and stores float32: agreement to float32 rounding
    torch.testing.assert_close(ours.betas.float(), theirs.betas, rtol=1e-6, atol=1e-9)


def test_linear_matches_diffusers_within_float32():
    from diffusers import DDPMScheduler

    ours = NoiseSchedule.linear()
    theirs = DDPMScheduler(num_train_timesteps=1000)
    # diffusers: torch.linspace and cumprod in float32; ours float64. Each beta differs by float32
    # linspace rounding, at most one float32 ulp of 0.02 (0.02 * 2^-23 = 2.4e-9); the 1000-term cumprod
    # accumulates at most ~1000 * 2^-24 relative (measured: 3.6e-7).
    assert (ours.betas - theirs.betas.double()).abs().max().item() < 0.02 * 2**-23
    rel = ((ours.alphas_cumprod - theirs.alphas_cumprod.double()) / ours.alphas_cumprod).abs().max().item()
    assert rel < 1000 * 2**-24


def test_respaced_keeps_alpha_bar_at_listed_steps():
    s = NoiseSchedule.linear()
    steps = [999, 749, 500, 250, 3, 0]
    r = s.respaced(steps)
    assert r.num_timesteps == len(steps)
    torch.testing.assert_close(r.alphas_cumprod, s.alphas_cumprod[sorted(steps)], rtol=1e-12, atol=0)
    # beta' between consecutive listed steps = 1 - ab_t / ab_prev
    assert r.betas[2].item() == pytest.approx(1 - s.alphas_cumprod[250].item() / s.alphas_cumprod[3].item())


def test_device_tables_are_float32_and_cached():
    s = NoiseSchedule.linear(100)
    tables = s.on("cpu")
    assert tables is s.on("cpu")
    assert tables.alphas_cumprod.dtype == torch.float32
    torch.testing.assert_close(tables.sqrt_alphas_cumprod, s.alphas_cumprod.sqrt().float())


def test_config_round_trip():
    for s in (NoiseSchedule.linear(200, 2e-4, 0.03), NoiseSchedule.cosine(300), NoiseSchedule.from_betas([0.1, 0.2])):
        back = NoiseSchedule.from_config(s.to_config())
        torch.testing.assert_close(back.betas, s.betas, rtol=1e-15, atol=0)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: NoiseSchedule.linear(0), "num_timesteps"),
        (lambda: NoiseSchedule.linear(-5), "num_timesteps"),
        (lambda: NoiseSchedule.linear(10.5), "num_timesteps"),
        (lambda: NoiseSchedule.linear(10, 0.0, 0.02), "beta_start"),
        (lambda: NoiseSchedule.linear(10, 1e-4, 1.0), "beta_end"),
        (lambda: NoiseSchedule.cosine(0), "num_timesteps"),
        (lambda: NoiseSchedule.from_betas([0.1, 1.2]), "beta"),
        (lambda: NoiseSchedule.from_betas([0.1, -0.1]), "beta"),
        (lambda: NoiseSchedule.from_betas([]), "num_timesteps"),
        (lambda: NoiseSchedule.from_betas([[0.1]]), "1-D"),
        (lambda: NoiseSchedule.from_config({"name": "sigmoid"}), "unknown schedule"),
    ],
)
def test_invalid_parameters_raise_naming_them(build, match):
    with pytest.raises(ValueError, match=match):
        build()
