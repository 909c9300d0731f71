"""FastDDPMPipeline with the schedulers people sample with (DDIM, DPM-Solver++, UniPC): the saved scheduler
picks the solver and its options, and the images equal diffusers' with the same generator (fp32, CPU);
hub ids open from the Hugging Face cache with HF_HUB_OFFLINE=1.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (DDIMScheduler, DDPMPipeline, DPMSolverMultistepScheduler, UniPCMultistepScheduler,  # noqa: E402
                       UNet2DModel)

from ddpm_fast.errors import CheckpointError  # noqa: E402
from ddpm_fast.hub import looks_like_hub_id  # noqa: E402
from ddpm_fast.pipeline import FastDDPMPipeline, inference_timesteps, scheduler_settings  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

# fp32 on both sides; diffusers' schedulers keep float32 sigmas and we round the float64 table to float32
# once: a few ulps per step on images in [0, 1], amplified up to 1/alpha ~ 157 in the first x0 prediction
ATOL = 1e-4


def tiny_unet2d(seed=0, channels=3) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=channels, out_channels=channels, block_out_channels=(16, 32),
        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, norm_eps=1e-6,
        downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, attention_head_dim=None,
    ).eval()


@pytest.fixture(scope="module")
def unet2d():
    return tiny_unet2d()


def diffusers_images(unet, scheduler, steps, seed=3, batch_size=2):
    """DDPMPipeline's loop written out (UniPC's step takes no generator, so DDPMPipeline refuses it)."""
    gen = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    x = torch.randn((batch_size, unet.config.in_channels, 8, 8), generator=gen)
    kwargs = {"generator": gen} if not isinstance(scheduler, UniPCMultistepScheduler) else {}
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, **kwargs).prev_sample
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("scheduler,solver", [
    (DDIMScheduler(), "ddim"),
    (DDIMScheduler(clip_sample=False, steps_offset=1), "ddim"),
    (DPMSolverMultistepScheduler(), "dpmpp-2m"),
    (DPMSolverMultistepScheduler(solver_order=3, timestep_spacing="trailing"), "dpmpp-3m"),
    (DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_type="heun"), "dpmpp-2m-sde"),
    (DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1), "dpmpp-2m"),
    (UniPCMultistepScheduler(), "unipc"),
    (UniPCMultistepScheduler(solver_order=3, disable_corrector=[0, 2], timestep_spacing="leading"), "unipc"),
], ids=["ddim-clip", "ddim-offset", "dpmpp-2m", "dpmpp-3m-trailing", "sde-heun", "dpmpp-cosine-clipped", "unipc",
        "unipc-3-leading"])
def test_saved_pipeline_picks_the_solver_and_matches_diffusers(unet2d, tmp_path, scheduler, solver):
    pipe = DDPMPipeline(unet=unet2d, scheduler=scheduler)
    pipe.save_pretrained(tmp_path)
    fast = FastDDPMPipeline.from_pretrained(tmp_path, device="cpu")
    assert fast.sampler.solver.name == solver
    config = dict(scheduler.config)
    if solver != "ddim":
        assert fast.sampler.solver.lambda_min_clipped == config.get("lambda_min_clipped", float("-inf"))
        assert fast.sampler.solver.order == config["solver_order"]
        assert fast.sampler.solver.solver_type == config["solver_type"]
    out = fast(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=6, output_type="np").images
    ref = diffusers_images(unet2d, type(scheduler).from_config(config), 6)
    assert np.isfinite(out).all() and out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=ATOL)
    assert ref.std() > 0.05
    fresh = type(scheduler).from_config(config)
    fresh.set_timesteps(6)
    assert inference_timesteps(fast.settings, 6) == fresh.timesteps.tolist() == fast.sampler.timesteps


def test_ddpm_pipeline_itself_with_dpm_solver(unet2d):
    """The drop-in against DDPMPipeline as shipped, with DPMSolverMultistepScheduler swapped in."""
    pipe = DDPMPipeline(unet=unet2d, scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(batch_size=2, generator=torch.Generator().manual_seed(5), num_inference_steps=8, output_type="np").images
    fast = FastDDPMPipeline.from_diffusers(pipe, device="cpu")
    out = fast(batch_size=2, generator=torch.Generator().manual_seed(5), num_inference_steps=8, output_type="np").images
    np.testing.assert_allclose(out, ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("config,match", [
    (dict(_class_name="DPMSolverMultistepScheduler", use_karras_sigmas=True), "use_karras_sigmas"),
    (dict(_class_name="DPMSolverMultistepScheduler", algorithm_type="dpmsolver"), "algorithm_type"),
    (dict(_class_name="DPMSolverMultistepScheduler", final_sigmas_type="sigma_min"), "final_sigmas_type"),
    (dict(_class_name="UniPCMultistepScheduler", solver_type="bh3"), "solver_type"),
    (dict(_class_name="UniPCMultistepScheduler", predict_x0=False), "predict_x0"),
    (dict(_class_name="UniPCMultistepScheduler", lambda_min_clipped=-5.1), "lambda_min_clipped"),
    (dict(_class_name="DDIMScheduler", timestep_spacing="trailing"), "leading"),
    (dict(_class_name="DDIMScheduler", set_alpha_to_one=False), "set_alpha_to_one"),
])
def test_unsupported_solver_configs_are_clear_errors(config, match):
    with pytest.raises(ValueError, match=match):
        scheduler_settings(config)


def test_hub_id_detection(tmp_path, monkeypatch):
    assert looks_like_hub_id("google/ddpm-cifar10-32")
    assert not looks_like_hub_id("runs/digits/checkpoints/step_1500")
    assert not looks_like_hub_id("../x")
    (tmp_path / "org").mkdir()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir()
    assert not looks_like_hub_id("org/name")  # an existing path wins


def _lay_out_hub_cache(cache, unet, scheduler, repo="someorg/tiny-ddpm", revision="0123456789abcdef0123456789abcdef01234567"):
    """A Hugging Face cache as snapshot_download leaves it: models--org--name/{refs/main, snapshots/<rev>/...}."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / revision
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return repo, snapshot


def test_hub_id_opens_from_the_offline_cache(unet2d, tmp_path):
    """from_pretrained and `ddpm-fast sample` with a hub id, HF_HUB_OFFLINE=1, a cache laid out here."""
    cache = tmp_path / "hub"
    repo, snapshot = _lay_out_hub_cache(cache, unet2d, UniPCMultistepScheduler())
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home")}
    code = ("import sys, torch\nfrom ddpm_fast import FastDDPMPipeline\n"
            f"pipe = FastDDPMPipeline.from_pretrained({repo!r}, device='cpu')\n"
            "x = pipe(batch_size=1, num_inference_steps=3, output_type='np', seeds=[1]).images\n"
            "print(pipe.sampler.solver.name, x.shape)\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "unipc (1, 8, 8, 3)" in done.stdout

    out = tmp_path / "samples"
    done = subprocess.run([sys.executable, "-m", "ddpm_fast.cli", "sample", repo, "--out", str(out), "--seeds", "0-1",
                           "--solver", "dpmpp-2m", "--steps", "3", "--device", "cpu"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dpmpp-2m" in done.stdout and (out / "samples.npz").is_file()

    missing = subprocess.run([sys.executable, "-m", "ddpm_fast.cli", "sample", "someorg/not-cached", "--out",
                              str(out), "--device", "cpu"], env=env, capture_output=True, text=True, timeout=240)
    assert missing.returncode == 2
    assert missing.stderr.startswith("ddpm-fast: error: cannot open hub id 'someorg/not-cached'")
    assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) == 1


def test_missing_offline_hub_id_in_process(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="cannot open hub id 'nobody/nothing'"):
        FastDDPMPipeline.from_pretrained("nobody/nothing")
