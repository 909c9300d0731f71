"""From a trained model to image files, in one straight line:

1. :func:`load_model_source` - a run folder, a checkpoint (step folder or ``.safetensors`` file), a
   diffusers UNet folder or a hub id (``google/ddpm-cifar10-32``, through the Hugging Face cache, see
   ``hub.py``) becomes ``(model, schedule, meta)``; EMA weights by default.
2. :func:`generate` - seeds become images. Image i starts from x_T = noise keyed by (seed_i, T) and every
   step adds z keyed by (seed_i, t) (``ops.seeded_noise``), so it is a pure function of seed i whatever
   the batch size. ``FastSampler`` runs the loop by default; ``reference=True`` runs the oracle
   ``reference.sample`` (``reference.solver_sample`` for the multistep solvers) on the same noise.
3. :func:`write_samples` - float images in [-1, 1] become ``grid.png``, ``samples.npz`` (guided-diffusion's
   format: ``arr_0``, uint8, NHWC) and optionally one PNG per image.

:func:`sample_to_folder` runs all three; it is what ``ddpm-fast sample`` calls.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import EMA_FILE, MODEL_FILE, atomic_write, build_model, load_checkpoint, read_json
from .checks import model_device
from .errors import CheckpointError
from .hub import resolve_source
from .sampler import DEFAULT_BATCH_SIZE, SEED_LIMIT
from .schedule import NoiseSchedule
from .solvers import SolverSpec, solver_spec

DEFAULT_SOLVER_STEPS = 20  # a multistep solver without --steps: diffusers' usual few-step budget

__all__ = ["parse_seeds", "load_model_source", "generate", "write_samples", "sample_to_folder", "SampleResult"]


# --------------------------------------------------------------------------------------------------
# seeds


def parse_seeds(text: str) -> list[int]:
    """'0-63' -> [0..63]; '1,5,9' -> [1, 5, 9]; '0-3,10' -> [0, 1, 2, 3, 10] (ranges inclusive, as in EDM).

    Raises ValueError naming the bad part; seeds must lie in [0, 2**32) and be unique.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("--seeds is empty: give a range like 0-63 or a list like 1,5,9")
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            raise ValueError(f"bad seed {part!r} in --seeds {text!r}: use ranges like 0-63 and lists like 1,5,9")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"seed range {part!r} runs backwards: write it low-high, e.g. {hi}-{lo}")
        if hi >= SEED_LIMIT:
            raise ValueError(f"seed {hi} is too large: seeds lie in 0..{SEED_LIMIT - 1}")
        if hi - lo >= 1_000_000:
            raise ValueError(f"seed range {part!r} asks for {hi - lo + 1:,} images: at most 1,000,000 per call")
        seeds.extend(range(lo, hi + 1))
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r} names a seed twice: each image needs its own seed")
    return seeds


# --------------------------------------------------------------------------------------------------
# 1. model source


def _diffusers_unet_folder(path: Path) -> Path | None:
    """The UNet2DModel folder at ``path`` (or in its ``unet/``, for a saved pipeline), else None."""
    for folder in (path, path / "unet"):
        config = folder / "config.json"
        if config.is_file():
            try:
                data = json.loads(config.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(data, dict) and data.get("_class_name") == "UNet2DModel":
                return folder
    return None


def _diffusers_schedule(unet_folder: Path) -> tuple[NoiseSchedule, dict]:
    """The schedule of a diffusers model: its pipeline's scheduler_config.json if there is one, else
    Ho's linear 1000-step schedule. Returns (schedule, sampling defaults from the scheduler)."""
    candidates = [unet_folder / "scheduler_config.json", unet_folder.parent / "scheduler" / "scheduler_config.json",
                  unet_folder / "scheduler" / "scheduler_config.json"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        return NoiseSchedule.linear(1000), {"variance": "fixed_large", "clip_x0": True, "scheduler": None,
                                            "solver": solver_spec("ddpm")}
    cfg = read_json(path)
    if cfg.get("prediction_type", "epsilon") != "epsilon":
        raise CheckpointError(f"{path}: prediction_type {cfg['prediction_type']!r} is not supported "
                              "(ddpm-fast samples eps-prediction models)")
    from .pipeline import SCHEDULERS, schedule_from_scheduler_config, scheduler_settings

    try:
        schedule = schedule_from_scheduler_config(cfg)
        # the saved scheduler's solver when we implement it; DDPM steps for any other scheduler class
        solver = scheduler_settings(cfg).solver if cfg.get("_class_name") in SCHEDULERS else solver_spec("ddpm")
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    variance = cfg.get("variance_type", "fixed_small")
    defaults = {"variance": variance if variance in ("fixed_small", "fixed_large") else "fixed_large",
                "clip_x0": bool(cfg.get("clip_sample", True)) and not solver.multistep, "scheduler": str(path),
                "solver": solver}
    return schedule, defaults


def load_model_source(source, *, use_ema: bool = True, device=None):
    """Load a model to sample from: ``(model, schedule, meta)``.

    source: a run folder (its latest checkpoint), a checkpoint step folder, a ``.safetensors`` weights
    file written by ddpm-fast, or a diffusers ``UNet2DModel`` folder (or a saved pipeline holding one in
    ``unet/``; its ``scheduler/scheduler_config.json`` gives the schedule and solver, else linear T=1000),
    local or a hub id.
    use_ema: the EMA weights (default) or the raw weights of a checkpoint.
    Returns the model in eval mode on ``device`` (default CPU), its NoiseSchedule, and meta: a dict with
    "kind", "path", "step", "weights" and the sampling defaults "variance", "clip_x0" and "solver".
    Raises CheckpointError (one line) for anything that cannot be loaded.
    """
    path = resolve_source(source)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: pass a run folder, a checkpoint (step folder or "
                              ".safetensors file) or a diffusers UNet folder")
    unet_folder = _diffusers_unet_folder(path) if path.is_dir() else None
    if unet_folder is not None:
        from .diffusers_io import load_diffusers_unet

        try:
            model = load_diffusers_unet(unet_folder)
        except (ValueError, FileNotFoundError, TypeError) as exc:
            raise CheckpointError(str(exc).splitlines()[0]) from None
        schedule, defaults = _diffusers_schedule(unet_folder)
        meta = {"kind": "diffusers", "path": str(unet_folder), "step": None, "weights": "model", **defaults}
    else:
        ckpt = load_checkpoint(path, with_state=False)
        take_ema = use_ema and ckpt.ema is not None
        weights = ckpt.ema if take_ema else ckpt.model
        weights_file = ckpt.path if ckpt.path.is_file() else ckpt.path / (EMA_FILE if take_ema else MODEL_FILE)
        model = build_model(ckpt.config["unet"], weights, source=weights_file)
        try:
            schedule = NoiseSchedule.from_config(ckpt.config["schedule"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{ckpt.path} carries an invalid schedule config ({exc})") from None
        meta = {"kind": "file" if ckpt.path.is_file() else "checkpoint", "path": str(ckpt.path),
                "step": ckpt.step, "weights": "ema" if take_ema else "model",
                "variance": "fixed_large", "clip_x0": True, "solver": solver_spec("ddpm")}
    model.eval().requires_grad_(False)
    if device is not None:
        model = model.to(device)
    return model, schedule, meta


# --------------------------------------------------------------------------------------------------
# 2. seeds -> images


def generate(model, schedule: NoiseSchedule, seeds, *, steps=None, variance: str = "fixed_large",
             clip_x0: bool = True, reference: bool = False, batch_size: int | None = None,
             device=None, sampler_options: dict | None = None, solver="ddpm") -> torch.Tensor:
    """Sample one image per seed: float32 (N, C, H, W) on the CPU, in [-1, 1].

    model: a ddpm_fast UNet (or any eps model with ``config.sample_size/in_channels``). seeds: N ints in
    [0, 2**32). steps: None (all T), an int n (diffusers' leading spacing) or a descending list.
    variance: "fixed_large" (Ho) or "fixed_small". clip_x0: clip the predicted x0 to [-1, 1] each step
    (Ho's and diffusers' default). reference: use the oracle ``reference.sample`` instead of FastSampler.
    batch_size: images per batch (default: all, at most DEFAULT_BATCH_SIZE = 256); the result does not depend on it.
    sampler_options: extra FastSampler arguments (e.g. ``{"compile": False}``). solver: a name or
    ``SolverSpec`` (``solvers.py``); the multistep ones take no clip_x0 and use their own spacing for int steps.
    """
    solver = solver_spec(solver)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("no seeds given: pass at least one seed (e.g. --seeds 0-63)")
    batch_size = batch_size or min(len(seeds), DEFAULT_BATCH_SIZE)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")

    if not reference:
        from .sampler import FastSampler

        sampler = FastSampler(model, schedule, timesteps=steps, solver=solver, variance=variance, clip_x0=clip_x0,
                              device=device, **(sampler_options or {}))
        return sampler.sample(seeds=seeds, batch_size=batch_size).float().cpu()

    from . import ops
    from . import reference as oracle

    device = torch.device(device) if device is not None else model_device(model)
    image_shape = (model.config.in_channels, model.config.sample_size, model.config.sample_size)
    was_training = model.training
    model.eval()  # dropout off; restored below
    out = []
    try:
        for start in range(0, len(seeds), batch_size):
            chunk = seeds[start:start + batch_size]

            def noise_fn(noise_step: int, shape, chunk=chunk):
                # x_T uses noise step T, the z added after visiting t uses noise step t
                return ops.seeded_noise(chunk, noise_step, shape[1:], device=device)

            if solver.multistep:
                if clip_x0:
                    raise ValueError(f"clip_x0 is not available with {solver.name}: its scheduler does not clip x0")
                x_T = noise_fn(schedule.num_timesteps, (len(chunk), *image_shape))
                x = oracle.solver_sample(model, schedule, x_T, solver, steps, noise_fn=noise_fn)
            elif solver.name == "ddim" and not solver.use_clipped_model_output and clip_x0:
                raise ValueError("the oracle's DDIM recomputes eps from the clipped x0: use clip off or FastSampler")
            else:
                x = oracle.sample(model, schedule, (len(chunk), *image_shape), variance=variance, clip_x0=clip_x0,
                                  timesteps=steps, device=device, noise_fn=noise_fn, eta=solver.eta)
            out.append(x.clamp(-1.0, 1.0).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------
# 3. images -> files


def write_samples(images: torch.Tensor, out_dir, *, seeds=None, png_per_image: bool = False,
                  grid_scale: int | None = None) -> dict[str, Path]:
    """Write ``out_dir/grid.png``, ``out_dir/samples.npz`` and optionally ``out_dir/images/seedNNNNNN.png``.

    images: float (N, C, H, W) in [-1, 1]. samples.npz holds ``arr_0``: uint8 (N, H, W, C), the layout of
    guided-diffusion's evaluator; it is written to a temporary file and renamed into place.
    grid_scale: nearest-neighbour upscaling of the grid (default: to about 32 pixels per image).
    Returns the paths written, by name ("grid", "npz", "images").
    """
    from .data import save_grid, save_pngs, to_uint8_nhwc

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8_nhwc(images)  # (N, H, W, C) uint8, the same rounding as DDPMPipeline

    def write_npz(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, arr_0=pixels)

    paths = {"npz": atomic_write(out_dir / "samples.npz", write_npz)}
    scale = grid_scale or max(1, 32 // pixels.shape[1])
    paths["grid"] = save_grid(pixels, out_dir / "grid.png", scale=scale)
    if png_per_image:
        names = [f"seed{s:06d}" for s in seeds] if seeds is not None else None
        save_pngs(pixels, out_dir / "images", names=names)
        paths["images"] = out_dir / "images"
    return paths


@dataclass
class SampleResult:
    """What :func:`sample_to_folder` did: files written, the settings used and how long it took."""

    paths: dict
    num_images: int
    meta: dict
    settings: dict
    seconds: float


def sample_to_folder(source, out_dir, seeds, *, steps=None, variance: str | None = None,
                     clip_x0: bool | None = None, reference: bool = False, batch_size: int | None = None,
                     png_per_image: bool = False, use_ema: bool = True, device=None, solver=None,
                     solver_options: dict | None = None) -> SampleResult:
    """Load ``source``, sample one image per seed and write them to ``out_dir`` (see the module docstring).

    variance / clip_x0 / solver: None takes the source's defaults (DDPM, fixed_large with clipping for
    ddpm-fast runs; a diffusers pipeline's scheduler and its settings). solver_options: keyword arguments
    of ``solvers.solver_spec`` (order, solver_type, corrector, timestep_spacing...), with ``solver`` only.
    steps: None = all T for ddpm/ddim, DEFAULT_SOLVER_STEPS for the multistep solvers.
    device: None = CUDA when available.
    """
    from .training import resolve_device

    if solver_options and solver is None:
        raise ValueError("solver options (order, type, corrector, spacing) need a solver: pass --solver too")
    spec = solver_spec(solver, **(solver_options or {})) if isinstance(solver, str) else None
    device = resolve_device(device)
    model, schedule, meta = load_model_source(source, use_ema=use_ema, device=device)
    spec = spec or (solver if isinstance(solver, SolverSpec) else meta["solver"])
    if steps is None:
        steps = DEFAULT_SOLVER_STEPS if spec.multistep else schedule.num_timesteps
    default_clip = meta["clip_x0"] and not spec.multistep
    settings = {"steps": steps, "variance": variance or meta["variance"],
                "clip_x0": default_clip if clip_x0 is None else bool(clip_x0),
                "sampler": "reference" if reference else "FastSampler", "device": str(device),
                "solver": spec.as_dict()}
    start = time.perf_counter()
    images = generate(model, schedule, seeds, steps=steps, variance=settings["variance"],
                      clip_x0=settings["clip_x0"], reference=reference, batch_size=batch_size, device=device,
                      solver=spec)
    seconds = time.perf_counter() - start
    paths = write_samples(images, out_dir, seeds=seeds, png_per_image=png_per_image)
    return SampleResult(paths, len(seeds), meta, settings, seconds)
