"""The CUDA paths no CPU test can reach: a training loop without host syncs, capturable torch twins, the
sampler's default configuration end to end, and capture on a device other than the current one.

All are marked ``cuda`` (``pytest -m cuda tests`` runs them on a GPU machine) and skip without a GPU.
The CPU-side logic they rely on (compile-mode mapping, pinned uploads) is tested here on the CPU too.
"""

import pytest
import torch

from ddpm_fast import NoiseSchedule, philox
from ddpm_fast.checks import host_to_device
from ddpm_fast.sampler import FastSampler, _compile_mode
from ddpm_fast.training import TrainConfig, Trainer
from ddpm_fast.unet import UNet, UNetConfig
from markers import needs_cuda

cuda_only = needs_cuda  # marked ``cuda`` (selected by ``pytest -m cuda``) and skipped without a GPU


def tiny_unet(seed: int, size: int = 16) -> UNet:
    torch.manual_seed(seed)
    config = UNetConfig.tiny(sample_size=size, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                             norm_num_groups=4)
    return UNet(config).eval()


# -- CPU-side logic --------------------------------------------------------------------------------------

def test_compile_modes_with_inductor_graphs_are_mapped_or_refused_under_the_samplers_capture():
    assert _compile_mode(None, True, True) == "max-autotune-no-cudagraphs"
    assert _compile_mode("max-autotune", True, True) == "max-autotune-no-cudagraphs"
    assert _compile_mode("default", True, True) == "default"
    with pytest.raises(ValueError, match="reduce-overhead.*cannot run inside the sampler's graph"):
        _compile_mode("reduce-overhead", True, True)
    # without the sampler's own capture inductor may capture: every mode runs as asked
    assert _compile_mode("reduce-overhead", True, False) == "reduce-overhead"
    assert _compile_mode("max-autotune", True, False) == "max-autotune"
    assert _compile_mode(None, False, False) is None and _compile_mode(True, False, False) == "default"


def test_host_to_device_keeps_values_and_leaves_cpu_moves_plain():
    x = torch.arange(5)
    assert host_to_device(x, "cpu") is x


@cuda_only
def test_cuda_host_to_device_keeps_values():
    x = torch.arange(5)
    y = host_to_device(x, "cuda")
    assert y.is_cuda and torch.equal(y.cpu(), x)


# -- training -------------------------------------------------------------------------------------------

@cuda_only
def test_cuda_training_steps_never_sync_the_host(tmp_path):
    """Between log points a training step must not wait for the GPU: seeds, the noise step and t reach
    the device through pinned, non-blocking copies, the batch too, and nothing reads a value back."""
    config = TrainConfig(data="digits", out=str(tmp_path / "run"), preset="tiny", steps=100, batch_size=16,
                         device="cuda", compile=False, progress=False, unet={"block_out_channels": [8, 16]})
    trainer = Trainer(config)
    for _ in range(2):  # warm-up: cuDNN's algorithm search and the allocator's first blocks may sync
        trainer.train_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            loss, grad_norm = trainer.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss) and torch.isfinite(grad_norm)  # reading them (a sync) is the log point's job


# -- sampling -------------------------------------------------------------------------------------------

@cuda_only
def test_cuda_torch_twin_noise_is_capturable():
    seeds = torch.arange(3, dtype=torch.int64, device="cuda")
    steps = torch.full((1,), 7, dtype=torch.int64, device="cuda")
    eager = philox.seeded_normal(seeds, steps, 300)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = philox.seeded_normal(seeds, steps, 300)
    captured.fill_(float("nan"))
    graph.replay()
    torch.testing.assert_close(captured, eager, rtol=0, atol=0)  # the same ops, replayed: bit for bit


@cuda_only
def test_cuda_unfused_update_captures_too():
    """fused_update=False (the ablation's baseline) must be captured like the fused path, not fall back."""
    model = tiny_unet(seed=11).cuda()
    schedule = NoiseSchedule.linear(1000)
    common = dict(timesteps=10, dtype=torch.float32, compile=False)
    unfused = FastSampler(model, schedule, fused_update=False, **common)
    out = unfused.sample(seeds=[1, 2, 3])
    assert unfused.settings["update"] == "torch"
    assert all(run.graphs and not run.eager for run in unfused._runs.values())
    eager = FastSampler(model, schedule, fused_update=False, cuda_graph=False, **common).sample(seeds=[1, 2, 3])
    torch.testing.assert_close(out, eager, rtol=0, atol=0)  # replaying the same kernels changes nothing


@cuda_only
def test_cuda_default_configuration_end_to_end_against_the_fp32_eager_path():
    """FastSampler's defaults on CUDA: compiled U-Net (its default mode), bf16 autocast, channels-last, the
    step captured as a CUDA graph, fused update with seed-keyed in-kernel noise. Both runs take the same
    seeds through the same chain, so out - eager is bf16 drift (each conv input rounded to 8 bits), not
    sampling noise; images drift apart over 20 steps, so the check is the one the CPU bf16 test makes
    (test_sampler): per-pixel mean and std over the 128 seeds within 0.05 of the fp32 run."""
    model = tiny_unet(seed=12)
    schedule = NoiseSchedule.linear(1000)
    seeds = list(range(128))
    fast = FastSampler(model.cuda(), schedule, timesteps=20, clip_x0=True)
    out = fast.sample(seeds=seeds)
    settings = fast.settings
    assert settings["compile"] == "max-autotune-no-cudagraphs" and settings["dtype"] == "bfloat16"
    assert settings["cuda_graph"] and settings["update"] == "triton" and settings["channels_last"]
    assert all(run.graphs and not run.eager for run in fast._runs.values())  # captured, no eager fallback
    eager = FastSampler(model.cuda(), schedule, timesteps=20, clip_x0=True, dtype=torch.float32, compile=False,
                        cuda_graph=False, fused_update=False).sample(seeds=seeds)
    assert torch.isfinite(out).all()
    assert (out.mean(0) - eager.mean(0)).abs().max() < 0.05
    assert (out.std(0) - eager.std(0)).abs().max() < 0.05
    assert (out - eager).abs().max() > 0  # bf16 really ran


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@cuda_only  # nearest the test: evaluated first, so a machine without CUDA reports "needs a CUDA GPU"
def test_cuda_capture_on_the_samplers_device_not_the_current_one():
    model = tiny_unet(seed=13).to("cuda:1")
    schedule = NoiseSchedule.linear(1000)
    with torch.cuda.device(0):
        sampler = FastSampler(model, schedule, timesteps=5, dtype=torch.float32, compile=False)
        out = sampler.sample(seeds=[1, 2])
    assert out.device == torch.device("cuda:1")
    assert all(run.graphs and not run.eager for run in sampler._runs.values())
    eager = FastSampler(model, schedule, timesteps=5, dtype=torch.float32, compile=False,
                        cuda_graph=False).sample(seeds=[1, 2])
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
