"""The CUDA paths: on a GPU, and their Python on the CPU through test-only stand-ins.

On a GPU (marked ``cuda``: ``pytest -m cuda tests`` runs them; skipped without one): a training loop
without host syncs, capturable torch twins, the sampler's default configuration end to end, sampling
without host waits after the first capture, and capture on a device other than the current one.

On the CPU (tests/cuda_standins.py stands in for torch.cuda's graph, stream, event, pool handle and
synchronize; nothing in the package changes): the sampler's warm-up, capture and
replay in torch's order, steps_per_graph, padded batches, the fallback after a failed capture (with the
caller's stream restored), the multistep solvers' history under capture and generator noise, each
compared with the eager path bit for bit; the training step's CUDA defaults (channels-last, the GPU RNG
states in checkpoints); the bench's CUDA-event timing; the compile-mode mapping and the seeds' upload.
"""

import math

import pytest
import torch

from ddpm_fast import NoiseSchedule, philox
from ddpm_fast.checks import host_to_device
from ddpm_fast.sampler import FastSampler, _compile_mode
from ddpm_fast.training import TrainConfig, Trainer
from ddpm_fast.unet import UNet, UNetConfig
from markers import needs_cuda
from test_sampler import ieee_fp32

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
    with ieee_fp32():  # the fp32 side in fp32, not cuDNN's default TF32
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


# -- the CUDA-only Python on the CPU, through test-only stand-ins (tests/cuda_standins.py) ----------------
# The sampler decides "capture or not" by its cuda_graph attribute alone: a CPU sampler with it switched
# on runs the capture, warm-up, replay and fallback code through the stand-ins, and must give exactly the
# eager images (a stand-in replay re-runs the very ops the capture recorded).

def _standin_sampler(monkeypatch, model=None, capture_runs_ops=False, **options):
    from cuda_standins import CudaStandIns

    standins = CudaStandIns(monkeypatch, capture_runs_ops=capture_runs_ops)
    options = {"timesteps": 6, "image_shape": None, **options}
    model = tiny_unet(seed=21, size=8) if model is None else model
    graphed = FastSampler(model, NoiseSchedule.linear(1000), **options)
    eager = FastSampler(model, NoiseSchedule.linear(1000), **options)
    assert not graphed.cuda_graph and graphed.device.type == "cpu"
    graphed.cuda_graph = True  # what on_cuda sets; everything else stays the CPU configuration
    return graphed, eager, standins


def _names(standins):
    return [e[0] for e in standins.log]


def test_standins_capture_warm_up_and_replay_in_the_order_torch_prescribes(monkeypatch):
    graphed, eager, standins = _standin_sampler(monkeypatch, clip_x0=True)
    seeds = [4, 2**32 - 1, 9]
    out = graphed.sample(seeds=seeds)
    torch.testing.assert_close(out, eager.sample(seeds=seeds), rtol=0, atol=0)
    run, = graphed._runs.values()
    assert set(run.graphs) == {1} and not run.eager and run.pool is not None
    names = _names(standins)
    # warm-up on a side stream that waits for the caller's, then the caller's waits for it; then the pool,
    # then the capture on its own stream, in torch's order; the caller's stream is current for the replays
    first = names.index
    assert first("device") < first("Stream") < first("stream_enter") < first("graph_pool_handle") \
        < first("CUDAGraph") < first("capture_begin") < first("capture_end") < first("replay")
    side = standins.events("Stream")[0][1]
    assert standins.events("wait_stream") == [("wait_stream", side, "default"), ("wait_stream", "default", side)]
    (_, graph_id, pool, capture_stream), = standins.events("capture_begin")
    assert pool == run.pool and capture_stream not in ("default", side)
    assert standins.events("set_stream") == [("set_stream", "default")] and standins.current.name == "default"
    replays = standins.events("replay")
    assert replays == [("replay", graph_id, "default")] * 6  # one replay per step, on the caller's stream
    # a second call replays the same graph: no warm-up, no capture
    before = len(standins.log)
    again = graphed.sample(seeds=[7, 8, 9])
    assert set(_names(standins)[before:]) == {"replay"}
    torch.testing.assert_close(again, eager.sample(seeds=[7, 8, 9]), rtol=0, atol=0)


def test_standin_graph_replays_its_buffers_not_their_replacements():
    """The stand-in itself can fail: a replay reads the tensors the capture saw, as a CUDA graph does."""
    from cuda_standins import CudaStandIns

    mp = pytest.MonkeyPatch()
    try:
        standins = CudaStandIns(mp)
        x, out = torch.arange(4.0), torch.zeros(4)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out.copy_(x * 2 + 1)
        assert torch.equal(out, torch.zeros(4))  # a capture launches nothing
        x.mul_(10)
        graph.replay()
        assert torch.equal(out, torch.arange(4.0) * 20 + 1)
        x = torch.ones(4)  # replaced, not refilled: the graph still reads the old tensor
        graph.replay()
        assert torch.equal(out, torch.arange(4.0) * 20 + 1)
        with pytest.raises(RuntimeError, match="previous error during capture"):
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                float(out.sum())
        assert standins.current.name != "default"  # torch leaves the capture stream current: the sampler's bug
    finally:
        mp.undo()


@pytest.mark.parametrize("steps_per_graph,batch_size", [(4, None), (6, 2)])
def test_standins_steps_per_graph_and_padded_batches_equal_eager(monkeypatch, steps_per_graph, batch_size):
    graphed, eager, standins = _standin_sampler(monkeypatch, steps_per_graph=steps_per_graph)
    seeds = [1, 2, 3, 4, 5]
    out = graphed.sample(seeds=seeds, batch_size=batch_size)
    torch.testing.assert_close(out, eager.sample(seeds=seeds, batch_size=batch_size), rtol=0, atol=0)
    run, = graphed._runs.values()
    assert set(run.graphs) == ({4, 2} if steps_per_graph == 4 else {6})  # 6 steps = 4 + 2, or one graph
    batches = 1 if batch_size is None else 3
    assert len(standins.events("capture_begin")) == len(run.graphs)
    assert len(standins.events("replay")) == batches * len(run.graphs)


@pytest.mark.parametrize("capture_runs_ops", [False, True])
def test_standins_failed_capture_warns_restores_the_stream_and_state_and_samples_eagerly(monkeypatch,
                                                                                        capture_runs_ops):
    model = tiny_unet(seed=22, size=8)

    def syncing_model(x, t):
        float(t.sum())  # reads a value on the host: not capturable
        return model(x, t)

    graphed, eager, standins = _standin_sampler(monkeypatch, syncing_model, capture_runs_ops=capture_runs_ops,
                                                image_shape=(3, 8, 8))
    with pytest.warns(RuntimeWarning, match="capture failed"):
        out = graphed.sample(seeds=[1, 2])
    assert standins.current.name == "default"  # the caller's stream, not the capture stream
    run, = graphed._runs.values()
    assert run.eager and not run.graphs and not standins.events("replay")
    torch.testing.assert_close(out, eager.sample(seeds=[1, 2]), rtol=0, atol=0)
    before = len(standins.log)
    graphed.sample(seeds=[1, 2])  # eager from now on: no second capture
    assert not standins.events("capture_begin")[1:] and len(standins.log) == before


@pytest.mark.parametrize("solver", ["dpmpp-3m", "unipc", "dpmpp-2m-sde"])
def test_standins_solver_history_under_capture_equals_eager(monkeypatch, solver):
    """The multistep solvers' history (and UniPC's last sample) are static buffers the graph updates."""
    graphed, eager, standins = _standin_sampler(monkeypatch, solver=solver, timesteps=7, steps_per_graph=3)
    out = graphed.sample(seeds=[3, 4])
    run, = graphed._runs.values()
    assert run.history and set(run.graphs) == {3, 1}
    torch.testing.assert_close(out, eager.sample(seeds=[3, 4]), rtol=0, atol=0)
    for buffer in run.history:  # poisoned history must be zeroed before each sample, not read
        buffer.fill_(float("nan"))
    torch.testing.assert_close(graphed.sample(seeds=[3, 4]), out, rtol=0, atol=0)


def test_standins_generator_noise_replays_one_step_per_draw(monkeypatch):
    graphed, eager, standins = _standin_sampler(monkeypatch, timesteps=5)
    out = graphed.sample(n=2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, eager.sample(n=2, generator=torch.Generator().manual_seed(3)), rtol=0, atol=0)
    assert len(standins.events("replay")) == 5


def test_seeds_reach_the_device_in_one_upload_per_call(monkeypatch):
    """Every batch's seeds come from one ``host_to_device`` upload (pinned, non-blocking on CUDA), not a
    pageable copy per batch; the CUDA test below checks the absence of host waits for real."""
    import ddpm_fast.sampler as sampler_module

    uploads = []

    def recording(x, device):
        uploads.append(x.clone())
        return host_to_device(x, device)

    monkeypatch.setattr(sampler_module, "host_to_device", recording)
    sampler = FastSampler(tiny_unet(seed=23, size=8), NoiseSchedule.linear(1000), timesteps=2)
    out = sampler.sample(seeds=[5, 6, 7], batch_size=2)
    assert [u.tolist() for u in uploads] == [[5, 6, 7, 7]]  # padded to whole batches, one copy
    torch.testing.assert_close(out[2:], sampler.sample(seeds=[7])[:1], rtol=0, atol=0)


@cuda_only
def test_cuda_sampling_never_waits_for_the_gpu_after_the_first_capture():
    model = tiny_unet(seed=24).cuda()
    sampler = FastSampler(model, NoiseSchedule.linear(1000), timesteps=4, compile=False)
    first = sampler.sample(seeds=[1, 2, 3], batch_size=2)  # warm-up: capture, cuDNN's search
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = sampler.sample(seeds=[1, 2, 3], batch_size=2)  # two batches: seeds, noise, replays
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(again, first, rtol=0, atol=0)


# -- the training step's CUDA-default branches on the CPU -------------------------------------------------

def _train_config(tmp_path, **kw):
    # no dropout: its mask would be drawn in memory order, so NCHW and NHWC runs would drop other units
    base = dict(data="digits", out=str(tmp_path / "run"), preset="tiny", steps=4, batch_size=8, progress=False,
                unet={"block_out_channels": [8, 16], "dropout": 0.0}, device="cpu", compile=False)
    return TrainConfig(**{**base, **kw})


def test_channels_last_training_step_equals_the_contiguous_one_within_rounding(tmp_path):
    """channels_last is a CUDA default (the model and every batch go NHWC): on the CPU the same step, with
    the convolutions' sums in another order. At step 0 (the same weights, batch, t and noise) the losses
    differ by at most the loss's response to every layer's rounding, both sides (tolerances)."""
    from tolerances import rounding_response

    nhwc = Trainer(_train_config(tmp_path, channels_last=True))
    nchw = Trainer(_train_config(tmp_path, channels_last=False))
    probe = Trainer(_train_config(tmp_path, channels_last=False))
    assert nhwc.model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    hook = nhwc.model.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    loss_nhwc, grad_nhwc = nhwc.train_step()
    hook.remove()
    assert seen[0].is_contiguous(memory_format=torch.channels_last)  # the batch went NHWC too
    loss_nchw, grad_nchw = nchw.train_step()
    x0 = next(probe.stream)  # the same first batch
    bound = rounding_response(lambda: probe.loss_on_batch(x0, 0).reshape(1), probe.model, signs=(1.0,))
    assert torch.isfinite(grad_nhwc) and torch.isfinite(grad_nchw)
    assert abs(loss_nhwc.item() - loss_nchw.item()) <= bound, (loss_nhwc.item(), loss_nchw.item(), bound)


def test_cuda_rng_states_are_saved_and_restored_through_standins(tmp_path, monkeypatch):
    """A CUDA run's checkpoint holds every GPU's RNG state and a resume sets them back: torch.cuda's RNG
    calls stood in (a CPU run has no GPU state to keep)."""
    trainer = Trainer(_train_config(tmp_path))
    trainer.train_step()
    gpu_state = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [gpu_state.clone(), gpu_state.clone()])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.append(list(states)))
    path = trainer.save(tmp_path / "run")
    monkeypatch.undo()
    from ddpm_fast.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    assert [s.tolist() for s in ckpt.state["rng"]["cuda"]] == [gpu_state.tolist()] * 2
    resumed = Trainer(_train_config(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.append(list(states)))
    resumed.load_state(ckpt)
    monkeypatch.undo()
    (states,) = restored  # one GPU here: the first saved state only
    assert [s.tolist() for s in states] == [gpu_state.tolist()]
    assert resumed.step == 1


def test_bench_ceilings_time_with_cuda_events_through_standins(monkeypatch):
    """The bench's ceilings (MFU's denominator) time with CUDA events: 3 warm-ups, then one event pair per
    repeat, synchronised on the end event. Stood in on the CPU with small sizes."""
    from cuda_standins import CudaStandIns
    from ddpm_fast.bench import timing

    standins = CudaStandIns(monkeypatch)
    flops = timing.measure_matmul_flops(torch.device("cpu"), n=32, dtype=torch.float32, repeats=3)
    assert flops > 0 and math.isfinite(flops)
    assert _names(standins) == ["event_record", "event_record", "event_synchronize"] * 3
    calls = []
    monkeypatch.setattr(timing, "_cuda_median_seconds", lambda work, repeats: calls.append(work()) or 0.5)
    assert timing.measure_copy_bandwidth(torch.device("cpu"), nbytes=4096, repeats=2) == 2 * 4096 / 0.5
    assert len(calls) == 1 and calls[0].shape == (1024,)


def test_bench_ceilings_on_a_cuda_device_record_a_failed_measurement_in_one_line(monkeypatch):
    """measure_ceilings' CUDA branch: a measurement that fails (here: no CUDA tensors on this machine) leaves
    the ceilings null with the reason, frees the cache, and the bench goes on."""
    from cuda_standins import CudaStandIns
    from ddpm_fast.bench import timing

    standins = CudaStandIns(monkeypatch)
    out = timing.measure_ceilings(torch.device("cuda"))
    assert out["bf16_matmul_tflops"] is None and out["copy_tb_s"] is None
    assert out["error"] and "\n" not in out["error"] and standins.events("empty_cache")


class _FakeNvml:
    """pynvml's stand-in: the calls describe_device makes, answered as an H200 would."""

    NVML_CLOCK_SM, NVML_CLOCK_MEM = 1, 2

    def __init__(self, pci_works=True):
        self.pci_works, self.calls = pci_works, []

    def __getattr__(self, name):
        answers = {"nvmlInit": None, "nvmlShutdown": None, "nvmlSystemGetDriverVersion": b"580.159.04",
                   "nvmlDeviceGetHandleByIndex": "handle-by-index", "nvmlDeviceGetName": b"NVIDIA H200",
                   "nvmlDeviceGetEnforcedPowerLimit": 700000}
        if name == "nvmlDeviceGetHandleByPciBusId":
            def by_pci(address):
                self.calls.append((name, address))
                if not self.pci_works:
                    raise RuntimeError("NVML_ERROR_NOT_FOUND")
                return "handle-by-pci"
            return by_pci
        if name == "nvmlDeviceGetMaxClockInfo":
            return lambda handle, clock: self.calls.append((name, handle)) or (1980 if clock == 1 else 3201)
        if name not in answers:
            raise AttributeError(name)
        return lambda *args: self.calls.append((name, *args)) or answers[name]


@pytest.mark.parametrize("pci_works", [True, False])
def test_describe_device_reads_a_cuda_device_through_torch_and_nvml_standins(monkeypatch, pci_works):
    """The bench's device description on a GPU: torch's properties, then NVML's handle matched by PCI
    address (else by index), its name, clocks and power limit."""
    import sys
    from types import SimpleNamespace

    from ddpm_fast import telemetry

    props = SimpleNamespace(name="NVIDIA H200", major=9, minor=0, multi_processor_count=132,
                            total_memory=143771 * 2**20, pci_domain_id=0, pci_bus_id=0x1B, pci_device_id=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    nv = _FakeNvml(pci_works)
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    info = telemetry.describe_device("cuda")
    assert info["name"] == "NVIDIA H200" and info["compute_capability"] == "9.0" and info["sm_count"] == 132
    assert info["memory_total_mib"] == 143771 and not info["cpu_only"]
    assert info["nvml"] and info["nvml_error"] is None and info["driver_version"] == "580.159.04"
    assert info["nvml_name"] == "NVIDIA H200" and info["power_limit_w"] == 700.0
    assert (info["max_sm_clock_mhz"], info["max_mem_clock_mhz"]) == (1980, 3201)
    assert ("nvmlDeviceGetHandleByPciBusId", b"00000000:1B:00.0") in nv.calls
    handle = "handle-by-pci" if pci_works else "handle-by-index"
    assert ("nvmlDeviceGetMaxClockInfo", handle) in nv.calls and ("nvmlShutdown",) in nv.calls


@pytest.mark.parametrize("asked,local_rank,world,want", [
    ("cuda", "1", "2", "cuda:1"),          # under torchrun "cuda" is cuda:LOCAL_RANK
    (None, "0", "2", "cuda:0"),            # no device: CUDA when available, then the same rule
    ("cuda:1", "1", "2", "cuda:1"),        # naming one's own GPU is fine
    ("cuda:0", "1", "2", "names one GPU for 2 processes"),
    ("cuda", "2", "3", "LOCAL_RANK 2 but only 2 GPUs here"),
    ("meta", "0", "1", "is not supported"),
])
def test_resolve_device_under_torchrun_with_two_gpus_stood_in(monkeypatch, asked, local_rank, world, want):
    """distributed.resolve_device's CUDA rules with torch.cuda's availability and count stood in."""
    from ddpm_fast.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for name, value in (("RANK", local_rank), ("LOCAL_RANK", local_rank), ("WORLD_SIZE", world)):
        monkeypatch.setenv(name, value)
    if want.startswith("cuda"):
        assert resolve_device(asked) == torch.device(want)
    else:
        with pytest.raises(ValueError, match=want):
            resolve_device(asked)
