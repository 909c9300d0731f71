"""From a trained model to image files, in one straight line:

1. :func:`load_model_source` - a run folder, a checkpoint (step folder or ``.safetensors`` file) or a
   diffusers UNet folder becomes ``(model, schedule, meta)``; EMA weights by default.
2. :func:`generate` - seeds become images. Image i starts from x_T = noise keyed by (seed_i, T) and every
   step adds z keyed by (seed_i, t) (``ops.seeded_noise``), so it is a pure function of seed i whatever
   the batch size. ``FastSampler`` runs the loop by default; ``reference=True`` runs the oracle
   ``reference.sample`` on the same noise.
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
from .sampler import DEFAULT_BATCH_SIZE, SEED_LIMIT
from .schedule import NoiseSchedule

__all__ = ["parse_seeds", "load_model_source", "iter_generate", "generate", "write_samples", "sample_to_folder", "SampleResult"]


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
        return NoiseSchedule.linear(1000), {"variance": "fixed_large", "clip_x0": True, "scheduler": None}
    cfg = read_json(path)
    if cfg.get("prediction_type", "epsilon") != "epsilon":
        raise CheckpointError(f"{path}: prediction_type {cfg['prediction_type']!r} is not supported "
                              "(ddpm-fast samples eps-prediction models)")
    from .pipeline import schedule_from_scheduler_config

    try:
        schedule = schedule_from_scheduler_config(cfg)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    variance = cfg.get("variance_type", "fixed_small")
    defaults = {"variance": variance if variance in ("fixed_small", "fixed_large") else "fixed_large",
                "clip_x0": bool(cfg.get("clip_sample", True)), "scheduler": str(path)}
    return schedule, defaults


def load_model_source(source, *, use_ema: bool = True, device=None):
    """Load a model to sample from: ``(model, schedule, meta)``.

    source: a run folder (its latest checkpoint), a checkpoint step folder, a ``.safetensors`` weights
    file written by ddpm-fast, or a diffusers ``UNet2DModel`` folder (or a saved pipeline holding one in
    ``unet/``; its ``scheduler/scheduler_config.json`` gives the schedule, else linear T=1000).
    use_ema: the EMA weights (default) or the raw weights of a checkpoint.
    Returns the model in eval mode on ``device`` (default CPU), its NoiseSchedule, and meta: a dict with
    "kind", "path", "step", "weights" and the sampling defaults "variance" and "clip_x0".
    Raises CheckpointError (one line) for anything that cannot be loaded.
    """
    path = Path(source)
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
                "variance": "fixed_large", "clip_x0": True}
    model.eval().requires_grad_(False)
    if device is not None:
        model = model.to(device)
    return model, schedule, meta


# --------------------------------------------------------------------------------------------------
# 2. seeds -> images


def iter_generate(model, schedule: NoiseSchedule, seeds, *, steps=None, variance: str = "fixed_large",
                  clip_x0: bool = True, reference: bool = False, batch_size: int | None = None,
                  device=None, sampler_options: dict | None = None):
    """Sample one image per seed, one batch at a time: yields ``(batch_seeds, images)`` in seed order,
    images float32 (B, C, H, W) on the CPU in [-1, 1], B <= batch_size (only the last batch is shorter).

    The hook for anything that consumes images as they come off the sampler (FID features, streamed
    files): only one batch is alive at a time. Arguments as :func:`generate`.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("no seeds given: pass at least one seed (e.g. --seeds 0-63)")
    batch_size = batch_size or DEFAULT_BATCH_SIZE
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    batch_size = min(batch_size, len(seeds))  # never pad a small request up to a large batch

    if not reference:
        from .sampler import FastSampler

        sampler = FastSampler(model, schedule, timesteps=steps, variance=variance, clip_x0=clip_x0, device=device,
                              **(sampler_options or {}))
        for start in range(0, len(seeds), batch_size):
            chunk = seeds[start:start + batch_size]
            # pad a short last batch with its last seed (images are independent): one batch shape, so the
            # sampler keeps its compiled graph and CUDA-graph capture; the padded rows are dropped
            padded = chunk + chunk[-1:] * (batch_size - len(chunk))
            images = sampler.sample(seeds=padded, batch_size=batch_size)[:len(chunk)]
            yield chunk, images.float().cpu()
        return

    from . import ops
    from . import reference as oracle

    device = torch.device(device) if device is not None else model_device(model)
    image_shape = (model.config.in_channels, model.config.sample_size, model.config.sample_size)
    was_training = model.training
    model.eval()  # dropout off; restored below
    try:
        for start in range(0, len(seeds), batch_size):
            chunk = seeds[start:start + batch_size]

            def noise_fn(noise_step: int, shape, chunk=chunk):
                # x_T uses noise step T, the z added after visiting t uses noise step t
                return ops.seeded_noise(chunk, noise_step, shape[1:], device=device)

            x = oracle.sample(model, schedule, (len(chunk), *image_shape), variance=variance, clip_x0=clip_x0,
                              timesteps=steps, device=device, noise_fn=noise_fn)
            yield chunk, x.clamp(-1.0, 1.0).float().cpu()
    finally:
        model.train(was_training)


def generate(model, schedule: NoiseSchedule, seeds, *, steps=None, variance: str = "fixed_large",
             clip_x0: bool = True, reference: bool = False, batch_size: int | None = None,
             device=None, sampler_options: dict | None = None) -> torch.Tensor:
    """Sample one image per seed: float32 (N, C, H, W) on the CPU, in [-1, 1].

    model: a ddpm_fast UNet (or any eps model with ``config.sample_size/in_channels``). seeds: N ints in
    [0, 2**32). steps: None (all T), an int n (diffusers' leading spacing) or a descending list.
    variance: "fixed_large" (Ho) or "fixed_small". clip_x0: clip the predicted x0 to [-1, 1] each step
    (Ho's and diffusers' default). reference: use the oracle ``reference.sample`` instead of FastSampler.
    batch_size: images per batch (default: all, at most DEFAULT_BATCH_SIZE = 256); the result does not depend on it.
    sampler_options: extra FastSampler arguments (e.g. ``{"compile": False}``).
    """
    batches = iter_generate(model, schedule, seeds, steps=steps, variance=variance, clip_x0=clip_x0,
                            reference=reference, batch_size=batch_size, device=device,
                            sampler_options=sampler_options)
    return torch.cat([images for _, images in batches])


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


GRID_MAX = 1024  # grid.png shows at most the first 1024 images (32 x 32); samples.npz holds them all


def _write_npz_streamed(tmp: Path, shape: tuple[int, ...], blocks) -> None:
    """Write ``arr_0`` of ``shape`` (uint8) into the .npz ``tmp`` from an iterator of row blocks, as
    np.savez lays it out (an uncompressed zip holding arr_0.npy), without the whole array in memory."""
    import zipfile

    rows = 0
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as member:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                      "shape": tuple(int(d) for d in shape)}
            np.lib.format.write_array_header_2_0(member, header)
            for block in blocks:
                if block.dtype != np.uint8 or block.shape[1:] != tuple(shape[1:]):
                    raise ValueError(f"block {block.dtype} {block.shape} does not fit arr_0 {shape}")
                member.write(np.ascontiguousarray(block).tobytes())
                rows += block.shape[0]
    if rows != shape[0]:  # the header promised shape[0] rows: a short file must never be renamed into place
        raise RuntimeError(f"wrote {rows} of {shape[0]} images to {tmp}")


@dataclass
class SampleResult:
    """What :func:`sample_to_folder` did: files written, the settings used and how long it took.

    seconds: sampling alone; hook_seconds: time spent in ``on_batch`` (e.g. FID features);
    write_seconds: converting and writing the files.
    """

    paths: dict
    num_images: int
    meta: dict
    settings: dict
    seconds: float
    hook_seconds: float = 0.0
    write_seconds: float = 0.0


def sample_to_folder(source, out_dir, seeds, *, steps=None, variance: str | None = None,
                     clip_x0: bool | None = None, reference: bool = False, batch_size: int | None = None,
                     png_per_image: bool = False, use_ema: bool = True, device=None,
                     on_batch=None) -> SampleResult:
    """Load ``source``, sample one image per seed and write them to ``out_dir`` (see the module docstring).

    variance / clip_x0: None takes the source's defaults (fixed_large with clipping for ddpm-fast runs;
    a diffusers pipeline's scheduler settings). device: None = CUDA when available.
    on_batch: optional ``f(images, seeds)`` called on each batch as it comes off the sampler (float32
    (B, C, H, W) CPU images in [-1, 1], the batch's seeds), e.g. FID features.
    Images are written batch by batch (samples.npz is streamed, grid.png keeps the first GRID_MAX), so
    memory holds one batch whatever the number of seeds.
    """
    from .data import save_grid, save_pngs, to_uint8_nhwc
    from .training import resolve_device

    device = resolve_device(device)
    model, schedule, meta = load_model_source(source, use_ema=use_ema, device=device)
    settings = {"steps": steps if steps is not None else schedule.num_timesteps,
                "variance": variance or meta["variance"],
                "clip_x0": meta["clip_x0"] if clip_x0 is None else bool(clip_x0),
                "sampler": "reference" if reference else "FastSampler", "device": str(device)}
    seeds = [int(s) for s in seeds]
    c, size = model.config.in_channels, model.config.sample_size
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    batches = iter_generate(model, schedule, seeds, steps=steps, variance=settings["variance"],
                            clip_x0=settings["clip_x0"], reference=reference, batch_size=batch_size, device=device)
    timing = {"hook": 0.0, "write": 0.0}
    grid: list[np.ndarray] = []
    paths: dict[str, Path] = {}

    def pixel_blocks():
        for chunk, images in batches:
            if on_batch is not None:
                t0 = time.perf_counter()
                on_batch(images, chunk)
                timing["hook"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            pixels = to_uint8_nhwc(images)  # (B, H, W, C) uint8, the same rounding as DDPMPipeline
            if sum(len(g) for g in grid) < GRID_MAX:
                grid.append(pixels[:GRID_MAX - sum(len(g) for g in grid)])
            if png_per_image:
                save_pngs(pixels, out_dir / "images", names=[f"seed{s:06d}" for s in chunk])
            timing["write"] += time.perf_counter() - t0
            yield pixels

    start = time.perf_counter()
    paths["npz"] = atomic_write(out_dir / "samples.npz",
                                lambda tmp: _write_npz_streamed(tmp, (len(seeds), size, size, c), pixel_blocks()))
    seconds = time.perf_counter() - start - timing["hook"] - timing["write"]
    t0 = time.perf_counter()
    first = np.concatenate(grid)
    paths["grid"] = save_grid(first, out_dir / "grid.png", scale=max(1, 32 // first.shape[1]))
    if png_per_image:
        paths["images"] = out_dir / "images"
    timing["write"] += time.perf_counter() - t0
    return SampleResult(paths, len(seeds), meta, settings, seconds, timing["hook"], timing["write"])
