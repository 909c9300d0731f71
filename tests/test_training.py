"""Training: the fast step against the oracle's loss, exact resume, the recipe's schedules, run folders."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from ddpm_fast import ops, reference
from ddpm_fast.checkpoint import load_checkpoint
from ddpm_fast.data import ImageDataset
from ddpm_fast.errors import DDPMFastError
from ddpm_fast.training import PRESETS, TrainConfig, Trainer, train
from tolerances import assert_within, gamma, q_sample_bound

# 8x8 digits, two levels of 8 and 16 channels: a few ms per step on a CPU core.
SMALL = {"block_out_channels": [8, 16]}


pytestmark = pytest.mark.usefixtures("single_thread")


def _config(tmp_path, **kw):
    # device="cpu": these tests mean the CPU path (eager float32); the default would pick CUDA where present
    base = dict(data="digits", out=str(tmp_path / "run"), preset="tiny", steps=6, batch_size=8,
                save_every=3, log_every=2, progress=False, unet=SMALL, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("batch_size", [1, 5, 16])
@pytest.mark.parametrize("step", [0, 7, 123456])
def test_fast_loss_equals_reference_q_sample_and_mse(tmp_path, batch_size, step):
    trainer = Trainer(_config(tmp_path, batch_size=batch_size))
    x0 = torch.rand(batch_size, 1, 8, 8) * 2 - 1
    seen = {}
    hook = trainer.model.register_forward_hook(lambda module, args, out: seen.update(x_t=args[0].detach().clone()))
    loss = trainer.loss_on_batch(x0, step)
    hook.remove()

    # the same t and eps, through the oracle's forward noising and a plain MSE
    t = trainer.timesteps_at(step, batch_size)
    eps = ops.seeded_noise(trainer.noise_seeds(batch_size), step, (1, 8, 8))
    x_t = reference.q_sample(x0.double(), t, eps.double(), trainer.schedule)
    ab = trainer.schedule.alphas_cumprod[t]
    # the model's input: the float32 noising against the float64 oracle (tolerances.q_sample_bound) ...
    assert_within(seen["x_t"], x_t, q_sample_bound(ab.sqrt(), (1 - ab).sqrt(), x0, eps), "x_t")
    # ... and the loss on that input: the same model and MSE, the same operations: equal
    expected = F.mse_loss(trainer.model(seen["x_t"], t), eps)
    assert loss.dtype == torch.float32 and loss.ndim == 0 and torch.isfinite(loss)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_min_snr_loss_weights_each_images_error(tmp_path, schedule):
    """snr_gamma: the same t, eps and model input as the plain loss; each image's mean squared error
    weighted by the oracle's min(SNR, gamma) / SNR (float64 weights rounded to float32 once)."""
    trainer = Trainer(_config(tmp_path, batch_size=7, snr_gamma=5.0, schedule=schedule))
    x0 = torch.rand(7, 1, 8, 8) * 2 - 1
    seen = {}
    hook = trainer.model.register_forward_hook(lambda module, args, out: seen.update(x_t=args[0].detach().clone()))
    loss = trainer.loss_on_batch(x0, 3)
    hook.remove()
    t = trainer.timesteps_at(3, 7)
    eps = ops.seeded_noise(trainer.noise_seeds(7), 3, (1, 8, 8))
    with torch.no_grad():
        err = (trainer.model(seen["x_t"], t).double() - eps.double()).square().mean(dim=(1, 2, 3))
    snr = trainer.schedule.snr[t]
    expected = (err * snr.clamp(max=5.0) / snr).mean()
    # float32 arithmetic on 7 images of 64 pixels against float64: a few ulps of the loss
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)
    assert trainer.run_config()["train"]["snr_gamma"] == 5.0


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "5"])
def test_snr_gamma_is_checked(tmp_path, bad):
    with pytest.raises(ValueError, match="snr_gamma must be a positive number"):
        _config(tmp_path, snr_gamma=bad).resolved()


def test_noise_and_timesteps_are_keyed_by_seed_and_step(tmp_path):
    a = Trainer(_config(tmp_path, seed=1))
    b = Trainer(_config(tmp_path, seed=2))
    assert torch.equal(a.timesteps_at(5, 64), a.timesteps_at(5, 64))
    assert not torch.equal(a.timesteps_at(5, 64), a.timesteps_at(6, 64))
    assert not torch.equal(a.timesteps_at(5, 64), b.timesteps_at(5, 64))
    assert not torch.equal(a.noise_seeds(8), b.noise_seeds(8))
    t = a.timesteps_at(0, 4096)
    assert t.min() >= 0 and t.max() < a.schedule.num_timesteps and t.dtype == torch.int64
    assert abs(t.float().mean().item() - 499.5) < 20  # uniform over 0..T-1


def test_lr_warmup_and_ema_warmup(tmp_path):
    trainer = Trainer(_config(tmp_path, lr=1e-3, warmup=4, ema_decay=0.999, ema_warmup=True))
    assert [trainer.lr_at(s) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert trainer.ema_decay_at(0) == pytest.approx(0.1) and trainer.ema_decay_at(10**6) == 0.999
    no_warmup = Trainer(_config(tmp_path, warmup=0, ema_decay=0.9999, ema_warmup=False))
    assert no_warmup.lr_at(0) == no_warmup.config.lr and no_warmup.ema_decay_at(0) == 0.9999


def test_one_step_is_adam_with_clipping_and_ema(tmp_path):
    trainer = Trainer(_config(tmp_path, grad_clip=1e-3, warmup=0))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    ema_before = {k: v.clone() for k, v in trainer.ema.state_dict().items()}
    loss, grad_norm = trainer.train_step()
    assert trainer.step == 1 and torch.isfinite(loss) and grad_norm > 1e-3  # clipping was active
    after = trainer.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed  # Adam moved the weights
    # Adam's first step moves every weight with a gradient by lr (sign of its gradient)
    delta = max((after[k] - before[k]).abs().max().item() for k in changed)
    assert delta == pytest.approx(trainer.config.lr, rel=1e-3)
    d = trainer.ema_decay_at(0)
    for k in ema_before:
        a, b = ema_before[k], after[k]
        if not a.is_floating_point():
            assert torch.equal(trainer.ema.state_dict()[k], b), k
            continue
        # lerp(a, b, 1 - d) against d a + (1 - d) b, both float32 with 1 - d and d rounded: each side is
        # within 4 roundings of the exact value, gamma_4 (|a| + |b|)
        assert_within(trainer.ema.state_dict()[k], d * a + (1 - d) * b, 2 * gamma(4) * (a.abs() + b.abs()), k)


def _state_tensors(trainer):
    out = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    out.update({f"ema.{k}": v for k, v in trainer.ema.state_dict().items()})
    for i, s in trainer.optimizer.state_dict()["state"].items():
        for name, v in s.items():
            out[f"adam.{i}.{name}"] = v
    return out


def test_resume_equals_uninterrupted_run(tmp_path):
    # dropout and flips on, so the RNG and data-position state must be restored for this to pass
    kw = dict(steps=8, save_every=4, seed=5, flip=True, unet={**SMALL, "dropout": 0.3})
    straight = train(_config(tmp_path / "a", **kw))
    assert straight.step == 8

    half = train(_config(tmp_path / "b", **{**kw, "steps": 4}))
    assert half.step == 4
    torch.manual_seed(12345)  # whatever happens to the global RNG in between must not matter
    resumed = train(_config(tmp_path / "b", **kw, resume=True))
    assert resumed.resumed_from == 4 and resumed.step == 8

    a = load_checkpoint(tmp_path / "a" / "run")
    b = load_checkpoint(tmp_path / "b" / "run")
    assert a.step == b.step == 8
    for name in a.model:
        assert torch.equal(a.model[name], b.model[name]), name
        assert torch.equal(a.ema[name], b.ema[name]), name
    for i, s in a.state["optimizer"]["state"].items():
        for k, v in s.items():
            assert torch.equal(v, b.state["optimizer"]["state"][i][k]), (i, k)
    assert a.state["batch_stream"] == b.state["batch_stream"]
    assert torch.equal(a.state["rng"]["torch"], b.state["rng"]["torch"])
    # the logged losses after the resume equal the uninterrupted run's
    def losses(run):
        lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in lines if "loss" in r}

    la, lb = losses(tmp_path / "a" / "run"), losses(tmp_path / "b" / "run")
    assert la == lb and set(la) == {2, 4, 6, 8}


def test_run_folder_contents(tmp_path):
    result = train(_config(tmp_path, sample_every=6, sample_steps=3, num_sample_images=4))
    run = tmp_path / "run"
    assert result.step == 6 and math.isfinite(result.final_loss) and result.images_per_second > 0
    config = json.loads((run / "config.json").read_text())
    assert config["format"] == "ddpm-fast-run" and config["train"]["preset"] == "tiny"
    assert config["unet"]["block_out_channels"] == [8, 16] and config["unet"]["in_channels"] == 1
    assert config["schedule"]["name"] == "linear" and config["schedule"]["num_timesteps"] == 1000
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [2, 3, 4, 6]  # every log_every steps and at each checkpoint
    assert all(math.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in steps)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000003", "step_000006"]
    assert (run / "samples" / "step_000006.png").is_file()
    assert result.checkpoint == run / "checkpoints" / "step_000006"


def test_existing_run_is_never_overwritten(tmp_path):
    train(_config(tmp_path))
    with pytest.raises(DDPMFastError, match="already holds a training run: pass --resume"):
        train(_config(tmp_path))
    with pytest.raises(DDPMFastError, match="keeps the run's lr"):
        train(_config(tmp_path, lr=5e-2, resume=True, steps=8))
    # resuming at the final step is a no-op, not an error
    again = train(_config(tmp_path, resume=True))
    assert again.step == 6 and again.resumed_from == 6


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    result = train(_config(tmp_path, resume=True, steps=2))
    assert result.step == 2 and result.resumed_from is None


def test_nan_loss_stops_with_a_clear_error(tmp_path, monkeypatch):
    real = Trainer.loss_on_batch
    monkeypatch.setattr(Trainer, "loss_on_batch", lambda self, x0, step: real(self, x0, step) * float("nan"))
    with pytest.raises(DDPMFastError, match="the loss became nan at step 2: lower --lr"):
        train(_config(tmp_path))


@pytest.mark.parametrize("bad, match", [
    (dict(preset="huge"), "unknown preset"),
    (dict(lr=-1.0), "lr must be a positive number"),
    (dict(steps=0), "steps must be an int >= 1"),
    (dict(ema_decay=1.0), "ema_decay must lie in"),
    (dict(dtype="bf16", device="cpu"), "bf16"),
    (dict(schedule="sigmoid"), "schedule must be"),
    (dict(batch_size=5000), "fewer than one batch"),
    (dict(data="/no/such/folder"), "does not exist"),
    (dict(device="tpu"), "unknown device|not supported"),
    (dict(preset="cifar10", data=None), "needs training data: pass --data"),
])
def test_bad_settings_raise_one_clear_error(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        train(_config(tmp_path, **bad))


def test_presets_follow_hos_recipe():
    cifar = TrainConfig(preset="cifar10", data="some/cifar", device="cpu").resolved()
    assert (cifar.lr, cifar.warmup, cifar.batch_size, cifar.grad_clip, cifar.ema_decay) == (2e-4, 5000, 128, 1.0, 0.9999)
    assert cifar.flip and cifar.steps == 800_000 and cifar.num_timesteps == 1000 and cifar.schedule == "linear"
    assert not cifar.compile and cifar.dtype == "fp32"  # CPU: eager float32
    digits = TrainConfig(preset="digits", device="cpu").resolved()
    assert digits.data == "digits" and not digits.flip  # mirrored digits are not digits
    assert set(PRESETS) == {"cifar10", "digits", "tiny"}
    assert {f.name for f in dataclasses.fields(TrainConfig)} >= {"data", "out", "preset", "steps", "batch_size",
                                                                  "lr", "warmup", "grad_clip", "ema_decay",
                                                                  "save_every", "sample_every", "seed", "compile",
                                                                  "device", "num_timesteps", "schedule", "dtype"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="CUDA is not available here: use --device cpu"):
        train(_config(tmp_path, device="cuda"))


def test_in_memory_dataset_needs_no_data_option(tmp_path):
    """The cifar10 preset has no default data; an in-memory dataset (as `ddpm-fast bench` passes) is enough,
    and config.json records where its images came from."""
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    dataset = ImageDataset(images, source="random test images")
    config = TrainConfig(preset="cifar10", out=str(tmp_path / "run"), steps=2, batch_size=4, save_every=0,
                         sample_every=0, log_every=1, progress=False, unet={**SMALL, "norm_num_groups": 8},
                         device="cpu")
    result = train(config, dataset=dataset)
    assert result.step == 2 and math.isfinite(result.final_loss)
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["train"]["data"] == "random test images" and stored["train"]["lr"] == 2e-4
