"""The benchmark harness itself: FLOP counts, timing arithmetic, telemetry without NVML, the JSON schema.

Speed is never asserted here (no figure is checked against a threshold); these tests check that the
harness counts, measures, labels and records correctly, on a CPU, in a few seconds.
"""

import json
import sys
import threading
import time
import types

import pytest
import torch
import torch.nn.functional as F

from ddpm_fast import bench, flops, telemetry
from ddpm_fast.bench import run_loop as bench_run_loop
from ddpm_fast.bench import settings as bench_settings
from ddpm_fast.diffusers_io import diffusers_config_from_unet
from ddpm_fast.unet import UNet, UNetConfig

# ---------------------------------------------------------------------------------------------------
# FLOP counting
# ---------------------------------------------------------------------------------------------------


def test_cifar10_forward_flops_match_the_published_count():
    # ANCHORS section 1: 12.1 GFLOP per image in convolutions and linears, about 12.4 with attention.
    config = UNetConfig.cifar10()
    conv_linear = flops.unet_forward_flops(config, include_attention=False)
    total = flops.unet_forward_flops(config, include_attention=True)
    assert abs(conv_linear - 12.1e9) / 12.1e9 < 0.01
    assert abs(total - 12.4e9) / 12.4e9 < 0.01
    assert total > conv_linear  # the attention matmuls were counted, not silently dropped


def test_training_step_costs_about_three_forwards():
    config = UNetConfig.tiny()
    forward = flops.unet_forward_flops(config)
    training = flops.unet_training_flops(config)
    assert 2.9 < training / forward < 3.1


@pytest.mark.parametrize("batch,fin,fout", [(1, 7, 5), (3, 16, 33)])
def test_linear_flops_are_two_per_multiply_add(batch, fin, fout):
    layer = torch.nn.Linear(fin, fout)
    count = flops.count_flops(layer, torch.randn(batch, fin))
    assert count.conv_linear == 2 * batch * fin * fout
    assert count.attention == 0


@pytest.mark.parametrize("cin,cout,k,size", [(3, 4, 3, 6), (5, 2, 1, 7)])
def test_conv_flops_match_the_formula(cin, cout, k, size):
    conv = torch.nn.Conv2d(cin, cout, k, padding=k // 2)
    count = flops.count_flops(conv, torch.randn(2, cin, size, size))
    assert count.conv_linear == 2 * 2 * cout * cin * k * k * size * size


@pytest.mark.parametrize("length,dim", [(16, 8), (9, 32)])
def test_attention_matmuls_are_counted_as_attention(length, dim):
    q, k, v = (torch.randn(2, 1, length, dim) for _ in range(3))
    count = flops.count_flops(F.scaled_dot_product_attention, q, k, v)
    # q k^T and attn v: two (L x D) x (D x L)-sized products per head and batch element
    assert count.attention == 2 * 2 * (2 * length * length * dim)


def test_diffusers_side_by_side_is_the_same_network():
    diffusers = pytest.importorskip("diffusers")
    for config in (UNetConfig.cifar10(), UNetConfig.tiny()):
        with torch.device("meta"):
            theirs = diffusers.UNet2DModel.from_config(diffusers_config_from_unet(config))
            ours = UNet(config)
        assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters())
    assert sum(p.numel() for p in ours.parameters()) > 0


# ---------------------------------------------------------------------------------------------------
# Timing arithmetic
# ---------------------------------------------------------------------------------------------------


def test_sampling_figures_are_extrapolated_to_the_full_schedule():
    g = torch.Generator().manual_seed(1)
    seconds = (torch.rand(5, generator=g) + 0.5).tolist()
    batch, steps, per_image, peak = 8, 20, 3e9, 5e12
    out = bench.throughput(seconds, "sampling", batch, steps, per_image, peak)
    median = sorted(seconds)[2]
    step_s = median / steps
    assert out["median_s"] == pytest.approx(median)
    assert out["ms_per_step"] == pytest.approx(1e3 * step_s)
    assert out["images_per_s"] == pytest.approx(batch / (step_s * bench.FULL_STEPS))
    assert out["steps_reported"] == bench.FULL_STEPS and out["extrapolated"]
    assert out["mfu"] == pytest.approx(batch * per_image / step_s / peak)
    assert out["repeats"] == 5


def test_training_figures_and_missing_peak():
    out = bench.throughput([0.5, 0.7], "training", 4, 10, 1e9, None)
    assert out["ms_per_step"] == pytest.approx(1e3 * 0.6 / 10)
    assert out["images_per_s"] == pytest.approx(4 * 10 / 0.6)
    assert out["mfu"] is None and not out["extrapolated"]


def test_time_runner_warms_up_then_times_each_run():
    calls = []
    runner = bench.Runner(torch.device("cpu"), lambda: calls.append("run"), warmup=lambda: calls.append("warm"))
    seconds = bench.time_runner(runner, repeats=3, warmup=2)
    assert calls == ["warm", "warm", "run", "run", "run"] and len(seconds) == 3
    # a budget stops repeating after the first run that exceeds it
    slow = bench.Runner(torch.device("cpu"), lambda: time.sleep(0.02))
    assert len(bench.time_runner(slow, repeats=10, warmup=0, max_seconds=0.01)) == 1


# ---------------------------------------------------------------------------------------------------
# Telemetry
# ---------------------------------------------------------------------------------------------------


def _break_nvml(monkeypatch):
    pynvml = pytest.importorskip("pynvml")

    def no_library():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_library)


def test_machine_without_nvml_is_reported_not_fatal(monkeypatch):
    _break_nvml(monkeypatch)
    info = telemetry.describe_device("cpu")
    assert info["nvml"] is False and "NVML" in info["nvml_error"]
    assert info["cpu_only"] is True and info["name"].startswith("CPU: ")
    sampler = telemetry.GpuSampler("cuda", interval_s=0.01).start()  # as if a GPU were there
    sampler.stop()
    summary = sampler.summary()
    assert summary["available"] is False and summary["samples"] == 0
    assert "NVML unavailable" in summary["reason"]


class _FakeNvml(types.SimpleNamespace):
    """Just enough of pynvml for the sampler: the SM clock counts up by 10 MHz per reading."""

    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 1, 2, 0

    def __init__(self):
        super().__init__()
        self.reads = 0
        self.lock = threading.Lock()
        self.shutdowns = 0

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetClockInfo(self, handle, which):
        if which == self.NVML_CLOCK_MEM:
            return 2619
        with self.lock:
            self.reads += 1
            return 1000 + 10 * self.reads

    def nvmlDeviceGetPowerUsage(self, handle):
        return 350_000  # milliwatts

    def nvmlDeviceGetTemperature(self, handle, which):
        return 51

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(used=3 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, handle):
        raise RuntimeError("not supported on this GPU")  # a metric that fails must just be absent


def test_sampler_summarises_what_nvml_reports(monkeypatch):
    fake = _FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(telemetry, "_nvml_handle", lambda nv, device: "handle")
    sampler = telemetry.GpuSampler("cuda", interval_s=0.005).start()
    deadline = time.time() + 5
    while len(sampler.samples) < 4 and time.time() < deadline:
        time.sleep(0.01)
    sampler.stop()
    rows = list(sampler.samples)
    assert len(rows) >= 4 and fake.shutdowns == 1
    clocks = [r["sm_clock_mhz"] for r in rows]
    summary = sampler.summary()
    assert summary["available"] and summary["samples"] == len(rows)
    assert summary["sm_clock_mhz"] == pytest.approx({"min": min(clocks), "mean": sum(clocks) / len(clocks),
                                                     "max": max(clocks)})
    assert summary["power_w"]["mean"] == pytest.approx(350.0)
    assert summary["memory_used_mib"]["max"] == pytest.approx(3 * 1024)
    assert summary["gpu_util_pct"] is None
    # a window holds only the samples taken inside it
    window = sampler.summary(rows[1]["time"], rows[2]["time"])
    assert window["samples"] == 2 and window["sm_clock_mhz"]["min"] == clocks[1]


# ---------------------------------------------------------------------------------------------------
# The command line, the plan and the JSON
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--batch-sizes", "0,4"], ["--batch-sizes", "1,x"], ["--steps", "-3"],
                                  ["--impls", "reference,warp-drive"]])
def test_bad_arguments_are_one_line_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def _args(**overrides):
    args = bench.build_parser().parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_ablation_adds_one_option_at_a_time_and_ends_at_ddpm_fast():
    settings = bench.resolve_settings(_args(device="cpu", impls=["ablation"]))
    settings.device = torch.device("cuda")  # plan for a GPU without needing one
    stages = [c for c in bench.plan_cases(settings) if c.impl.startswith("fast:")]
    assert [c.impl for c in stages] == [name for name, _ in bench.ABLATION_STAGES]
    for before, after in zip(stages, stages[1:]):
        changed = [k for k in after.options if after.options[k] != before.options[k]]
        assert len(changed) == 1
    assert stages[-1].options == bench.fast_sampler_options(torch.device("cuda"))


def test_quick_cpu_settings_are_small_and_skip_compilation():
    settings = bench.resolve_settings(_args(device="cpu", quick=True))
    assert settings.batch_sizes == [1] and settings.steps <= 5
    assert "diffusers-compiled" not in settings.impls and settings.ablation_batch is None
    assert bench.fast_sampler_options(torch.device("cpu"))["compile"] is False


def test_default_output_is_dated_and_named_after_the_device():
    import datetime

    path = bench.default_out_path({"name": "NVIDIA H100 80GB HBM3"}, datetime.datetime(2026, 1, 2))
    assert path.as_posix() == "benchmarks/results/2026-01-02-nvidia-h100-80gb-hbm3.json"


def _tiny_run(tmp_path, monkeypatch, *extra):
    _break_nvml(monkeypatch)
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        # one thread: on a busy shared CPU, OpenMP barriers make tiny multi-threaded ops 100x slower
        rc = bench.main(["--device", "cpu", "--model", "tiny", "--steps", "1", "--repeats", "1", "--threads", "1",
                         "--train-steps", "1", "--out", str(out), *extra])
    finally:
        torch.set_num_threads(threads)
    return rc, json.loads(out.read_text()), out.with_suffix(".md").read_text()


def test_cpu_run_writes_a_valid_labelled_result(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    rc, result, markdown = _tiny_run(tmp_path, monkeypatch, "--impls", "reference,diffusers,ddpm_fast",
                                     "--train-batch-sizes", "2")
    assert rc == 0, [c["error"] for c in result["cases"]]
    bench.validate_result(result)
    assert result["cpu_only"] is True and result["device"]["name"].startswith("CPU: ")
    assert result["device"]["nvml"] is False and result["telemetry"]["available"] is False
    assert result["ceilings"]["bf16_matmul_tflops"] is None
    assert result["command"] and "--model" in result["bench_argv"]
    got = {(c["kind"], c["impl"]) for c in result["cases"]}
    assert got == {("sampling", "reference"), ("sampling", "diffusers"), ("sampling", "ddpm_fast"),
                   ("training", "reference"), ("training", "ddpm_fast")}
    for case in result["cases"]:
        assert case["error"] is None and case["mfu"] is None
        assert case["images_per_s"] > 0 and case["ms_per_step"] > 0
        if case["kind"] == "sampling":
            assert case["steps_timed"] == 1 and case["steps_reported"] == bench.FULL_STEPS
    assert result["model"]["forward_gflop"] == pytest.approx(flops.unet_forward_flops(UNetConfig.tiny()) / 1e9)
    assert "**CPU figures**" in markdown
    for impl in ("reference", "diffusers", "ddpm_fast"):
        assert f"| {impl} | 1 |" in markdown


def test_a_failing_case_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    def flaky(case, ctx):
        if case.impl == "reference":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")
        return bench.Runner(ctx.device, lambda: time.sleep(0.001))  # the harness, not a model, is under test

    monkeypatch.setattr(bench_run_loop, "make_runner", flaky)  # the name run_case calls
    rc, result, markdown = _tiny_run(tmp_path, monkeypatch, "--only", "sampling", "--impls", "reference,ddpm_fast")
    assert rc == 1
    bench.validate_result(result)
    failed, ran = result["cases"]
    assert failed["impl"] == "reference" and "out of memory" in failed["error"]
    assert failed["images_per_s"] is None
    assert ran["impl"] == "ddpm_fast" and ran["error"] is None and ran["images_per_s"] > 0
    assert "error: OutOfMemoryError" in markdown


def _valid_result():
    case = {"kind": "sampling", "impl": "reference", "batch_size": 1, "steps": 3, "steps_timed": 3,
            "steps_reported": bench.FULL_STEPS, "images_per_s": 0.5, "ms_per_step": 2.0, "mfu": None, "error": None}
    return {"schema_version": 1, "cpu_only": True, "device": {"name": "CPU: test"}, "software": {},
            "command": "ddpm-fast bench", "cases": [case]}


@pytest.mark.parametrize("breakage,message", [
    (lambda r: r["device"].pop("name"), "missing 'name'"),
    (lambda r: r["device"].update(name="NVIDIA H100"), "must start with 'CPU: '"),
    (lambda r: r["cases"][0].update(mfu=0.3), "mfu must be null"),
    (lambda r: r["cases"][0].update(images_per_s=-1.0), "positive finite"),
    (lambda r: r["cases"][0].update(ms_per_step=float("nan")), "positive finite"),
    (lambda r: r["cases"][0].pop("steps_timed"), "steps_timed"),
    (lambda r: r.pop("cases"), "missing 'cases'"),
])
def test_validator_rejects_broken_results(breakage, message):
    result = _valid_result()
    bench.validate_result(result)
    breakage(result)
    with pytest.raises(ValueError, match=message):
        bench.validate_result(result)


def test_markdown_ratios_compare_like_with_like():
    def case(kind, impl, batch, ips):
        return {"kind": kind, "impl": impl, "batch_size": batch, "steps": 10, "images_per_s": ips,
                "ms_per_step": 1.0, "mfu": 0.25, "error": None}

    result = {"device": {"name": "NVIDIA Test"}, "cases": [
        case("sampling", "diffusers", 64, 10.0), case("sampling", "diffusers-compiled", 64, 20.0),
        case("sampling", "ddpm_fast", 64, 50.0), case("sampling", "ddpm_fast", 1, 7.0),
        case("training", "reference", 128, 100.0), case("training", "ddpm_fast", 128, 300.0),
        case("sampling", "fast:base", 64, 4.0), case("sampling", "fast:+bf16", 64, 6.0)]}
    lines = bench.markdown_report(result).splitlines()
    row = next(line for line in lines if line.startswith("| ddpm_fast | 64 |"))
    assert row.endswith("| 25.0% | 5.00x | 2.50x |")
    lonely = next(line for line in lines if line.startswith("| ddpm_fast | 1 |"))
    assert lonely.endswith("| — | — |")  # no baseline at batch 1: no ratio invented
    train = next(line for line in lines if line.startswith("| ddpm_fast | 128 |"))
    assert train.endswith("| 3.00x |")
    stage = next(line for line in lines if line.startswith("| fast:+bf16 | 64 |"))
    assert stage.endswith("| 0.60x | 0.30x | 1.50x |")  # vs diffusers, vs compiled, vs the stage before


def test_ablation_last_stage_reuses_the_ddpm_fast_case_instead_of_timing_it_twice():
    cuda = torch.device("cuda")
    last = bench.Case("sampling", "fast:+embedding-table", 64, 50, bench.fast_sampler_options(cuda))
    earlier = bench.Case("sampling", "fast:+cuda-graph", 64, 50, {**bench.fast_sampler_options(cuda),
                                                                   "embedding_table": False})
    done = [{"kind": "sampling", "impl": "ddpm_fast", "batch_size": 64, "steps": 50, "images_per_s": 30.0,
             "error": None}]
    reused = bench_settings._same_as_ddpm_fast(last, done, cuda)
    assert reused["impl"] == "fast:+embedding-table" and reused["same_as"] == "ddpm_fast"
    assert reused["images_per_s"] == 30.0
    assert bench_settings._same_as_ddpm_fast(earlier, done, cuda) is None
    assert bench_settings._same_as_ddpm_fast(last, [{**done[0], "batch_size": 1}], cuda) is None
    assert bench_settings._same_as_ddpm_fast(last, [{**done[0], "error": "OutOfMemoryError"}], cuda) is None


@pytest.mark.parametrize("solver", ["dpmpp-2m", "unipc"])
def test_bench_times_a_solver_against_the_matching_diffusers_scheduler(tmp_path, monkeypatch, solver):
    """--solver: every sampling case runs that solver (diffusers its scheduler), figures as timed."""
    pytest.importorskip("diffusers")
    rc, result, markdown = _tiny_run(tmp_path, monkeypatch, "--impls", "reference,diffusers,ddpm_fast",
                                     "--only", "sampling", "--solver", solver, "--steps", "2")
    assert rc == 0, [c["error"] for c in result["cases"]]
    bench.validate_result(result)
    assert result["settings"]["solver"] == solver and result["settings"]["steps_reported"] == 2
    by_impl = {c["impl"]: c for c in result["cases"]}
    assert by_impl["ddpm_fast"]["config"]["resolved"]["solver"] == solver
    expected = "UniPCMultistepScheduler" if solver == "unipc" else "DPMSolverMultistepScheduler"
    assert by_impl["diffusers"]["config"]["scheduler"] == expected
    for case in result["cases"]:
        assert case["error"] is None and case["steps_reported"] == 2 and not case["extrapolated"]
    assert f"## Sampling with {solver}: images/s for 2-step samples" in markdown
