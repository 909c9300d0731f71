"""FastDDPMPipeline: a drop-in for diffusers' ``DDPMPipeline`` that samples with :class:`FastSampler`.

It reads a saved DDPMPipeline (``unet/`` and ``scheduler/``, a local folder or a hub id such as
``google/ddpm-cifar10-32``) or takes a live one, turns the scheduler's config (DDPMScheduler, DDIMScheduler,
DPMSolverMultistepScheduler or UniPCMultistepScheduler) into a ``NoiseSchedule`` plus a solver and its settings, and answers ``pipe(batch_size, generator,
num_inference_steps, output_type)`` like DDPMPipeline does. With a torch.Generator the noise is drawn
exactly as DDPMPipeline draws it (x_T first, then one z per step with t > 0, on the generator's device),
so float32 on the CPU reproduces DDPMPipeline's images; without one, noise is seed-keyed (each image a
function of its own seed, see ``sampler.py``).

diffusers is needed only to run a diffusers U-Net that our ``UNet`` cannot express (a fallback).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import read_json
from .checks import model_device
from .errors import CheckpointError
from .hub import resolve_source
from .sampler import FastSampler
from .schedule import NoiseSchedule
from .solvers import SolverSpec, solver_spec, spec_timesteps

__all__ = ["FastDDPMPipeline", "FastPipelineOutput", "SchedulerSettings", "scheduler_settings",
           "schedule_from_scheduler_config", "inference_timesteps"]

SCHEDULER_CONFIG = "scheduler_config.json"
OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class FastPipelineOutput:
    """What ``FastDDPMPipeline.__call__`` returns, like diffusers' ImagePipelineOutput.

    images: a list of PIL images ("pil"), a (B, H, W, C) float32 numpy array in [0, 1] ("np"), or a
    (B, C, H, W) float32 tensor in [0, 1] ("pt").
    """

    images: object


@dataclass(frozen=True)
class SchedulerSettings:
    """The parts of a scheduler config that decide the sampled images."""

    schedule: NoiseSchedule
    variance: str  # "fixed_small" or "fixed_large" (DDPM steps only)
    clip: float | None  # clip_sample_range when clip_sample, else None
    timestep_spacing: str  # "leading", "linspace" or "trailing"
    steps_offset: int
    solver: SolverSpec = solver_spec("ddpm")  # the sampler the scheduler's step() is


SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler")
# options of the multistep schedulers that change their steps, with the only value we implement
_FIXED_OPTIONS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                  "use_lu_lambdas": False, "use_flow_sigmas": False, "final_sigmas_type": "zero",
                  "euler_at_final": False, "variance_type": None, "use_dynamic_shifting": False,
                  "solver_p": None, "predict_x0": True}


def scheduler_settings(config: Mapping) -> SchedulerSettings:
    """Read a scheduler config (``scheduler_config.json`` or ``scheduler.config``) into settings.

    Schedulers: DDPMScheduler (ancestral steps), DDIMScheduler (eta 0, as DDPMPipeline calls it),
    DPMSolverMultistepScheduler (dpmsolver++ / sde-dpmsolver++, any solver_order and solver_type) and
    UniPCMultistepScheduler (bh1/bh2, disable_corrector). Supported: beta_schedule linear, scaled_linear,
    squaredcos_cap_v2, sigmoid or trained_betas; prediction_type epsilon; DDPM's variance_type
    fixed_small/fixed_large; clip_sample with clip_sample_range (DDPM, DDIM); timestep_spacing
    leading/linspace/trailing with steps_offset. Anything else is a ValueError naming the key, never a
    silently different sampler. Missing keys take that scheduler's defaults.
    """
    cfg = dict(config)
    name = cfg.get("_class_name", "DDPMScheduler")
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler {name!r} is not supported: use one of {', '.join(SCHEDULERS)}")
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ValueError(f"prediction_type={prediction!r} is not supported: the model must predict the noise "
                         "(prediction_type='epsilon')")
    if cfg.get("thresholding", False):
        raise ValueError("thresholding=True (dynamic thresholding) is not supported: set thresholding=False")
    if cfg.get("rescale_betas_zero_snr", False):
        raise ValueError("rescale_betas_zero_snr=True is not supported: alpha-bar 0 at t=T-1 has no eps-form step")
    if name in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler"):
        return _multistep_settings(name, cfg)
    variance = cfg.get("variance_type", "fixed_small") if name == "DDPMScheduler" else "fixed_small"
    if variance not in ("fixed_small", "fixed_large"):
        raise ValueError(f"variance_type={variance!r} is not supported: use 'fixed_small' or 'fixed_large'")
    spacing = cfg.get("timestep_spacing", "leading")
    if spacing not in ("leading", "linspace", "trailing"):
        raise ValueError(f"timestep_spacing={spacing!r} is not supported: use leading, linspace or trailing")
    clip = None
    if cfg.get("clip_sample", True):
        clip = float(cfg.get("clip_sample_range", 1.0))
        if not clip > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {clip}")
    solver = solver_spec("ddpm")
    if name == "DDIMScheduler":
        if spacing != "leading":
            # DDIMScheduler steps to t - T // n, which is the next visited timestep only with leading spacing
            raise ValueError(f"DDIMScheduler with timestep_spacing={spacing!r} is not supported: use 'leading'")
        if not cfg.get("set_alpha_to_one", True):
            raise ValueError("DDIMScheduler with set_alpha_to_one=False is not supported: set it to True")
        # DDPMPipeline calls step() with eta = 0 and use_clipped_model_output = False
        solver = SolverSpec("ddim", eta=0.0, use_clipped_model_output=False)
    return SchedulerSettings(schedule=schedule_from_scheduler_config(cfg), variance=variance, clip=clip,
                             timestep_spacing=spacing, steps_offset=int(cfg.get("steps_offset", 0)),
                             solver=solver_spec(solver))


def _multistep_settings(name: str, cfg: dict) -> SchedulerSettings:
    """DPMSolverMultistepScheduler / UniPCMultistepScheduler configs as a SolverSpec (no clipping there)."""
    for key, value in _FIXED_OPTIONS.items():
        if key in cfg and cfg[key] != value and not (value is None and cfg[key] in (None, "")):
            raise ValueError(f"{name} with {key}={cfg[key]!r} is not supported: use {key}={value!r}")
    clip = cfg.get("lambda_min_clipped", -float("inf"))
    if clip != -float("inf") and name != "DPMSolverMultistepScheduler":
        raise ValueError(f"{name} with lambda_min_clipped={clip!r} is not supported: use -inf")
    options = dict(order=int(cfg.get("solver_order", 2)), lower_order_final=bool(cfg.get("lower_order_final", True)),
                   timestep_spacing=cfg.get("timestep_spacing", "linspace"), steps_offset=int(cfg.get("steps_offset", 0)))
    if name == "UniPCMultistepScheduler":
        spec = solver_spec("unipc", solver_type=cfg.get("solver_type", "bh2"),
                           disable_corrector=cfg.get("disable_corrector", []) or [], **options)
    else:
        algorithm = cfg.get("algorithm_type", "dpmsolver++")
        if algorithm not in ("dpmsolver++", "sde-dpmsolver++"):
            raise ValueError(f"{name} with algorithm_type={algorithm!r} is not supported: use 'dpmsolver++' or "
                             "'sde-dpmsolver++'")
        kind = "dpmpp-2m-sde" if algorithm == "sde-dpmsolver++" else ("dpmpp-3m" if options["order"] == 3 else "dpmpp-2m")
        spec = solver_spec(kind, solver_type=cfg.get("solver_type", "midpoint"), lambda_min_clipped=clip, **options)
    return SchedulerSettings(schedule=schedule_from_scheduler_config(cfg), variance="fixed_small", clip=None,
                             timestep_spacing=spec.timestep_spacing, steps_offset=spec.steps_offset, solver=spec)


def schedule_from_scheduler_config(cfg: Mapping) -> NoiseSchedule:
    """The beta table diffusers builds for a scheduler config (beta_schedule, betas, T), in float64.

    Raises a ValueError naming an unsupported beta_schedule.
    """
    T = int(cfg.get("num_train_timesteps", 1000))
    start, end = float(cfg.get("beta_start", 0.0001)), float(cfg.get("beta_end", 0.02))
    kind = cfg.get("beta_schedule", "linear")
    if cfg.get("trained_betas") is not None:
        return NoiseSchedule.from_betas(cfg["trained_betas"])
    if kind == "linear":
        return NoiseSchedule.linear(T, start, end)
    if kind == "squaredcos_cap_v2":
        return NoiseSchedule.cosine(T)
    if kind == "scaled_linear":
        return NoiseSchedule.from_betas(torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2)
    if kind == "sigmoid":
        sigmoid = torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64))
        return NoiseSchedule.from_betas(sigmoid * (end - start) + start)
    raise ValueError(f"beta_schedule={kind!r} is not supported: use linear, scaled_linear, squaredcos_cap_v2, "
                     "sigmoid or trained_betas")


def inference_timesteps(settings: SchedulerSettings, num_inference_steps: int) -> list[int]:
    """The descending timesteps the scheduler's set_timesteps(num_inference_steps) visits."""
    T = settings.schedule.num_timesteps
    n = num_inference_steps
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= T:
        raise ValueError(f"num_inference_steps must be an int in 1..{T} (num_train_timesteps), got {n!r}")
    if settings.solver.multistep:
        return spec_timesteps(settings.schedule, n, settings.solver)
    if settings.timestep_spacing == "linspace":
        steps = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    elif settings.timestep_spacing == "leading":
        steps = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + settings.steps_offset
    else:  # trailing
        steps = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    return [int(s) for s in steps]


class FastDDPMPipeline:
    """DDPMPipeline's interface on FastSampler.

    unet: a ``ddpm_fast.UNet``, a diffusers ``UNet2DModel`` or any eps model with a ``config`` giving
    sample_size and in_channels (or pass image_shape in sampler_options). scheduler: a DDPMScheduler, its
    config dict, or None for DDPMScheduler's defaults. device: where to sample (default: CUDA when
    available, else the CPU). sampler_options: passed to :class:`FastSampler` (dtype, compile,
    cuda_graph, ...); on the CPU the default dtype is float32, which matches DDPMPipeline to rounding.
    """

    def __init__(self, unet, scheduler=None, *, device=None, **sampler_options):
        config = getattr(scheduler, "config", scheduler)
        self.scheduler_config = dict(config) if config is not None else {}
        if hasattr(scheduler, "config"):  # a live scheduler's config does not name its class: its type does
            self.scheduler_config.setdefault("_class_name", type(scheduler).__name__)
        self.settings = scheduler_settings(self.scheduler_config)
        self.unet = unet
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._sampler_options = dict(sampler_options)
        self._build_sampler(torch.device(device))

    def _build_sampler(self, device: torch.device) -> None:
        s = self.settings
        self.sampler = FastSampler(self.unet, s.schedule, solver=s.solver, variance=s.variance,
                                   clip_x0=s.clip or False, device=device, **self._sampler_options)
        self._num_inference_steps = None

    # -- loading ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder, *, convert_unet: bool = True, device=None, revision: str | None = None,
                        **sampler_options):
        """Load a DDPMPipeline saved with ``save_pretrained``: a local folder with unet/ and scheduler/, or a
        hub id ("google/ddpm-cifar10-32") fetched into and read from the Hugging Face cache (``hub.py``;
        ``HF_HUB_OFFLINE=1`` opens a cached download without a network). revision: a hub branch/commit.

        convert_unet: load the U-Net as our ``UNet`` (it gets the time-embedding table); a config our
        UNet cannot express falls back to diffusers' UNet2DModel with a warning. False keeps diffusers'.
        """
        root = resolve_source(folder, revision=revision)
        scheduler_file = root / "scheduler" / SCHEDULER_CONFIG
        if not root.is_dir():
            raise CheckpointError(f"{root} is not a folder: pass a saved DDPMPipeline folder (unet/ and scheduler/)")
        if not scheduler_file.is_file() or not (root / "unet").is_dir():
            raise CheckpointError(f"{root} is not a saved DDPMPipeline: expected unet/ and "
                                  f"scheduler/{SCHEDULER_CONFIG}")
        scheduler_config = read_json(scheduler_file)
        unet = _load_unet(root / "unet", convert_unet)
        return cls(unet, scheduler_config, device=device, **sampler_options)

    @classmethod
    def from_diffusers(cls, pipeline, *, convert_unet: bool = True, device=None, **sampler_options):
        """Wrap a live diffusers DDPMPipeline (its unet and scheduler); it is not modified.

        device: default the pipeline U-Net's device.
        """
        if not hasattr(pipeline, "unet") or not hasattr(pipeline, "scheduler"):
            raise TypeError(f"from_diffusers needs a DDPMPipeline (with .unet and .scheduler), "
                            f"got {type(pipeline).__name__}")
        unet = pipeline.unet
        if device is None:
            device = model_device(unet)
        if convert_unet:
            unet = _convert_unet(unet, source="the pipeline's UNet2DModel")
        return cls(unet, pipeline.scheduler, device=device, **sampler_options)

    # -- diffusers-style conveniences -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.sampler.device

    def to(self, device) -> "FastDDPMPipeline":
        """Sample on ``device`` from now on (re-prepares the model there); returns self."""
        if torch.device(device) != self.device:
            self._build_sampler(torch.device(device))
        return self

    # -- generation ---------------------------------------------------------------------------------
    def __call__(self, batch_size: int = 1, generator=None, num_inference_steps: int = 1000,
                 output_type: str = "pil", return_dict: bool = True, *, seeds=None):
        """Generate ``batch_size`` images with ``num_inference_steps`` DDPM steps, as DDPMPipeline does.

        generator: a torch.Generator (or a list, one per image): DDPMPipeline's exact noise. None: seed-keyed
        noise from ``seeds`` (one uint32 per image), or from seeds drawn with torch's global RNG.
        output_type: "pil" (list of PIL images), "np" ((B, H, W, C) float32 in [0, 1]) or "pt"
        ((B, C, H, W) float32 tensor in [0, 1]). Returns FastPipelineOutput(images), or (images,) when
        return_dict is False.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not supported: use 'pil', 'np' or 'pt'")
        self._use_steps(num_inference_steps)
        # the sampler checks, before any step, that seeds and generator are not both given and that
        # there is one seed per image
        x = self.sampler.sample(n=batch_size, seeds=seeds, generator=generator, clamp=False)

        images = (x / 2 + 0.5).clamp(0, 1)  # DDPMPipeline's mapping of x_0 to [0, 1]
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = numpy_to_pil(images)
        return FastPipelineOutput(images=images) if return_dict else (images,)

    def _use_steps(self, num_inference_steps: int) -> None:
        """Point the sampler at the scheduler's timesteps for this step count (rebuilt only on change)."""
        if num_inference_steps == self._num_inference_steps:
            return
        steps = inference_timesteps(self.settings, num_inference_steps)
        # DDPMScheduler adds noise whenever t > 0, also at the last step (trailing spacing, steps_offset):
        # its sigma there has ab_prev = 1, so beta' = 1 - ab_t (fixed_small's variance 0 is clamped to 1e-20)
        last_sigma = None
        if steps[-1] > 0 and self.settings.solver.name == "ddpm":
            ab_last = float(self.settings.schedule.alphas_cumprod[steps[-1]])
            last_sigma = (1.0 - ab_last) ** 0.5 if self.settings.variance == "fixed_large" else 1e-10
        self.sampler._set_steps(steps, last_sigma=last_sigma)
        self._num_inference_steps = num_inference_steps


def numpy_to_pil(images: np.ndarray) -> list:
    """(B, H, W, C) float array in [0, 1] -> list of PIL images, rounded as diffusers rounds them."""
    from PIL import Image

    pixels = (images * 255).round().astype("uint8")
    if pixels.shape[-1] == 1:
        return [Image.fromarray(p.squeeze(-1), mode="L") for p in pixels]
    return [Image.fromarray(p) for p in pixels]


def _load_unet(folder: Path, convert: bool):
    """Our UNet from a diffusers unet/ folder, or diffusers' UNet2DModel when we cannot express it."""
    if convert:
        from .diffusers_io import load_diffusers_unet

        try:
            return load_diffusers_unet(folder)
        except ValueError as err:
            warnings.warn(f"using diffusers' UNet2DModel (no time-embedding table): {err}", stacklevel=3)
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise CheckpointError(f"{folder} needs diffusers' UNet2DModel: pip install diffusers") from None
    return UNet2DModel.from_pretrained(folder).eval()


def _convert_unet(unet, source: str):
    """Our UNet with unet's weights when its config is expressible; else unet itself (with a warning)."""
    from .diffusers_io import load_diffusers_unet

    try:
        return load_diffusers_unet(unet).eval()
    except (ValueError, TypeError) as err:
        warnings.warn(f"sampling with {source} as is (no time-embedding table): {err}", stacklevel=3)
        return unet
