"""Test-session setup shared by every test module.

On a machine without CUDA the Triton kernels run through Triton's interpreter on CPU tensors. The
interpreter is chosen when triton is first imported, so the variable is set here, before any test module
can import it.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two CPU cores in CI: more threads only add contention between torch's pools.
torch.set_num_threads(min(2, torch.get_num_threads()))
