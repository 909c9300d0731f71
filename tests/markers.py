"""Test markers shared by every module (pytest puts tests/ on the path: ``from markers import needs_cuda``).

``needs_cuda`` (``CUDA_MARKS`` for a parameter) is the one way a test says it needs a GPU: it carries the ``cuda`` marker (so
``pytest -m cuda tests`` runs exactly the CUDA tests and ``-m "not cuda"`` the rest) and skips without
CUDA. ``conftest.py`` refuses, at collection, a test that skips for want of CUDA any other way, or that
carries one half of the pair without the other.

``KERNEL_DEVICES`` parametrizes a Triton-kernel test over the device it runs on: CPU tensors through the
Triton interpreter (chosen at import, only where there is no CUDA), or CUDA.
"""

import pytest
import torch

CUDA = torch.cuda.is_available()
NEEDS_CUDA_REASON = "needs a CUDA GPU"

CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason=NEEDS_CUDA_REASON)]


def needs_cuda(test):
    """Decorator: the ``cuda`` marker and the skip without CUDA (``pytest.param(..., marks=CUDA_MARKS)``
    for one parameter)."""
    for mark in CUDA_MARKS:
        test = mark(test)
    return test


def _interpreting() -> bool:
    try:
        from ddpm_fast.kernels.utils import interpreting
    except ImportError:  # no triton: nothing runs the kernels on CPU tensors
        return False
    return interpreting()


KERNEL_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(CUDA or not _interpreting(),
                                                 reason="CPU tensors need the Triton interpreter")),
    pytest.param("cuda", marks=CUDA_MARKS),
]
