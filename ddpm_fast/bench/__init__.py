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

Modules: ``cases`` (what is timed: Case, BenchContext, one runner builder per implementation),
``timing`` (timing a runner, throughput and MFU figures, the measured hardware ceilings), ``settings``
(the command line, device-dependent defaults, the case plan), ``run_loop`` (running the plan, writing
the JSON), ``report`` (Markdown tables) and ``schema`` (the JSON schema's version and validator). This
module holds the entry points and re-exports what other code imports.
"""

from __future__ import annotations

import argparse
import sys

from .cases import (FULL_STEPS, SAMPLING_IMPLS, TRAINING_IMPLS, BenchContext, Case, Runner,
                    fast_sampler_options, make_runner)
from .report import BASELINES, markdown_report
from .run_loop import run, run_case
from .schema import SCHEMA_VERSION, validate_result
from .settings import (ABLATION_STAGES, COMPILE_MODES, MODELS, Settings, add_arguments, default_out_path, plan_cases,
                       resolve_settings)
from .timing import (measure_ceilings, measure_copy_bandwidth, measure_matmul_flops, model_flops, throughput,
                     time_runner)

__all__ = [
    "ABLATION_STAGES", "BASELINES", "COMPILE_MODES", "FULL_STEPS", "MODELS", "SAMPLING_IMPLS", "SCHEMA_VERSION",
    "TRAINING_IMPLS", "BenchContext", "Case", "Runner", "Settings", "add_arguments", "build_parser",
    "default_out_path", "fast_sampler_options", "main", "make_runner", "markdown_report",
    "measure_ceilings", "measure_copy_bandwidth", "measure_matmul_flops", "model_flops", "plan_cases",
    "resolve_settings", "run", "run_case", "throughput", "time_runner", "validate_result",
]


def build_parser(prog: str = "ddpm-fast bench") -> argparse.ArgumentParser:
    """The standalone ``bench`` parser; its description is the first line of this package's docstring."""
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

