#!/usr/bin/env python3
"""One short sample through the default fast path, checked against the eager fp32 reference.

    python benchmarks/verify_sample.py --out verify-sample.json            # CUDA: CIFAR-10 U-Net
    python benchmarks/verify_sample.py --device cpu --model tiny --out x.json --dtype bfloat16

The fast path is ``FastSampler`` with its defaults on the device (on CUDA: bf16 autocast, channels-last,
torch.compile, the fused reverse update with in-kernel seeded noise, the step captured as a CUDA graph;
``--compile-mode`` swaps only the compile mode). The reference is ``ddpm_fast.reference.sample``, the
model eager in fp32 (TF32 off for the whole check), fed the same seed-keyed noise. Same weights (random, seeded), same seeds, same
``--steps`` respaced steps, x0 clipped to [-1, 1] (fixed_large variance, Ho's CIFAR-10 sampler).

The tolerance is derived from what bf16 itself does to this chain, not guessed. The same eager
reference chain is run a second time with only the model's dtype changed to the fast path's (autocast,
bf16 on CUDA): its distance from the fp32 chain, D = max |ref_bf16 - ref_fp32|, is the effect of bf16
rounding alone on these weights, seeds and steps. The fast path rounds in bf16 at other places (fused,
compiled kernels), so its distance from fp32 should be of the same size: the tolerance is
``--safety`` (default 3) x D, plus an fp32 floor: an fp32 eps error of 64 ulp of max |eps| carried by
sum_k |b_k| (b_k: how far an eps error moves x_prev at visited step k, ``eps_coefficients``), so an fp32
fast path has a tolerance too. (A worst-case bound through the chain is no use: with x0 clipping only
1-Lipschitz, the x_t coefficients multiply to ~60 over 10 respaced steps and the bound exceeds the [-1, 1]
range of the images.) The JSON also reports the relative L2 errors, the fast path's and bf16's own, and one
eps's bf16 error at x_T (bf16 operands land between 1e-3 and 1e-2).

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
    parser.add_argument("--safety", type=positive_float, default=3.0,
                        help="factor on the bf16 chain's own distance from fp32 (default 3)")
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
    """The check with TF32 off: cuDNN runs float32 convolutions in TF32 (10-bit mantissa) by default, which
    would make the fp32 reference (and an fp32 fast path) a TF32 one. The bf16 fast path is unaffected."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return _verify(args)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _verify(args: argparse.Namespace) -> dict:
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
    # what is measured so far survives a kill during the reference chains (the final write replaces it)
    write_json_atomic(args.out, {"ok": None, "partial": True, "time_to_first_image_s": first_image_s,
                                 "steady_run_s": steady_s, "graph_captured": graph_captured, "sampler": settings})

    steps = resolve_timesteps(args.steps, schedule.num_timesteps)
    start = time.perf_counter()
    with torch.no_grad():
        seeds_t = torch.tensor(seeds, dtype=torch.int64)

        def noise_fn(step, s):
            return ops.seeded_noise(seeds_t, step, s[1:], device=device)

        ref = reference.sample(model, schedule, (args.batch, *shape), noise_fn=noise_fn, device=device,
                               **common).clamp(-1.0, 1.0)
        _sync(device)
        reference_s = time.perf_counter() - start

        # the same chain with only the model's dtype changed: what bf16 rounding alone does to it
        low = sampler.dtype

        def model_low(x, t):
            with torch.autocast(device.type, dtype=low, enabled=low != torch.float32):
                return model(x, t).float()

        ref_low = reference.sample(model_low, schedule, (args.batch, *shape), noise_fn=noise_fn, device=device,
                                   **common).clamp(-1.0, 1.0)
        # one eps at x_T and the first visited step, for the record
        x_T = ops.seeded_noise(seeds_t, schedule.num_timesteps, shape, device=device)
        t = torch.full((args.batch,), steps[0], dtype=torch.int64, device=device)
        eps32 = model(x_T, t).float()
        eps_low = model_low(x_T, t)
    eps_scale = eps32.abs().max().item()
    gain = eps_coefficients(schedule, steps).sum().item()
    floor = gain * FP32_FLOOR * max(eps_scale, 1.0)
    bf16_max_abs = (ref_low - ref).abs().max().item()
    tolerance = args.safety * bf16_max_abs + floor

    diff = (fast - ref).abs()
    max_abs = diff.max().item()
    rel_l2 = _rel_l2(fast, ref)
    finite = bool(torch.isfinite(fast).all())
    within = finite and max_abs <= tolerance
    ok = within and graph_captured is not False and torch.equal(fast, repeat)
    return {
        "ok": ok,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__, "triton": _triton_version(),
        "model": args.model, "parameters": model.num_parameters(), "batch": args.batch, "steps": len(steps),
        "timesteps": steps, "seeds": seeds, "sampler": settings, "graph_captured": graph_captured,
        "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
        "warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
        "repeat_identical": torch.equal(fast, repeat),
        "max_abs_diff": max_abs, "mean_abs_diff": diff.mean().item(), "rel_l2": rel_l2, "finite": finite,
        "tolerance": tolerance, "within_tolerance": within,
        "tolerance_derivation": {
            "low_dtype": str(low).removeprefix("torch."), "reference_low_max_abs_diff": bf16_max_abs,
            "reference_low_rel_l2": _rel_l2(ref_low, ref), "safety": args.safety, "fp32_floor": floor,
            "fp32_floor_rel": FP32_FLOOR, "sum_abs_eps_coefficients": gain, "eps_max_abs": eps_scale,
            "eps_max_abs_diff": (eps_low - eps32).abs().max().item(), "eps_rel_l2": _rel_l2(eps_low, eps32),
            "formula": "safety * max|reference chain in low dtype - fp32 chain| + sum_k |b_k| * fp32_floor_rel "
                       "* max(max|eps|, 1)"},
        "time_to_first_image_s": first_image_s, "steady_run_s": steady_s, "reference_run_s": reference_s,
        "startup_s": max(first_image_s - steady_s, 0.0),
    }


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


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
