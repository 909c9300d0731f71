"""FastSampler against the oracle (reference.sample fed the very same noise), on fresh random models.

CPU tests run in CI (eager, fp32 unless stated; bf16 autocast once; torch.compile once on a tiny model).
The CUDA tests (graph replay, compiled bf16, capture cache) run only where a GPU is present.
"""

import math
from contextlib import contextmanager

import pytest
import torch

from ddpm_fast import NoiseSchedule, ops, reference
from ddpm_fast.sampler import FastSampler, reverse_update_torch
from ddpm_fast.unet import UNet, UNetConfig
from markers import needs_cuda
from tolerances import (BOX_MULLER_ATOL, assert_within, projection_rounding_bound, reverse_update_bound,
                        rounding_response)



pytestmark = pytest.mark.usefixtures("single_thread")


@contextmanager
def ieee_fp32():
    """float32 convolutions and matmuls in float32 on CUDA, not TF32. cuDNN runs float32 convolutions in
    TF32 (a 10-bit mantissa) by default: emulating that rounding of the conv inputs on the CPU moved a
    30-step tiny-U-Net chain by 4e-2, far outside any float32 bound. No effect on the CPU."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def tiny_unet(seed=0, channels=3, size=8) -> UNet:
    """A ~45k-parameter U-Net with attention: ~1-3 ms per forward at batch 2 on one CPU core."""
    torch.manual_seed(seed)
    config = UNetConfig.tiny(sample_size=size, in_channels=channels, out_channels=channels,
                             block_out_channels=(8, 16), norm_num_groups=4)
    return UNet(config).eval()


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def seeded_noise_fn(seeds, shape_chw=None):
    """The oracle's noise_fn producing the sampler's seed-keyed noise: (noise step, shape) -> (B, C, H, W)."""
    seeds = torch.tensor(seeds, dtype=torch.int64)

    def noise_fn(noise_step, shape):
        return ops.seeded_noise(seeds, noise_step, shape[1:])

    return noise_fn


def oracle(model, schedule, seeds, image_shape, **kwargs):
    """reference.sample with the sampler's noise; the update in float64 (the model still runs in float32),
    so the fp32 fast path is measured against the exact chain, not against the oracle's own rounding."""
    def model64(x, t):
        return model(x.float(), t).double()

    device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else "cpu"
    ref = reference.sample(model64, schedule, (len(seeds), *image_shape), noise_fn=seeded_noise_fn(seeds),
                           dtype=torch.float64, device=device, **kwargs)
    return ref.float()


def oracle_bound(run, model, update_sides=1):
    """What the fast fp32 chain may differ from the oracle's by: the chain's response (tolerances) to every
    layer's rounding on both sides (the model in float32 on both: its sums in another order, channels-last,
    the time table) and to the fast update's float32 rounding (update_sides=1 against the oracle's float64
    update, 2 against a float32 one). One sign: to first order -bound mirrors +bound."""
    return rounding_response(run, model, sides=2, signs=(1.0,), update_sides=update_sides)


def assert_matches_oracle(out, ref, bound):
    """fp32 loops agree with the oracle within the derived bound (NaN never passes)."""
    assert_within(out, ref, bound, "sampler vs oracle")


# -- the oracle comparisons ---------------------------------------------------------------------------
def test_full_1000_step_loop_matches_reference(unet):
    """Ho's sampler end to end: 1000 steps, fixed_large, no clipping, identical seed-keyed noise."""
    schedule = NoiseSchedule.linear(1000)
    seeds = [3, 2**32 - 1]  # the largest uint32 seed too
    sampler = FastSampler(unet, schedule)
    out = sampler.sample(seeds=seeds, clamp=False)
    ref = oracle(unet, schedule, seeds, (3, 8, 8))
    assert out.shape == (2, 3, 8, 8) and out.dtype == torch.float32
    assert_matches_oracle(out, ref, oracle_bound(lambda: sampler.sample(seeds=seeds, clamp=False), sampler.model))


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
@pytest.mark.parametrize("clip_x0", [False, True])
@pytest.mark.parametrize("image_shape,channels_last", [((3, 8, 8), True), ((3, 6, 10), False), ((3, 6, 10), True)])
def test_all_steps_of_a_short_schedule_match_reference(variance, clip_x0, image_shape, channels_last):
    model = tiny_unet(seed=1)
    schedule = NoiseSchedule.linear(40, 1e-3, 0.2)
    seeds = [17]  # batch 1
    sampler = FastSampler(model, schedule, variance=variance, clip_x0=clip_x0, channels_last=channels_last,
                          image_shape=image_shape)
    out = sampler.sample(seeds=seeds, clamp=False)
    ref = oracle(model, schedule, seeds, image_shape, variance=variance, clip_x0=clip_x0)
    assert_matches_oracle(out, ref, oracle_bound(lambda: sampler.sample(seeds=seeds, clamp=False), sampler.model))
    if clip_x0:  # a clipped x0 keeps the chain bounded: make sure the run did not saturate trivially
        assert ref.abs().max().item() <= 1.0 + 1e-6 and ref.std().item() > 0.1


@pytest.mark.parametrize("timesteps", [10, [999, 640, 321, 57, 3]])
@pytest.mark.parametrize("eta,clip_x0", [(None, False), (None, True), (0.0, False), (0.0, True), (1.0, True),
                                         (0.5, False)])
def test_respaced_and_ddim_match_reference(unet, timesteps, eta, clip_x0):
    schedule = NoiseSchedule.linear(1000)
    seeds = [5, 6, 123456]
    sampler = FastSampler(unet, schedule, timesteps=timesteps, eta=eta, clip_x0=clip_x0)
    out = sampler.sample(seeds=seeds, clamp=False)
    ref = oracle(unet, schedule, seeds, (3, 8, 8), timesteps=timesteps, eta=eta, clip_x0=clip_x0)
    assert_matches_oracle(out, ref, oracle_bound(lambda: sampler.sample(seeds=seeds, clamp=False), sampler.model))
    assert sampler.timesteps[0] > sampler.timesteps[-1] and sampler.num_steps == len(sampler.table)


def test_clip_range_other_than_one_matches_clamped_update(unet):
    """clip_x0=r clamps x0 to [-r, r]: one step checked against reverse_step's algebra with r."""
    schedule = NoiseSchedule.linear(1000)
    sampler = FastSampler(unet, schedule, timesteps=[999, 0], clip_x0=0.25)
    out = sampler.sample(seeds=[9], clamp=False)
    # by hand: x_T, one step at t=999 onto t=0 (respaced), then the last step at t=0 (no noise)
    sched = schedule.respaced([999, 0])
    x = ops.seeded_noise([9], 1000, (3, 8, 8)).double()
    for j, t in ((1, 999), (0, 0)):
        eps = unet(x.float(), torch.tensor([t])).double()
        ab, ab_prev = sched.alphas_cumprod[j], sched.alphas_cumprod_prev[j]
        x0 = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-0.25, 0.25)
        beta = 1 - ab / ab_prev
        mean = ab_prev.sqrt() * beta / (1 - ab) * x0 + (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab) * x
        z = ops.seeded_noise([9], t, (3, 8, 8)).double() if j > 0 else 0.0
        x = mean + beta.sqrt() * z
    # the by-hand chain runs the caller's model (contiguous, time MLP) and a float64 update
    bound = oracle_bound(lambda: sampler.sample(seeds=[9], clamp=False), sampler.model)
    assert_within(out, x, bound, "clip radius")
    assert out.abs().max() <= 0.25 + bound  # the last step returns the clamped x0 itself


@pytest.mark.parametrize("variance,timesteps", [("fixed_small", 8), ("fixed_large", None)])
def test_generator_noise_matches_reference_generator(variance, timesteps):
    """With a torch.Generator the noise is drawn in DDPMPipeline's order, like reference.sample's."""
    model = tiny_unet(seed=2, channels=1)
    schedule = NoiseSchedule.linear(30, 1e-3, 0.2) if timesteps is None else NoiseSchedule.linear(1000)
    sampler = FastSampler(model, schedule, variance=variance, timesteps=timesteps, clip_x0=True)
    out = sampler.sample(n=3, generator=torch.Generator().manual_seed(4), clamp=False)
    ref = reference.sample(model, schedule, (3, 1, 8, 8), generator=torch.Generator().manual_seed(4),
                           variance=variance, timesteps=timesteps, clip_x0=True)
    # the reference's update runs in float32 here too: both sides' update rounding
    bound = oracle_bound(lambda: sampler.sample(n=3, generator=torch.Generator().manual_seed(4), clamp=False),
                         sampler.model, update_sides=2)
    assert_matches_oracle(out, ref, bound)
    # a list of generators draws image i from generator i alone
    gens = [torch.Generator().manual_seed(s) for s in (4, 5)]
    pair = sampler.sample(n=2, generator=gens)
    single = sampler.sample(n=1, generator=[torch.Generator().manual_seed(5)])
    bound = rounding_response(lambda: sampler.sample(n=1, generator=[torch.Generator().manual_seed(5)]), sampler.model)
    torch.testing.assert_close(pair[1:], single, rtol=0, atol=bound)  # batch 2 vs 1: the convolutions' sums


# -- seeds, batching, poisoning -----------------------------------------------------------------------
def test_image_depends_only_on_its_seed(unet):
    schedule = NoiseSchedule.linear(1000)
    sampler = FastSampler(unet, schedule, timesteps=12, clip_x0=True)
    seeds = [11, 7, 2**32 - 1, 0, 5]
    whole = sampler.sample(seeds=seeds)  # one batch of 5
    pairs = sampler.sample(seeds=seeds, batch_size=2)  # 2 + 2 + a padded last batch
    # the noise is exact at any batch size; the convolutions may block their sums by batch size (oneDNN
    # picks its algorithm by shape and CPU): the bound is the chain's response to that rounding
    bound = rounding_response(lambda: sampler.sample(seeds=seeds), sampler.model)
    for i, seed in enumerate(seeds):
        alone = sampler.sample(seeds=[seed], batch_size=1)
        torch.testing.assert_close(alone[0], whole[i], rtol=0, atol=bound)
    torch.testing.assert_close(pairs, whole, rtol=0, atol=bound)
    moved = sampler.sample(seeds=torch.tensor([5, 11]))  # other positions, other batch
    torch.testing.assert_close(moved, whole[[4, 0]], rtol=0, atol=bound)
    assert not torch.allclose(whole[0], whole[1])  # different seeds, different images
    # seeds drawn from the global RNG: torch.manual_seed repeats them
    torch.manual_seed(8)
    a = sampler.sample(n=2)
    torch.manual_seed(8)
    torch.testing.assert_close(sampler.sample(n=2), a, rtol=0, atol=0)


def test_poisoned_static_buffers_are_fully_overwritten(unet):
    schedule = NoiseSchedule.linear(1000)
    sampler = FastSampler(unet, schedule, timesteps=6)
    first = sampler.sample(seeds=[1, 2, 3])
    for run in sampler._runs.values():
        run.x.fill_(float("nan"))
        run.counter.fill_(3)
    second = sampler.sample(seeds=[1, 2, 3])
    assert torch.isfinite(second).all()
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    assert second.min() >= -1 and second.max() <= 1  # clamp=True by default


# -- dtype, layouts, tables, model kinds ------------------------------------------------------------------
def test_bf16_autocast_close_in_distribution_to_fp32(unet):
    """bf16 autocast on the CPU: per-pixel mean and std over a batch match fp32's."""
    schedule = NoiseSchedule.linear(1000)
    seeds = list(range(64))
    fp32 = FastSampler(unet, schedule, timesteps=20, clip_x0=True).sample(seeds=seeds)
    bf16_sampler = FastSampler(unet, schedule, timesteps=20, clip_x0=True, dtype=torch.bfloat16)
    bf16 = bf16_sampler.sample(seeds=seeds)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    assert bf16_sampler.settings["dtype"] == "bfloat16"
    assert (bf16 - fp32).abs().max() > 1e-3  # autocast really ran the model in bf16
    assert (bf16.mean(0) - fp32.mean(0)).abs().max() < 0.05
    assert (bf16.std(0) - fp32.std(0)).abs().max() < 0.05
    assert abs(bf16.mean().item() - fp32.mean().item()) < 0.01


def test_embedding_table_gives_the_same_images_and_leaves_the_model_alone(monkeypatch):
    """The table changes only the order of float32 sums in the time projections. The bound: the images'
    response to moving every projection by its full rounding bound (tolerances), in either direction; real
    rounding errors stay inside that bound (typically ~sqrt(K) u, not K u), so their effect does too."""
    model = tiny_unet(seed=3).train()  # a training-mode model: the sampler must use eval on its own copy
    schedule = NoiseSchedule.linear(1000)
    seeds = [1, 2]
    with_table = FastSampler(model, schedule, timesteps=8)
    without = FastSampler(model, schedule, timesteps=8, embedding_table=False)
    assert with_table.settings["embedding_table"] and not without.settings["embedding_table"]
    table = with_table.model.time_embedding_table
    assert table.shape[0] == 1000
    all_t = torch.arange(1000)
    bound = projection_rounding_bound(without.model, all_t)
    mlp = torch.cat(without.model._time_mlp_projections(all_t), dim=1)
    assert ((table - mlp).abs() <= bound).all()  # the table itself, entry by entry
    a, b = with_table.sample(seeds=seeds, clamp=False), without.sample(seeds=seeds, clamp=False)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()

    # sensitivity: the table-free sampler with its projections moved by +bound, -bound and random signs
    original = UNet._time_mlp_projections
    response = 0.0
    for sign in (1.0, -1.0, torch.randint(0, 2, bound.shape, generator=torch.Generator().manual_seed(0)) * 2.0 - 1):
        def shifted(self, t, sign=sign):
            row_sign = sign[t] if isinstance(sign, torch.Tensor) else sign
            moved = torch.cat(original(self, t), dim=1) + row_sign * bound[t]
            return list(moved.split(self._temb_widths, dim=1))

        monkeypatch.setattr(UNet, "_time_mlp_projections", shifted)
        moved = FastSampler(model, schedule, timesteps=8, embedding_table=False).sample(seeds=seeds, clamp=False)
        response = max(response, (moved - b).abs().max().item())
    monkeypatch.setattr(UNet, "_time_mlp_projections", original)
    assert 0 < response < 1e-2 * b.abs().max().item()  # a rounding-sized perturbation, not another model
    assert (a - b).abs().max().item() <= response
    assert model.training and model.time_embedding_table is None  # the caller's model is untouched
    assert model.conv_in.weight.is_contiguous()


class PlainEps(torch.nn.Module):
    """Any eps model: not our UNet, no config (so image_shape is required); returns a tuple."""

    def __init__(self, channels=2):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.scale = torch.nn.Parameter(torch.tensor(0.01))

    def forward(self, x, t):
        return (torch.tanh(self.conv(x)) + self.scale * t.view(-1, 1, 1, 1).float() / 1000,)


def test_any_eps_callable_works_and_matches_reference():
    torch.manual_seed(0)
    model = PlainEps()
    schedule = NoiseSchedule.linear(1000)
    with pytest.raises(ValueError, match="image_shape"):
        FastSampler(model, schedule)
    sampler = FastSampler(model, schedule, timesteps=7, image_shape=(2, 5, 7))
    out = sampler.sample(seeds=[4, 1], clamp=False)
    ref = oracle(lambda x, t: model(x, t)[0], schedule, [4, 1], (2, 5, 7), timesteps=7)
    assert_matches_oracle(out, ref, oracle_bound(lambda: sampler.sample(seeds=[4, 1], clamp=False), sampler.model))
    # a plain function works too
    fn_sampler = FastSampler(lambda x, t: model(x, t)[0], schedule, timesteps=7, image_shape=(2, 5, 7))
    # the module's copy runs channels-last, the function the caller's contiguous model: the conv's sums
    bound = rounding_response(lambda: fn_sampler.sample(seeds=[4, 1], clamp=False), model, signs=(1.0,))
    torch.testing.assert_close(fn_sampler.sample(seeds=[4, 1], clamp=False), out, rtol=0, atol=bound)


def test_reverse_update_torch_is_the_table_algebra():
    """The unfused update against the coefficient formulas, fp64 by hand, for a clipped and an eps row."""
    from ddpm_fast import coefficients as C

    schedule = NoiseSchedule.linear(1000)
    x, eps, z = torch.randn(3, 2, 3, 5, 4).double().unbind(0)  # float32 values: both sides read the same
    for clip in (None, 0.7):
        table64 = C.reverse_table(schedule, 10, "fixed_small", clip_x0=clip is not None)
        row = torch.tensor([3])
        got = reverse_update_torch(x.float(), eps.float(), table64.float(), row, z.float(), clip)
        c = table64[3]
        x0 = x * c[C.SQRT_RECIP_AB] - eps * c[C.SQRT_RECIPM1_AB]
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        want = c[C.C_X0] * x0 + c[C.C_XT] * x + c[C.C_EPS] * eps + c[C.SIGMA] * z
        # the float32 update against float64 on the same float32 inputs: gamma_8 S (tolerances)
        assert_within(got, want, reverse_update_bound(table64[3:4], x.float(), eps.float(), z.float()), "update")


def test_model_with_the_wrong_output_is_a_clear_error():
    schedule = NoiseSchedule.linear(1000)
    sampler = FastSampler(lambda x, t: torch.cat([x, x], 1), schedule, timesteps=2, image_shape=(3, 4, 4))
    with pytest.raises(ValueError, match="eps of the input's shape"):
        sampler.sample(seeds=[1])


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(variance="learned"), ValueError, "variance"),
    (dict(clip_x0=-1.0), ValueError, "clip_x0"),
    (dict(eta=-0.5), ValueError, "eta"),
    (dict(dtype=torch.int32), ValueError, "dtype"),
    (dict(timesteps=[3, 5]), ValueError, "descending"),
    (dict(timesteps=2000), ValueError, "timesteps"),
    (dict(steps_per_graph=0), ValueError, "steps_per_graph"),
    (dict(compile=3), TypeError, "compile"),
    (dict(image_shape=(3, 8)), ValueError, "image_shape"),
])
def test_bad_constructor_arguments(unet, kwargs, error, match):
    with pytest.raises(error, match=match):
        FastSampler(unet, NoiseSchedule.linear(1000), **kwargs)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(), ValueError, "give n"),
    (dict(n=0), ValueError, "n "),
    (dict(seeds=[-1]), ValueError, r"\[0, 2\*\*32\)"),
    (dict(seeds=[2**32]), ValueError, r"\[0, 2\*\*32\)"),
    (dict(seeds=[]), ValueError, "empty"),
    (dict(seeds=torch.tensor([1.5])), TypeError, "integer"),
    (dict(n=3, seeds=[1, 2]), ValueError, "n=3"),
    (dict(seeds=[1], batch_size=0), ValueError, "batch_size"),
    (dict(n=1, seeds=[1], generator=torch.Generator()), ValueError, "not both"),
    (dict(n=2, generator=[torch.Generator()] * 3), ValueError, "one per image"),
    (dict(n=1, generator="cpu"), TypeError, "Generator"),
    (dict(n=2, generator=[torch.Generator(), "cpu"]), TypeError, "Generator or a list"),
    (dict(seeds=[1, "two"]), TypeError, "sequence of ints"),
])
def test_bad_sample_arguments(unet, kwargs, error, match):
    sampler = FastSampler(unet, NoiseSchedule.linear(1000), timesteps=2)
    with pytest.raises(error, match=match):
        sampler.sample(**kwargs)


def test_solver_arguments_given_twice_or_of_the_wrong_type(unet):
    from ddpm_fast import solvers

    schedule = NoiseSchedule.linear(1000)
    with pytest.raises(TypeError, match="solver_options must be a dict"):
        FastSampler(unet, schedule, solver="unipc", solver_options=[("order", 2)])
    with pytest.raises(ValueError, match="not both"):
        FastSampler(unet, schedule, solver=solvers.solver_spec("unipc"), solver_options={"order": 2})
    with pytest.raises(ValueError, match="eta in the SolverSpec or as eta="):
        FastSampler(unet, schedule, solver=solvers.solver_spec("ddim", eta=0.0), eta=1.0)


def test_other_arguments_are_type_checked(unet):
    with pytest.raises(TypeError, match="NoiseSchedule"):
        FastSampler(unet, "linear")
    with pytest.raises(TypeError, match="callable"):
        FastSampler(42, NoiseSchedule.linear(10), image_shape=(1, 2, 2))


def test_cpu_turns_gpu_only_options_off(unet):
    sampler = FastSampler(unet, NoiseSchedule.linear(1000), timesteps=3)
    s = sampler.settings
    assert s["device"] == "cpu" and s["dtype"] == "float32" and s["compile"] is None
    assert s["cuda_graph"] is False and s["update"] == "torch"
    assert "FastSampler(" in repr(sampler)


def test_fused_kernel_under_the_triton_interpreter(unet, monkeypatch):
    """The Triton update (in-kernel Philox noise) equals the torch twin, on CPU via TRITON_INTERPRET."""
    import os

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest on machines without CUDA)")
    pytest.importorskip("triton")
    schedule = NoiseSchedule.linear(1000)

    def torch_run():
        return FastSampler(unet, schedule, timesteps=4, clip_x0=True, fused_update=False).sample(seeds=[3, 9])

    torch_path = torch_run()
    # what differs: the update's float32 order (kernel vs twin: both within gamma_8 S, so 2 sides) and z
    # (the kernel's Box-Muller through the interpreter's numpy log/cos against torch's); the model is the
    # same eager network on both sides
    bound = rounding_response(torch_run, unet, sides=0, update_sides=2, noise_atol=BOX_MULLER_ATOL)
    monkeypatch.setenv("DDPM_FAST_BACKEND", "triton")
    fused = FastSampler(unet, schedule, timesteps=4, clip_x0=True, fused_update=True)
    assert fused.settings["update"] == "triton"
    assert_within(fused.sample(seeds=[3, 9]), torch_path, bound, "fused update vs torch twin")


def test_torch_compile_on_cpu_matches_eager():
    """The one compile test: a tiny conv model, a few steps (torch.compile's CPU path, inductor)."""
    torch.manual_seed(0)
    model = PlainEps()
    schedule = NoiseSchedule.linear(1000)
    eager = FastSampler(model, schedule, timesteps=3, image_shape=(2, 4, 4)).sample(seeds=[1, 2], clamp=False)
    compiled = FastSampler(model, schedule, timesteps=3, image_shape=(2, 4, 4), compile=True)
    assert compiled.settings["compile"] == "default"
    # inductor's code sums and rounds in its own order: both sides' conv rounding (gamma_19 of |W| |x|,
    # above the few ulps by which two tanh implementations differ) and update rounding, through the chain
    eager_sampler = FastSampler(model, schedule, timesteps=3, image_shape=(2, 4, 4))
    bound = rounding_response(lambda: eager_sampler.sample(seeds=[1, 2], clamp=False), eager_sampler.model,
                              signs=(1.0,), update_sides=2)
    assert_within(compiled.sample(seeds=[1, 2], clamp=False), eager, bound, "compiled vs eager")


# -- CUDA only ------------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replay_equals_eager_fast_path(dtype):
    model = tiny_unet(seed=5, size=16).cuda()
    schedule = NoiseSchedule.linear(1000)
    seeds = list(range(6))
    common = dict(timesteps=25, clip_x0=True, dtype=dtype, compile=False)
    with ieee_fp32():
        eager = FastSampler(model, schedule, cuda_graph=False, **common).sample(seeds=seeds)
        graphed = FastSampler(model, schedule, cuda_graph=True, **common)
        out = graphed.sample(seeds=seeds)
        # several steps per graph (25 = 4 * 6 + 1: a tail graph too)
        multi = FastSampler(model, schedule, cuda_graph=True, steps_per_graph=6, **common).sample(seeds=seeds)
    assert graphed.settings["cuda_graph"] and graphed.settings["update"] == "triton"
    assert all(run.graphs and not run.eager for run in graphed._runs.values())
    # the same kernels at the same batch size, replayed: cuDNN's heuristics pick by shape, so both sides
    # normally sum in the same order; the tolerance leaves room for one other algorithm choice
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, eager, rtol=tol, atol=tol)
    torch.testing.assert_close(multi, eager, rtol=tol, atol=tol)


@needs_cuda
def test_cuda_fast_path_matches_reference_and_cpu():
    """fp32 on CUDA (TF32 off) against the float64-update oracle and against the CPU fast path, each within
    the derived bound: the U-Net's sums in another order (both sides), the update's float32 rounding, and
    z from the fused kernel's Box-Muller (CUDA's logf/cosf) against the torch twin's."""
    model = tiny_unet(seed=6, size=16)
    schedule = NoiseSchedule.linear(1000)
    seeds = [1, 2**31 + 5]
    with ieee_fp32():
        gpu = FastSampler(model.cuda(), schedule, timesteps=30, dtype=torch.float32, compile=False)
        out = gpu.sample(seeds=seeds, clamp=False)
        assert gpu.settings["update"] == "triton" and gpu.settings["cuda_graph"]
        ref = oracle(model.cuda(), schedule, seeds, (3, 16, 16), timesteps=30)
        # the bound's chain: the eager torch-update path on the CPU (what rounding_response can perturb)
        cpu = FastSampler(model.cpu(), schedule, timesteps=30)
        cpu_out = cpu.sample(seeds=seeds, clamp=False)
        to_oracle = rounding_response(lambda: cpu.sample(seeds=seeds, clamp=False), cpu.model, signs=(1.0,),
                                      update_sides=1, noise_atol=BOX_MULLER_ATOL)
        to_cpu = rounding_response(lambda: cpu.sample(seeds=seeds, clamp=False), cpu.model, signs=(1.0,),
                                   update_sides=2, noise_atol=BOX_MULLER_ATOL)
    assert_within(out, ref, to_oracle, "CUDA fp32 vs oracle")
    assert_within(out, cpu_out, to_cpu, "CUDA fp32 vs CPU")


@needs_cuda
def test_cuda_compiled_bf16_close_to_fp32():
    model = tiny_unet(seed=7, size=16).cuda()
    schedule = NoiseSchedule.linear(1000)
    seeds = list(range(128))
    with ieee_fp32():
        fp32 = FastSampler(model, schedule, timesteps=20, clip_x0=True, dtype=torch.float32,
                           compile=False).sample(seeds=seeds)
    fast = FastSampler(model, schedule, timesteps=20, clip_x0=True, compile="default")
    out = fast.sample(seeds=seeds)
    assert fast.settings["dtype"] == "bfloat16" and fast.settings["compile"] == "default"
    assert (out.mean(0) - fp32.mean(0)).abs().max() < 0.05 and (out.std(0) - fp32.std(0)).abs().max() < 0.05


@needs_cuda
def test_cuda_capture_cache_per_batch_size():
    model = tiny_unet(seed=8, size=16).cuda()
    schedule = NoiseSchedule.linear(1000)
    sampler = FastSampler(model, schedule, timesteps=5, compile=False)  # bf16, the default
    a = sampler.sample(seeds=[1, 2, 3, 4])
    graphs = {k: dict(r.graphs) for k, r in sampler._runs.items()}
    b = sampler.sample(seeds=[1, 2, 3, 4])
    assert {k: dict(r.graphs) for k, r in sampler._runs.items()} == graphs  # replayed, not recaptured
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = sampler.sample(seeds=[3, 4, 5], batch_size=2)  # a second batch size: a second capture
    assert len(sampler._runs) == 2 and torch.isfinite(c).all()
    # batch 2 against batch 4: cuDNN may pick other kernels per batch size (other sum orders), and in
    # bf16 each layer's output may then round to the other neighbour, so a bf16 comparison has no bound
    # short of bf16's whole effect. Compare in fp32 (TF32 off), where the bound is derived: the chain's
    # response to every layer's rounding, both sides
    with ieee_fp32():
        exact = FastSampler(model, schedule, timesteps=5, compile=False, dtype=torch.float32)
        a32 = exact.sample(seeds=[1, 2, 3, 4], clamp=False)
        c32 = exact.sample(seeds=[3, 4, 5], batch_size=2, clamp=False)
        assert len(exact._runs) == 2 and all(r.graphs and not r.eager for r in exact._runs.values())
        eager = FastSampler(model, schedule, timesteps=5, compile=False, dtype=torch.float32, cuda_graph=False)
        bound = rounding_response(lambda: eager.sample(seeds=[3, 4], clamp=False), eager.model)
    assert_within(c32[:2], a32[2:], bound, "batch 2 vs batch 4")


@needs_cuda
def test_cuda_capture_failure_falls_back_with_a_warning():
    model = tiny_unet(seed=9, size=16).cuda()

    def syncing_model(x, t):
        float(t.sum())  # a host sync: not capturable
        return model(x, t)

    schedule = NoiseSchedule.linear(1000)
    caller = torch.cuda.current_stream()
    # compile=False: the failure is the capture's; compiling the model would only cost time
    sampler = FastSampler(syncing_model, schedule, timesteps=4, image_shape=(3, 16, 16), device="cuda",
                          dtype=torch.float32, compile=False)
    with ieee_fp32(), pytest.warns(RuntimeWarning, match="capture failed"):
        out = sampler.sample(seeds=[1, 2])
    assert torch.cuda.current_stream() == caller  # not the capture stream
    with ieee_fp32():
        ref = FastSampler(model, schedule, timesteps=4, dtype=torch.float32, compile=False,
                          cuda_graph=False).sample(seeds=[1, 2])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert math.isfinite(out.sum().item())
