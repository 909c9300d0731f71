"""The torch Philox twin (ddpm_fast.philox) against published vectors and against Triton's own randn."""

import os

import pytest
import torch

if not torch.cuda.is_available():  # the interpreter must be chosen before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ddpm_fast import philox  # noqa: E402

MASK32 = 0xFFFFFFFF

# Random123's known-answer vectors for philox4x32_10 (kat_vectors): counter, key -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK32,) * 4, (MASK32, MASK32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox4x32_10_known_answers(counter, key, expected):
    words = [torch.tensor([c], dtype=torch.int64) for c in counter]
    keys = [torch.tensor([k], dtype=torch.int64) for k in key]
    out = philox.philox4x32(*words, *keys)
    assert tuple(int(w) for w in out) == expected


def test_mul_hi_lo_is_exact_for_extreme_uint32():
    gen = torch.Generator().manual_seed(0)
    a = torch.cat([torch.tensor([0, 1, MASK32, 2**31, 2**16 - 1]),
                   torch.randint(0, 2**32, (200,), generator=gen, dtype=torch.int64)])
    for m in (philox.PHILOX_ROUND_A, philox.PHILOX_ROUND_B, MASK32, 1):
        hi, lo = philox._mul_hi_lo(a, m)
        for v, h, low in zip(a.tolist(), hi.tolist(), lo.tolist()):
            assert (h, low) == ((v * m) >> 32, (v * m) & MASK32)


def test_uniform_lies_in_unit_interval_at_the_extremes():
    x = torch.tensor([0, 1, 2**31 - 1, 2**31, MASK32], dtype=torch.int64)
    u = philox.uniform_from_uint32(x)
    assert u.dtype == torch.float32
    assert (u >= 0).all() and (u < 1).all()
    assert u[0] == 0 and u[-1] == 0  # 0 and 2^32-1 fold onto the same value, as in Triton


def test_randn_statistics_and_determinism():
    scipy_stats = pytest.importorskip("scipy.stats")
    z = philox.randn(7, 3, torch.arange(20000))
    assert torch.isfinite(z).all()
    assert abs(float(z.mean())) < 4 / 20000**0.5
    assert abs(float(z.var()) - 1.0) < 0.05
    assert scipy_stats.kstest(z.double().numpy(), "norm").pvalue > 1e-3
    assert torch.equal(z, philox.randn(7, 3, torch.arange(20000)))
    other = philox.randn(7, 4, torch.arange(20000))
    assert abs(float(torch.corrcoef(torch.stack([z, other]))[0, 1])) < 4 / 20000**0.5


def test_seeded_normal_rows_and_chunking():
    seeds = torch.tensor([5, 0, MASK32])
    steps = torch.tensor([1000, 0, MASK32])
    whole = philox.seeded_normal(seeds, steps, 777)
    chunked = philox.seeded_normal(seeds, steps, 777, chunk=100)
    assert whole.shape == (3, 777) and torch.equal(whole, chunked)
    for b in range(3):
        assert torch.equal(whole[b], philox.randn(int(seeds[b]), int(steps[b]), torch.arange(777)))


# --- against Triton's own tl.randint4x / tl.randn and the kernels' philox_randn ----------------------

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from ddpm_fast.kernels.random import philox_randn  # noqa: E402
from markers import KERNEL_DEVICES  # noqa: E402
from tolerances import BOX_MULLER_ATOL, assert_within  # noqa: E402


@triton.jit
def _draw(ints_ptr, lib_ptr, ours_ptr, key_ptr, N, BLOCK: tl.constexpr):
    off = tl.arange(0, BLOCK)
    mask = off < N
    seed = tl.load(key_ptr)
    step = tl.load(key_ptr + 1)
    seed64 = (step << 32) | seed
    i0, i1, i2, i3 = tl.randint4x(seed64, off)
    tl.store(ints_ptr + 4 * off, i0.to(tl.int64) & 0xFFFFFFFF, mask=mask)
    tl.store(ints_ptr + 4 * off + 1, i1.to(tl.int64) & 0xFFFFFFFF, mask=mask)
    tl.store(ints_ptr + 4 * off + 2, i2.to(tl.int64) & 0xFFFFFFFF, mask=mask)
    tl.store(ints_ptr + 4 * off + 3, i3.to(tl.int64) & 0xFFFFFFFF, mask=mask)
    tl.store(lib_ptr + off, tl.randn(seed64, off), mask=mask)
    tl.store(ours_ptr + off, philox_randn(seed.to(tl.uint32), step.to(tl.uint32), off.to(tl.uint32)), mask=mask)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("seed,step", [(0, 0), (7, 999), (MASK32, MASK32), (123456789, 2**31)])
def test_twin_equals_triton_randn(seed, step, device):
    n = 3000
    ints = torch.full((n, 4), -1, dtype=torch.int64, device=device)
    lib = torch.full((n,), float("nan"), device=device)
    ours = torch.full((n,), float("nan"), device=device)
    key = torch.tensor([seed, step], dtype=torch.int64, device=device)
    _draw[(1,)](ints, lib, ours, key, n, BLOCK=4096)
    offsets = torch.arange(n, device=device)
    twin_ints = torch.stack(philox.randint4x(torch.tensor(seed), torch.tensor(step), offsets), dim=1)
    assert torch.equal(ints, twin_ints)  # the integer stream is exact
    # the kernel helper is Triton's randn: the same numpy operations under the interpreter (equal); compiled,
    # within what two evaluations of log/cos may differ by. The twin differs only by the rounding of log/cos.
    if device == "cpu":
        torch.testing.assert_close(ours, lib, rtol=0, atol=0)
    else:
        assert_within(ours, lib, BOX_MULLER_ATOL, "philox_randn vs tl.randn")
    assert_within(philox.randn(seed, step, offsets), lib, BOX_MULLER_ATOL, "twin vs tl.randn")
