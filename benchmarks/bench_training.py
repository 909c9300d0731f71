#!/usr/bin/env python3
"""Training-step throughput: the reference step (eager fp32) against the fast path (``Trainer.train_step``).

The same code as ``ddpm-fast bench --only training`` (``ddpm_fast.bench``), e.g.
``python benchmarks/bench_training.py --train-batch-sizes 128 --train-steps 10``.
"""

import sys

from ddpm_fast.bench import main

if __name__ == "__main__":
    sys.exit(main(only="training", prog="bench_training.py"))
