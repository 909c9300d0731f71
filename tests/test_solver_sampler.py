"""FastSampler's multistep solvers against the oracle (reference.solver_sample on the same x_T and noise),
the fused solver kernel under the interpreter against its torch twin, seeds and batch-size invariance, and
diffusers' draws in generator mode.

Tolerance of the fp32 fast path against the float64 oracle: the update runs in float32 (2^-24 relative per
operation) on up to ~10 terms whose coefficients reach 1/alpha ~ 157 at t = T-1 before they cancel; over
at most 10 steps that is ~1e-5 of the images' scale, the same bound as the DDPM sampler tests.
"""

import os

import pytest
import torch

from ddpm_fast import NoiseSchedule, ops, reference, solvers
from ddpm_fast.sampler import FastSampler, solver_update_torch
from markers import KERNEL_DEVICES
from test_sampler import ieee_fp32, tiny_unet
from tolerances import rounding_response

pytestmark = pytest.mark.usefixtures("single_thread")

SOLVER_CASES = [("dpmpp-2m", {}), ("dpmpp-3m", {}), ("dpmpp-2m-sde", {}), ("unipc", {}),
                ("unipc", {"order": 3, "solver_type": "bh1"}), ("dpmpp-2m", {"solver_type": "heun", "order": 1}),
                ("unipc", {"corrector": False, "timestep_spacing": "trailing"})]


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def oracle(model, schedule, seeds, image_shape, spec, steps):
    """reference.solver_sample fed the sampler's seed-keyed x_T and z, the update in float64."""
    seeds_t = torch.tensor(seeds, dtype=torch.int64)
    x_T = ops.seeded_noise(seeds_t, schedule.num_timesteps, image_shape)
    noise_fn = (lambda t, shape: ops.seeded_noise(seeds_t, t, shape[1:]))  # noqa: E731

    def model64(x, t):
        return model(x.float(), t).double()

    return reference.solver_sample(model64, schedule, x_T, spec, steps, noise_fn=noise_fn).float()


def assert_matches(out, ref, rel=2e-5):
    assert torch.isfinite(out).all(), "NaN/inf in the sampler's output"
    scale = ref.abs().max().item()
    torch.testing.assert_close(out, ref, rtol=rel, atol=rel * max(scale, 1.0))


@pytest.mark.parametrize("name,options", SOLVER_CASES)
def test_fast_solvers_match_the_oracle(unet, name, options):
    schedule = NoiseSchedule.linear(1000)
    seeds = [5, 2**32 - 1]
    sampler = FastSampler(unet, schedule, solver=name, solver_options=options, timesteps=6)
    out = sampler.sample(seeds=seeds, clamp=False)
    ref = oracle(unet, schedule, seeds, (3, 8, 8), sampler.solver, 6)
    assert sampler.num_steps == 6 and sampler.settings["solver"] == name
    assert_matches(out, ref)


@pytest.mark.parametrize("name,clip", [("dpmpp-2m", -3.0), ("dpmpp-3m", -4.0)])
def test_lambda_min_clipped_on_the_cosine_schedule_matches_the_oracle(unet, name, clip):
    """The demo's sampler: the cosine schedule with the noisiest timesteps skipped; the fast path visits the
    oracle's (diffusers') timesteps and matches its images."""
    schedule = NoiseSchedule.cosine(1000)
    seeds = [3, 11]
    sampler = FastSampler(unet, schedule, solver=name, solver_options={"lambda_min_clipped": clip}, timesteps=7)
    spec = solvers.solver_spec(name, lambda_min_clipped=clip)
    assert sampler.timesteps == solvers.spec_timesteps(schedule, 7, spec)
    assert sampler.timesteps[0] < solvers.solver_timesteps(1000, 7)[0]
    out = sampler.sample(seeds=seeds, clamp=False)
    assert_matches(out, oracle(unet, schedule, seeds, (3, 8, 8), sampler.solver, 7))


@pytest.mark.parametrize("name", ["dpmpp-3m", "dpmpp-2m-sde", "unipc"])
def test_seed_and_batch_size_invariance(unet, name):
    """Image i depends on seed i alone: batch size, position and neighbours do not change it."""
    schedule = NoiseSchedule.linear(1000)
    sampler = FastSampler(unet, schedule, solver=name, timesteps=5, channels_last=False)
    together = sampler.sample(seeds=[7, 8, 9], batch_size=3)
    apart = torch.cat([sampler.sample(seeds=[s], batch_size=1) for s in (9, 8, 7)]).flip(0)
    padded = sampler.sample(seeds=[7, 8, 9], batch_size=2)  # a padded short last batch
    assert torch.isfinite(together).all()
    # the model's float32 output differs by a few ulps between batch sizes (BLAS blocking); the x0
    # prediction multiplies eps by sqrt(1/ab - 1) ~ 157 at t = 999 and no clipping bounds it: 4 ulp (2^-22
    # relative) of |eps| ~ 3 times 157 is ~1.1e-4
    torch.testing.assert_close(apart, together, rtol=0, atol=2e-4)
    torch.testing.assert_close(padded, together, rtol=0, atol=2e-4)
    assert not torch.equal(together[0], together[1])


def test_sde_generator_mode_reproduces_diffusers():
    """dpmpp-2m-sde with a torch.Generator draws x_T and each step's z as DDPMPipeline + the scheduler do."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    model = tiny_unet(seed=2, channels=1, size=6)
    ab = scheduler.alphas_cumprod.double()
    schedule = NoiseSchedule.from_betas(1 - ab / torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]]))
    out = FastSampler(model, schedule, solver="dpmpp-2m-sde", timesteps=5).sample(
        n=2, generator=torch.Generator().manual_seed(4), clamp=False)

    scheduler.set_timesteps(5)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn((2, 1, 6, 6), generator=gen)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t.view(1).expand(2)), t, x, generator=gen).prev_sample
    # both float32 (diffusers casts the sample to float32 in step; sigmas float32 on both sides)
    assert_matches(out, x, rel=2e-5)


def test_bad_solver_arguments(unet):
    schedule = NoiseSchedule.linear(1000)
    with pytest.raises(ValueError, match="unknown solver"):
        FastSampler(unet, schedule, solver="heun")
    with pytest.raises(ValueError, match="clip_x0 is not available with dpmpp-2m"):
        FastSampler(unet, schedule, solver="dpmpp-2m", clip_x0=True)
    with pytest.raises(ValueError, match="eta is DDIM's parameter"):
        FastSampler(unet, schedule, solver="unipc", eta=0.5)
    with pytest.raises(ValueError, match="bad solver_options"):
        FastSampler(unet, schedule, solver="unipc", solver_options={"orderr": 2})
    ddim = FastSampler(unet, schedule, solver="ddim", timesteps=4)
    assert ddim.eta == 0.0 and ddim.settings["solver"] == "ddim"


# -- the fused kernel under the interpreter (CPU) and on CUDA against its torch twin ----------------------
# KERNEL_DEVICES: CPU tensors through the Triton interpreter where there is no GPU; the cuda-marked param
# where there is one (so `pytest -m cuda` runs the compiled kernel in run_gpu.sh's verify stage)

@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("name,options,noise,channels_last,shape", [
    ("unipc", {"order": 3}, None, False, (2, 3, 5, 7)),
    ("unipc", {}, None, True, (1, 3, 4, 4)),
    ("dpmpp-3m", {}, None, True, (3, 1, 5, 5)),
    ("dpmpp-2m-sde", {}, "seeds", False, (2, 3, 3, 5)),
    ("dpmpp-2m-sde", {"order": 1}, "tensor", True, (2, 3, 4, 6)),
])
def test_solver_kernel_is_the_twin(name, options, noise, channels_last, shape, device):
    pytest.importorskip("triton")
    from ddpm_fast import kernels

    spec = solvers.solver_spec(name, **options)
    schedule = NoiseSchedule.linear(1000)
    steps = solvers.solver_timesteps(1000, 6)
    table = solvers.solver_table(schedule, steps, spec).to(device=device, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def rand():
        return torch.randn(shape, generator=gen).to(device).contiguous(memory_format=fmt)

    x, hist = rand(), tuple(rand() for _ in range(spec.num_history))
    last = rand() if spec.corrects else None
    seeds = torch.tensor([11, 2**32 - 2, 3][:shape[0]], dtype=torch.int64, device=device)
    for k in range(len(steps)):  # every row: warm-up, full order, the final step
        row = torch.tensor([k], device=device)
        eps = rand().to(torch.bfloat16) if k == 1 else rand()
        z = rand() if noise == "tensor" else None
        twin = [b.clone() for b in (x, *hist, *([last] if last is not None else []))]
        if noise == "seeds":
            z_twin = ops.seeded_noise(seeds.cpu(), int(table[k, 0]), shape[1:], device=device)
        else:
            z_twin = z
        solver_update_torch(twin[0], eps, table, row, tuple(twin[1:1 + len(hist)]),
                            twin[-1] if last is not None else None, z_twin)
        kernels.solver_update(x, eps, table, row, hist, last, seeds=seeds if noise == "seeds" else None, noise=z)
        for got, want in zip((x, *hist, *([last] if last is not None else [])), twin):
            assert torch.isfinite(got).all()
            assert got.is_contiguous(memory_format=fmt)
            # float32 both ways; the kernel may fuse multiply-adds (one rounding fewer per term)
            torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6 * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_solver_kernel_rejects_bad_arguments(device):
    pytest.importorskip("triton")
    from ddpm_fast import kernels

    x = torch.zeros(2, 3, 4, 4, device=device)
    table = torch.zeros(3, solvers.NUM_SOLVER_COLUMNS, device=device)
    row = torch.zeros(1, dtype=torch.int64, device=device)
    with pytest.raises(TypeError, match="float32"):
        kernels.solver_update(x.half(), x, table, row)
    with pytest.raises(ValueError, match="shape"):
        kernels.solver_update(x, x, table[:, :8].contiguous(), row)
    with pytest.raises(ValueError, match="at most 3"):
        kernels.solver_update(x, x, table, row, (x.clone(),) * 4)
    with pytest.raises(ValueError, match="x's memory layout"):
        kernels.solver_update(x, x, table, row, (x.clone().to(memory_format=torch.channels_last),))


@pytest.mark.skipif(os.environ.get("DDPM_FAST_BACKEND") == "torch", reason="backend forced to torch")
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_sampler_with_the_fused_kernel_matches_the_oracle(unet, monkeypatch, device):
    """FastSampler's triton backend end to end: the interpreter on the CPU; on CUDA the compiled kernel
    inside the captured graph, the U-Net in fp32 with TF32 off."""
    pytest.importorskip("triton")
    if device == "cpu":
        monkeypatch.setenv("DDPM_FAST_BACKEND", "triton")
    schedule = NoiseSchedule.linear(1000)
    with ieee_fp32():
        sampler = FastSampler(unet, schedule, solver="unipc", solver_options={"order": 3}, timesteps=5,
                              device=device, dtype=torch.float32, compile=False)
        assert sampler.update_backend == "triton"
        out = sampler.sample(seeds=[1, 2], clamp=False).cpu()
    ref = oracle(unet, schedule, [1, 2], (3, 8, 8), sampler.solver, 5)
    if device == "cpu":
        assert_matches(out, ref)
        return
    # on CUDA the U-Net's sums run in another order than the CPU oracle's: add the chain's response to that
    # rounding (both sides, tolerances.rounding_response) to the update's bound
    cpu = FastSampler(unet, schedule, solver="unipc", solver_options={"order": 3}, timesteps=5)
    response = rounding_response(lambda: cpu.sample(seeds=[1, 2], clamp=False), cpu.model, signs=(1.0,))
    scale = ref.abs().max().item()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5 * max(scale, 1.0) + response)


COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from ddpm_fast.kernels.solver_update import _solver_update_kernel

cases = [  # (eps pointer, NOISE, NUM_HIST, CORRECTOR, CL): every value of every constexpr at least once
    ("*fp32", 0, 1, 0, 0), ("*bf16", 2, 3, 1, 1), ("*fp16", 1, 2, 1, 0), ("*fp32", 2, 0, 0, 1),
]
for eps, noise, hist, corr, cl in cases:
    sig = {n: "*fp32" for n in ("x_ptr", "z_ptr", "h1_ptr", "h2_ptr", "h3_ptr", "last_ptr", "table_ptr")}
    sig.update(eps_ptr=eps, row_ptr="*i64", seeds_ptr="*i64", CHW="i32", HW="i32")
    const = dict(C=3, CL=cl, E_CL=1 - cl, Z_CL=cl, NOISE=noise, NUM_HIST=hist, CORRECTOR=corr, NUM_COLS=24,
                 BLOCK=1024)
    sig.update({k: "constexpr" for k in const})
    triton.compile(triton.compiler.ASTSource(_solver_update_kernel, sig, const), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": 4})
print("compiled", len(cases))
"""


def test_solver_kernel_compiles_for_sm90():
    """The interpreter accepts code the real compiler rejects: compile for an H100 (no GPU needed)."""
    pytest.importorskip("triton")
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "compiled 4" in done.stdout
