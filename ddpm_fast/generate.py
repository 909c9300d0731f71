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
calls. It survives preemption: the seeds are cut into fixed chunks of ``batch_size``, the finished chunks'
images go to a memory-mapped spool in ``DIR/unfinished/`` after every round with a record of the chunks
done (``sample_progress.py``), SIGTERM/SIGINT stop after the round in flight, and ``resume=True`` samples
the missing chunks only: the same bytes as an uninterrupted run, at any world size. Under torchrun (or
any initialized process group) the missing chunks are dealt to the ranks round by round; since image i
depends on seed i alone (and each chunk is always sampled as one batch), the images are those of a single
process. :func:`generate` (no folder) deals batches as EDM's generate.py does
(:func:`ddpm_fast.distributed.deal`).
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
from .distributed import Group, current_group, deal, env_rank, process_group
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
    "kind", "path", "step", "weights", "weights_file" (the file the weights came from) and the sampling
    defaults "variance", "clip_x0" and "solver".
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
        from .diffusers_io import BIN_NAME, SAFETENSORS_NAME

        weights_file = next(unet_folder / n for n in (SAFETENSORS_NAME, BIN_NAME) if (unet_folder / n).is_file())
        meta = {"kind": "diffusers", "path": str(unet_folder), "step": None, "weights": "model",
                "weights_file": str(weights_file), **defaults}
    else:
        ckpt = load_checkpoint(path, with_state=False, weights=("ema",) if use_ema else ("model",))
        take_ema = use_ema and ckpt.ema is not None
        weights = ckpt.ema if take_ema else ckpt.model
        weights_file = ckpt.path if ckpt.path.is_file() else ckpt.path / (EMA_FILE if take_ema else MODEL_FILE)
        model = build_model(ckpt.config["unet"], weights, source=weights_file)
        try:
            schedule = NoiseSchedule.from_config(ckpt.config["schedule"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{ckpt.path} carries an invalid schedule config ({exc})") from None
        meta = {"kind": "file" if ckpt.path.is_file() else "checkpoint", "path": str(ckpt.path),
                "step": ckpt.step, "weights": "ema" if take_ema else "model", "weights_file": str(weights_file),
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
                    keep: bool = True, **options):
    """This rank's share of the seeds: (positions in ``seeds``, float32 (n, C, H, W) CPU images).

    Every rank loops over the same number of batches (:func:`deal`), so the per-batch count of images
    done (one small host-side all_reduce, for the progress bar) keeps the ranks in step.
    on_batch: ``f(images, batch_seeds)`` called on each of this rank's batches as it comes off the
    sampler (the hook FID features are taken from). keep: False drops each batch after ``on_batch``
    (the images returned are then empty): memory holds one batch whatever the number of seeds.
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
    """What :func:`sample_to_folder` did: files written, the settings used and how long it took.

    seconds: sampling in this session; hook_seconds: in ``after`` (e.g. FID features); extra: what
    ``after`` returned. stopped_by: the signal that stopped the run early ("SIGTERM", ...; None when it
    finished); seeds_done: images on disk now; resumed_from: images that were on disk when this session
    began (0 for a fresh run); already_finished: ``--resume`` found the folder finished and wrote nothing;
    progress_seconds: time rank 0 spent writing the spool and the progress record. samples_sha256:
    samples.npz's (rank 0), as run.json records it.
    """

    paths: dict
    num_images: int
    meta: dict
    settings: dict
    seconds: float
    hook_seconds: float = 0.0
    extra: dict | None = None
    stopped_by: str | None = None
    seeds_done: int = 0
    resumed_from: int = 0
    already_finished: bool = False
    progress_seconds: float = 0.0
    samples_sha256: str | None = None


def unclipped_start_note(spec: SolverSpec, schedule: NoiseSchedule) -> str | None:
    """A one-line note when DPM-Solver++ would start where alpha-bar is ~0 (the cosine schedule's last
    timesteps: its first x0 prediction multiplies eps's error by 1 / alpha), else None."""
    ab_last = float(schedule.alphas_cumprod[-1])
    if not spec.name.startswith("dpmpp") or spec.lambda_min_clipped != float("-inf") or ab_last >= 1e-6:
        return None
    return (f"ddpm-fast: note: this model's schedule ends at alpha-bar {ab_last:.1e}, where {spec.name} without "
            "--lambda-min-clipped gives broken images; the demo samples with --lambda-min-clipped -3 "
            "(docs/demo_study.md; diffusers suggests -5.1)")


def sample_to_folder(source, out_dir, seeds, *, steps=None, variance: str | None = None,
                     clip_x0: bool | None = None, reference: bool = False, batch_size: int | None = None,
                     png_per_image: bool = False, use_ema: bool = True, device=None,
                     progress: bool = False, solver=None, solver_options: dict | None = None,
                     after=None, resume: bool = False, stop_line=None) -> SampleResult:
    """Load ``source``, sample one image per seed and write them to ``out_dir`` (see the module docstring),
    with ``out_dir/run.json`` saying what made them. Survives preemption (``sample_progress.py``).

    variance / clip_x0: None takes the source's defaults (fixed_large with clipping for ddpm-fast runs;
    a diffusers pipeline's scheduler settings). device: None = CUDA when available (``cuda:LOCAL_RANK``
    under torchrun). solver: None takes the source's (DDPM for ddpm-fast runs; a diffusers pipeline's
    scheduler with its settings); solver_options: keyword arguments of ``solvers.solver_spec`` (order,
    solver_type, corrector, timestep_spacing...), with ``solver`` only. steps: None = all T for ddpm/ddim,
    DEFAULT_SOLVER_STEPS for the multistep solvers. batch_size: images per chunk (default min(N, 256);
    a resume takes the folder's).

    Progress is kept in ``out_dir/unfinished/`` after every round (one chunk per rank). SIGTERM or SIGINT
    ends the run after the round in flight (``stopped_by`` names the signal; a second signal exits at
    once). resume: continue such a folder with its missing chunks only; the final samples.npz, grid.png,
    PNGs and run.json (but for its "sessions" entry) are byte-identical to an uninterrupted run's, at any
    world size. A finished folder is left as it is (``already_finished``). Settings that would change the
    images, a foreign folder, an unwritable one or a disk too small are refused with a one-line error.

    Under torchrun every rank samples its chunks (and writes their PNGs with ``png_per_image``); rank 0
    writes the spool, samples.npz (seed order), grid.png and run.json. progress: a bar of images done
    out of all, across resumes.
    after: ``f(group, images) -> dict`` called on every rank once all images are done, inside the process
    group; ``images`` is the finished uint8 (N, H, W, C) array (seed order) on rank 0, None elsewhere.
    Rank 0's dict goes into run.json and SampleResult.extra (e.g. an FID of exactly these images).
    stop_line: ``f(result) -> str`` printed to stderr by rank 0 when a signal stops the run, while every
    rank is still in the group (a launcher that sees the other ranks leave may kill rank 0 right after).
    """
    from . import sample_progress as sp
    from .distributed import resolve_device
    from .integrity import file_sha256, recorded_sha256

    if solver_options and solver is None:
        raise ValueError("solver options (order, type, corrector, spacing, lambda_min_clipped) need a solver: pass "
                         "--solver too")
    out_dir = Path(out_dir)
    state = sp.inspect_folder(out_dir, RUN_FILE)
    if resume and state.kind == "finished":  # nothing to load, nothing to rewrite
        run = state.run
        return SampleResult({"npz": out_dir / "samples.npz", "run": out_dir / RUN_FILE}, run.get("num_images", 0),
                            run.get("model", {}), run.get("sampling", {}), 0.0, extra=run,
                            seeds_done=run.get("num_images", 0), resumed_from=run.get("num_images", 0),
                            already_finished=True, samples_sha256=run.get("samples_sha256"))
    if state.kind == "foreign":
        raise sp.SampleFolderError(f"--out {out_dir} was made by another command ({state.what}): sample into a "
                                   f"new or empty folder")
    if resume and state.kind == "new":
        raise sp.SampleFolderError(f"--resume: {out_dir} holds no unfinished sampling run: run without --resume "
                                   "to start one")
    if not resume and state.kind == "unfinished" and state.progress.seeds_done() > 0:  # 0 done: nothing to lose
        p = state.progress
        raise sp.SampleFolderError(f"{out_dir} holds an unfinished run ({p.seeds_done():,} of {p.num_images:,} "
                                   f"seeds done): add --resume to continue it, or delete {p.folder} to start over")
    spec = solver_spec(solver, **(solver_options or {})) if isinstance(solver, str) else None
    start = time.perf_counter()
    # loaded and checked before joining: a bad source or folder is one line from rank 0, not one per rank
    model, schedule, meta = load_model_source(source, use_ema=use_ema)
    spec = spec or (solver if isinstance(solver, SolverSpec) else meta["solver"])
    if steps is None:
        steps = DEFAULT_SOLVER_STEPS if spec.multistep else schedule.num_timesteps
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("no seeds given: pass at least one seed (e.g. --seeds 0-63)")
    if resume and batch_size is None:
        batch_size = state.progress.batch_size
    batch_size = batch_size or min(len(seeds), DEFAULT_BATCH_SIZE)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    device_type = resolve_device(device).type
    note = unclipped_start_note(spec, schedule)
    if note and env_rank() == 0:
        print(note, file=sys.stderr, flush=True)
    default_clip = meta["clip_x0"] and not spec.multistep
    settings = {"steps": steps, "variance": variance or meta["variance"],
                "clip_x0": default_clip if clip_x0 is None else bool(clip_x0),
                "sampler": "reference" if reference else "FastSampler", "device": device_type,
                "solver": spec.as_dict()}
    image_shape = list(model_image_shape(model, None))
    record = {"source": str(source), "model": {k: meta.get(k) for k in ("kind", "path", "step", "weights")},
              "weights_file": meta["weights_file"],
              "weights_sha256": recorded_sha256(meta["weights_file"]) or file_sha256(meta["weights_file"]),
              "weights": meta["weights"], "steps": steps, "solver": settings["solver"],
              "variance": settings["variance"], "clip_x0": settings["clip_x0"], "sampler": settings["sampler"],
              "seeds": format_seeds(seeds), "num_images": len(seeds), "image_shape": image_shape,
              "batch_size": batch_size, "device_type": device_type, "png_per_image": bool(png_per_image),
              "sampling": settings}
    if resume:
        sp.check_same_settings(state.progress.settings, record, out_dir)
        record = state.progress.settings  # run.json describes the run as it was started
    sp.check_writable(out_dir)
    c, h, w = image_shape
    sp.check_room(out_dir, image_shape, len(seeds), png_per_image,
                  reserved=len(seeds) * c * h * w if resume else 0)
    options = dict(steps=steps, variance=settings["variance"], clip_x0=settings["clip_x0"], reference=reference,
                   batch_size=batch_size, solver=spec)
    with process_group(device) as group:
        model = model.to(group.device)
        # the sampler checks its settings before the folder is touched
        sample = _image_sampler(model, schedule, seeds, device=group.device, **options)
        progress_record = None
        if group.is_main:
            progress_record = state.progress if resume else sp.Progress.start(out_dir, record)
        done = group.all_objects(sorted(progress_record.done) if progress_record else None)[0]
        run = _SamplingRun(sample, model, seeds, out_dir, group=group, done=set(done), record=record,
                           progress_record=progress_record, png_per_image=png_per_image, progress=progress,
                           batch_size=batch_size)
        run.sample_missing()
        seconds = time.perf_counter() - start
        result = SampleResult({"images": out_dir / "images"} if png_per_image else {}, len(seeds), meta,
                              settings, run.sampling_seconds, stopped_by=run.stopped_by,
                              seeds_done=run.seeds_done, resumed_from=run.resumed_from,
                              progress_seconds=run.progress_seconds)
        if run.stopped_by is not None:
            if stop_line is not None and group.is_main:
                print(stop_line(result), file=sys.stderr, flush=True)
            group.barrier()
            return result
        try:
            result.paths.update(run.finish(after, seconds))
        except OSError as exc:  # a full disk at the end: the spool and its record are still whole
            raise OSError(exc.errno, f"{exc.strerror or exc} while writing the final files (all {len(seeds):,} "
                                     f"images kept in {out_dir / 'unfinished'}; fix it and run again with "
                                     "--resume)", exc.filename) from None
        result.hook_seconds, result.extra, result.samples_sha256 = run.after_seconds, run.extra, run.samples_sha256
        group.barrier()  # no rank leaves before the folder is complete
        return result


GRID_MAX_IMAGES = 1024  # grid.png shows the first images of a large run, not all 50,000


class _SamplingRun:
    """One session of :func:`sample_to_folder` inside the process group: the rounds, then the final files.

    Round r gives rank j the missing chunk ``missing[r * world + j]`` (every rank loops over the same
    number of rounds, so the per-round collectives stay in step). After each round rank 0 receives the
    round's images as uint8 (a quarter of the floats' bytes), puts them at their seeds' rows of the
    spool and records the chunks done (``sample_progress.Progress``).
    """

    def __init__(self, sample, model, seeds, out_dir: Path, *, group: Group, record: dict, done: set,
                 progress_record, png_per_image: bool, progress: bool, batch_size: int):
        from .sample_progress import chunk_positions

        self.sample, self.model, self.seeds, self.out_dir, self.group = sample, model, seeds, out_dir, group
        self.record, self.done, self.store = record, done, progress_record
        self.png_per_image, self.progress, self.batch_size = png_per_image, progress, batch_size
        self.num_chunks = -(-len(seeds) // batch_size)
        self.chunk = lambda c: chunk_positions(len(seeds), batch_size, c)
        self.seeds_done = self.resumed_from = sum(len(self.chunk(c)) for c in done)
        self.stopped_by: str | None = None
        self.sampling_seconds = self.progress_seconds = self.after_seconds = 0.0
        self.extra: dict | None = None
        self.session = None
        self.samples_sha256: str | None = None

    def _save(self, **changes) -> None:
        """Rank 0: update this session's entry and rewrite the progress record (atomically)."""
        if self.store is None:
            return
        self.session.update(seeds_done=self.seeds_done, sampling_seconds=round(self.sampling_seconds, 3),
                            progress_write_seconds=round(self.progress_seconds, 4), **changes)
        self.store.write()

    def sample_missing(self) -> None:
        """Sample every missing chunk, flushing after each round; stop early on SIGTERM/SIGINT on any rank."""
        from tqdm.auto import tqdm

        from .data import save_pngs, to_uint8_nhwc
        from .preemption import StopSignals

        group = self.group
        missing = [c for c in range(self.num_chunks) if c not in self.done]
        rounds = -(-len(missing) // group.world_size)
        if self.store is not None:
            self.session = self.store.begin_session({
                "command": sys.argv, "world_size": group.world_size, "backend": group.backend,
                "device": str(group.device), "seeds_done": self.seeds_done})
            self.store.write()
        spool = self.store.open_spool() if self.store is not None else None
        bar = tqdm(total=len(self.seeds), initial=self.seeds_done, desc="sample", unit="img", dynamic_ncols=True,
                   disable=not (self.progress and group.is_main))
        stop = StopSignals(announce=group.is_main, finishing="finishing this round of samples, then saving the "
                           "progress", kept=f"{self.out_dir} resumes from its last saved round with --resume")
        try:
            with stop:
                for r in range(rounds):
                    if group.any(stop.requested):  # every rank stops after the same round
                        self.stopped_by = stop.signal_name or "another process's signal"
                        break
                    t0 = time.perf_counter()
                    # every rank knows every rank's chunk of this round: rank j takes missing[r * world + j]
                    every = []
                    for i in range(r * group.world_size, (r + 1) * group.world_size):
                        c = missing[i] if i < len(missing) else None
                        every.append((c, list(self.chunk(c)) if c is not None else []))
                    chunk, positions = every[group.rank]
                    pixels = np.zeros((0, *spool_shape(self.model)), np.uint8)
                    if positions:
                        chunk_seeds = [self.seeds[i] for i in positions]
                        pixels = to_uint8_nhwc(self.sample(chunk_seeds))
                        if self.png_per_image:  # before the gather: a chunk is recorded only once its PNGs exist
                            save_pngs(pixels, self.out_dir / "images", names=_png_names(chunk_seeds))
                    rows = group.gather_rows(torch.from_numpy(pixels), [len(p) for _, p in every], to_all=False)
                    self.sampling_seconds += time.perf_counter() - t0
                    finished = [c for c, _ in every if c is not None]
                    self.seeds_done += sum(len(p) for _, p in every)
                    if spool is not None:
                        t1 = time.perf_counter()
                        spool[[p for _, ps in every for p in ps]] = rows.numpy()
                        spool.flush()  # the rows reach the disk before the record names their chunks
                        self.store.done.update(finished)
                        self._save()
                        self.progress_seconds += time.perf_counter() - t1
                    self.done.update(finished)
                    bar.update(sum(len(p) for _, p in every))
        except OSError as exc:  # a full disk, a folder gone: the record still names what is on disk
            raise OSError(exc.errno, f"{exc.strerror or exc} while saving the progress ({self.seeds_done:,} of "
                                     f"{len(self.seeds):,} images kept in {self.out_dir}; fix it and run again "
                                     f"with --resume)", exc.filename) from None
        finally:
            bar.close()
            del spool
        if self.stopped_by is not None:
            self._save(ended=self.stopped_by)

    def finish(self, after, seconds: float) -> dict:
        """All chunks done: write samples.npz, grid.png and run.json from the spool, then remove it."""
        from .data import save_grid

        paths = {}
        group = self.group
        images = np.load(self.store.spool_path, mmap_mode="r") if self.store is not None else None
        if images is not None:
            paths["npz"] = _write_npz_from_spool(self.store.spool_path, self.out_dir / "samples.npz")
            height = images.shape[1]
            paths["grid"] = save_grid(np.ascontiguousarray(images[:GRID_MAX_IMAGES]), self.out_dir / "grid.png",
                                      scale=max(1, 32 // height))
        if after is not None:
            t0 = time.perf_counter()
            self.extra = after(group, images)
            self.after_seconds = time.perf_counter() - t0
        del images
        if self.store is not None:
            from .integrity import file_sha256

            self.session.update(ended="finished", seconds=round(seconds, 3))
            self._save()
            self.samples_sha256 = file_sha256(paths["npz"])
            paths["run"] = write_run_record(self.out_dir, self.record, self.samples_sha256, self.store.sessions,
                                            extra=self.extra)
            self.store.remove()  # last: a folder with run.json and no unfinished/ is finished
        return paths


def spool_shape(model) -> tuple[int, int, int]:
    """(H, W, C) of one image of ``model`` as stored in the spool and samples.npz."""
    c, h, w = model_image_shape(model, None)
    return h, w, c


def _write_npz_from_spool(spool: Path, path: Path) -> Path:
    """samples.npz from the spool: arr_0.npy stored (not compressed) in a zip, as np.savez writes it, via a
    temporary file renamed into place. A fixed date and zip64 always: the same images give the same bytes."""

    def write_npz(tmp: Path) -> None:
        entry = zipfile.ZipInfo("arr_0.npy", date_time=(1980, 1, 1, 0, 0, 0))
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as npz, \
                npz.open(entry, "w", force_zip64=True) as dst, open(spool, "rb") as src:
            shutil.copyfileobj(src, dst, 1 << 20)

    return atomic_write(path, write_npz)


def write_run_record(out_dir, record: dict, samples_sha256: str, sessions: list, *,
                     extra: dict | None = None) -> Path:
    """Write ``out_dir/run.json`` (atomically): what made this folder of samples, so it can be made again.

    record: the image-defining settings the run started with (``sample_progress``): the source (as given
    and as resolved) and its weights' sha256, EMA or raw weights, the seeds (as a --seeds string), the
    sampling settings, the batch size. samples_sha256: samples.npz's sha256, so an FID can name exactly the
    images it scored. Software versions are added. sessions: one entry per run of the command (times,
    world size, device, how it ended); it is the only part of run.json that an interrupted and resumed run
    writes differently from an uninterrupted one. extra: more JSON-able entries (e.g. an FID) merged in.
    """
    from . import __version__
    from .sample_progress import SAMPLES_FORMAT

    run = {
        "format": SAMPLES_FORMAT, "source": record["source"], "model": record["model"],
        "weights_file": record["weights_file"], "weights_sha256": record["weights_sha256"],
        "checkpoint_step": record["model"].get("step"), "ema": record["weights"] == "ema",
        "seeds": record["seeds"], "num_images": record["num_images"], "sampling": record["sampling"],
        "batch_size": record["batch_size"], "samples_sha256": samples_sha256,
        "versions": {"ddpm_fast": __version__, "torch": torch.__version__, "python": platform.python_version(),
                     "cuda": torch.version.cuda},
        "sessions": sessions, **(extra or {}),
    }
    return write_json_atomic(Path(out_dir) / RUN_FILE, run)
