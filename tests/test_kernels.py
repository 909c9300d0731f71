"""The fused Triton kernels against the float64 reference: on CUDA when present, else on CPU tensors
through Triton's interpreter (TRITON_INTERPRET=1; small shapes, the interpreter pays per program)."""

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():  # the interpreter must be chosen before the kernels are decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from ddpm_fast import coefficients, philox, reference  # noqa: E402
from ddpm_fast import kernels  # noqa: E402
from ddpm_fast.schedule import NoiseSchedule  # noqa: E402
from markers import KERNEL_DEVICES, needs_cuda  # noqa: E402
from tolerances import (BOX_MULLER_ATOL, assert_within, output_rounding, q_sample_bound,  # noqa: E402
                        reverse_update_bound)

DEVICES = KERNEL_DEVICES
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 3, 7, 7), (5, 3, 5, 9), (3, 1, 4, 4), (2, 4, 8, 8)]
T = 1000


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.linear(T)


def _images(shape, dtype, device, gen, channels_last=False):
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def _poisoned_like(x, channels_last=None):
    out = torch.full_like(x, float("nan"))
    if channels_last is not None:
        out = out.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return out


def _assert_matches(actual, expected, arithmetic):
    """Against a float64 oracle fed the same rounded inputs: the kernel's float32 arithmetic (a bound from
    tolerances) plus one rounding of the output to its dtype. NaN (a poisoned output not overwritten) fails."""
    expected = expected.double().cpu()
    arithmetic = torch.as_tensor(arithmetic, dtype=torch.float64)
    bound = arithmetic + output_rounding(expected.abs() + arithmetic, actual.dtype)
    assert_within(actual, expected, bound, f"kernel, {actual.dtype} out")


# ------------------------------------------------------------------------------------------------
# reverse_update: every sampler's table against the reference step


# (eta, variance, clip_x0, timesteps): DDPM eps form, clipped DDPM, respaced, DDIM eta 0/1 +- clip
SAMPLERS = [
    pytest.param(None, "fixed_large", False, None, id="ddpm-large"),
    pytest.param(None, "fixed_small", False, None, id="ddpm-small"),
    pytest.param(None, "fixed_large", True, None, id="ddpm-large-clip"),
    pytest.param(None, "fixed_small", True, None, id="ddpm-small-clip"),
    pytest.param(None, "fixed_large", False, 10, id="ddpm-respaced10"),
    pytest.param(None, "fixed_small", True, [999, 700, 420, 123, 5, 0], id="ddpm-respaced-list-clip"),
    pytest.param(0.0, "fixed_large", False, 10, id="ddim-eta0"),
    pytest.param(0.0, "fixed_large", True, 10, id="ddim-eta0-clip"),
    pytest.param(1.0, "fixed_large", False, 10, id="ddim-eta1"),
    pytest.param(1.0, "fixed_large", True, 25, id="ddim-eta1-clip"),
]


def _reference_step(schedule, timesteps, eta, variance, clip, x, j, eps, z):
    """The oracle in float64 on the schedule the table was built for; j = respaced index per sample."""
    steps = coefficients.resolve_timesteps(timesteps, schedule.num_timesteps)
    sched = schedule if len(steps) == schedule.num_timesteps else schedule.respaced(steps)
    args = (x.double().cpu(), j, eps.double().cpu(), sched, None if z is None else z.double().cpu())
    if eta is None:
        return reference.reverse_step(*args, variance=variance, clip_x0=clip)
    return reference.ddim_step(*args, eta=eta, clip_x0=clip)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eta,variance,clip,timesteps", SAMPLERS)
def test_reverse_update_matches_reference_per_sample_rows(device, dtype, eta, variance, clip, timesteps, schedule):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((dtype, eta, variance, clip, timesteps)).encode()))
    shape = SHAPES[(DTYPES.index(dtype) + (0 if eta is None else 2)) % len(SHAPES)]
    table = coefficients.reverse_table(schedule, timesteps, variance=variance, clip_x0=clip, eta=eta)
    num_rows = table.shape[0]
    B = shape[0]
    # first and last rows always present (t = T-1 and t = 0), the rest random
    rows = torch.randint(0, num_rows, (B,), generator=gen)
    rows[0] = num_rows - 1
    if B > 1:
        rows[1] = 0
    x = _images(shape, dtype, device, gen, channels_last=dtype == torch.bfloat16)
    eps = _images(shape, dtype, device, gen)
    z = _images(shape, dtype, device, gen, channels_last=dtype == torch.float16)
    out = _poisoned_like(x)
    result = kernels.reverse_update(x, eps, table.to(device=device, dtype=torch.float32), rows.to(device),
                                    out=out, noise=z, clip=1.0 if clip else None)
    assert result is out and result.dtype == dtype
    expected = _reference_step(schedule, timesteps, eta, variance, clip, x, num_rows - 1 - rows, eps, z)
    _assert_matches(result, expected, reverse_update_bound(table[rows], x, eps, z))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layouts", ["nchw", "cl", "x-cl", "eps-cl", "out-cl"])
def test_reverse_update_layouts_single_row_no_noise(device, shape, layouts, schedule):
    gen = torch.Generator().manual_seed(len(layouts) + shape[0])
    table = coefficients.reverse_table(schedule, clip_x0=True).to(device=device, dtype=torch.float32)
    x = _images(shape, torch.float32, device, gen, channels_last=layouts in ("cl", "x-cl"))
    eps = _images(shape, torch.float32, device, gen, channels_last=layouts in ("cl", "eps-cl"))
    out = _poisoned_like(x, channels_last=layouts in ("cl", "out-cl", "x-cl"))
    t = 412
    row = torch.tensor([T - 1 - t], device=device, dtype=torch.int32)
    result = kernels.reverse_update(x, eps, table, row, out=out, clip=1.0)
    expected = reference.reverse_step(x.double().cpu(), t, eps.double().cpu(), schedule, None, clip_x0=True)
    row64 = coefficients.reverse_table(schedule, clip_x0=True)[T - 1 - t].view(1, -1)
    bound = reverse_update_bound(row64, x, eps, None)
    _assert_matches(result, expected, bound)
    # the default output takes x_t's layout
    default = kernels.reverse_update(x, eps, table, row, clip=1.0)
    assert default.is_contiguous(memory_format=torch.channels_last) == (layouts in ("cl", "x-cl") or shape[1] == 1)
    _assert_matches(default, expected, bound)


@pytest.mark.parametrize("device", DEVICES)
def test_reverse_update_mixed_dtypes(device, schedule):
    """bf16 x_t with float32 eps and z into a float32 output: every operand is upcast, nothing rounds."""
    gen = torch.Generator().manual_seed(4)
    shape = (2, 3, 5, 7)
    table64 = coefficients.reverse_table(schedule, variance="fixed_small")
    table = table64.to(device=device, dtype=torch.float32)
    x = _images(shape, torch.bfloat16, device, gen)
    eps = _images(shape, torch.float32, device, gen, channels_last=True)
    z = _images(shape, torch.float16, device, gen)
    rows = torch.tensor([0, T - 1], device=device)
    out = kernels.reverse_update(x, eps, table, rows, out=_poisoned_like(x).float(), noise=z)
    assert out.dtype == torch.float32
    expected = reference.reverse_step(x.double().cpu(), T - 1 - rows.cpu(), eps.double().cpu(), schedule,
                                      z.double().cpu(), variance="fixed_small")
    _assert_matches(out, expected, reverse_update_bound(table64[rows.cpu()], x, eps, z))


@pytest.mark.parametrize("device", DEVICES)
def test_reverse_update_in_place_and_clip_radius(device, schedule):
    gen = torch.Generator().manual_seed(3)
    table = coefficients.reverse_table(schedule, 10, eta=0.0, clip_x0=True).to(device=device, dtype=torch.float32)
    x = _images((2, 3, 6, 6), torch.float32, device, gen) * 3
    eps = _images((2, 3, 6, 6), torch.float32, device, gen)
    row = torch.tensor([4], device=device)
    out_of_place = kernels.reverse_update(x, eps, table, row, clip=0.5)
    x0 = (x * table[4, coefficients.SQRT_RECIP_AB] - eps * table[4, coefficients.SQRT_RECIPM1_AB]).clamp(-0.5, 0.5)
    expected = table[4, coefficients.C_X0] * x0 + table[4, coefficients.C_XT] * x
    # both sides float32 (torch's expression here): twice the arithmetic bound
    _assert_matches(out_of_place, expected, reverse_update_bound(table[4:5].double().cpu(), x, eps, None, sides=2))
    same = kernels.reverse_update(x, eps, table, row, out=x, clip=0.5)
    assert same is x
    torch.testing.assert_close(x, out_of_place, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_reverse_update_seeded_noise_is_the_twin(device, dtype, channels_last, schedule):
    """In-kernel z equals ddpm_fast.philox's noise keyed by (seed, model timestep); none on the last row."""
    gen = torch.Generator().manual_seed(11)
    steps = [999, 600, 250, 0]
    table64 = coefficients.reverse_table(schedule, steps, variance="fixed_small")
    table = table64.to(device=device, dtype=torch.float32)
    shape = (4, 3, 5, 9)
    x = _images(shape, dtype, device, gen, channels_last)
    eps = _images(shape, dtype, device, gen)
    seeds = torch.tensor([7, 0, 2**32 - 1, 12345], device=device)
    rows = torch.tensor([0, 1, 2, 3], device=device)
    out = kernels.reverse_update(x, eps, table, rows, out=_poisoned_like(x), seeds=seeds)
    z = philox.seeded_normal(seeds.cpu(), torch.tensor(steps), 3 * 5 * 9).view(shape)
    expected = _reference_step(schedule, steps, None, "fixed_small", False, x, 3 - rows.cpu(), eps, z)
    # the kernel's z is the twin's up to Box-Muller's log/cos (BOX_MULLER_ATOL), scaled by sigma
    sigma = table64[rows.cpu(), coefficients.SIGMA].view(-1, 1, 1, 1)
    _assert_matches(out, expected, reverse_update_bound(table64[rows.cpu()], x, eps, z) + sigma * BOX_MULLER_ATOL)
    # the last row (t = 0) adds no noise at all: same bits as with z = 0
    no_noise = kernels.reverse_update(x, eps, table, rows, out=_poisoned_like(x))
    torch.testing.assert_close(out[3], no_noise[3], rtol=0, atol=0)
    assert not torch.equal(out[0], no_noise[0])


# ------------------------------------------------------------------------------------------------
# q_sample


def _q_sample_bound(schedule, t, x0, noise):
    ab = schedule.alphas_cumprod[t.cpu()]
    return q_sample_bound(ab.sqrt(), (1 - ab).sqrt(), x0, noise)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("layouts", ["nchw", "cl", "noise-cl"])
def test_q_sample_matches_reference(device, dtype, shape, layouts, schedule):
    gen = torch.Generator().manual_seed(shape[0] * 7 + len(layouts))
    x0 = _images(shape, dtype, device, gen, channels_last=layouts == "cl")
    noise = _images(shape, dtype, device, gen, channels_last=layouts != "nchw")
    t = torch.randint(0, T, (shape[0],), generator=gen)
    t[0] = T - 1
    if shape[0] > 1:
        t[1] = 0
    tables = schedule.on(device)
    out = _poisoned_like(x0)
    result = kernels.q_sample(x0, t.to(device), tables.sqrt_alphas_cumprod, tables.sqrt_one_minus_alphas_cumprod,
                              noise, out=out)
    assert result is out
    expected = reference.q_sample(x0.double().cpu(), t, noise.double().cpu(), schedule)
    _assert_matches(result, expected, _q_sample_bound(schedule, t, x0, noise))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_q_sample_seeded_writes_the_noise_it_used(device, dtype, channels_last, schedule):
    gen = torch.Generator().manual_seed(5)
    shape = (3, 3, 7, 7)
    x0 = _images(shape, dtype, device, gen, channels_last)
    t = torch.tensor([0, T - 1, 321], device=device)
    seeds = torch.tensor([7, 8, 9], device=device)
    tables = schedule.on(device)
    noise_out = _poisoned_like(x0).float()  # float32 noise for the loss, whatever the image dtype
    x_t, eps = kernels.q_sample(x0, t, tables.sqrt_alphas_cumprod, tables.sqrt_one_minus_alphas_cumprod,
                                out=_poisoned_like(x0), seeds=seeds, noise_step=42, noise_out=noise_out)
    assert eps is noise_out and x_t.dtype == dtype
    twin = philox.seeded_normal(seeds.cpu(), torch.tensor([42]), 3 * 7 * 7).view(shape)
    assert_within(eps, twin, BOX_MULLER_ATOL, "in-kernel noise vs twin")
    expected = reference.q_sample(x0.double().cpu(), t.cpu(), eps.double().cpu(), schedule)
    _assert_matches(x_t, expected, _q_sample_bound(schedule, t.cpu(), x0, eps))
    # per-sample noise steps as a device tensor
    steps = torch.tensor([1, 2, 3], device=device)
    _, eps_steps = kernels.q_sample(x0, t, tables.sqrt_alphas_cumprod, tables.sqrt_one_minus_alphas_cumprod,
                                    seeds=seeds, noise_step=steps)
    twin_steps = philox.seeded_normal(seeds.cpu(), steps.cpu(), 3 * 7 * 7).view(shape)
    _assert_matches(eps_steps, twin_steps, BOX_MULLER_ATOL)


# ------------------------------------------------------------------------------------------------
# in-kernel noise: distribution and keying


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_randn_is_standard_normal(device):
    scipy_stats = pytest.importorskip("scipy.stats")
    z = kernels.seeded_randn(torch.tensor([1, 2, 3, 4], device=device), 1000, (3, 32, 32))
    assert z.shape == (4, 3, 32, 32) and z.dtype == torch.float32
    flat = z.double().cpu().flatten()
    n = flat.numel()
    assert torch.isfinite(flat).all()
    assert abs(float(flat.mean())) < 4 / n**0.5
    assert abs(float(flat.var()) - 1.0) < 6 * (2 / n) ** 0.5
    assert scipy_stats.kstest(flat.numpy(), "norm").pvalue > 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_randn_keying(device):
    shape = (3, 7, 9)
    n = 3 * 7 * 9
    alone = kernels.seeded_randn(torch.tensor([7], device=device), 5, shape)
    again = kernels.seeded_randn(torch.tensor([7], device=device), 5, shape)
    torch.testing.assert_close(alone, again, rtol=0, atol=0)  # same key, same noise
    # batch composition: seed 7 at position 3 of a batch of 5 is the same image
    batch = kernels.seeded_randn(torch.tensor([1, 2, 3, 7, 9], device=device), 5, shape)
    torch.testing.assert_close(batch[3], alone[0], rtol=0, atol=0)
    # layout: a channels_last output holds the same logical values
    cl_out = torch.full((5, *shape), float("nan"), device=device).to(memory_format=torch.channels_last)
    cl = kernels.seeded_randn(torch.tensor([1, 2, 3, 7, 9], device=device), 5, shape, out=cl_out)
    torch.testing.assert_close(cl, batch, rtol=0, atol=0)
    # different seeds and different steps give uncorrelated noise
    big = kernels.seeded_randn(torch.tensor([7, 7, 8], device=device), torch.tensor([5, 6, 5], device=device),
                               (3, 32, 32)).double().cpu().view(3, -1)
    corr = torch.corrcoef(big)
    bound = 4 / big.shape[1] ** 0.5
    assert abs(float(corr[0, 1])) < bound and abs(float(corr[0, 2])) < bound and abs(float(corr[1, 2])) < bound
    # the torch twin reproduces the kernel
    twin = philox.seeded_normal(torch.tensor([1, 2, 3, 7, 9]), torch.tensor([5]), n).view(5, *shape)
    assert_within(batch, twin, BOX_MULLER_ATOL, "kernel noise vs twin")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_seeded_randn_half_outputs(device, dtype):
    out = torch.full((2, 3, 5, 5), float("nan"), device=device, dtype=dtype)
    z = kernels.seeded_randn(torch.tensor([3, 4], device=device), 9, (3, 5, 5), out=out)
    twin = philox.seeded_normal(torch.tensor([3, 4]), torch.tensor([9]), 75).view(2, 3, 5, 5)
    _assert_matches(z, twin, BOX_MULLER_ATOL)


# ------------------------------------------------------------------------------------------------
# argument checks (host side; no kernel runs)


@pytest.mark.parametrize("device", DEVICES)
def test_reverse_update_rejects_bad_arguments(device, schedule):
    x = torch.zeros(2, 3, 4, 4, device=device)
    table = coefficients.reverse_table(schedule).to(device=device, dtype=torch.float32)
    row = torch.zeros(1, dtype=torch.int64, device=device)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        kernels.reverse_update(x.double(), x.double(), table, row)
    with pytest.raises(ValueError, match="eps must have the shape"):
        kernels.reverse_update(x, x[:1], table, row)
    with pytest.raises(TypeError, match="float32"):
        kernels.reverse_update(x, x, table.double(), row)
    with pytest.raises(ValueError, match=r"shape \(S, 8\)"):
        kernels.reverse_update(x, x, table[:, :7].contiguous(), row)
    with pytest.raises(ValueError, match=r"row must have shape \(1,\) or \(2,\)"):
        kernels.reverse_update(x, x, table, torch.zeros(3, dtype=torch.int64, device=device))
    with pytest.raises(TypeError, match="int32 or int64"):
        kernels.reverse_update(x, x, table, row.float())
    with pytest.raises(ValueError, match="at most one of seeds"):
        kernels.reverse_update(x, x, table, row, seeds=torch.zeros(2, dtype=torch.int64, device=device), noise=x)
    with pytest.raises(ValueError, match="clip must be None or a positive float"):
        kernels.reverse_update(x, x, table, row, clip=0.0)
    with pytest.raises(ValueError, match=r"seeds must have shape \(2,\)"):
        kernels.reverse_update(x, x, table, row, seeds=torch.zeros(3, dtype=torch.int64, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_q_sample_and_seeded_randn_reject_bad_arguments(device, schedule):
    x = torch.zeros(2, 3, 4, 4, device=device)
    t = torch.zeros(2, dtype=torch.int64, device=device)
    tables = schedule.on(device)
    a, s = tables.sqrt_alphas_cumprod, tables.sqrt_one_minus_alphas_cumprod
    with pytest.raises(ValueError, match="exactly one of noise"):
        kernels.q_sample(x, t, a, s)
    with pytest.raises(ValueError, match="needs noise_step"):
        kernels.q_sample(x, t, a, s, seeds=t)
    with pytest.raises(ValueError, match="only apply to in-kernel noise"):
        kernels.q_sample(x, t, a, s, x, noise_step=3)
    with pytest.raises(ValueError, match=r"1-D \(T,\) table"):
        kernels.q_sample(x, t, a.view(1, -1), s, x)
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\*\*32\)"):
        kernels.q_sample(x, t, a, s, seeds=t, noise_step=-1)
    with pytest.raises(ValueError, match="one image's"):
        kernels.seeded_randn(t, 0, (4, 4))
    with pytest.raises(ValueError, match="must have shape"):
        kernels.seeded_randn(t, 0, (3, 4, 4), out=x[:1])


# ------------------------------------------------------------------------------------------------
# CUDA graphs (GPU only): one capture replays every step, reading the step counter from memory


@needs_cuda
def test_reverse_update_replays_in_a_cuda_graph(schedule):
    device = "cuda"
    steps = 10
    table = coefficients.reverse_table(schedule, steps, eta=1.0).to(device=device, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    x_start = _images((4, 3, 8, 8), torch.float32, device, gen)
    eps = _images((4, 3, 8, 8), torch.float32, device, gen)
    seeds = torch.tensor([1, 2, 3, 4], device=device)
    eager = x_start.clone()
    for k in range(steps):
        eager = kernels.reverse_update(eager, eps, table, torch.tensor([k], device=device), seeds=seeds)

    x = x_start.clone()
    counter = torch.zeros(1, dtype=torch.int64, device=device)
    kernels.reverse_update(x.clone(), eps, table, counter, seeds=seeds)  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernels.reverse_update(x, eps, table, counter, out=x, seeds=seeds)
        counter.add_(1)
    x.copy_(x_start)
    counter.zero_()
    for _ in range(steps):
        graph.replay()
    torch.cuda.synchronize()
    assert int(counter) == steps
    torch.testing.assert_close(x, eager, rtol=0, atol=0)
