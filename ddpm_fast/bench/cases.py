"""The cases ``ddpm-fast bench`` times and the runner each one builds (models built, nothing timed).

A ``Case`` names one measurement (kind, implementation, batch, steps); ``BenchContext`` holds what every
case shares (device, U-Net config, schedule, one set of initial weights); ``make_runner`` turns a case
into a ``Runner``, one callable doing one timed unit of work and synchronising at its end.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

SAMPLING_IMPLS = ("reference", "diffusers", "diffusers-compiled", "ddpm_fast")
TRAINING_IMPLS = ("reference", "ddpm_fast")
FULL_STEPS = 1000  # the schedule's length: what images/s figures are reported for


@dataclass(frozen=True)
class Case:
    """One thing to time. steps: sampler steps (sampling) or optimizer steps (training) per timed run."""

    kind: str  # "sampling" | "training"
    impl: str
    batch_size: int
    steps: int
    options: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass
class BenchContext:
    """What every case shares: device, U-Net config, schedule, and one set of initial weights."""

    device: torch.device
    model_name: str = "cifar10"
    seed: int = 0
    compile_mode: str = "default"  # diffusers-compiled's torch.compile mode
    fast_compile_mode: str | None = None  # None: FastSampler's own choice when compile=True
    _config: object = None
    _weights: dict | None = None

    @property
    def config(self):
        if self._config is None:
            from ..unet import UNetConfig

            self._config = getattr(UNetConfig, self.model_name)()
        return self._config

    @property
    def schedule(self):
        from ..schedule import NoiseSchedule

        return NoiseSchedule.linear(FULL_STEPS)

    def fresh_unet(self):
        """A new ``ddpm_fast.unet.UNet`` on the device with this run's weights (the same for every case)."""
        from ..unet import UNet

        if self._weights is None:
            torch.manual_seed(self.seed)
            self._weights = {k: v.detach().clone() for k, v in UNet(self.config).state_dict().items()}
        model = UNet(self.config)
        model.load_state_dict(self._weights)
        return model.to(self.device)

    def image_shape(self, batch_size: int) -> tuple:
        c = self.config
        return (batch_size, c.in_channels, c.sample_size, c.sample_size)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dtype(name) -> torch.dtype:
    return name if isinstance(name, torch.dtype) else getattr(torch, name)


class Runner:
    """``runner()`` does one timed unit (a batch sampled / ``steps`` optimizer steps) and synchronises.

    ``warmup()`` does whatever must happen before timing (compilation, graph capture, cuDNN plans); the
    default is one full unit. ``context()`` wraps both (e.g. inductor flags that must hold while compiling).
    ``config`` records what was actually configured, for the JSON. ``warmup_is_full``: the warm-up is a
    whole timed unit (no separate warm-up function), so it already produced a first result.
    """

    def __init__(self, device: torch.device, work, warmup=None, context=None, config=None):
        self.device = device
        self._work = work
        self._warmup = warmup
        self.warmup_is_full = warmup is None
        self._context = context
        self.config = config or {}

    def __call__(self) -> None:
        self._work()
        _sync(self.device)

    def warmup(self) -> None:
        (self._warmup or self._work)()
        _sync(self.device)

    def context(self):
        return self._context() if self._context is not None else contextlib.nullcontext()


def _reference_sampling(case: Case, ctx: BenchContext) -> Runner:
    from .. import reference

    model = ctx.fresh_unet().eval()
    schedule = ctx.schedule
    generator = torch.Generator(ctx.device).manual_seed(ctx.seed)
    shape = ctx.image_shape(case.batch_size)

    def work(steps=case.steps):
        reference.sample(model, schedule, shape, generator=generator, timesteps=steps, variance="fixed_large",
                         clip_x0=True, device=ctx.device)

    # Eager code needs no full-length warm-up: two steps load the kernels and cuDNN plans.
    return Runner(ctx.device, work, warmup=lambda: work(min(2, case.steps)),
                  config={"dtype": "float32", "model": "ddpm_fast.unet.UNet (eager)", "variance": "fixed_large",
                          "clip_x0": True})


def _diffusers_pipeline(ctx: BenchContext):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from ..diffusers_io import diffusers_config_from_unet

    torch.manual_seed(ctx.seed)
    unet = UNet2DModel.from_config(diffusers_config_from_unet(ctx.config)).to(ctx.device).eval()
    # google/ddpm-cifar10-32's scheduler: linear betas, fixed_large variance, x0 clipped to [-1, 1].
    scheduler = DDPMScheduler(num_train_timesteps=FULL_STEPS, beta_schedule="linear", beta_start=1e-4,
                              beta_end=0.02, variance_type="fixed_large", clip_sample=True)
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_sampling(case: Case, ctx: BenchContext) -> Runner:
    pipe = _diffusers_pipeline(ctx)
    generator = torch.Generator(ctx.device).manual_seed(ctx.seed)

    def work(steps=case.steps):
        # output_type "pt": a device tensor, as ddpm_fast returns (no PIL encoding, no host copy). Also
        # the only type that works in bf16: "np"/"pil" call .numpy(), which has no bfloat16.
        pipe(batch_size=case.batch_size, generator=generator, num_inference_steps=steps, output_type="pt")

    params = sum(p.numel() for p in pipe.unet.parameters())
    return Runner(ctx.device, work, warmup=lambda: work(min(2, case.steps)),
                  config={"dtype": "float32", "unet_parameters": params, "output_type": "pt",
                          "attention": _attention_processor(pipe.unet)})


def _attention_processor(unet) -> str | None:
    """Class name of the attention processor diffusers' U-Net uses (SDPA's AttnProcessor2_0 by default)."""
    for module in unet.modules():
        processor = getattr(module, "processor", None)
        if processor is not None:
            return type(processor).__name__
    return None


# inductor flags from the diffusers docs / diffusion-fast blog ("torch.compile ... max-autotune" recipe).
_DIFFUSERS_INDUCTOR_FLAGS = dict(conv_1x1_as_mm=True, coordinate_descent_tuning=True, epilogue_fusion=False,
                                 coordinate_descent_check_all_directions=True)


def _diffusers_compiled_sampling(case: Case, ctx: BenchContext) -> Runner:
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    pipe = _diffusers_pipeline(ctx)
    unet = pipe.unet.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    # What UNet2DConditionModel.fuse_qkv_projections() does, per module (UNet2DModel lacks the helper):
    # one (3C x C) projection instead of three, then SDPA.
    fused = 0
    for module in unet.modules():
        if isinstance(module, Attention):
            module.fuse_projections(fuse=True)
            module.set_processor(FusedAttnProcessor2_0())
            fused += 1
    pipe.unet = torch.compile(unet, mode=None if ctx.compile_mode == "default" else ctx.compile_mode,
                              fullgraph=True)
    generator = torch.Generator(ctx.device).manual_seed(ctx.seed)

    def work():
        pipe(batch_size=case.batch_size, generator=generator, num_inference_steps=case.steps, output_type="pt")

    def flags():
        import torch._inductor.config as inductor_config

        return inductor_config.patch(_DIFFUSERS_INDUCTOR_FLAGS)

    return Runner(ctx.device, work, context=flags,
                  config={"dtype": "bfloat16", "channels_last": True, "compile_mode": ctx.compile_mode,
                          "output_type": "pt", "fullgraph": True, "fused_qkv_attention_modules": fused,
                          "attention": _attention_processor(unet),
                          "inductor_flags": dict(_DIFFUSERS_INDUCTOR_FLAGS)})


def fast_sampler_options(device: torch.device, **overrides) -> dict:
    """FastSampler options for the full ``ddpm_fast`` case on ``device`` (GPU-only options off on a CPU)."""
    cuda = device.type == "cuda"
    options = dict(dtype="bfloat16" if cuda else "float32", channels_last=True, compile=cuda, fused_update=True,
                   cuda_graph=cuda, embedding_table=True)
    options.update(overrides)
    return options


def _fast_sampling(case: Case, ctx: BenchContext) -> Runner:
    from ..sampler import FastSampler

    options = dict(case.options) or fast_sampler_options(ctx.device)
    if options.get("compile") is True and ctx.fast_compile_mode:
        options["compile"] = ctx.fast_compile_mode  # FastSampler takes a mode string for compile
    sampler = FastSampler(ctx.fresh_unet().eval(), ctx.schedule, timesteps=case.steps, variance="fixed_large",
                          clip_x0=True, device=ctx.device, **{**options, "dtype": _dtype(options["dtype"])})

    def work():
        sampler.sample(n=case.batch_size, batch_size=case.batch_size)

    # Warm-up is one full run: compilation and CUDA-graph capture are keyed to this batch and step count.
    return Runner(ctx.device, work, config={"requested": dict(options), "resolved": sampler.settings})


def _reference_training(case: Case, ctx: BenchContext) -> Runner:
    """Ho's step done plainly: oracle loss, eager fp32, Adam, grad-norm clip 1.0, EMA of the weights."""
    from .. import reference

    model = ctx.fresh_unet().train()
    ema = [p.detach().clone() for p in model.parameters()]
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=2e-4)
    schedule = ctx.schedule
    generator = torch.Generator(ctx.device).manual_seed(ctx.seed)
    x0 = torch.rand(ctx.image_shape(case.batch_size), generator=generator, device=ctx.device) * 2 - 1

    def one_step():
        loss = reference.training_loss(model, x0, schedule, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1.0 - 0.9999)

    def work(steps=case.steps):
        for _ in range(steps):
            one_step()

    return Runner(ctx.device, work, warmup=lambda: work(1),
                  config={"dtype": "float32", "optimizer": "Adam(lr=2e-4)", "grad_clip": 1.0, "ema": 0.9999,
                          "noising": "reference.training_loss (torch ops)"})


def _fast_training(case: Case, ctx: BenchContext) -> Runner:
    """``ddpm_fast.training.Trainer.train_step`` on an in-memory set of random images on the device.

    On CUDA: fused seed-keyed noising (Triton), bf16 autocast, channels-last, torch.compile, fused Adam
    (the Trainer's defaults); on a CPU the Trainer's CPU defaults (fp32, eager).
    """
    from ..data import ImageDataset
    from ..training import TrainConfig, Trainer

    c = ctx.config
    generator = torch.Generator().manual_seed(ctx.seed)
    count = max(4 * case.batch_size, 256)  # a few batches' worth: the stream reshuffles per epoch
    images = torch.randint(0, 256, (count, c.in_channels, c.sample_size, c.sample_size), dtype=torch.uint8,
                           generator=generator)
    dataset = ImageDataset(images, flip=True, source="random uint8 images (benchmark)").to(ctx.device)
    config = TrainConfig(preset=ctx.model_name, batch_size=case.batch_size, device=str(ctx.device),
                         seed=ctx.seed, progress=False, flip=True, unet=_unet_overrides(ctx))
    trainer = Trainer(config, dataset=dataset)

    def work(steps=case.steps):
        for _ in range(steps):
            trainer.train_step()

    resolved = trainer.config
    # Compilation happens on the first step; one step is a full warm-up (shapes never change).
    return Runner(ctx.device, work, warmup=lambda: work(1),
                  config={"dtype": resolved.dtype, "compile": resolved.compile, "channels_last": resolved.channels_last,
                          "optimizer": f"Adam(lr={resolved.lr}, fused={ctx.device.type == 'cuda'})",
                          "grad_clip": resolved.grad_clip, "ema": resolved.ema_decay,
                          "noising": "ops.q_sample_seeded (fused Triton kernel on CUDA)"})


def _unet_overrides(ctx: BenchContext) -> dict:
    """UNetConfig fields where the Trainer's preset model would differ from this run's model."""
    from ..training import unet_config_for

    c = ctx.config
    preset = unet_config_for(ctx.model_name, c.in_channels, c.sample_size).to_dict()
    return {k: v for k, v in c.to_dict().items() if preset.get(k) != v}


_SAMPLING_BUILDERS = {
    "reference": _reference_sampling,
    "diffusers": _diffusers_sampling,
    "diffusers-compiled": _diffusers_compiled_sampling,
    "ddpm_fast": _fast_sampling,
}

_TRAINING_BUILDERS = {"reference": _reference_training, "ddpm_fast": _fast_training}


def make_runner(case: Case, ctx: BenchContext) -> Runner:
    """Build the runner for one case (models built, nothing timed yet)."""
    if case.kind == "training":
        return _TRAINING_BUILDERS[case.impl](case, ctx)
    if case.impl.startswith("fast:"):
        return _fast_sampling(case, ctx)
    return _SAMPLING_BUILDERS[case.impl](case, ctx)
