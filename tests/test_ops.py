"""ddpm_fast.ops: backend dispatch, the triton path against the reference, the seed-keyed variants and
validation that mirrors the reference's."""

import os

import pytest
import torch

if not torch.cuda.is_available():  # the interpreter must be chosen before the kernels are decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ddpm_fast import ops, reference  # noqa: E402
from ddpm_fast.schedule import NoiseSchedule  # noqa: E402
from markers import KERNEL_DEVICES, needs_cuda  # noqa: E402
from tolerances import (BOX_MULLER_ATOL, assert_within, output_rounding, q_sample_bound,  # noqa: E402
                        reverse_update_bound)
from ddpm_fast.coefficients import reverse_table  # noqa: E402

T = 1000

needs_kernels = pytest.mark.skipif(not ops.triton_available(), reason="needs the triton package")


@pytest.fixture(params=KERNEL_DEVICES)
def device(request):
    """CPU tensors through the Triton interpreter where there is no CUDA; CUDA tensors (a cuda test)."""
    return request.param


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.linear(T)


@pytest.fixture(autouse=True)
def _no_env_backend(monkeypatch):
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)


def _batch(device, shape=(3, 3, 7, 5), dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(3)]


# ------------------------------------------------------------------------------------------------
# dispatch


def test_auto_backend_picks_by_device():
    cpu = torch.zeros(1, 1, 1, 1)
    assert ops.resolve_backend("auto", cpu) == "torch"
    assert ops.resolve_backend("torch", cpu) == "torch"
    assert ops.resolve_backend("auto", cpu.double()) == "torch"


@needs_cuda
@needs_kernels
def test_auto_backend_picks_triton_on_cuda():
    x = torch.zeros(1, 1, 1, 1, device="cuda")
    assert ops.resolve_backend("auto", x) == "triton"
    assert ops.resolve_backend("auto", x.double()) == "torch"  # no float64 kernels


def test_unknown_backend_is_a_value_error(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        ops.resolve_backend("cuda", torch.zeros(1))
    monkeypatch.setenv(ops.ENV_BACKEND, "fast")
    with pytest.raises(ValueError, match=f"unknown environment variable {ops.ENV_BACKEND} 'fast'"):
        ops.resolve_backend("auto", torch.zeros(1))


@needs_kernels
def test_env_override_beats_the_argument(monkeypatch, device):
    x = torch.zeros(1, 1, 1, 1, device=device)
    monkeypatch.setenv(ops.ENV_BACKEND, "triton")
    assert ops.resolve_backend("torch", x) == "triton"
    monkeypatch.setenv(ops.ENV_BACKEND, "torch")
    assert ops.resolve_backend("triton", x) == "torch"
    monkeypatch.setenv(ops.ENV_BACKEND, "auto")
    assert ops.resolve_backend("triton", x) == ("triton" if x.is_cuda else "torch")


@needs_kernels
def test_env_override_routes_the_call(monkeypatch, schedule, device):
    x, e, _ = _batch(device)
    calls = []
    from ddpm_fast import kernels

    real = kernels.q_sample
    monkeypatch.setattr(kernels, "q_sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv(ops.ENV_BACKEND, "torch")
    ops.q_sample(x, 5, e, schedule, backend="triton")
    assert calls == []
    monkeypatch.setenv(ops.ENV_BACKEND, "triton")
    ops.q_sample(x, 5, e, schedule, backend="torch")
    assert calls == [1]


def test_triton_backend_without_triton_is_a_clear_error(monkeypatch, schedule, device):
    def missing():
        raise ImportError("No module named 'triton'")

    monkeypatch.setattr(ops, "_kernels", missing)
    x, e, _ = _batch(device)
    with pytest.raises(ValueError, match="needs the triton package"):
        ops.q_sample(x, 5, e, schedule, backend="triton")
    assert ops.resolve_backend("auto", x) == "torch"
    torch.testing.assert_close(ops.q_sample(x, 5, e, schedule), reference.q_sample(x, 5, e, schedule))


@needs_kernels
def test_triton_backend_rejects_float64(device):
    with pytest.raises(TypeError, match="use backend='torch'"):
        ops.resolve_backend("triton", torch.zeros(1, 1, 1, 1, dtype=torch.float64, device=device))


# ------------------------------------------------------------------------------------------------
# the triton path against the float64 reference: bounds from tests/tolerances.py


def _q_sample_bound(schedule, t, x0, noise, dtype=torch.float32):
    ab = schedule.alphas_cumprod[t.cpu()]
    arithmetic = q_sample_bound(ab.sqrt(), (1 - ab).sqrt(), x0, noise)
    exact = reference.q_sample(x0.double().cpu(), t.cpu(), noise.double().cpu(), schedule)
    return arithmetic + output_rounding(exact.abs() + arithmetic, dtype)


def _update_bound(table64, t, x, eps, z=None):
    """The float32 table update's bound (tolerances.reverse_update_bound) at model-schedule indices t."""
    rows = table64.shape[0] - 1 - torch.as_tensor(t).cpu().view(-1)
    return reverse_update_bound(table64[rows], x, eps, z)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q_sample_triton_matches_reference(dtype, schedule, device):
    x, e, _ = _batch(device, dtype=dtype, seed=1)
    t = torch.tensor([0, T - 1, 17], device=device)
    got = ops.q_sample(x, t, e, schedule, backend="triton")
    want = reference.q_sample(x.double(), t, e.double(), schedule)
    assert got.dtype == dtype
    assert_within(got, want, _q_sample_bound(schedule, t, x, e, dtype), "q_sample")


@needs_kernels
@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
@pytest.mark.parametrize("clip_x0", [False, True])
@pytest.mark.parametrize("with_noise", [False, True])
def test_reverse_step_triton_matches_reference(variance, clip_x0, with_noise, schedule, device):
    x, e, z = _batch(device, seed=2)
    x = x.to(memory_format=torch.channels_last)
    t = torch.tensor([T - 1, 0, 500], device=device)
    noise = z if with_noise else None
    got = ops.reverse_step(x, t, e, schedule, noise, variance=variance, clip_x0=clip_x0, backend="triton")
    want = reference.reverse_step(x.double(), t, e.double(), schedule, None if noise is None else z.double(),
                                  variance=variance, clip_x0=clip_x0)
    table64 = reverse_table(schedule, None, variance=variance, clip_x0=clip_x0)
    assert_within(got, want, _update_bound(table64, t, x, e, noise), "reverse_step")
    # an int t works too (the float64 oracle: the float32 reference loses digits in 1 - ab at small t)
    got_int = ops.reverse_step(x, 3, e, schedule, noise, variance=variance, clip_x0=clip_x0, backend="triton")
    want_int = reference.reverse_step(x.double(), 3, e.double(), schedule, None if noise is None else z.double(),
                                      variance=variance, clip_x0=clip_x0)
    assert_within(got_int, want_int, _update_bound(table64, 3, x, e, noise), "reverse_step, int t")


@needs_kernels
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip_x0", [False, True])
def test_ddim_step_triton_matches_reference(eta, clip_x0, schedule, device):
    respaced = schedule.respaced(list(range(0, T, 100)))
    x, e, z = _batch(device, seed=3)
    t = torch.tensor([9, 0, 4], device=device)
    got = ops.ddim_step(x, t, e, respaced, z, eta=eta, clip_x0=clip_x0, backend="triton")
    want = reference.ddim_step(x.double(), t, e.double(), respaced, z.double(), eta=eta, clip_x0=clip_x0)
    table64 = reverse_table(respaced, None, clip_x0=clip_x0, eta=eta)
    assert_within(got, want, _update_bound(table64, t, x, e, z), "ddim_step")


# ------------------------------------------------------------------------------------------------
# seed-keyed variants


BACKENDS_RUNNABLE = ["torch", pytest.param("triton", marks=needs_kernels)]


@pytest.mark.parametrize("backend", BACKENDS_RUNNABLE)
def test_q_sample_seeded(backend, schedule, device):
    x, _, _ = _batch(device, seed=4)
    t = torch.tensor([0, T - 1, 250], device=device)
    x_t, eps = ops.q_sample_seeded(x, t, schedule, [7, 8, 9], 123, backend=backend)
    want_eps = ops.seeded_noise([7, 8, 9], 123, x.shape[1:], device=device)
    if backend == "torch":  # the same function, the same element-wise ops
        torch.testing.assert_close(eps, want_eps, rtol=0, atol=0)
    else:  # the kernel's log/cos against the twin's
        assert_within(eps, want_eps, BOX_MULLER_ATOL, "kernel noise vs twin")
    assert_within(x_t, reference.q_sample(x.double(), t, eps.double(), schedule), _q_sample_bound(schedule, t, x, eps),
                  "q_sample_seeded")


@pytest.mark.parametrize("backend", BACKENDS_RUNNABLE)
@pytest.mark.parametrize("clip_x0", [False, True])
def test_reverse_step_seeded(backend, clip_x0, schedule, device):
    x, e, _ = _batch(device, seed=5)
    t = torch.tensor([T - 1, 0, 640], device=device)
    seeds = torch.tensor([1, 2**32 - 1, 5], device=device)
    got = ops.reverse_step_seeded(x, t, e, schedule, seeds, variance="fixed_small", clip_x0=clip_x0,
                                  backend=backend)
    z = torch.stack([ops.seeded_noise([int(s)], int(tt), x.shape[1:], device=device)[0]
                     for s, tt in zip(seeds.tolist(), t.tolist())])
    # torch runs the reference itself (the same float32 expression: equal); the kernel (float64-built
    # table) is held to the float64 oracle, which the float32 reference misses by ~2e-4 at t = 0 (1 - ab
    # rounded in float32), within the table update's bound plus sigma times the noise's (log/cos)
    work = torch.float32 if backend == "torch" else torch.float64
    want = reference.reverse_step(x.to(work), t, e.to(work), schedule, z.to(work), variance="fixed_small",
                                  clip_x0=clip_x0)
    if backend == "torch":
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:
        table64 = reverse_table(schedule, None, variance="fixed_small", clip_x0=clip_x0)
        sigma = table64[T - 1 - t.cpu(), 6].view(-1, 1, 1, 1)  # column SIGMA
        assert_within(got, want, _update_bound(table64, t, x, e, z) + sigma * BOX_MULLER_ATOL, "reverse_step_seeded")


def test_seeded_noise_forms_and_invariance():
    a = ops.seeded_noise([3, 7], 10, (2, 3, 4))
    b = ops.seeded_noise(torch.tensor([7]), torch.tensor([10]), (2, 3, 4))
    assert a.shape == (2, 2, 3, 4) and a.dtype == torch.float32
    torch.testing.assert_close(a[1], b[0], rtol=0, atol=0)  # batch-position invariance
    per_sample = ops.seeded_noise([3, 7], torch.tensor([10, 11]), (2, 3, 4))
    torch.testing.assert_close(per_sample[0], a[0], rtol=0, atol=0)
    assert not torch.equal(per_sample[1], a[1])
    half = ops.seeded_noise([3, 7], 10, (2, 3, 4), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), a.bfloat16().float(), rtol=0, atol=0)  # the float32 noise, rounded


@needs_kernels
def test_seeded_noise_kernel_backend_equals_twin(device):
    twin = ops.seeded_noise([3, 7], 10, (3, 5, 5), device=device)
    kern = ops.seeded_noise([3, 7], 10, (3, 5, 5), device=device, backend="triton")
    assert_within(kern, twin, BOX_MULLER_ATOL, "kernel noise vs twin")


@pytest.mark.parametrize("seeds,step,error,match", [
    ([-1], 0, ValueError, r"seeds must lie in \[0, 2\*\*32\)"),
    ([2**32], 0, ValueError, r"seeds must lie in \[0, 2\*\*32\)"),
    ([1], 2**32, ValueError, r"step must lie in \[0, 2\*\*32\)"),
    ([1.5], 0, TypeError, "seeds must be ints"),
    (3, 0, TypeError, "seeds must be a list of ints"),
    ([], 0, ValueError, "non-empty"),
    ([1, 2], torch.tensor([1, 2, 3]), ValueError, "step must be an int or have shape"),
    (torch.tensor([1.0]), 0, TypeError, "seeds must hold integers"),
])
def test_seeded_noise_rejects_bad_keys(seeds, step, error, match):
    with pytest.raises(error, match=match):
        ops.seeded_noise(seeds, step, (1, 2, 2))


def test_seeded_ops_check_seed_count(schedule, device):
    x, e, _ = _batch(device)
    with pytest.raises(ValueError, match=r"one entry per image \(3\)"):
        ops.reverse_step_seeded(x, 5, e, schedule, [1, 2], backend="torch")
    with pytest.raises(ValueError, match=r"one entry per image \(3\)"):
        ops.q_sample_seeded(x, 5, schedule, [1, 2], 0, backend="torch")


# ------------------------------------------------------------------------------------------------
# validation mirrors the reference


def _bad_calls(schedule, device):
    x, e, z = _batch(device)
    return {
        "x 3-D": (lambda f, **k: f(x[0], 1, e[0], schedule, None, **k)),
        "eps shape": (lambda f, **k: f(x, 1, e[:2], schedule, None, **k)),
        "noise shape": (lambda f, **k: f(x, 1, e, schedule, z[:, :2], **k)),
        "int eps": (lambda f, **k: f(x, 1, e.long(), schedule, None, **k)),
        "t range": (lambda f, **k: f(x, T, e, schedule, None, **k)),
        "t batch": (lambda f, **k: f(x, torch.tensor([1, 2], device=device), e, schedule, None, **k)),
        "t float": (lambda f, **k: f(x, torch.ones(3, device=device), e, schedule, None, **k)),
        "x list": (lambda f, **k: f([1.0], 1, e, schedule, None, **k)),
    }


@pytest.mark.parametrize("case", ["x 3-D", "eps shape", "noise shape", "int eps", "t range", "t batch",
                                  "t float", "x list"])
@pytest.mark.parametrize("backend", BACKENDS_RUNNABLE)
def test_reverse_step_errors_mirror_reference(case, backend, schedule, device):
    call = _bad_calls(schedule, device)[case]
    with pytest.raises((TypeError, ValueError)) as want:
        call(reference.reverse_step)
    with pytest.raises(want.type) as got:
        call(ops.reverse_step, backend=backend)
    assert str(got.value) == str(want.value)


@pytest.mark.parametrize("backend", BACKENDS_RUNNABLE)
def test_variance_and_eta_errors_mirror_reference(backend, schedule, device):
    x, e, _ = _batch(device)
    with pytest.raises(ValueError, match="unknown variance 'large'"):
        ops.reverse_step(x, 1, e, schedule, None, variance="large", backend=backend)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        ops.ddim_step(x, 1, e, schedule, None, eta=-1.0, backend=backend)
    with pytest.raises(ValueError, match="noise must have the shape of x0"):
        ops.q_sample(x, 1, e[:1], schedule, backend=backend)
    with pytest.raises(ValueError, match="out of range"):
        ops.q_sample(x, -1, e, schedule, backend=backend)


@needs_kernels
def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    from ddpm_fast.kernels import utils

    monkeypatch.setattr(utils, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        ops.resolve_backend("triton", torch.zeros(1, 1, 1, 1))
