"""pytest-benchmark suite settings: CPU sizes on a CPU, GPU sizes on CUDA (``pytest benchmarks/ --benchmark-only``).

Not part of the CI run (CI runs ``pytest tests``). The cases are the ones ``ddpm-fast bench`` times, built
by ``ddpm_fast.bench.make_runner``. Environment overrides (comma lists where plural):
DDPM_FAST_BENCH_IMPLS, DDPM_FAST_BENCH_BATCH_SIZES, DDPM_FAST_BENCH_STEPS, DDPM_FAST_BENCH_TRAIN_BATCH_SIZES,
DDPM_FAST_BENCH_ROUNDS, DDPM_FAST_BENCH_MODEL (cifar10 | digits | tiny), DDPM_FAST_BENCH_FAST_COMPILE_MODE
(ddpm_fast's torch.compile mode, as ``ddpm-fast bench --fast-compile-mode``; default FastSampler's own).
"""

import os

import pytest
import torch

from ddpm_fast import bench

ON_CUDA = torch.cuda.is_available()
# `ddpm-fast bench`'s defaults on this device (the sizes and implementations it would time)
BENCH_DEFAULTS = bench.resolve_settings(bench.build_parser().parse_args([]))
DEVICE = BENCH_DEFAULTS.device


def _env_list(name: str, default: list) -> list:
    text = os.environ.get(name)
    if not text:
        return default
    return [int(v) if v.strip().isdigit() else v.strip() for v in text.split(",") if v.strip()]


# The same defaults as `ddpm-fast bench` on this device, but fewer steps: pytest-benchmark repeats rounds.
SETTINGS = {
    "impls": _env_list("DDPM_FAST_BENCH_IMPLS", [i for i in BENCH_DEFAULTS.impls if i != "ablation"]),
    "batch_sizes": _env_list("DDPM_FAST_BENCH_BATCH_SIZES", list(BENCH_DEFAULTS.batch_sizes)),
    "steps": int(os.environ.get("DDPM_FAST_BENCH_STEPS", 20 if ON_CUDA else 2)),
    "train_batch_sizes": _env_list("DDPM_FAST_BENCH_TRAIN_BATCH_SIZES", list(BENCH_DEFAULTS.train_batch_sizes)),
    "train_steps": 5 if ON_CUDA else 1,
    "rounds": int(os.environ.get("DDPM_FAST_BENCH_ROUNDS", 5 if ON_CUDA else 2)),
    "model": os.environ.get("DDPM_FAST_BENCH_MODEL", "cifar10"),
    "fast_compile_mode": os.environ.get("DDPM_FAST_BENCH_FAST_COMPILE_MODE") or None,
}


def pytest_configure(config):
    """A bad setting is one line from pytest (a usage error), not a traceback from importing this file."""
    if SETTINGS["fast_compile_mode"] not in (None, *bench.COMPILE_MODES):
        raise pytest.UsageError(f"DDPM_FAST_BENCH_FAST_COMPILE_MODE={SETTINGS['fast_compile_mode']!r}: choose "
                                f"from {', '.join(bench.COMPILE_MODES)}")


def pytest_generate_tests(metafunc):
    """Parametrise over this device's implementations and sizes (decided at collection time)."""
    if "sampling_impl" in metafunc.fixturenames:
        metafunc.parametrize("sampling_impl", SETTINGS["impls"])
    if "sampling_batch" in metafunc.fixturenames:
        metafunc.parametrize("sampling_batch", SETTINGS["batch_sizes"], ids=lambda b: f"batch{b}")
    if "training_impl" in metafunc.fixturenames:
        metafunc.parametrize("training_impl", list(bench.TRAINING_IMPLS))
    if "training_batch" in metafunc.fixturenames:
        metafunc.parametrize("training_batch", SETTINGS["train_batch_sizes"], ids=lambda b: f"batch{b}")


@pytest.fixture(scope="session")
def bench_setup():
    """The shared context (device, model, weights), counted FLOPs and the bf16 matmul peak (CUDA only)."""
    if not ON_CUDA:
        # TRITON_INTERPRET is not needed: on the CPU every case takes its torch path.
        torch.set_num_threads(min(2, torch.get_num_threads()))
    ctx = bench.BenchContext(device=DEVICE, model_name=SETTINGS["model"],
                             fast_compile_mode=SETTINGS["fast_compile_mode"])
    peak = bench.measure_ceilings(DEVICE)["bf16_matmul_tflops"]
    return {"ctx": ctx, "flops": bench.model_flops(ctx), "peak": peak * 1e12 if peak else None,
            "settings": SETTINGS}
