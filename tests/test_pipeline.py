"""FastDDPMPipeline against diffusers' DDPMPipeline: same generator, same images (fp32 on the CPU).

Small random UNet2DModels (8x8), few steps; both variance types, clipping on and off (and a range other
than 1), every timestep spacing, a saved folder, the U-Net converted to ours or used as is.
"""

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

from ddpm_fast import FastSampler  # noqa: E402
from ddpm_fast.errors import CheckpointError  # noqa: E402
from ddpm_fast.pipeline import FastDDPMPipeline, inference_timesteps, scheduler_settings  # noqa: E402
from ddpm_fast.unet import UNet  # noqa: E402
from tolerances import assert_within, rounding_response  # noqa: E402


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_unet2d(seed=0, channels=3, downsample_padding=0) -> UNet2DModel:
    """A DDPM-family UNet2DModel (convertible to ours when downsample_padding=0), 8x8, attention at 4x4."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=channels, out_channels=channels, block_out_channels=(16, 32),
        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, norm_eps=1e-6,
        downsample_padding=downsample_padding, flip_sin_to_cos=False, freq_shift=1, attention_head_dim=None,
    ).eval()


def diffusers_pipeline(unet, **scheduler_config) -> DDPMPipeline:
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_both(pipe, fast, steps, batch_size=2, seed=3, output_type="np"):
    ref = pipe(batch_size=batch_size, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
               output_type=output_type).images
    out = fast(batch_size=batch_size, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
               output_type=output_type).images
    return out, ref


def diffusers_bound(fast, steps, batch_size=2, generator=lambda: torch.Generator().manual_seed(3)):
    """How far our images may lie from DDPMPipeline's (tolerances.rounding_response, one sign: first
    order): both U-Nets' float32 rounding (ours channels-last, the time table: other sum orders) and both
    updates'. Ours: the float32 table update, gamma_8 S. Diffusers': the same terms with coefficients
    from its float32 cumprod of 1 - beta, up to gamma_{T+8} S: together 1 + (T + 8) / 8 times ours."""
    T = fast.settings.schedule.num_timesteps

    def run():
        return torch.from_numpy(fast(batch_size=batch_size, generator=generator(), num_inference_steps=steps,
                                     output_type="np").images)

    return rounding_response(run, fast.sampler.model, sides=2, signs=(1.0,), update_sides=1 + (T + 8) / 8)


@pytest.fixture(scope="module")
def unet2d():
    return tiny_unet2d()


@pytest.mark.parametrize("scheduler_config", [
    dict(variance_type="fixed_large", clip_sample=True),
    dict(variance_type="fixed_large", clip_sample=False),
    dict(variance_type="fixed_small", clip_sample=True),
    dict(variance_type="fixed_small", clip_sample=False),
    dict(variance_type="fixed_small", clip_sample=True, clip_sample_range=0.5, beta_schedule="squaredcos_cap_v2"),
], ids=["large-clip", "large-noclip", "small-clip", "small-noclip", "small-clip0.5-cosine"])
@pytest.mark.parametrize("convert_unet", [True, False], ids=["our-unet", "their-unet"])
def test_matches_ddpm_pipeline_with_the_same_generator(unet2d, scheduler_config, convert_unet):
    pipe = diffusers_pipeline(unet2d, **scheduler_config)
    fast = FastDDPMPipeline.from_diffusers(pipe, convert_unet=convert_unet)
    assert isinstance(fast.sampler.model, UNet) == convert_unet
    assert fast.sampler.settings["embedding_table"] == convert_unet
    out, ref = run_both(pipe, fast, steps=10)
    assert isinstance(out, np.ndarray) and out.shape == ref.shape == (2, 8, 8, 3) and out.dtype == np.float32
    assert np.isfinite(out).all()
    assert_within(torch.from_numpy(out), torch.from_numpy(ref), diffusers_bound(fast, 10), "vs DDPMPipeline")
    assert ref.std() > 0.05  # not a saturated, trivially equal pair


@pytest.mark.parametrize("scheduler_config", [
    dict(timestep_spacing="trailing", variance_type="fixed_large"),  # last t > 0: diffusers adds noise there
    dict(timestep_spacing="trailing", variance_type="fixed_small", clip_sample=False),
    dict(timestep_spacing="linspace", variance_type="fixed_large"),
    dict(timestep_spacing="leading", steps_offset=1, variance_type="fixed_large"),
])
def test_every_timestep_spacing_matches_ddpm_pipeline(unet2d, scheduler_config):
    pipe = diffusers_pipeline(unet2d, **scheduler_config)
    fast = FastDDPMPipeline.from_diffusers(pipe)
    out, ref = run_both(pipe, fast, steps=7, batch_size=1)
    assert_within(torch.from_numpy(out), torch.from_numpy(ref), diffusers_bound(fast, 7, 1), "vs DDPMPipeline")


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("T,n", [(1000, 1), (1000, 7), (1000, 50), (1000, 333), (1000, 999), (100, 100)])
def test_inference_timesteps_are_diffusers(spacing, steps_offset, T, n):
    if spacing == "leading" and steps_offset and n == T:
        pytest.skip("leading spacing with an offset overflows T at n == T (diffusers fails too)")
    config = dict(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=steps_offset)
    scheduler = DDPMScheduler(**config)
    scheduler.set_timesteps(n)
    assert inference_timesteps(scheduler_settings(scheduler.config), n) == scheduler.timesteps.tolist()


@pytest.mark.parametrize("config", [
    dict(beta_schedule="linear"),
    dict(beta_schedule="linear", beta_start=0.001, beta_end=0.05, num_train_timesteps=200),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="sigmoid"),
    dict(trained_betas=np.linspace(0.001, 0.1, 50).tolist(), num_train_timesteps=50),
])
def test_schedules_match_diffusers(config):
    scheduler = DDPMScheduler(**config)
    schedule = scheduler_settings(scheduler.config).schedule
    assert schedule.num_timesteps == scheduler.config.num_train_timesteps
    torch.testing.assert_close(schedule.betas.float(), scheduler.betas, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(schedule.alphas_cumprod.float(), scheduler.alphas_cumprod, rtol=2e-5, atol=1e-7)


def test_from_pretrained_folder_matches_ddpm_pipeline(tmp_path, unet2d):
    diffusers_pipeline(unet2d, variance_type="fixed_large").save_pretrained(tmp_path)
    pipe = DDPMPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    fast = FastDDPMPipeline.from_pretrained(tmp_path)
    assert isinstance(fast.unet, UNet) and fast.settings.variance == "fixed_large"
    assert fast.device == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fast.to("cpu")
    out, ref = run_both(pipe, fast, steps=6)
    assert_within(torch.from_numpy(out), torch.from_numpy(ref), diffusers_bound(fast, 6), "from_pretrained")
    kept = FastDDPMPipeline.from_pretrained(tmp_path, convert_unet=False, device="cpu")
    assert isinstance(kept.unet, UNet2DModel)
    out2, _ = run_both(pipe, kept, steps=6)
    assert_within(torch.from_numpy(out2), torch.from_numpy(ref), diffusers_bound(kept, 6), "their U-Net")


def test_unconvertible_unet_falls_back_to_diffusers_with_a_warning():
    unet = tiny_unet2d(seed=1, downsample_padding=1)  # outside our UNet's family
    pipe = diffusers_pipeline(unet)
    with pytest.warns(UserWarning, match="downsample_padding"):
        fast = FastDDPMPipeline.from_diffusers(pipe)
    assert fast.unet is unet and not fast.sampler.settings["embedding_table"]
    out, ref = run_both(pipe, fast, steps=5)
    assert_within(torch.from_numpy(out), torch.from_numpy(ref), diffusers_bound(fast, 5), "unconverted")


def test_output_types_and_grayscale_pil():
    unet = tiny_unet2d(seed=2, channels=1)
    pipe = diffusers_pipeline(unet)
    fast = FastDDPMPipeline.from_diffusers(pipe)
    pil, ref_pil = run_both(pipe, fast, steps=4, output_type="pil")
    assert len(pil) == 2 and pil[0].mode == "L" and pil[0].size == (8, 8)
    for a, b in zip(pil, ref_pil):  # rounding to uint8 may flip at most one level
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
    pt = fast(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=4, output_type="pt").images
    assert isinstance(pt, torch.Tensor) and pt.shape == (2, 1, 8, 8) and 0 <= pt.min() and pt.max() <= 1
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), np.asarray(pil, dtype=np.float32)[..., None] / 255,
                               atol=0.5 / 255 + 1e-6)
    (images,) = fast(batch_size=1, num_inference_steps=2, output_type="np", return_dict=False)
    assert images.shape == (1, 8, 8, 1)


def test_rgb_pil_matches(unet2d):
    pipe = diffusers_pipeline(unet2d)
    fast = FastDDPMPipeline.from_diffusers(pipe)
    pil, ref_pil = run_both(pipe, fast, steps=3, output_type="pil")
    assert pil[0].mode == "RGB" and pil[0].size == (8, 8)
    for a, b in zip(pil, ref_pil):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1


def test_without_a_generator_noise_is_seed_keyed(unet2d):
    pipe = diffusers_pipeline(unet2d, variance_type="fixed_large")
    fast = FastDDPMPipeline.from_diffusers(pipe)
    keyed = fast(batch_size=2, num_inference_steps=5, output_type="pt", seeds=[7, 8]).images
    settings = fast.settings
    sampler = FastSampler(fast.unet, settings.schedule, timesteps=inference_timesteps(settings, 5),
                          variance="fixed_large", clip_x0=True)
    torch.testing.assert_close(keyed, sampler.sample(seeds=[7, 8]) / 2 + 0.5, rtol=0, atol=0)  # the same ops
    single = fast(batch_size=1, num_inference_steps=5, output_type="pt", seeds=[8]).images
    # batch 1 vs 2: the convolutions' sums may differ in order; the chain's response to their rounding
    bound = rounding_response(lambda: sampler.sample(seeds=[8]) / 2 + 0.5, sampler.model)
    torch.testing.assert_close(single[0], keyed[1], rtol=0, atol=bound)
    torch.manual_seed(0)
    a = fast(batch_size=2, num_inference_steps=5, output_type="np").images
    torch.manual_seed(0)
    b = fast(batch_size=2, num_inference_steps=5, output_type="np").images
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a[0], a[1])


def test_a_list_of_generators_matches_ddpm_pipeline(unet2d):
    pipe = diffusers_pipeline(unet2d, variance_type="fixed_large")
    fast = FastDDPMPipeline.from_diffusers(pipe)
    ref = pipe(batch_size=2, generator=[torch.Generator().manual_seed(s) for s in (1, 2)], num_inference_steps=4,
               output_type="np").images
    out = fast(batch_size=2, generator=[torch.Generator().manual_seed(s) for s in (1, 2)], num_inference_steps=4,
               output_type="np").images
    bound = diffusers_bound(fast, 4, generator=lambda: [torch.Generator().manual_seed(s) for s in (1, 2)])
    assert_within(torch.from_numpy(out), torch.from_numpy(ref), bound, "generator list")


@pytest.mark.parametrize("config,match", [
    (dict(prediction_type="v_prediction"), "epsilon"),
    (dict(prediction_type="sample"), "epsilon"),
    (dict(variance_type="learned_range"), "variance_type"),
    (dict(thresholding=True), "thresholding"),
    (dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
    (dict(timestep_spacing="karras"), "timestep_spacing"),
    (dict(beta_schedule="laplace"), "beta_schedule"),
    (dict(_class_name="DDIMScheduler"), "DDIMScheduler"),
])
def test_unsupported_scheduler_configs_are_clear_errors(config, match):
    with pytest.raises(ValueError, match=match):
        scheduler_settings({"_class_name": "DDPMScheduler", **config})


def test_bad_call_arguments(unet2d, tmp_path):
    fast = FastDDPMPipeline.from_diffusers(diffusers_pipeline(unet2d))
    with pytest.raises(ValueError, match="output_type"):
        fast(batch_size=1, num_inference_steps=2, output_type="latent")
    for steps in (0, 1001, 2.5):
        with pytest.raises(ValueError, match="num_inference_steps"):
            fast(batch_size=1, num_inference_steps=steps)
    with pytest.raises(ValueError, match="one seed per image"):
        fast(batch_size=3, num_inference_steps=2, seeds=[1, 2])
    with pytest.raises(ValueError, match="not both"):
        fast(batch_size=1, num_inference_steps=2, seeds=[1], generator=torch.Generator())
    with pytest.raises(CheckpointError, match="not a folder"):
        FastDDPMPipeline.from_pretrained(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="unet/ and scheduler/"):
        FastDDPMPipeline.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="DDPMPipeline"):
        FastDDPMPipeline.from_diffusers(unet2d)
