"""Test-session setup shared by every test module.

On a machine without CUDA the Triton kernels run through Triton's interpreter on CPU tensors. The
interpreter is chosen when triton is first imported, so the variable is set here, before any test module
can import it.
"""

import os
import re

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from markers import NEEDS_CUDA_REASON  # noqa: E402  (after TRITON_INTERPRET: markers asks triton)

# Training on a file source decodes it into the data cache: keep the tests' caches out of the home folder
# (subprocesses inherit the variable).
if "DDPM_FAST_DATA_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["DDPM_FAST_DATA_CACHE"] = tempfile.mkdtemp(prefix="ddpm-fast-test-cache-")
    atexit.register(shutil.rmtree, os.environ["DDPM_FAST_DATA_CACHE"], True)

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


_CUDA_WORDS = re.compile(r"\b(cuda|gpu)\b", re.IGNORECASE)


def pytest_collection_modifyitems(config, items):
    """Refuse a CUDA test that ``-m cuda`` would not select, or a ``cuda``-marked test that runs without
    CUDA: the marker and the skip come together, from ``markers.needs_cuda``. A skip whose reason names
    CUDA or a GPU (other than "... without CUDA") is refused on a test without that pair; a CUDA test may
    add its own (e.g. "needs two CUDA GPUs")."""
    wrong = []
    for item in items:
        marked = item.get_closest_marker("cuda") is not None
        reasons = [str(m.kwargs.get("reason", m.args[1] if len(m.args) > 1 else "")) for m in item.iter_markers("skipif")]
        paired = NEEDS_CUDA_REASON in reasons
        stray = [] if paired else [r for r in reasons if _CUDA_WORDS.search(r) and "without" not in r]
        if marked != paired or stray:
            wrong.append(f"{item.nodeid}: cuda marker {'present' if marked else 'absent'}, needs_cuda skip "
                         f"{'present' if paired else 'absent'}{', other CUDA skips: ' + repr(stray) if stray else ''}")
    if wrong:
        raise pytest.UsageError("CUDA tests must use markers.needs_cuda (the cuda marker and its skip):\n  "
                                + "\n  ".join(wrong))
