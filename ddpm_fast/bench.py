"""``ddpm-fast bench``: sampling and training throughput of the CIFAR-10 U-Net, side by side.

Sampling implementations (all on the same U-Net architecture with random weights: speed does not depend
on them), each timed for a sampler of ``steps`` steps and reported as images/s for the full 1000-step
schedule (per-step time x 1000; the JSON says so with ``steps_timed`` / ``steps_reported``):

- ``reference``: ``ddpm_fast.reference.sample`` (the oracle) with the U-Net in eager fp32;
- ``diffusers``: diffusers' ``DDPMPipeline`` as shipped (``UNet2DModel`` + ``DDPMScheduler``, fp32);
- ``diffusers-compiled``: the diffusers maintainers' recipe (bf16, channels-last, fused QKV projections,
  SDPA attention, inductor flags from the diffusion-fast blog, ``torch.compile(fullgraph=True)``);
- ``ddpm_fast``: ``FastSampler`` with every optimisation on, and the ablation ``fast:*`` that adds them one
  at a time (bf16, channels-last, compile, fused update, CUDA graph, embedding table).

Training: one optimizer step of Ho's recipe for the reference (eager fp32) against the fast path.
MFU = counted FLOPs per second (``ddpm_fast.flops``) over the bf16 matrix rate measured in the same run
(an 8192^3 bf16 matmul); null on a CPU. Every case runs in its own try/except: a failure (an OOM at batch
512, a missing optional package) is recorded as ``error`` and the run goes on. The JSON is rewritten
after every case, so a run cut short by a time limit still leaves its finished cases.

``benchmarks/bench_sampling.py``, ``benchmarks/bench_training.py`` and the pytest-benchmark suite in
``benchmarks/`` call the same functions.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import telemetry

SCHEMA_VERSION = 1
SAMPLING_IMPLS = ("reference", "diffusers", "diffusers-compiled", "ddpm_fast")
TRAINING_IMPLS = ("reference", "ddpm_fast")
BASELINES = ("diffusers", "diffusers-compiled")  # the ratio columns of the sampling tables
MODELS = ("cifar10", "digits", "tiny")
COMPILE_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")
FULL_STEPS = 1000  # the schedule's length: what images/s figures are reported for

# The ablation: each stage turns on one more FastSampler option, in the order the issue lists them.
ABLATION_STAGES = (
    ("fast:base", {}),
    ("fast:+bf16", {"dtype": "bfloat16"}),
    ("fast:+channels-last", {"channels_last": True}),
    ("fast:+compile", {"compile": True}),
    ("fast:+fused-update", {"fused_update": True}),
    ("fast:+cuda-graph", {"cuda_graph": True}),
    ("fast:+embedding-table", {"embedding_table": True}),
)
_FAST_OFF = dict(dtype="float32", channels_last=False, compile=False, fused_update=False, cuda_graph=False,
                 embedding_table=False)


# ---------------------------------------------------------------------------------------------------
# Cases and what a run needs to build them
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One thing to time. steps: sampler steps (sampling) or optimizer steps (training) per timed run."""

    kind: str  # "sampling" | "training"
    impl: str
    batch_size: int
    steps: int
    options: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass
class BenchContext:
    """What every case shares: device, U-Net config, schedule, and one set of initial weights."""

    device: torch.device
    model_name: str = "cifar10"
    seed: int = 0
    compile_mode: str = "default"  # diffusers-compiled's torch.compile mode
    fast_compile_mode: str | None = None  # None: FastSampler's own choice when compile=True
    _config: object = None
    _weights: dict | None = None

    @property
    def config(self):
        if self._config is None:
            from .unet import UNetConfig

            self._config = getattr(UNetConfig, self.model_name)()
        return self._config

    @property
    def schedule(self):
        from .schedule import NoiseSchedule

        return NoiseSchedule.linear(FULL_STEPS)

    def fresh_unet(self):
        """A new ``ddpm_fast.unet.UNet`` on the device with this run's weights (the same for every case)."""
        from .unet import UNet

        if self._weights is None:
            torch.manual_seed(self.seed)
            self._weights = {k: v.detach().clone() for k, v in UNet(self.config).state_dict().items()}
        model = UNet(self.config)
        model.load_state_dict(self._weights)
        return model.to(self.device)

    def image_shape(self, batch_size: int) -> tuple:
        c = self.config
        return (batch_size, c.in_channels, c.sample_size, c.sample_size)


def diffusers_unet_config(config) -> dict:
    """The ``UNet2DModel`` keyword arguments equivalent to a ``UNetConfig`` (see ANCHORS section 1)."""
    levels = len(config.block_out_channels)
    attention = set(config.attention_levels)
    return dict(
        sample_size=config.sample_size,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        down_block_types=tuple("AttnDownBlock2D" if i in attention else "DownBlock2D" for i in range(levels)),
        up_block_types=tuple("AttnUpBlock2D" if levels - 1 - i in attention else "UpBlock2D" for i in range(levels)),
        norm_num_groups=config.norm_num_groups,
        norm_eps=config.norm_eps,
        attention_head_dim=config.attention_head_dim,
        downsample_padding=0,
        flip_sin_to_cos=config.flip_sin_to_cos,
        freq_shift=config.freq_shift,
        dropout=config.dropout,
        act_fn="silu",
        time_embedding_type="positional",
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dtype(name) -> torch.dtype:
    return name if isinstance(name, torch.dtype) else getattr(torch, name)


# ---------------------------------------------------------------------------------------------------
# Runners: one callable per case doing one timed unit of work, synchronised at its end
# ---------------------------------------------------------------------------------------------------
class Runner:
    """``runner()`` does one timed unit (a batch sampled / ``steps`` optimizer steps) and synchronises.

    ``warmup()`` does whatever must happen before timing (compilation, graph capture, cuDNN plans); the
    default is one full unit. ``context()`` wraps both (e.g. inductor flags that must hold while compiling).
    ``config`` records what was actually configured, for the JSON.
    """

    def __init__(self, device: torch.device, work, warmup=None, context=None, config=None):
        self.device = device
        self._work = work
        self._warmup = warmup
        self._context = context
        self.config = config or {}

    def __call__(self) -> None:
        self._work()
        _sync(self.device)

    def warmup(self) -> None:
        (self._warmup or self._work)()
        _sync(self.device)

    def context(self):
        return self._context() if self._context is not None else contextlib.nullcontext()


def _reference_sampling(case: Case, ctx: BenchContext) -> Runner:
    from . import reference

    model = ctx.fresh_unet().eval()
    schedule = ctx.schedule
    generator = torch.Generator(ctx.device).manual_seed(ctx.seed)
    shape = ctx.image_shape(case.batch_size)

    def work(steps=case.steps):
        reference.sample(model, schedule, shape, generator=generator, timesteps=steps, variance="fixed_large",
                         clip_x0=True, device=ctx.device)

    # Eager code needs no full-length warm-up: two steps load the kernels and cuDNN plans.
    return Runner(ctx.device, work, warmup=lambda: work(min(2, case.steps)),
                  config={"dtype": "float32", "model": "ddpm_fast.unet.UNet (eager)", "variance": "fixed_large",
                          "clip_x0": True})


def _diffusers_pipeline(ctx: BenchContext):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(ctx.seed)
    unet = UNet2DModel(**diffusers_unet_config(ctx.config)).to(ctx.device).eval()
    # google/ddpm-cifar10-32's scheduler: linear betas, fixed_large variance, x0 clipped to [-1, 1].
    scheduler = DDPMScheduler(num_train_timesteps=FULL_STEPS, beta_schedule="linear", beta_start=1e-4,
                              beta_end=0.02, variance_type="fixed_large", clip_sample=True)
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_sampling(case: Case, ctx: BenchContext) -> Runner:
    pipe = _diffusers_pipeline(ctx)
    generator = torch.Generator(ctx.device).manual_seed(ctx.seed)

    def work(steps=case.steps):
        # output_type "pt": a device tensor, as ddpm_fast returns (no PIL encoding, no host copy). Also
        # the only type that works in bf16: "np"/"pil" call .numpy(), which has no bfloat16.
        pipe(batch_size=case.batch_size, generator=generator, num_inference_steps=steps, output_type="pt")

    params = sum(p.numel() for p in pipe.unet.parameters())
    return Runner(ctx.device, work, warmup=lambda: work(min(2, case.steps)),
                  config={"dtype": "float32", "unet_parameters": params, "output_type": "pt",
                          "attention": _attention_processor(pipe.unet)})


def _attention_processor(unet) -> str | None:
    """Class name of the attention processor diffusers' U-Net uses (SDPA's AttnProcessor2_0 by default)."""
    for module in unet.modules():
        processor = getattr(module, "processor", None)
        if processor is not None:
            return type(processor).__name__
    return None


# inductor flags from the diffusers docs / diffusion-fast blog ("torch.compile ... max-autotune" recipe).
_DIFFUSERS_INDUCTOR_FLAGS = dict(conv_1x1_as_mm=True, coordinate_descent_tuning=True, epilogue_fusion=False,
                                 coordinate_descent_check_all_directions=True)


def _diffusers_compiled_sampling(case: Case, ctx: BenchContext) -> Runner:
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    pipe = _diffusers_pipeline(ctx)
    unet = pipe.unet.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    # What UNet2DConditionModel.fuse_qkv_projections() does, per module (UNet2DModel lacks the helper):
    # one (3C x C) projection instead of three, then SDPA.
    fused = 0
    for module in unet.modules():
        if isinstance(module, Attention):
            module.fuse_projections(fuse=True)
            module.set_processor(FusedAttnProcessor2_0())
            fused += 1
    pipe.unet = torch.compile(unet, mode=None if ctx.compile_mode == "default" else ctx.compile_mode,
                              fullgraph=True)
    generator = torch.Generator(ctx.device).manual_seed(ctx.seed)

    def work():
        pipe(batch_size=case.batch_size, generator=generator, num_inference_steps=case.steps, output_type="pt")

    def flags():
        import torch._inductor.config as inductor_config

        return inductor_config.patch(_DIFFUSERS_INDUCTOR_FLAGS)

    return Runner(ctx.device, work, context=flags,
                  config={"dtype": "bfloat16", "channels_last": True, "compile_mode": ctx.compile_mode,
                          "output_type": "pt", "fullgraph": True, "fused_qkv_attention_modules": fused,
                          "attention": _attention_processor(unet),
                          "inductor_flags": dict(_DIFFUSERS_INDUCTOR_FLAGS)})


def fast_sampler_options(device: torch.device, **overrides) -> dict:
    """FastSampler options for the full ``ddpm_fast`` case on ``device`` (GPU-only options off on a CPU)."""
    cuda = device.type == "cuda"
    options = dict(dtype="bfloat16" if cuda else "float32", channels_last=True, compile=cuda, fused_update=True,
                   cuda_graph=cuda, embedding_table=True)
    options.update(overrides)
    return options


def _fast_sampling(case: Case, ctx: BenchContext) -> Runner:
    from .sampler import FastSampler

    options = dict(case.options) or fast_sampler_options(ctx.device)
    if options.get("compile") is True and ctx.fast_compile_mode:
        options["compile"] = ctx.fast_compile_mode  # FastSampler takes a mode string for compile
    sampler = FastSampler(ctx.fresh_unet().eval(), ctx.schedule, timesteps=case.steps, variance="fixed_large",
                          clip_x0=True, device=ctx.device, **{**options, "dtype": _dtype(options["dtype"])})

    def work():
        sampler.sample(n=case.batch_size, batch_size=case.batch_size)

    # Warm-up is one full run: compilation and CUDA-graph capture are keyed to this batch and step count.
    return Runner(ctx.device, work, config={"requested": dict(options), "resolved": sampler.settings})


def _reference_training(case: Case, ctx: BenchContext) -> Runner:
    """Ho's step done plainly: oracle loss, eager fp32, Adam, grad-norm clip 1.0, EMA of the weights."""
    from . import reference

    model = ctx.fresh_unet().train()
    ema = [p.detach().clone() for p in model.parameters()]
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=2e-4)
    schedule = ctx.schedule
    generator = torch.Generator(ctx.device).manual_seed(ctx.seed)
    x0 = torch.rand(ctx.image_shape(case.batch_size), generator=generator, device=ctx.device) * 2 - 1

    def one_step():
        loss = reference.training_loss(model, x0, schedule, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - 0.9999)

    def work(steps=case.steps):
        for _ in range(steps):
            one_step()

    return Runner(ctx.device, work, warmup=lambda: work(1),
                  config={"dtype": "float32", "optimizer": "Adam(lr=2e-4)", "grad_clip": 1.0, "ema": 0.9999,
                          "noising": "reference.training_loss (torch ops)"})


def _fast_training(case: Case, ctx: BenchContext) -> Runner:
    """``ddpm_fast.training.Trainer.train_step`` on an in-memory set of random images on the device.

    On CUDA: fused seed-keyed noising (Triton), bf16 autocast, channels-last, torch.compile, fused Adam
    (the Trainer's defaults); on a CPU the Trainer's CPU defaults (fp32, eager).
    """
    from .data import ImageDataset
    from .training import TrainConfig, Trainer

    c = ctx.config
    generator = torch.Generator().manual_seed(ctx.seed)
    count = max(4 * case.batch_size, 256)  # a few batches' worth: the stream reshuffles per epoch
    images = torch.randint(0, 256, (count, c.in_channels, c.sample_size, c.sample_size), dtype=torch.uint8,
                           generator=generator)
    dataset = ImageDataset(images, flip=True, source="random uint8 images (benchmark)").to(ctx.device)
    config = TrainConfig(preset=ctx.model_name, batch_size=case.batch_size, device=str(ctx.device),
                         seed=ctx.seed, progress=False, flip=True, unet=_unet_overrides(ctx))
    trainer = Trainer(config, dataset=dataset)

    def work(steps=case.steps):
        for _ in range(steps):
            trainer.train_step()

    resolved = trainer.config
    # Compilation happens on the first step; one step is a full warm-up (shapes never change).
    return Runner(ctx.device, work, warmup=lambda: work(1),
                  config={"dtype": resolved.dtype, "compile": resolved.compile, "channels_last": resolved.channels_last,
                          "optimizer": f"Adam(lr={resolved.lr}, fused={ctx.device.type == 'cuda'})",
                          "grad_clip": resolved.grad_clip, "ema": resolved.ema_decay,
                          "noising": "ops.q_sample_seeded (fused Triton kernel on CUDA)"})


def _unet_overrides(ctx: BenchContext) -> dict:
    """UNetConfig fields where the Trainer's preset model would differ from this run's model."""
    from .training import unet_config_for

    c = ctx.config
    preset = unet_config_for(ctx.model_name, c.in_channels, c.sample_size).to_dict()
    return {k: v for k, v in c.to_dict().items() if preset.get(k) != v}


_SAMPLING_BUILDERS = {
    "reference": _reference_sampling,
    "diffusers": _diffusers_sampling,
    "diffusers-compiled": _diffusers_compiled_sampling,
    "ddpm_fast": _fast_sampling,
}
_TRAINING_BUILDERS = {"reference": _reference_training, "ddpm_fast": _fast_training}


def make_runner(case: Case, ctx: BenchContext) -> Runner:
    """Build the runner for one case (models built, nothing timed yet)."""
    if case.kind == "training":
        return _TRAINING_BUILDERS[case.impl](case, ctx)
    if case.impl.startswith("fast:"):
        return _fast_sampling(case, ctx)
    return _SAMPLING_BUILDERS[case.impl](case, ctx)


# ---------------------------------------------------------------------------------------------------
# Timing and the figures derived from it
# ---------------------------------------------------------------------------------------------------
def time_runner(runner: Runner, repeats: int, warmup: int = 1, max_seconds: float | None = None) -> list[float]:
    """Seconds per timed unit for up to ``repeats`` runs after ``warmup`` warm-up runs.

    Each run is bracketed by device synchronisation and read with ``time.perf_counter`` (wall time is the
    honest measure here: diffusers' loop is host-driven). Stops early, after at least one run, once the
    runs so far took more than ``max_seconds``.
    """
    with runner.context():
        for _ in range(warmup):
            runner.warmup()
        seconds = []
        for _ in range(repeats):
            _sync(runner.device)
            start = time.perf_counter()
            runner()
            seconds.append(time.perf_counter() - start)
            if max_seconds is not None and sum(seconds) > max_seconds:
                break
    return seconds


def throughput(seconds: list[float], kind: str, batch_size: int, steps: int, flops_per_image_step: int | None,
               peak_flops: float | None) -> dict:
    """Figures from the per-run times (median).

    sampling: ms_per_step = median / steps; images_per_s is for a FULL_STEPS-step sample (extrapolated
    when steps < FULL_STEPS). training: ms_per_step = median / steps (one optimizer step); images_per_s =
    batch * steps / median. flops_per_image_step: FLOPs one image costs per step (a forward for sampling,
    forward + backward for training). mfu = achieved FLOP/s / peak_flops, None without a peak (CPU).
    """
    median = statistics.median(seconds)
    step_s = median / steps
    if kind == "sampling":
        images_per_s = batch_size / (step_s * FULL_STEPS)
        steps_reported = FULL_STEPS
    else:
        images_per_s = batch_size / step_s
        steps_reported = steps
    achieved = None if flops_per_image_step is None else batch_size * flops_per_image_step / step_s
    return {
        "median_s": median,
        "seconds": seconds,
        "repeats": len(seconds),
        "spread_pct": 100.0 * (max(seconds) - min(seconds)) / median if median > 0 else None,
        "ms_per_step": 1e3 * step_s,
        "images_per_s": images_per_s,
        "steps_reported": steps_reported,
        "extrapolated": steps_reported != steps,
        "achieved_tflops": None if achieved is None else achieved / 1e12,
        "mfu": None if (achieved is None or not peak_flops) else achieved / peak_flops,
    }


def measure_matmul_flops(device: torch.device, n: int = 8192, dtype=torch.bfloat16, repeats: int = 20) -> float:
    """FLOP/s of an n^3 matrix product on ``device`` (median over ``repeats``, CUDA events; random data)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.matmul(a, b)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2.0 * n**3 / statistics.median(times)


def measure_copy_bandwidth(device: torch.device, nbytes: int = 2**30, repeats: int = 20) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2.0 * src.numel() * 4 / statistics.median(times)


def measure_ceilings(device: torch.device) -> dict:
    """The GPU's bf16 matrix rate and copy bandwidth, measured now (MFU's denominator). Nulls on a CPU."""
    out = {"bf16_matmul_tflops": None, "matmul_n": 8192, "copy_tb_s": None, "error": None}
    if device.type != "cuda":
        out["error"] = "not measured on a CPU: MFU is reported as null"
        return out
    try:
        out["bf16_matmul_tflops"] = measure_matmul_flops(device) / 1e12
        out["copy_tb_s"] = measure_copy_bandwidth(device) / 1e12
    except Exception as exc:  # noqa: BLE001 - without a ceiling MFU is null, the rest still runs
        out["error"] = _one_line(exc)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:500]


def run_case(case: Case, ctx: BenchContext, *, repeats: int, warmup: int, flops: dict, peak_flops: float | None,
             sampler: telemetry.GpuSampler | None = None, max_seconds: float | None = None) -> dict:
    """Build, warm up and time one case; returns its JSON record (``error`` set instead of raising)."""
    record = {"kind": case.kind, "impl": case.impl, "batch_size": case.batch_size, "steps": case.steps,
              "steps_timed": case.steps, "steps_reported": FULL_STEPS if case.kind == "sampling" else case.steps,
              "images_per_s": None, "ms_per_step": None, "mfu": None, "error": None}
    device = ctx.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    runner = None
    try:
        runner = make_runner(case, ctx)
        record["config"] = runner.config
        seconds = time_runner(runner, repeats, warmup, max_seconds=max_seconds)
        per_image = flops.get(case.kind)
        record.update(throughput(seconds, case.kind, case.batch_size, case.steps, per_image, peak_flops))
        record["flops_per_image_step"] = per_image
    except Exception as exc:  # noqa: BLE001 - one case's failure (OOM, missing package) must not end the run
        record["error"] = _one_line(exc)
        print(f"[bench] {case.kind}/{case.impl}/batch {case.batch_size} failed:", file=sys.stderr)
        traceback.print_exc(file=sys.stderr)
    finally:
        end = time.perf_counter()
        record["wall_s"] = end - start
        if device.type == "cuda":
            record["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        if sampler is not None and sampler.available:
            record["telemetry"] = sampler.summary(start, end)
        record["cudnn_benchmark"] = torch.backends.cudnn.benchmark
        del runner
        _release(device)
    return record


def _release(device: torch.device) -> None:
    """Drop compiled graphs and cached memory between cases, so each case starts from the same state."""
    try:
        import torch._dynamo

        torch._dynamo.reset()
    except Exception:  # noqa: BLE001
        pass
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------
# Settings: the command line and what it resolves to on this device
# ---------------------------------------------------------------------------------------------------
def _positive_int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers (e.g. 1,64,512), got {text!r}")
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers (e.g. 1,64,512), got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _impl_list(text: str) -> list[str]:
    known = (*SAMPLING_IMPLS, "ablation")
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown implementation(s) {unknown or text!r}; choose from {', '.join(known)}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``bench`` options to ``parser`` (used by ``ddpm-fast bench`` and benchmarks/bench_*.py)."""
    parser.add_argument("--batch-sizes", type=_positive_int_list, default=None,
                        help="sampling batch sizes, comma-separated (default: 1,64,512 on a GPU; 1 on a CPU)")
    parser.add_argument("--steps", type=_positive_int, default=None,
                        help="sampler steps to time (default 100 on a GPU, 3 on a CPU); images/s are reported "
                             f"for the full {FULL_STEPS}-step schedule from the per-step time")
    parser.add_argument("--impls", type=_impl_list, default=None,
                        help=f"sampling implementations: {','.join(SAMPLING_IMPLS)},ablation "
                             "(default: all on a GPU; reference,diffusers,ddpm_fast on a CPU)")
    parser.add_argument("--ablation-batch", type=_positive_int, default=64,
                        help="batch size of the one-optimisation-at-a-time ablation (default 64)")
    parser.add_argument("--train-batch-sizes", type=_positive_int_list, default=None,
                        help="training batch sizes (default 128 on a GPU, 2 on a CPU)")
    parser.add_argument("--train-steps", type=_positive_int, default=None,
                        help="optimizer steps per timed training run (default 10 on a GPU, 1 on a CPU)")
    parser.add_argument("--only", choices=("sampling", "training"), default=None,
                        help="run only the sampling or only the training cases")
    parser.add_argument("--repeats", type=_positive_int, default=None,
                        help="timed runs per case; the median is reported (default 3; 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up runs per case before timing (default 1)")
    parser.add_argument("--model", choices=MODELS, default="cifar10", help="U-Net preset (default cifar10)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                        help="torch.compile mode of the diffusers-compiled case (default: default)")
    parser.add_argument("--fast-compile-mode", choices=COMPILE_MODES, default=None,
                        help="torch.compile mode for ddpm_fast (default: FastSampler's own, "
                             "max-autotune-no-cudagraphs on CUDA)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds; cases not started by then are recorded as skipped")
    parser.add_argument("--case-seconds", type=float, default=60.0,
                        help="stop repeating a case once its timed runs took this long (default 60)")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="torch CPU threads (default: torch's own; 1 is steadier on a busy shared CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and noise")
    parser.add_argument("--telemetry-interval-ms", type=_positive_int, default=100,
                        help="NVML sampling interval (default 100 ms)")
    parser.add_argument("--quick", action="store_true",
                        help="a short run: on a CPU batch 1, 3 steps, reference/diffusers/ddpm_fast (< 2 min); "
                             "on a GPU batch 64, 20 steps, no ablation")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default benchmarks/results/<date>-<gpu>.json); Markdown goes beside it")
    return parser


@dataclass
class Settings:
    device: torch.device
    batch_sizes: list
    steps: int
    impls: list
    ablation_batch: int | None
    train_batch_sizes: list
    train_steps: int
    repeats: int
    warmup: int
    quick: bool


def resolve_settings(args: argparse.Namespace) -> Settings:
    """Fill the device-dependent defaults (GPU sizes on CUDA, CPU sizes on a CPU)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    cuda = device.type == "cuda"
    quick = bool(args.quick)
    if cuda:
        batch_sizes = [64] if quick else [1, 64, 512]
        steps, impls = (20 if quick else 100), [*SAMPLING_IMPLS] + ([] if quick else ["ablation"])
        train_batch_sizes, train_steps = [128], (5 if quick else 10)
    else:
        batch_sizes, steps, impls = [1], 3, ["reference", "diffusers", "ddpm_fast"]
        train_batch_sizes, train_steps = [2], 1
    impls = args.impls or impls
    do_sampling = args.only in (None, "sampling")
    do_training = args.only in (None, "training")
    return Settings(
        device=device,
        batch_sizes=(args.batch_sizes or batch_sizes) if do_sampling else [],
        steps=args.steps or steps,
        impls=impls if do_sampling else [],
        ablation_batch=args.ablation_batch if (do_sampling and "ablation" in impls) else None,
        train_batch_sizes=(args.train_batch_sizes or train_batch_sizes) if do_training else [],
        train_steps=args.train_steps or train_steps,
        repeats=args.repeats or (2 if quick else 3),
        warmup=args.warmup,
        quick=quick,
    )


def plan_cases(settings: Settings) -> list[Case]:
    """The cases in priority order, so that a time budget cuts the least important ones.

    Eager baselines first (cheap), then per batch size the pair ddpm_fast / diffusers-compiled (each
    compiles), then training, then the ablation.
    """
    cases = []
    for impl in ("reference", "diffusers"):
        if impl in settings.impls:
            cases += [Case("sampling", impl, batch, settings.steps) for batch in settings.batch_sizes]
    for batch in settings.batch_sizes:
        for impl in ("ddpm_fast", "diffusers-compiled"):
            if impl in settings.impls:
                cases.append(Case("sampling", impl, batch, settings.steps))
    for impl in TRAINING_IMPLS:
        for batch in settings.train_batch_sizes:
            cases.append(Case("training", impl, batch, settings.train_steps))
    if settings.ablation_batch:
        options = dict(_FAST_OFF)
        for name, change in ABLATION_STAGES:
            options = {**options, **change}
            cases.append(Case("sampling", name, settings.ablation_batch, settings.steps, dict(options)))
    return cases


def _same_as_ddpm_fast(case: Case, done: list[dict], device: torch.device) -> dict | None:
    """The finished ddpm_fast record this ablation stage would repeat exactly (the last stage), if any."""
    if not case.impl.startswith("fast:") or case.options != fast_sampler_options(device):
        return None
    for record in done:
        if (record["impl"] == "ddpm_fast" and record["batch_size"] == case.batch_size
                and record["steps"] == case.steps and not record.get("error")):
            return {**record, "impl": case.impl, "same_as": "ddpm_fast", "wall_s": 0.0}
    return None


def default_out_path(device_info: dict, when: _dt.datetime) -> Path:
    """benchmarks/results/<date>-<gpu>.json, the GPU (or CPU) name reduced to a file-name slug."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_info["name"].lower()).strip("-")[:60]
    return Path("benchmarks") / "results" / f"{when:%Y-%m-%d}-{slug}.json"


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------
def model_flops(ctx: BenchContext) -> dict:
    """Counted FLOPs per image: one forward (sampling step) and one forward+backward (training step)."""
    from .flops import unet_flop_breakdown

    forward = unet_flop_breakdown(ctx.config)
    training = unet_flop_breakdown(ctx.config, backward=True)
    return {
        "forward_gflop": forward.total / 1e9,
        "forward_gflop_conv_linear": forward.conv_linear / 1e9,
        "forward_gflop_attention": forward.attention / 1e9,
        "training_step_gflop": training.total / 1e9,
        "sampling": forward.total,
        "training": training.total,
    }


def _parameter_count(config) -> int:
    from .unet import UNet

    with torch.device("meta"):  # shapes only: no memory, no init time
        return sum(p.numel() for p in UNet(config).parameters())


def _write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")
    tmp.replace(out)  # atomic: a run killed mid-write leaves the previous complete file
    out.with_suffix(".md").write_text(markdown_report(result), encoding="utf-8")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed ``args``; writes JSON + Markdown. Returns an exit code.

    0 when every case ran (or was skipped by --time-budget), 1 when any case recorded an error.
    """
    settings = resolve_settings(args)
    device = settings.device
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    began = time.perf_counter()
    now = _dt.datetime.now(_dt.timezone.utc)
    ctx = BenchContext(device=device, model_name=args.model, seed=args.seed, compile_mode=args.compile_mode,
                       fast_compile_mode=args.fast_compile_mode)
    device_info = telemetry.describe_device(device)
    out = Path(args.out) if args.out else default_out_path(device_info, now)
    flops = model_flops(ctx)
    result = {
        "schema_version": SCHEMA_VERSION,
        "created": now.isoformat(timespec="seconds"),
        "command": telemetry.exact_command(),
        "bench_argv": getattr(args, "bench_argv", None),  # set when called as main(argv) from Python
        "cpu_only": device_info["cpu_only"],
        "device": device_info,
        "software": telemetry.describe_software(),
        "model": {"name": args.model, "config": ctx.config.to_dict(),
                  "parameters": _parameter_count(ctx.config),
                  **{k: v for k, v in flops.items() if k not in ("sampling", "training")}},
        "settings": {"batch_sizes": settings.batch_sizes, "steps_timed": settings.steps,
                     "steps_reported": FULL_STEPS, "impls": settings.impls, "ablation_batch": settings.ablation_batch,
                     "train_batch_sizes": settings.train_batch_sizes, "train_steps": settings.train_steps,
                     "repeats": settings.repeats, "warmup": settings.warmup, "quick": settings.quick,
                     "time_budget_s": args.time_budget, "compile_mode": args.compile_mode,
                     "fast_compile_mode": args.fast_compile_mode, "seed": args.seed,
                     "torch_threads": torch.get_num_threads(),
                     "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32},
        "method": ("median of the timed runs after warm-up; each run bracketed by device synchronisation and "
                   "timed with perf_counter. Sampling: a sampler of steps_timed steps (diffusers' leading spacing), "
                   f"ms_per_step = median / steps_timed, images_per_s = batch / (ms_per_step * {FULL_STEPS}): the "
                   "full schedule, extrapolated per step (fixed per-run costs are spread over the timed steps, "
                   "which slightly understates images/s). Training: images_per_s = batch * steps / median. "
                   "MFU = batch * counted FLOPs per image per step / step time / measured bf16 matmul rate "
                   "(counted FLOPs: conv + linear + attention matmuls of ddpm_fast.flops, the same for every impl)."),
        "ceilings": {},
        "telemetry": None,
        "cases": [],
        "wall_s": None,
    }
    interval = args.telemetry_interval_ms / 1000.0
    with telemetry.GpuSampler(device, interval_s=interval) as sampler:
        result["ceilings"] = measure_ceilings(device)
        tflops = result["ceilings"]["bf16_matmul_tflops"]
        peak = tflops * 1e12 if tflops else None
        _write(result, out)
        for case in plan_cases(settings):
            spent = time.perf_counter() - began
            record = _same_as_ddpm_fast(case, result["cases"], device)
            if record is not None:
                pass  # the ablation's last stage is ddpm_fast itself: not timed twice
            elif args.time_budget is not None and spent > args.time_budget:
                record = {"kind": case.kind, "impl": case.impl, "batch_size": case.batch_size, "steps": case.steps,
                          "steps_timed": case.steps, "steps_reported": None, "images_per_s": None,
                          "ms_per_step": None, "mfu": None, "skipped": True,
                          "error": f"skipped: the time budget of {args.time_budget:g} s was spent"}
            else:
                print(f"[bench] {case.kind} {case.impl} batch {case.batch_size} x {case.steps} steps ...",
                      file=sys.stderr, flush=True)
                record = run_case(case, ctx, repeats=settings.repeats, warmup=settings.warmup, flops=flops,
                                  peak_flops=peak, sampler=sampler, max_seconds=args.case_seconds)
                print(f"[bench]   -> {_case_line(record)}", file=sys.stderr, flush=True)
            result["cases"].append(record)
            result["telemetry"] = sampler.summary()
            result["wall_s"] = time.perf_counter() - began
            _write(result, out)
    result["telemetry"] = sampler.summary()
    result["wall_s"] = time.perf_counter() - began
    _write(result, out)
    print(markdown_report(result))
    print(f"[bench] wrote {out} and {out.with_suffix('.md')} in {result['wall_s']:.1f} s", file=sys.stderr)
    failed = [c for c in result["cases"] if c.get("error") and not c.get("skipped")]
    return 1 if failed else 0


def _case_line(record: dict) -> str:
    if record.get("error"):
        return f"error: {record['error']}"
    return f"{record['images_per_s']:.4g} images/s, {record['ms_per_step']:.4g} ms/step"


# ---------------------------------------------------------------------------------------------------
# Reporting and checking the JSON
# ---------------------------------------------------------------------------------------------------
def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _ratio(record: dict, baseline: dict | None) -> str:
    if not baseline or not record.get("images_per_s") or not baseline.get("images_per_s"):
        return "—"
    return f"{record['images_per_s'] / baseline['images_per_s']:.2f}x"


def _table(records: list[dict], baselines: list[str], index: dict, stepwise: bool = False) -> list[str]:
    """Markdown rows; ratios against each baseline at the same kind and batch (and, stepwise, the row above)."""
    header = ["impl", "batch", "images/s", "ms/step", "MFU", *(f"x vs {b}" for b in baselines)]
    if stepwise:
        header.append("x vs previous stage")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    previous = None
    for r in records:
        cells = [r["impl"], str(r["batch_size"])]
        if r.get("error"):
            cells += [f"error: {r['error'][:80]}", "—", "—", *("—" for _ in baselines)]
            if stepwise:
                cells.append("—")
        else:
            mfu = "—" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
            cells += [_fmt(r["images_per_s"]), _fmt(r["ms_per_step"]), mfu,
                      *(_ratio(r, index.get((r["kind"], b, r["batch_size"]))) for b in baselines)]
            if stepwise:
                cells.append(_ratio(r, previous))
        previous = r
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown_report(result: dict) -> str:
    """The benchmark JSON as Markdown: a header on the device and method, then one table per kind."""
    dev, sw = result.get("device", {}), result.get("software", {})
    ceilings = result.get("ceilings") or {}
    cases = result.get("cases", [])
    index = {(c["kind"], c["impl"], c["batch_size"]): c for c in cases if not c.get("error")}
    lines = [f"# ddpm-fast benchmark: {dev.get('name', '?')}", ""]
    if result.get("cpu_only"):
        lines += ["**CPU figures** (no GPU in this run): not comparable with GPU results; MFU not reported.", ""]
    lines += [
        f"- date: {result.get('created')}; command: `{result.get('command')}`",
        f"- torch {sw.get('torch')}, triton {sw.get('triton')}, CUDA {sw.get('cuda')}, diffusers {sw.get('diffusers')}, "
        f"driver {dev.get('driver_version')}",
    ]
    if ceilings.get("bf16_matmul_tflops"):
        lines.append(f"- measured in this run: bf16 matmul {ceilings['bf16_matmul_tflops']:.0f} TFLOP/s "
                     f"({ceilings.get('matmul_n')}^3), device copy {_fmt(ceilings.get('copy_tb_s'), 3)} TB/s")
    model = result.get("model", {})
    if model:
        lines.append(f"- model: {model.get('name')} U-Net, {model.get('parameters'):,} parameters, "
                     f"{_fmt(model.get('forward_gflop'))} GFLOP per image per forward")
    tele = result.get("telemetry") or {}
    if tele.get("available"):
        def span(key, unit):
            s = tele.get(key)
            return f"{key.rsplit('_', 1)[0]} {s['min']:.0f}/{s['mean']:.0f}/{s['max']:.0f} {unit}" if s else None

        parts = [span("sm_clock_mhz", "MHz"), span("power_w", "W"), span("temperature_c", "C"),
                 span("memory_used_mib", "MiB")]
        lines.append("- telemetry (min/mean/max): " + ", ".join(p for p in parts if p))
    elif tele:
        lines.append(f"- telemetry: none ({tele.get('reason')})")
    settings = result.get("settings", {})
    sampling = [c for c in cases if c["kind"] == "sampling" and not c["impl"].startswith("fast:")]
    ablation = [c for c in cases if c["kind"] == "sampling" and c["impl"].startswith("fast:")]
    training = [c for c in cases if c["kind"] == "training"]
    if sampling:
        lines += ["", f"## Sampling: images/s for {FULL_STEPS}-step samples "
                      f"(timed over {settings.get('steps_timed')} steps, per-step time x {FULL_STEPS})", ""]
        lines += _table(sampling, list(BASELINES), index)
    if ablation:
        lines += ["", f"## Ablation: one optimisation at a time (batch {ablation[0]['batch_size']})", ""]
        lines += _table(ablation, list(BASELINES), index, stepwise=True)
    if training:
        lines += ["", "## Training: one optimizer step (ms/step is per step)", ""]
        lines += _table(training, ["reference"], index)
    lines += ["", f"Total wall time {_fmt(result.get('wall_s'), 3)} s."]
    return "\n".join(lines) + "\n"


def validate_result(result: dict) -> None:
    """Check a benchmark JSON document's schema; raises ValueError listing every problem found."""
    problems = []

    def need(obj, key, types, where):
        if not isinstance(obj, dict) or key not in obj:
            problems.append(f"{where}: missing {key!r}")
            return None
        if not isinstance(obj[key], types):
            problems.append(f"{where}.{key}: expected {types}, got {type(obj[key]).__name__}")
        return obj[key]

    need(result, "schema_version", int, "result")
    device = need(result, "device", dict, "result")
    cpu_only = need(result, "cpu_only", bool, "result")
    if isinstance(device, dict):
        name = need(device, "name", str, "device")
        if cpu_only and isinstance(name, str) and not name.startswith("CPU: "):
            problems.append(f"device.name must start with 'CPU: ' on a CPU-only run, got {name!r}")
    need(result, "software", dict, "result")
    need(result, "command", str, "result")
    cases = need(result, "cases", list, "result") or []
    number = (int, float)
    for i, case in enumerate(cases if isinstance(cases, list) else []):
        where = f"cases[{i}]"
        for key in ("kind", "impl"):
            need(case, key, str, where)
        need(case, "batch_size", int, where)
        need(case, "steps", int, where)
        error = need(case, "error", (str, type(None)), where)
        for key in ("images_per_s", "ms_per_step", "mfu"):
            value = need(case, key, (*number, type(None)), where)
            if error is None and key != "mfu" and (value is None or not (isinstance(value, number) and value > 0
                                                                         and math.isfinite(value))):
                problems.append(f"{where}.{key}: a case without error needs a positive finite number, got {value!r}")
        if cpu_only and case.get("mfu") is not None:
            problems.append(f"{where}.mfu must be null on a CPU-only run")
        if error is None and case.get("kind") == "sampling":
            if not isinstance(case.get("steps_timed"), int) or case.get("steps_reported") != FULL_STEPS:
                problems.append(f"{where}: sampling cases need steps_timed and steps_reported={FULL_STEPS}")
    if problems:
        raise ValueError("invalid benchmark result: " + "; ".join(problems))


def build_parser(prog: str = "ddpm-fast bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    return add_arguments(parser)


def main(argv=None, *, only: str | None = None, prog: str = "ddpm-fast bench") -> int:
    """Command-line entry (``python -m ddpm_fast.bench``, benchmarks/bench_*.py). ``only`` presets --only."""
    args = build_parser(prog).parse_args(argv)
    args.bench_argv = None if argv is None else [str(a) for a in argv]
    if only is not None:
        args.only = only
    try:
        return run(args)
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
