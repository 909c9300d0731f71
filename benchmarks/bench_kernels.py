"""Micro-benchmarks of the fused kernels against the eager reference and torch.compile, in GB/s.

Each case reports the effective bandwidth of every implementation (the bytes the fused kernel must
move, divided by the time) next to the device's measured copy bandwidth (a device-to-device copy of the
same number of bytes per element, timed in the same run). Implementations:

- ``kernel``: the fused Triton kernel (one launch; in-kernel noise for the *_seeded cases);
- ``reference``: ``ddpm_fast.reference`` as is (gathers coefficients on the CPU: one sync per call);
- ``eager``: the same maths in eager torch with device-side coefficient gathers (no sync);
- ``compiled``: ``torch.compile`` of ``eager``.

Bytes per element (e = element size): reverse_seeded 3e (read x_t, eps; write x_prev), reverse_noise 4e
(+ read z), q_sample 3e, q_sample_seeded 3e (read x0; write x_t, eps), seeded_randn 1e.
Timing: CUDA events around ``--iters`` calls after warm-up, best of ``--repeats`` (nanoGPT bench.py
style); on CPU perf_counter, small sizes only, and the kernels run through Triton's interpreter there
(TRITON_INTERPRET=1), so CPU numbers only check that the harness works.

Usage: python benchmarks/bench_kernels.py --out benchmarks/results/kernels.json [--dtype bf16]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ddpm_fast import coefficients, kernels, reference  # noqa: E402
from ddpm_fast.checkpoint import write_json_atomic  # noqa: E402
from ddpm_fast.schedule import NoiseSchedule  # noqa: E402

CUDA_SHAPES = [(1, 3, 32, 32), (16, 3, 32, 32), (128, 3, 32, 32), (256, 3, 64, 64), (64, 3, 256, 256),
               (256, 4, 256, 256)]  # 3K .. 64M elements
CPU_SHAPES = [(1, 3, 32, 32), (4, 3, 32, 32)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BYTES_PER_ELEMENT = {"reverse_seeded": 3, "reverse_noise": 4, "q_sample": 3, "q_sample_seeded": 3,
                     "seeded_randn": 1}


def timer(device: torch.device, iters: int, repeats: int, warmup: int):
    """A function f -> seconds per call of f (best of ``repeats``)."""

    def run(fn) -> float:
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                for _ in range(iters):
                    fn()
                end.record()
                torch.cuda.synchronize()
                samples.append(start.elapsed_time(end) / 1e3 / iters)
            else:
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn()
                samples.append((time.perf_counter() - t0) / iters)
        return min(samples)

    return run


def build_cases(shape, dtype, device, schedule, compile_fns):
    """{case: {impl: zero-arg callable}} for one shape."""
    B = shape[0]
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, device=device, generator=gen).to(dtype)
    eps = torch.randn(shape, device=device, generator=gen).to(dtype)
    z = torch.randn(shape, device=device, generator=gen).to(dtype)
    out = torch.empty_like(x)
    noise_out = torch.empty_like(x)
    seeds = torch.arange(B, device=device)
    t = torch.randint(1, schedule.num_timesteps, (B,), device=device, generator=gen)
    table64 = coefficients.reverse_table(schedule)
    table = table64.to(device=device, dtype=torch.float32)
    rows = (schedule.num_timesteps - 1 - t).contiguous()
    dev_tables = schedule.on(device)
    step = torch.full((1,), 7, device=device, dtype=torch.int64)

    def eager_reverse(x, eps, z, rows):
        c = table[rows].view(B, 8, 1, 1, 1).unbind(1)
        xf, ef = x.float(), eps.float()
        x0 = xf * c[1] - ef * c[2]
        return (c[3] * x0 + c[4] * xf + c[5] * ef + c[6] * z.float()).to(x.dtype)

    def eager_reverse_seeded(x, eps, rows):
        return eager_reverse(x, eps, torch.randn_like(x), rows)

    def eager_q(x0, t, noise):
        a = dev_tables.sqrt_alphas_cumprod[t].view(B, 1, 1, 1)
        s = dev_tables.sqrt_one_minus_alphas_cumprod[t].view(B, 1, 1, 1)
        return (a * x0.float() + s * noise.float()).to(x0.dtype)

    def eager_q_seeded(x0, t):
        noise = torch.randn_like(x0)
        return eager_q(x0, t, noise), noise

    cases = {
        "reverse_seeded": {
            "kernel": lambda: kernels.reverse_update(x, eps, table, rows, out=out, seeds=seeds),
            "eager": lambda: eager_reverse_seeded(x, eps, rows),
        },
        "reverse_noise": {
            "kernel": lambda: kernels.reverse_update(x, eps, table, rows, out=out, noise=z),
            "reference": lambda: reference.reverse_step(x, t, eps, schedule, z),
            "eager": lambda: eager_reverse(x, eps, z, rows),
        },
        "q_sample": {
            "kernel": lambda: kernels.q_sample(x, t, dev_tables.sqrt_alphas_cumprod,
                                               dev_tables.sqrt_one_minus_alphas_cumprod, z, out=out),
            "reference": lambda: reference.q_sample(x, t, z, schedule),
            "eager": lambda: eager_q(x, t, z),
        },
        "q_sample_seeded": {
            "kernel": lambda: kernels.q_sample(x, t, dev_tables.sqrt_alphas_cumprod,
                                               dev_tables.sqrt_one_minus_alphas_cumprod, out=out, seeds=seeds,
                                               noise_step=step, noise_out=noise_out),
            "eager": lambda: eager_q_seeded(x, t),
        },
        "seeded_randn": {
            "kernel": lambda: kernels.seeded_randn(seeds, step, shape[1:], out=noise_out),
            "eager": lambda: torch.randn(shape, device=device, dtype=dtype),
        },
    }
    if compile_fns:
        reverse, reverse_seeded, q, q_seeded = (torch.compile(fn, dynamic=False) for fn in
                                                (eager_reverse, eager_reverse_seeded, eager_q, eager_q_seeded))
        cases["reverse_seeded"]["compiled"] = lambda: reverse_seeded(x, eps, rows)
        cases["reverse_noise"]["compiled"] = lambda: reverse(x, eps, z, rows)
        cases["q_sample"]["compiled"] = lambda: q(x, t, z)
        cases["q_sample_seeded"]["compiled"] = lambda: q_seeded(x, t)
    return cases


def write_report(path: str, report: dict) -> None:
    """Write the table so far, atomically, with the median kernel/copy ratio over the large rows so far."""
    large = [r["kernel_vs_copy"] for r in report["results"] if r["elements"] >= 1 << 24]
    report["median_kernel_vs_copy_large"] = statistics.median(large) if large else None
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json_atomic(path, report)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/kernels.json", help="JSON output path")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--iters", type=int, default=None, help="calls per timing (default 50 CUDA, 2 CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="also time torch.compile (default on CUDA only)")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--cases", default=",".join(BYTES_PER_ELEMENT), help="comma-separated case names")
    parser.add_argument("--max-elements", type=int, default=1 << 26)
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype]
    iters = args.iters or (50 if on_cuda else 2)
    use_compile = on_cuda if args.compile is None else args.compile
    measure = timer(device, iters, args.repeats if on_cuda else 1, warmup=5 if on_cuda else 1)
    wanted = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(wanted) - set(BYTES_PER_ELEMENT))
    if unknown:
        print(f"error: unknown case(s) {unknown}; choose from {list(BYTES_PER_ELEMENT)}", file=sys.stderr)
        return 2
    schedule = NoiseSchedule.linear(1000)
    shapes = [s for s in (CUDA_SHAPES if on_cuda else CPU_SHAPES) if math.prod(s) <= args.max_elements]

    # the device's copy bandwidth on a large buffer (read + write bytes)
    big = torch.empty((1 << 26) if on_cuda else (1 << 22), device=device, dtype=torch.float32)
    big_dst = torch.empty_like(big)
    peak_copy = 2 * big.numel() * 4 / measure(lambda: big_dst.copy_(big)) / 1e9
    del big, big_dst

    label = torch.cuda.get_device_name(device) if on_cuda else f"CPU ({platform.processor() or platform.machine()})"
    if not on_cuda:
        label += ", kernels through the Triton interpreter: not a speed measurement"
    report = {
        "device": label,
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "dtype": args.dtype,
        "iters": iters,
        "compiled_baselines": use_compile,
        "peak_copy_gbs": round(peak_copy, 2),
        "bytes_per_element": BYTES_PER_ELEMENT,
        "complete": False,
        "results": [],
    }
    results = report["results"]
    write_report(args.out, report)  # a run killed before its first row still leaves the header
    for shape in shapes:
        numel = math.prod(shape)
        cases = build_cases(shape, dtype, device, schedule, use_compile)
        elem = dtype.itemsize
        src = torch.empty(numel, device=device, dtype=dtype)
        dst = torch.empty_like(src)
        copy_gbs = 2 * numel * elem / measure(lambda: dst.copy_(src)) / 1e9
        for case in wanted:
            nbytes = BYTES_PER_ELEMENT[case] * numel * elem
            row = {"case": case, "shape": list(shape), "elements": numel, "dtype": args.dtype,
                   "bytes": nbytes, "copy_gbs": round(copy_gbs, 2), "impls": {}}
            for impl, fn in cases[case].items():
                seconds = measure(fn)
                row["impls"][impl] = {"us": round(seconds * 1e6, 3), "gbs": round(nbytes / seconds / 1e9, 2)}
            k = row["impls"]["kernel"]
            row["kernel_vs_copy"] = round(k["gbs"] / copy_gbs, 3)
            row["kernel_vs_peak_copy"] = round(k["gbs"] / peak_copy, 3)
            row["speedup_vs_eager"] = round(row["impls"]["eager"]["us"] / k["us"], 2)
            if "compiled" in row["impls"]:
                row["speedup_vs_compiled"] = round(row["impls"]["compiled"]["us"] / k["us"], 2)
            results.append(row)
            write_report(args.out, report)  # after every row: a killed run keeps what it measured
            others = "  ".join(f"{n} {v['us']:9.1f}us {v['gbs']:7.1f}GB/s" for n, v in row["impls"].items())
            print(f"{case:16s} {str(tuple(shape)):20s} copy {copy_gbs:7.1f}GB/s  {others}", flush=True)

    report["complete"] = True
    write_report(args.out, report)
    print(f"peak copy {peak_copy:.1f} GB/s on {label}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
