"""pytest-benchmark cases: sampling and training throughput, the same cases as ``ddpm-fast bench``.

Run with ``pytest benchmarks/ --benchmark-only`` (add ``--benchmark-json out.json`` to keep the figures).
Each test builds its case with ``ddpm_fast.bench.make_runner``, warms it up (compilation, CUDA-graph
capture) outside the timed rounds, then lets pytest-benchmark time whole runs; images/s, ms/step and MFU
from the median go to ``extra_info``. An out-of-memory case is skipped with the reason, not failed.
"""

import pytest
import torch

from ddpm_fast import bench
from ddpm_fast.bench import run_loop


def _time_case(benchmark, bench_setup, case: bench.Case) -> None:
    settings, device = bench_setup["settings"], bench_setup["ctx"].device
    benchmark.group = f"{case.kind} batch {case.batch_size}"
    try:
        runner = bench.make_runner(case, bench_setup["ctx"])
        with runner.context():
            runner.warmup()
            benchmark.pedantic(runner, rounds=settings["rounds"], iterations=1, warmup_rounds=0)
    except torch.cuda.OutOfMemoryError as exc:
        pytest.skip(f"out of memory: {str(exc).splitlines()[0]}")
    finally:
        run_loop._release(device)
    seconds = [benchmark.stats.stats.median]
    figures = bench.throughput(seconds, case.kind, case.batch_size, case.steps,
                               bench_setup["flops"][case.kind], bench_setup["peak"])
    benchmark.extra_info.update(
        device=str(device), impl=case.impl, batch_size=case.batch_size, steps_timed=case.steps,
        steps_reported=figures["steps_reported"], images_per_s=figures["images_per_s"],
        ms_per_step=figures["ms_per_step"], mfu=figures["mfu"], config=getattr(runner, "config", None))
    assert figures["images_per_s"] > 0


def test_sampling(benchmark, bench_setup, sampling_impl, sampling_batch):
    steps = bench_setup["settings"]["steps"]
    _time_case(benchmark, bench_setup, bench.Case("sampling", sampling_impl, sampling_batch, steps))


def test_training(benchmark, bench_setup, training_impl, training_batch):
    steps = bench_setup["settings"]["train_steps"]
    _time_case(benchmark, bench_setup, bench.Case("training", training_impl, training_batch, steps))
