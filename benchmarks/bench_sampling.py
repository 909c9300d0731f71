#!/usr/bin/env python3
"""Sampling throughput: reference, diffusers, diffusers-compiled, ddpm_fast and its ablation.

The same code as ``ddpm-fast bench --only sampling`` (``ddpm_fast.bench``); every ``ddpm-fast bench``
option works here, e.g. ``python benchmarks/bench_sampling.py --batch-sizes 1,64,512 --steps 100``.
"""

import sys

from ddpm_fast.bench import main

if __name__ == "__main__":
    sys.exit(main(only="sampling", prog="bench_sampling.py"))
