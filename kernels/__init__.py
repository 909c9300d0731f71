"""Fused Triton kernels of ddpm-fast (installed as ``ddpm_fast.kernels``; needs triton).

- ``q_sample``: forward noising with per-sample coefficient gathers, eps given or drawn in-kernel;
- ``reverse_update``: the reverse step of every DDPM/DDIM sampler from a coefficient table, graph-safe;
- ``solver_update``: a step of the multistep solvers (DPM-Solver++, UniPC) with their history, graph-safe;
- ``seeded_randn``: seed-keyed in-kernel N(0, 1) noise (a sampler's x_T).

In-kernel noise for image b, noise step s and logical NCHW element e is Triton's Philox
``randn((s << 32) | seeds[b], e)``; ``ddpm_fast.philox`` is its torch twin. Kernels run on CUDA tensors,
or on CPU tensors under TRITON_INTERPRET=1 (set before triton is first imported).
"""

from .noising import q_sample, seeded_randn
from .reverse_update import NUM_COLUMNS, reverse_update
from .solver_update import NUM_SOLVER_COLUMNS, solver_update

__all__ = ["q_sample", "reverse_update", "solver_update", "seeded_randn", "NUM_COLUMNS", "NUM_SOLVER_COLUMNS"]
