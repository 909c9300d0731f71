"""Timing a runner and the figures derived from it, and the hardware ceilings MFU is measured against.

MFU's numerator is counted FLOPs (``model_flops``, per image per step) over the measured step time; its
denominator is the bf16 matrix rate measured in the same run (``measure_ceilings``), not a datasheet figure.
"""

from __future__ import annotations

import statistics
import time

import torch

from .cases import FULL_STEPS, BenchContext, Runner, _sync


def time_runner(runner: Runner, repeats: int, warmup: int = 1, max_seconds: float | None = None,
                phases: dict | None = None) -> list[float]:
    """Seconds per timed unit for up to ``repeats`` runs after ``warmup`` warm-up runs.

    Each run is bracketed by device synchronisation and read with ``time.perf_counter`` (wall time is the
    honest measure here: diffusers' loop is host-driven). Stops early, after at least one run, once the
    runs so far took more than ``max_seconds``. ``phases``, when given, receives ``warmup_s`` (the
    warm-up runs together: compilation, graph capture, cuDNN plans) and ``warmup_is_full`` (whether a
    warm-up run did a whole timed unit, i.e. already produced a first result).
    """
    with runner.context():
        start = time.perf_counter()
        for _ in range(warmup):
            runner.warmup()
        if phases is not None:
            phases["warmup_s"] = time.perf_counter() - start
            phases["warmup_is_full"] = warmup > 0 and runner.warmup_is_full
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
               peak_flops: float | None, full_steps: int = FULL_STEPS) -> dict:
    """Figures from the per-run times (median).

    sampling: ms_per_step = median / steps; images_per_s is for a ``full_steps``-step sample (FULL_STEPS
    for DDPM, extrapolated when steps < FULL_STEPS; the timed steps themselves for a few-step solver). training: ms_per_step = median / steps (one optimizer step); images_per_s =
    batch * steps / median. flops_per_image_step: FLOPs one image costs per step (a forward for sampling,
    forward + backward for training). mfu = achieved FLOP/s / peak_flops, None without a peak (CPU).
    """
    median = statistics.median(seconds)
    step_s = median / steps
    if kind == "sampling":
        images_per_s = batch_size / (step_s * full_steps)
        steps_reported = full_steps
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


def first_run(build_s: float, phases: dict, seconds: list[float], kind: str, steps: int,
              full_steps: int = FULL_STEPS) -> dict:
    """How long the first result takes on a new shape, from the runner's build to the end of the first
    whole timed unit (a batch of ``steps``-step samples; ``steps`` optimizer steps): build + warm-up,
    plus the first timed run when the warm-up was a partial one (the eager baselines warm up with 2
    steps, which this figure then includes). ``startup_s`` is its one-time part (``first_run_s`` minus
    the median run: compilation, capture, building); for sampling ``first_image_full_s`` is the time to
    the first batch of full-schedule images on a new shape (startup + the per-step time x full_steps:
    FULL_STEPS for DDPM/DDIM, the timed steps themselves for a few-step solver).
    """
    median = statistics.median(seconds)
    first = build_s + phases["warmup_s"] + (0.0 if phases["warmup_is_full"] else seconds[0])
    out = {"build_s": build_s, "warmup_s": phases["warmup_s"], "first_run_s": first,
           "startup_s": max(first - median, 0.0)}
    if kind == "sampling":
        out["first_image_full_s"] = out["startup_s"] + median / steps * full_steps
    return out


def model_flops(ctx: BenchContext) -> dict:
    """Counted FLOPs per image: one forward (sampling step) and one forward+backward (training step)."""
    from ..flops import unet_flop_breakdown

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


def _cuda_median_seconds(work, repeats: int) -> float:
    """Median seconds of ``work()`` over ``repeats`` runs timed with CUDA events, after 3 warm-up runs."""
    for _ in range(3):
        work()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        work()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure_matmul_flops(device: torch.device, n: int = 8192, dtype=torch.bfloat16, repeats: int = 20) -> float:
    """FLOP/s of an n^3 matrix product on ``device`` (median over ``repeats``, CUDA events; random data)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2.0 * n**3 / _cuda_median_seconds(lambda: torch.matmul(a, b), repeats)


def measure_copy_bandwidth(device: torch.device, nbytes: int = 2**30, repeats: int = 20) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2.0 * src.numel() * 4 / _cuda_median_seconds(lambda: dst.copy_(src), repeats)


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
        torch.cuda.empty_cache()
    return out


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:500]
