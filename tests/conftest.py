"""Test-session setup shared by every test module.

On a machine without CUDA the Triton kernels run through Triton's interpreter on CPU tensors. The
interpreter is chosen when triton is first imported, so the variable is set here, before any test module
can import it.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two CPU cores in CI: more threads only add contention between torch's pools.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def single_thread():
    """Run a module single-threaded. Its models are tiny: a second intra-op thread only adds pool
    wake-ups (and, on a busy machine, stalls on a descheduled sibling). Use it with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
