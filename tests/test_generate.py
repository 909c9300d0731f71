"""Sampling to files: seed parsing, every kind of source, batch-size invariance, the oracle, the file formats."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_fast.checkpoint import save_checkpoint
from ddpm_fast.errors import CheckpointError
from ddpm_fast.generate import generate, load_model_source, parse_seeds, sample_to_folder, write_samples
from ddpm_fast.schedule import NoiseSchedule
from ddpm_fast.unet import UNet, UNetConfig
from tolerances import rounding_response

TINY = UNetConfig.tiny(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16))
T = 40  # a short schedule keeps full-length sampling cheap


pytestmark = pytest.mark.usefixtures("single_thread")


def _model(seed):
    torch.manual_seed(seed)
    return UNet(TINY).eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder whose EMA and raw weights differ."""
    root = tmp_path_factory.mktemp("gen") / "run"
    config = {"format": "ddpm-fast-run", "version": 1, "unet": TINY.to_dict(),
              "schedule": NoiseSchedule.linear(T).to_config(), "train": {}}
    root.mkdir()
    (root / "config.json").write_text(json.dumps(config))
    save_checkpoint(root, step=9, config=config, model=_model(1).state_dict(), ema=_model(2).state_dict(), state={})
    return root


@pytest.mark.parametrize("text, expected", [
    ("0-3", [0, 1, 2, 3]), ("5", [5]), ("1,5,9", [1, 5, 9]), ("0-2,10", [0, 1, 2, 10]),
    (" 7 , 3-4 ", [7, 3, 4]), ("4294967295", [4294967295]),
])
def test_parse_seeds(text, expected):
    assert parse_seeds(text) == expected


@pytest.mark.parametrize("text, match", [
    ("", "empty"), ("a-b", "bad seed"), ("5-2", "runs backwards"), ("-3", "bad seed"), ("1,,2", "bad seed"),
    ("4294967296", "too large"), ("1,1", "twice"), ("0-99999999", "at most"), ("1.5", "bad seed"),
])
def test_parse_seeds_rejects_bad_input(text, match):
    with pytest.raises(ValueError, match=match):
        parse_seeds(text)


def test_image_is_a_pure_function_of_its_seed(run_dir):
    model, schedule, _ = load_model_source(run_dir)
    seeds = [3, 0, 17, 2**32 - 1, 5]
    together = generate(model, schedule, seeds, steps=10, batch_size=5)
    assert together.shape == (5, 1, 8, 8) and together.dtype == torch.float32
    assert torch.isfinite(together).all() and together.abs().max() <= 1.0
    # exact noise at any batch size; the convolutions' sums may be blocked by batch size: the bound is the
    # chain's response to their rounding (tolerances.rounding_response)
    bound = rounding_response(lambda: generate(model, schedule, seeds, steps=10, batch_size=5), model)
    for batch_size in (1, 2, 3):
        torch.testing.assert_close(generate(model, schedule, seeds, steps=10, batch_size=batch_size), together,
                                   rtol=0, atol=bound)
    alone = generate(model, schedule, [17], steps=10)
    torch.testing.assert_close(alone[0], together[2], rtol=0, atol=bound)
    assert not torch.allclose(together[0], together[1], atol=1e-2)  # different seeds, different images


def test_reference_sampler_matches_fast_sampler(run_dir):
    model, schedule, _ = load_model_source(run_dir)
    seeds = [0, 1, 2]
    for steps, variance, clip in ((None, "fixed_large", True), (7, "fixed_small", False)):
        fast = generate(model, schedule, seeds, steps=steps, variance=variance, clip_x0=clip)
        oracle = generate(model, schedule, seeds, steps=steps, variance=variance, clip_x0=clip, reference=True,
                          batch_size=2)
        # two float32 chains whose model sums differ in order (layout, batch size, time table vs MLP)
        bound = rounding_response(lambda: generate(model, schedule, seeds, steps=steps, variance=variance,
                                                   clip_x0=clip), model)
        torch.testing.assert_close(fast, oracle, rtol=0, atol=bound)
    assert model.training is False


def test_sources_run_folder_step_folder_and_file(run_dir):
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0, 39])
    ema_out, raw_out = _model(2)(x, t), _model(1)(x, t)
    step_dir = run_dir / "checkpoints" / "step_000009"
    cases = [(run_dir, {}, ema_out, "ema"), (step_dir, {}, ema_out, "ema"),
             (run_dir, {"use_ema": False}, raw_out, "model"),
             (step_dir / "model.safetensors", {}, raw_out, "model")]
    for source, kw, expected, weights in cases:
        model, schedule, meta = load_model_source(source, **kw)
        assert not model.training and schedule.num_timesteps == T
        assert meta["weights"] == weights and meta["step"] == 9
        assert meta["variance"] == "fixed_large" and meta["clip_x0"] is True
        with torch.no_grad():
            torch.testing.assert_close(model(x, t), expected, rtol=0, atol=0)


@pytest.mark.parametrize("with_scheduler", [False, True])
def test_diffusers_unet_folder(tmp_path, with_scheduler):
    from ddpm_fast.diffusers_io import save_diffusers_unet

    pipeline = tmp_path / "pipe"
    save_diffusers_unet(_model(4), pipeline / "unet")
    if with_scheduler:
        (pipeline / "scheduler").mkdir()
        (pipeline / "scheduler" / "scheduler_config.json").write_text(json.dumps({
            "_class_name": "DDPMScheduler", "num_train_timesteps": 30, "beta_schedule": "linear",
            "beta_start": 0.001, "beta_end": 0.03, "variance_type": "fixed_small", "clip_sample": False}))
    for source in (pipeline / "unet", pipeline):
        model, schedule, meta = load_model_source(source)
        assert meta["kind"] == "diffusers"
        if with_scheduler:
            assert schedule.num_timesteps == 30 and schedule.betas[0].item() == pytest.approx(0.001)
            assert meta["variance"] == "fixed_small" and meta["clip_x0"] is False
        else:
            assert schedule.num_timesteps == 1000 and meta["variance"] == "fixed_large" and meta["clip_x0"]
        x = torch.randn(1, 1, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(model(x, 3), _model(4)(x, 3), rtol=0, atol=0)


def test_write_samples_formats(tmp_path):
    images = torch.rand(5, 1, 8, 8) * 2 - 1
    images[0] = 1.0
    images[1] = -1.0
    paths = write_samples(images, tmp_path / "out", seeds=[10, 11, 12, 13, 14], png_per_image=True)
    with np.load(paths["npz"]) as data:
        assert list(data.keys()) == ["arr_0"]
        arr = data["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (5, 8, 8, 1)  # NHWC
    assert (arr[0] == 255).all() and (arr[1] == 0).all()
    expected = np.round(((images.permute(0, 2, 3, 1).numpy() + 1) / 2).clip(0, 1) * 255)
    assert np.array_equal(arr, expected.astype(np.uint8))
    assert Image.open(paths["grid"]).size[0] > 8 * 3
    pngs = sorted(p.name for p in paths["images"].iterdir())
    assert pngs == [f"{s:06d}.png" for s in range(10, 15)]
    assert np.array_equal(np.asarray(Image.open(paths["images"] / "000012.png")), arr[2, :, :, 0])
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_sample_to_folder_end_to_end(run_dir, tmp_path):
    result = sample_to_folder(run_dir, tmp_path / "s", [0, 1, 2, 3], steps=5, batch_size=3, device="cpu")
    assert result.num_images == 4 and result.settings["sampler"] == "FastSampler"
    assert result.settings["variance"] == "fixed_large" and result.settings["clip_x0"] is True
    with np.load(result.paths["npz"]) as data:
        assert data["arr_0"].shape == (4, 8, 8, 1)


def test_sample_to_folder_streams_the_same_pixels_as_generate(run_dir, tmp_path, monkeypatch):
    """samples.npz is filled batch by batch through a memory-mapped spool: the same uint8 images as
    generate() + write_samples, in seed order, the spool gone, the grid capped at GRID_MAX_IMAGES."""
    import ddpm_fast.generate as generate_module
    from ddpm_fast.data import to_uint8_nhwc

    monkeypatch.setattr(generate_module, "GRID_MAX_IMAGES", 4)
    seeds = [9, 3, 7, 1, 5, 11, 2]
    result = sample_to_folder(run_dir, tmp_path / "s", seeds, steps=5, batch_size=3, device="cpu")
    model, schedule, _ = load_model_source(run_dir)
    expected = to_uint8_nhwc(generate(model, schedule, seeds, steps=5, batch_size=7, device="cpu"))
    with np.load(result.paths["npz"]) as data:
        assert list(data.keys()) == ["arr_0"] and np.array_equal(data["arr_0"], expected)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["grid.png", "run.json", "samples.npz"]
    assert Image.open(result.paths["grid"]).size == Image.open(
        write_samples(torch.from_numpy(expected[:4]).permute(0, 3, 1, 2).float() / 127.5 - 1,
                      tmp_path / "w")["grid"]).size


def test_bad_sources_raise_checkpoint_errors(tmp_path, run_dir):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model_source(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_model_source(tmp_path / "empty")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        load_model_source(bad)
    from ddpm_fast.diffusers_io import save_diffusers_unet

    broken = save_diffusers_unet(_model(0), tmp_path / "broken_unet")
    (broken / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no weights"):
        load_model_source(broken)
    (broken / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "downsample_padding": 1}))
    with pytest.raises(CheckpointError, match="downsample_padding"):
        load_model_source(broken)
    with pytest.raises(ValueError, match="no seeds"):
        generate(_model(0), NoiseSchedule.linear(T), [])


def test_dpmpp_on_a_cosine_schedule_without_lambda_clip_prints_a_note(tmp_path, capsys):
    """The cosine schedule ends at alpha-bar ~1e-9: DPM-Solver++ without lambda_min_clipped gives broken images
    there (docs/demo_study.md), so sampling says so in one line; with the clip, or on Ho's linear schedule
    (alpha-bar 4e-5 at T = 1000), it does not."""
    root = tmp_path / "run"
    config = {"format": "ddpm-fast-run", "version": 1, "unet": TINY.to_dict(),
              "schedule": NoiseSchedule.cosine(1000).to_config(), "train": {}}
    root.mkdir()
    (root / "config.json").write_text(json.dumps(config))
    save_checkpoint(root, step=1, config=config, model=_model(1).state_dict(), ema=_model(2).state_dict(), state={})
    sample_to_folder(root, tmp_path / "a", [0], steps=3, solver="dpmpp-2m", device="cpu")
    assert "--lambda-min-clipped" in capsys.readouterr().err
    result = sample_to_folder(root, tmp_path / "b", [0], steps=3, solver="dpmpp-2m", device="cpu",
                              solver_options={"lambda_min_clipped": -3.0})
    assert "--lambda-min-clipped" not in capsys.readouterr().err
    assert result.settings["solver"]["lambda_min_clipped"] == -3.0
    config["schedule"] = NoiseSchedule.linear(1000).to_config()
    linear = tmp_path / "linear"
    linear.mkdir()
    (linear / "config.json").write_text(json.dumps(config))
    save_checkpoint(linear, step=1, config=config, model=_model(1).state_dict(), ema=_model(2).state_dict(), state={})
    sample_to_folder(linear, tmp_path / "c", [0], steps=3, solver="dpmpp-2m", device="cpu")
    assert "--lambda-min-clipped" not in capsys.readouterr().err
