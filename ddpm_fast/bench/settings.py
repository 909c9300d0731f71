"""Settings of a run: the ``bench`` command line, its device-dependent defaults, and the case plan.

``add_arguments`` defines the options; ``resolve_settings`` fills the defaults that depend on the device
(GPU sizes on CUDA, CPU sizes on a CPU); ``plan_cases`` orders the cases so a time budget cuts the least
important ones first.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..argtypes import positive_int, positive_int_list
from ..solvers import SOLVERS
from .cases import FULL_STEPS, SAMPLING_IMPLS, TRAINING_IMPLS, Case, fast_sampler_options

MODELS = ("cifar10", "digits", "tiny")
COMPILE_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")

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


def _impl_list(text: str) -> list[str]:
    known = (*SAMPLING_IMPLS, "ablation")
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown implementation(s) {unknown or text!r}; choose from {', '.join(known)}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``bench`` options to ``parser`` (used by ``ddpm-fast bench`` and benchmarks/bench_*.py)."""
    parser.add_argument("--batch-sizes", type=positive_int_list, default=None,
                        help="sampling batch sizes, comma-separated (default: 1,64,512 on a GPU; 1 on a CPU)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="sampler steps to time (default 100 on a GPU, 3 on a CPU); images/s are reported "
                             f"for the full {FULL_STEPS}-step schedule from the per-step time")
    parser.add_argument("--impls", type=_impl_list, default=None,
                        help=f"sampling implementations: {','.join(SAMPLING_IMPLS)},ablation "
                             "(default: all on a GPU; reference,diffusers,ddpm_fast on a CPU)")
    parser.add_argument("--ablation-batch", type=positive_int, default=64,
                        help="batch size of the one-optimisation-at-a-time ablation (default 64)")
    parser.add_argument("--train-batch-sizes", type=positive_int_list, default=None,
                        help="training batch sizes (default 128 on a GPU, 2 on a CPU)")
    parser.add_argument("--train-steps", type=positive_int, default=None,
                        help="optimizer steps per timed training run (default 10 on a GPU, 1 on a CPU)")
    parser.add_argument("--only", choices=("sampling", "training"), default=None,
                        help="run only the sampling or only the training cases")
    parser.add_argument("--repeats", type=positive_int, default=None,
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
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's own; 1 is steadier on a busy shared CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and noise")
    parser.add_argument("--solver", choices=SOLVERS, default="ddpm",
                        help="sampler of every sampling case: ddpm (default), ddim, dpmpp-2m, dpmpp-3m, dpmpp-2m-sde "
                             "or unipc; diffusers runs the matching scheduler in DDPMPipeline. With a multistep "
                             "solver images/s are for the --steps timed (no extrapolation to 1000 steps)")
    parser.add_argument("--telemetry-interval-ms", type=positive_int, default=100,
                        help="NVML sampling interval (default 100 ms)")
    parser.add_argument("--quick", action="store_true",
                        help="a short run: on a CPU batch 1, 3 steps, reference/diffusers/ddpm_fast (< 2 min); "
                             "on a GPU batch 64, 20 steps, no ablation")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default benchmarks/results/<date>-<gpu>.json); Markdown goes beside it")
    return parser


@dataclass
class Settings:
    """What ``resolve_settings`` made of the arguments on this device: sizes, implementations, repeats."""

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
