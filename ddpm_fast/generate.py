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

:func:`sample_to_folder` runs all three and records how in ``run.json``; it is what ``ddpm-fast sample``
calls. Under torchrun (or any initialized process group) the seed batches are dealt to the ranks as EDM's
generate.py deals them (:func:`ddpm_fast.distributed.deal`); since image i depends on seed i alone, the
images are those of a single process.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import (EMA_FILE, MODEL_FILE, atomic_write, build_model, load_checkpoint, read_json,
                         write_json_atomic)
from .checks import model_device
from .distributed import Group, current_group, deal, process_group
from .errors import CheckpointError
from .hub import resolve_source
from .sampler import DEFAULT_BATCH_SIZE, SEED_LIMIT, model_image_shape
from .schedule import NoiseSchedule
from .solvers import SolverSpec, solver_spec

DEFAULT_SOLVER_STEPS = 20  # a multistep solver without --steps: diffusers' usual few-step budget

__all__ = ["parse_seeds", "format_seeds", "load_model_source", "generate", "write_samples", "sample_to_folder",
           "SampleResult", "RUN_FILE"]

RUN_FILE = "run.json"


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


def format_seeds(seeds) -> str:
    """The inverse of :func:`parse_seeds`: [0, 1, 2, 3, 10] -> '0-3,10' (runs of consecutive seeds)."""
    parts, seeds = [], [int(s) for s in seeds]
    i = 0
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(str(seeds[i]) if i == j else f"{seeds[i]}-{seeds[j]}")
        i = j + 1
    return ",".join(parts)


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
             device=None, sampler_options: dict | None = None, group: Group | None = None,
             progress: bool = False, solver="ddpm") -> torch.Tensor:
    """Sample one image per seed: float32 (N, C, H, W) on the CPU, in [-1, 1].

    model: a ddpm_fast UNet (or any eps model with ``config.sample_size/in_channels``). seeds: N ints in
    [0, 2**32). steps: None (all T), an int n (diffusers' leading spacing) or a descending list.
    variance: "fixed_large" (Ho) or "fixed_small". clip_x0: clip the predicted x0 to [-1, 1] each step
    (Ho's and diffusers' default). reference: use the oracle ``reference.sample`` instead of FastSampler.
    batch_size: images per batch (default: all, at most DEFAULT_BATCH_SIZE = 256); the result does not depend on it.
    sampler_options: extra FastSampler arguments (e.g. ``{"compile": False}``).
    group: the process group (default: torch.distributed's if one is initialized, else one process).
    With N > 1 ranks every rank must call this with the same arguments: the seed batches are dealt to
    the ranks, each samples its own on its device, and every rank returns all N images in seed order.
    progress: a progress bar of images done across all ranks (rank 0 draws it).
    solver: a name or ``SolverSpec`` (``solvers.py``); the multistep ones take no clip_x0 and use their
    own spacing for int steps.
    """
    solver = solver_spec(solver)
    seeds = [int(s) for s in seeds]
    group = group if group is not None else current_group()
    if group.world_size == 1 and not progress:  # one process: the whole list in one call, as always
        return _image_sampler(model, schedule, seeds, steps=steps, variance=variance, clip_x0=clip_x0,
                              reference=reference, batch_size=batch_size, device=device,
                              sampler_options=sampler_options, solver=solver)(seeds)
    positions, images = _generate_dealt(model, schedule, seeds, steps=steps, variance=variance, clip_x0=clip_x0,
                                        reference=reference, batch_size=batch_size, device=device,
                                        sampler_options=sampler_options, group=group, progress=progress,
                                        solver=solver)
    return _in_seed_order(group, images, positions, len(seeds), to_all=True)


def _image_sampler(model, schedule, seeds, *, steps, variance, clip_x0, reference, batch_size, device,
                   sampler_options=None, solver="ddpm"):
    """Check the arguments once and return ``sample(seeds) -> float32 (n, C, H, W) CPU images``, built
    once (FastSampler compiles and captures once) for every batch that follows."""
    if not seeds:
        raise ValueError("no seeds given: pass at least one seed (e.g. --seeds 0-63)")
    batch_size = batch_size or min(len(seeds), DEFAULT_BATCH_SIZE)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")

    solver = solver_spec(solver)
    if not reference:
        from .sampler import FastSampler

        sampler = FastSampler(model, schedule, timesteps=steps, solver=solver, variance=variance, clip_x0=clip_x0,
                              device=device, **(sampler_options or {}))
        return lambda chunk: sampler.sample(seeds=chunk, batch_size=batch_size).float().cpu()

    from . import ops
    from . import reference as oracle

    device = torch.device(device) if device is not None else model_device(model)
    image_shape = model_image_shape(model, None)
    if solver.multistep and clip_x0:
        raise ValueError(f"clip_x0 is not available with {solver.name}: its scheduler does not clip x0")
    if solver.name == "ddim" and not solver.use_clipped_model_output and clip_x0:
        raise ValueError("the oracle's DDIM recomputes eps from the clipped x0: use clip off or FastSampler")

    def sample(chunk_seeds):
        was_training = model.training
        model.eval()  # dropout off; restored below
        out = []
        try:
            for start in range(0, len(chunk_seeds), batch_size):
                chunk = chunk_seeds[start:start + batch_size]

                def noise_fn(noise_step: int, shape, chunk=chunk):
                    # x_T uses noise step T, the z added after visiting t uses noise step t
                    return ops.seeded_noise(chunk, noise_step, shape[1:], device=device)

                if solver.multistep:
                    x_T = noise_fn(schedule.num_timesteps, (len(chunk), *image_shape))
                    x = oracle.solver_sample(model, schedule, x_T, solver, steps, noise_fn=noise_fn)
                else:
                    x = oracle.sample(model, schedule, (len(chunk), *image_shape), variance=variance,
                                      clip_x0=clip_x0, timesteps=steps, device=device, noise_fn=noise_fn,
                                      eta=solver.eta)
                out.append(x.clamp(-1.0, 1.0).float().cpu())
        finally:
            model.train(was_training)
        return torch.cat(out)

    return sample


def _generate_dealt(model, schedule, seeds, *, batch_size, group: Group, progress: bool, on_batch=None,
                    keep: bool = True, on_round=None, **options):
    """This rank's share of the seeds: (positions in ``seeds``, float32 (n, C, H, W) CPU images).

    Every rank loops over the same number of batches (:func:`deal`), so the per-batch count of images
    done (one small host-side all_reduce, for the progress bar) keeps the ranks in step.
    on_batch: ``f(images, batch_seeds)`` called on each of this rank's batches as it comes off the
    sampler (the hook FID features are taken from). keep: False drops each batch after ``on_batch``
    (the images returned are then empty): memory holds one batch whatever the number of seeds.
    on_round: ``f(images or None, batch)`` called on every rank at every round, in step (None when this
    rank's batch of the round is empty), for per-round collectives such as gathering the images.
    """
    from tqdm.auto import tqdm

    sample = _image_sampler(model, schedule, seeds, batch_size=batch_size, **options)
    batch_size = batch_size or min(len(seeds), DEFAULT_BATCH_SIZE)
    batches = deal(len(seeds), batch_size, group.world_size, group.rank)
    bar = tqdm(total=len(seeds), desc="sample", unit="img", disable=not (progress and group.is_main),
               dynamic_ncols=True)
    out, positions = [], []
    try:
        for batch in batches:
            if len(batch):
                chunk = [seeds[i] for i in batch]
                images = sample(chunk)
                if on_batch is not None:
                    on_batch(images, chunk)
                if keep:
                    out.append(images)
                    positions.extend(batch)
            if on_round is not None:
                on_round(images if len(batch) else None, batch)
            bar.update(group.sum_int(len(batch)))
    finally:
        bar.close()
    if not out:  # fewer seeds than ranks: this rank had nothing to do
        return positions, torch.zeros((0, *model_image_shape(model, None)))
    return positions, torch.cat(out)


def _in_seed_order(group: Group, rows: torch.Tensor, positions: list[int], total: int, *, to_all: bool):
    """Gather every rank's rows and put row k of the result at position k: (total, ...) CPU tensor on
    rank 0 (every rank with ``to_all``), None on the other ranks."""
    every_position = group.all_objects(positions)
    gathered = group.gather_rows(rows, [len(p) for p in every_position], to_all=to_all)
    if gathered is None:
        return None
    out = torch.empty((total, *gathered.shape[1:]), dtype=gathered.dtype)
    out[torch.tensor([p for ps in every_position for p in ps], dtype=torch.int64)] = gathered
    return out


# --------------------------------------------------------------------------------------------------
# 3. images -> files


def write_samples(images: torch.Tensor, out_dir, *, seeds=None, png_per_image: bool = False,
                  grid_scale: int | None = None) -> dict[str, Path]:
    """Write ``out_dir/grid.png``, ``out_dir/samples.npz`` and optionally ``out_dir/images/NNNNNN.png`` (the seed).

    images: float (N, C, H, W) in [-1, 1]. samples.npz holds ``arr_0``: uint8 (N, H, W, C), the layout of
    guided-diffusion's evaluator; it is written to a temporary file and renamed into place.
    grid_scale: nearest-neighbour upscaling of the grid (default: to about 32 pixels per image).
    Returns the paths written, by name ("grid", "npz", "images").
    """
    from .data import to_uint8_nhwc

    # (N, H, W, C) uint8, the same rounding as DDPMPipeline
    return _write_pixels(to_uint8_nhwc(images), out_dir, seeds=seeds, png_per_image=png_per_image,
                         grid_scale=grid_scale)


def _png_names(seeds) -> list[str]:
    return [f"{s:06d}" for s in seeds]  # EDM's {seed:06d}.png


def _write_pixels(pixels: np.ndarray, out_dir, *, seeds=None, png_per_image: bool = False,
                  grid_scale: int | None = None) -> dict[str, Path]:
    """:func:`write_samples` for images already in uint8 (N, H, W, C)."""
    from .data import save_grid, save_pngs

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def write_npz(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, arr_0=pixels)

    paths = {"npz": atomic_write(out_dir / "samples.npz", write_npz)}
    scale = grid_scale or max(1, 32 // pixels.shape[1])
    paths["grid"] = save_grid(pixels, out_dir / "grid.png", scale=scale)
    if png_per_image:
        names = _png_names(seeds) if seeds is not None else None
        save_pngs(pixels, out_dir / "images", names=names)
        paths["images"] = out_dir / "images"
    return paths


@dataclass
class SampleResult:
    """What :func:`sample_to_folder` did: files written, the settings used and how long it took
    (``seconds``: sampling; ``hook_seconds``: in ``on_batch``, e.g. FID features; ``extra``: what ``after``
    returned)."""

    paths: dict
    num_images: int
    meta: dict
    settings: dict
    seconds: float
    hook_seconds: float = 0.0
    extra: dict | None = None


def sample_to_folder(source, out_dir, seeds, *, steps=None, variance: str | None = None,
                     clip_x0: bool | None = None, reference: bool = False, batch_size: int | None = None,
                     png_per_image: bool = False, use_ema: bool = True, device=None,
                     progress: bool = False, solver=None, solver_options: dict | None = None,
                     on_batch=None, after=None) -> SampleResult:
    """Load ``source``, sample one image per seed and write them to ``out_dir`` (see the module docstring),
    with ``out_dir/run.json`` saying what made them.

    variance / clip_x0: None takes the source's defaults (fixed_large with clipping for ddpm-fast runs;
    a diffusers pipeline's scheduler settings). device: None = CUDA when available (``cuda:LOCAL_RANK``
    under torchrun). Under torchrun every rank samples its dealt share of the seeds; rank 0 writes
    samples.npz (seed order), grid.png and run.json, and with ``png_per_image`` each rank writes the
    PNGs of its own seeds. progress: a bar of images done across all ranks.
    solver: None takes the source's (DDPM for ddpm-fast runs; a diffusers pipeline's scheduler with its
    settings); solver_options: keyword arguments of ``solvers.solver_spec`` (order, solver_type,
    corrector, timestep_spacing...), with ``solver`` only. steps: None = all T for ddpm/ddim,
    DEFAULT_SOLVER_STEPS for the multistep solvers. run.json records the solver under "sampling".
    on_batch: ``f(images, batch_seeds)`` called on every rank for each of its batches as they come off
    the sampler (float32 (B, C, H, W) CPU images in [-1, 1]), e.g. FID features.
    after: ``f(group) -> dict`` called on every rank after sampling, inside the process group (so it can
    combine what on_batch gathered across ranks); rank 0's dict goes into run.json and SampleResult.extra.
    """
    if solver_options and solver is None:
        raise ValueError("solver options (order, type, corrector, spacing) need a solver: pass --solver too")
    spec = solver_spec(solver, **(solver_options or {})) if isinstance(solver, str) else None
    start = time.perf_counter()
    # loaded before joining: a bad source is one line from rank 0, not one per rank
    model, schedule, meta = load_model_source(source, use_ema=use_ema)
    with process_group(device) as group:
        device = group.device
        model = model.to(device)
        spec = spec or (solver if isinstance(solver, SolverSpec) else meta["solver"])
        if steps is None:
            steps = DEFAULT_SOLVER_STEPS if spec.multistep else schedule.num_timesteps
        default_clip = meta["clip_x0"] and not spec.multistep
        settings = {"steps": steps, "variance": variance or meta["variance"],
                    "clip_x0": default_clip if clip_x0 is None else bool(clip_x0),
                    "sampler": "reference" if reference else "FastSampler", "device": str(device),
                    "solver": spec.as_dict()}
        options = dict(steps=steps, variance=settings["variance"], clip_x0=settings["clip_x0"],
                       reference=reference, batch_size=batch_size, device=device, solver=spec)
        seeds = [int(s) for s in seeds]
        hook = {"seconds": 0.0}
        if on_batch is not None:
            def timed(images, chunk, inner=on_batch):
                t0 = time.perf_counter()
                inner(images, chunk)
                hook["seconds"] += time.perf_counter() - t0

            options["on_batch"] = timed
        paths, seconds = _sample_dealt_to_folder(model, schedule, seeds, out_dir, group=group,
                                                 png_per_image=png_per_image, progress=progress,
                                                 start=start, **options)
        extra = after(group) if after is not None else None
        if group.is_main:
            paths["run"] = write_run_record(out_dir, source=source, meta=meta, settings=settings, seeds=seeds,
                                            batch_size=batch_size, world_size=group.world_size,
                                            backend=group.backend, seconds=time.perf_counter() - start, extra=extra)
        group.barrier()  # no rank leaves before the folder is complete
        return SampleResult(paths, len(seeds), meta, settings, seconds - hook["seconds"], hook["seconds"], extra)


GRID_MAX_IMAGES = 1024  # grid.png shows the first images of a large run, not all 50,000


def _sample_dealt_to_folder(model, schedule, seeds, out_dir, *, group: Group, png_per_image: bool,
                            progress: bool, start: float, **options) -> tuple[dict, float]:
    """Sample and write as the batches come: memory holds one round of batches, whatever the number of seeds.

    Every rank samples its dealt batches and writes its own PNGs. After each round rank 0 receives the
    round's images as uint8 (a quarter of the floats' bytes) and puts them at their seeds' positions of a
    memory-mapped (N, H, W, C) array on disk; at the end that array becomes samples.npz (stored, not
    compressed, as np.savez writes it; via a temporary file renamed into place) and its first
    GRID_MAX_IMAGES images grid.png. Returns (paths, sampling seconds).
    """
    import tempfile

    from .data import save_grid, save_pngs, to_uint8_nhwc

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    channels, height, width = model_image_shape(model, None)
    shape = (len(seeds), height, width, channels)
    spool = None
    if group.is_main:
        handle, name = tempfile.mkstemp(dir=out_dir, prefix=".samples-", suffix=".npy")
        os.close(handle)  # open_memmap reopens it by name
        spool = Path(name)
    try:
        array = np.lib.format.open_memmap(spool, mode="w+", dtype=np.uint8, shape=shape) if spool else None

        def on_round(images, batch):
            pixels = to_uint8_nhwc(images) if images is not None else np.zeros((0, *shape[1:]), np.uint8)
            if png_per_image and len(batch):
                save_pngs(pixels, out_dir / "images", names=_png_names([seeds[i] for i in batch]))
            every_position = group.all_objects(list(batch))
            rows = group.gather_rows(torch.from_numpy(pixels), [len(p) for p in every_position], to_all=False)
            if rows is not None and rows.shape[0]:
                array[[p for ps in every_position for p in ps]] = rows.numpy()

        _generate_dealt(model, schedule, seeds, group=group, progress=progress, keep=False, on_round=on_round,
                        **options)
        seconds = time.perf_counter() - start
        paths = {"images": out_dir / "images"} if png_per_image else {}
        if spool is not None:
            array.flush()
            del array

            def write_npz(tmp: Path) -> None:  # arr_0.npy stored in a zip, as np.savez writes it
                # a fixed date and zip64 always: the same images give the same bytes, run after run
                entry = zipfile.ZipInfo("arr_0.npy", date_time=(1980, 1, 1, 0, 0, 0))
                with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as npz, \
                        npz.open(entry, "w", force_zip64=True) as dst, open(spool, "rb") as src:
                    shutil.copyfileobj(src, dst, 1 << 20)

            paths["npz"] = atomic_write(out_dir / "samples.npz", write_npz)
            first = np.load(spool, mmap_mode="r")[:GRID_MAX_IMAGES]
            paths["grid"] = save_grid(np.ascontiguousarray(first), out_dir / "grid.png",
                                      scale=max(1, 32 // height))
    finally:
        if spool is not None:
            spool.unlink(missing_ok=True)
    return paths, seconds


def write_run_record(out_dir, *, source, meta: dict, settings: dict, seeds, batch_size, world_size: int,
                     backend: str | None, seconds: float, extra: dict | None = None) -> Path:
    """Write ``out_dir/run.json`` (atomically): what made this folder of samples, so it can be made again.

    Holds the source (as given and as resolved), checkpoint step, EMA or raw weights, the seeds (as a
    --seeds string), the sampling settings (steps, variance, clip_x0, sampler, device and whatever else
    ``settings`` carries), batch size, world size and backend, software versions and the wall time.
    extra: more JSON-able entries (e.g. a quality figure computed from the samples) merged in last.
    """
    from . import __version__

    record = {
        "source": str(source), "model": {k: meta.get(k) for k in ("kind", "path", "step", "weights")},
        "checkpoint_step": meta.get("step"), "ema": meta.get("weights") == "ema",
        "seeds": format_seeds(seeds), "num_images": len(seeds), "sampling": dict(settings),
        "batch_size": batch_size, "world_size": world_size, "backend": backend,
        "versions": {"ddpm_fast": __version__, "torch": torch.__version__, "python": platform.python_version(),
                     "cuda": torch.version.cuda},
        "command": sys.argv, "wall_seconds": seconds, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    return write_json_atomic(Path(out_dir) / RUN_FILE, record)
