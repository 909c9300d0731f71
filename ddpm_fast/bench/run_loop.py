"""The run loop: time each planned case in turn and rewrite the JSON (and Markdown) after every case.

Every case runs in its own try/except, so a failure (an OOM at batch 512, a missing optional package) is
recorded as ``error`` and the run goes on; a run cut short by a time limit still leaves its finished cases.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from .. import telemetry
from ..checkpoint import atomic_write
from .cases import FULL_STEPS, BenchContext, Case, make_runner
from .report import markdown_report
from .schema import SCHEMA_VERSION
from .settings import _same_as_ddpm_fast, default_out_path, plan_cases, resolve_settings
from .timing import _one_line, first_run, measure_ceilings, model_flops, throughput, time_runner


def _case_record(case: Case, *, steps_reported, error=None, **extra) -> dict:
    """A case's JSON record before timing: its identity, the figures still null (``extra`` goes before
    ``error``, as ``skipped`` does)."""
    return {"kind": case.kind, "impl": case.impl, "batch_size": case.batch_size, "steps": case.steps,
            "steps_timed": case.steps, "steps_reported": steps_reported, "images_per_s": None,
            "ms_per_step": None, "mfu": None, **extra, "error": error}


def run_case(case: Case, ctx: BenchContext, *, repeats: int, warmup: int, flops: dict, peak_flops: float | None,
             sampler: telemetry.GpuSampler | None = None, max_seconds: float | None = None) -> dict:
    """Build, warm up and time one case; returns its JSON record (``error`` set instead of raising)."""
    full_steps = case.steps if ctx.multistep else FULL_STEPS  # a few-step solver is reported as timed
    record = _case_record(case, steps_reported=full_steps if case.kind == "sampling" else case.steps)
    device = ctx.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    runner = None
    try:
        runner = make_runner(case, ctx)
        build_s = time.perf_counter() - start
        record["config"] = runner.config
        phases = {}
        seconds = time_runner(runner, repeats, warmup, max_seconds=max_seconds, phases=phases)
        per_image = flops.get(case.kind)
        record.update(throughput(seconds, case.kind, case.batch_size, case.steps, per_image, peak_flops,
                                 full_steps=full_steps))
        record.update(first_run(build_s, phases, seconds, case.kind, case.steps, full_steps=full_steps))
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


def _parameter_count(config) -> int:
    from ..unet import UNet

    with torch.device("meta"):  # shapes only: no memory, no init time
        return UNet(config).num_parameters()


def _write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1, default=str) + "\n"
    # atomic: a run killed mid-write leaves the previous complete file
    atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
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
                       fast_compile_mode=args.fast_compile_mode, solver=args.solver)
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
        "settings": {"batch_sizes": settings.batch_sizes, "steps_timed": settings.steps, "solver": args.solver,
                     "steps_reported": settings.steps if ctx.multistep else FULL_STEPS, "impls": settings.impls, "ablation_batch": settings.ablation_batch,
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
                   "Time to the first result on a new shape: first_run_s = build + warm-up (compile, capture) "
                   "+ the first timed run when the warm-up was partial; startup_s = first_run_s - median; "
                   f"sampling's first_image_full_s = startup_s + the per-step time x {FULL_STEPS}. "
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
                record = _case_record(case, steps_reported=None, skipped=True,
                                      error=f"skipped: the time budget of {args.time_budget:g} s was spent")
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
    return (f"{record['images_per_s']:.4g} images/s, {record['ms_per_step']:.4g} ms/step, "
            f"first run {record['first_run_s']:.3g} s (startup {record['startup_s']:.3g} s)")
