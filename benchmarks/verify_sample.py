#!/usr/bin/env python3
"""One short sample through the default fast path, checked against the eager fp32 reference.

    python benchmarks/verify_sample.py --out verify-sample.json            # CUDA: CIFAR-10 U-Net
    python benchmarks/verify_sample.py --device cpu --model tiny --out x.json --dtype bfloat16

The fast path is ``FastSampler`` with its defaults on the device (on CUDA: bf16 autocast, channels-last,
torch.compile, the fused reverse update with in-kernel seeded noise, the step captured as a CUDA graph;
``--compile-mode`` swaps only the compile mode). The reference is ``ddpm_fast.reference.sample``, the
model eager in fp32, fed the same seed-keyed noise. Same weights (random, seeded), same seeds, same
``--steps`` respaced steps, x0 clipped to [-1, 1] (fixed_large variance, Ho's CIFAR-10 sampler).

The tolerance is derived, not guessed. The sample is a chain of linear updates
x_prev = a_k x_t + b_k eps_k + sigma_k z (``coefficients.reverse_table``; clipping x0 is 1-Lipschitz and
can only shrink a difference), so an error d in every eps moves the final sample by at most
sum_k |b_k| d when the model does not amplify the differences in x it is fed. d is measured in this run:
the largest difference between one eps in the fast path's dtype (autocast) and in fp32 at x_T, floored at
fp32 rounding (so an fp32 run has a tolerance too). The bound allows a factor ``--safety`` (default 4)
for the model's own amplification of input differences over the chain. The JSON also reports the
relative L2 error of the sample and of that one eps (bf16 operands land between 1e-3 and 1e-2).

Time to the first image: from building the sampler to the first batch of images, which is what a user
pays on a new batch shape (compilation, autotuning, graph capture, the first run); then a second run of
the same batch for the steady-state time. Exit status 0 when the sample is within the tolerance (and, on
CUDA, the step was captured as a graph), 1 otherwise, 2 for bad arguments or no CUDA.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

from ddpm_fast import coefficients, ops, reference
from ddpm_fast.argtypes import positive_float, positive_int
from ddpm_fast.checkpoint import write_json_atomic
from ddpm_fast.checks import resolve_timesteps
from ddpm_fast.schedule import NoiseSchedule

MODELS = ("cifar10", "digits", "tiny")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FP32_FLOOR = 64 * torch.finfo(torch.float32).eps  # relative: fp32 sums in another order, over a deep net


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="verify_sample.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON output path (written atomically)")
    parser.add_argument("--model", choices=MODELS, default="cifar10", help="U-Net preset (default cifar10)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--batch", type=positive_int, default=8, help="images (default 8)")
    parser.add_argument("--steps", type=positive_int, default=10,
                        help="respaced sampler steps (default 10; leading spacing over 1000)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="the fast path's autocast dtype (default FastSampler's: bfloat16 on CUDA)")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode of the fast path (default FastSampler's own on CUDA, "
                             "max-autotune-no-cudagraphs; 'none' for eager)")
    parser.add_argument("--safety", type=positive_float, default=4.0, help="factor on the derived bound (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    return parser


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eps_coefficients(schedule: NoiseSchedule, steps: list[int]) -> torch.Tensor:
    """|b_k| per visited step (float64): how far an error in eps can move x_prev at that step.

    x_prev = C_X0 * clamp(x_t * SQRT_RECIP_AB - eps * SQRT_RECIPM1_AB) + C_XT * x_t + C_EPS * eps; the
    clamp is 1-Lipschitz, so an eps error d moves x_prev by at most (|C_X0| SQRT_RECIPM1_AB + |C_EPS|) d.
    """
    table = coefficients.reverse_table(schedule, steps, variance="fixed_large", clip_x0=True)
    return (table[:, coefficients.C_X0].abs() * table[:, coefficients.SQRT_RECIPM1_AB]
            + table[:, coefficients.C_EPS].abs())


def verify(args: argparse.Namespace) -> dict:
    from ddpm_fast.sampler import FastSampler
    from ddpm_fast.unet import UNet, UNetConfig

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    config = getattr(UNetConfig, args.model)()
    torch.manual_seed(args.seed)
    model = UNet(config).to(device).eval()
    schedule = NoiseSchedule.linear(1000)
    shape = (config.in_channels, config.sample_size, config.sample_size)
    seeds = list(range(args.batch))
    options = {}
    if args.dtype:
        options["dtype"] = DTYPES[args.dtype]
    if args.compile_mode:
        options["compile"] = False if args.compile_mode == "none" else args.compile_mode
    common = dict(timesteps=args.steps, variance="fixed_large", clip_x0=True)

    _sync(device)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sampler = FastSampler(model, schedule, device=device, **common, **options)
        fast = sampler.sample(seeds=seeds)
        _sync(device)
        first_image_s = time.perf_counter() - start
        again = time.perf_counter()
        repeat = sampler.sample(seeds=seeds)
        _sync(device)
        steady_s = time.perf_counter() - again
    settings = sampler.settings
    graph_captured = all(run.graphs and not run.eager for run in sampler._runs.values()) if sampler.cuda_graph \
        else None

    steps = resolve_timesteps(args.steps, schedule.num_timesteps)
    start = time.perf_counter()
    with torch.no_grad():
        seeds_t = torch.tensor(seeds, dtype=torch.int64)
        ref = reference.sample(model, schedule, (args.batch, *shape), noise_fn=lambda step, s: ops.seeded_noise(
            seeds_t, step, s[1:], device=device), device=device, **common).clamp(-1.0, 1.0)
        _sync(device)
        reference_s = time.perf_counter() - start

        # d: one eps in the fast path's dtype against fp32, at x_T and the first visited step
        x_T = ops.seeded_noise(seeds_t, schedule.num_timesteps, shape, device=device)
        t = torch.full((args.batch,), steps[0], dtype=torch.int64, device=device)
        eps32 = model(x_T, t).float()
        low = sampler.dtype
        with torch.autocast(device.type, dtype=low, enabled=low != torch.float32):
            eps_low = model(x_T, t).float()
    eps_scale = eps32.abs().max().item()
    eps_diff = (eps_low - eps32).abs().max().item()
    per_step = max(eps_diff, FP32_FLOOR * max(eps_scale, 1.0))
    gain = eps_coefficients(schedule, steps).sum().item()
    tolerance = args.safety * gain * per_step

    diff = (fast - ref).abs()
    max_abs = diff.max().item()
    rel_l2 = ((fast - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    finite = bool(torch.isfinite(fast).all())
    within = finite and max_abs <= tolerance
    ok = within and graph_captured is not False and torch.equal(fast, repeat)
    return {
        "ok": ok,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__, "triton": _triton_version(),
        "model": args.model, "parameters": model.num_parameters(), "batch": args.batch, "steps": len(steps),
        "timesteps": steps, "seeds": seeds, "sampler": settings, "graph_captured": graph_captured,
        "warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
        "repeat_identical": torch.equal(fast, repeat),
        "max_abs_diff": max_abs, "mean_abs_diff": diff.mean().item(), "rel_l2": rel_l2, "finite": finite,
        "tolerance": tolerance, "within_tolerance": within,
        "tolerance_derivation": {"eps_max_abs_diff": eps_diff, "eps_max_abs": eps_scale,
                                 "eps_rel_l2": ((eps_low - eps32).norm() / eps32.norm().clamp_min(1e-30)).item(),
                                 "per_step_eps_error": per_step, "sum_abs_eps_coefficients": gain,
                                 "safety": args.safety, "fp32_floor_rel": FP32_FLOOR,
                                 "formula": "safety * sum_k |b_k| * max(eps error, fp32 floor * max(|eps|, 1))"},
        "time_to_first_image_s": first_image_s, "steady_run_s": steady_s, "reference_run_s": reference_s,
        "startup_s": max(first_image_s - steady_s, 0.0),
    }


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = verify(args)
    except ValueError as exc:
        print(f"verify_sample.py: error: {exc}", file=sys.stderr)
        return 2
    write_json_atomic(args.out, result)
    verdict = "ok" if result["ok"] else "FAILED"
    print(f"verify_sample: {verdict}: {result['model']} batch {result['batch']} x {result['steps']} steps on "
          f"{result['device']}: max |fast - reference| {result['max_abs_diff']:.3g} (tolerance "
          f"{result['tolerance']:.3g}), rel L2 {result['rel_l2']:.3g}, graph {result['graph_captured']}, "
          f"first image {result['time_to_first_image_s']:.1f} s, then {result['steady_run_s']:.3f} s; "
          f"wrote {args.out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
