"""``ddpm-fast demo``: the whole pipeline on data that ships with the install, in about 70 s on 2 CPU cores.

1. train a digits U-Net on scikit-learn's 1,797 bundled 8x8 digits into ``DIR/run-RECIPE`` (a normal run
   folder: ``ddpm-fast sample DIR/run-quick ...`` works on it; running the demo again reuses or continues
   it) with the demo's recipe (:data:`RECIPES`: "quick" by default, "full" for the digits preset's
   longer one);
2. sample 400 digits from the EMA weights with FastSampler and the recipe's sampler (20 DPM-Solver++
   steps for "quick", 250 DDPM steps for "full");
3. write ``DIR/samples.png`` (8x upscaled so a person sees the digits) and ``DIR/samples.npz``;
4. print the quality figure (``ddpm_fast.quality``: Frechet distance in a digit classifier's feature
   space, next to the held-out-real floor and a Gaussian baseline, plus the spread over the ten digits)
   and where the time went (start-up, training, sampling, scoring, files).

The quick recipe was picked by ``benchmarks/demo_study.py`` (docs/demo_study.md): the FD of the demo's 400
samples over several training seeds against the recipe's cost, for candidates over batch size, learning
rate and its decay, EMA, model width, noise schedule, loss weighting and sampler, then confirmed on
training seeds the pick was not made on.
"""

from __future__ import annotations

import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["run_demo", "DemoResult", "DemoRecipe", "RECIPES", "DEFAULT_RECIPE", "DEMO_SAMPLES"]

DEMO_SAMPLES = 400  # the quality figure needs a few hundred samples to be stable
DEMO_GRID = 100  # the first 100 go into samples.png (10 x 10)
DEMO_SCALE = 8


@dataclass(frozen=True)
class DemoRecipe:
    """How the demo trains and samples.

    train: TrainConfig fields over the digits preset (applied to the digits preset only; the hidden
    "tiny" preset for tests keeps its own). solver / solver_options / sample_steps / clip_x0: the sampler
    (``solvers.solver_spec``'s name and options, generate()'s steps and clipping). about: one line for the
    report.
    """

    name: str
    train: dict = field(default_factory=dict)
    solver: str = "ddpm"
    solver_options: dict = field(default_factory=dict)
    sample_steps: int = 250
    clip_x0: bool = True
    about: str = ""

    def sample_flags(self, steps: int | None = None) -> str:
        """The ``ddpm-fast sample`` options that sample as this recipe does (with ``steps`` sampler steps:
        None = the recipe's)."""
        flags = f"--solver {self.solver} --steps {self.sample_steps if steps is None else steps}"
        if "lambda_min_clipped" in self.solver_options:
            flags += f" --lambda-min-clipped {self.solver_options['lambda_min_clipped']:g}"
        return flags  # the clipping is the sample command's default for each solver, as here


RECIPES: dict[str, DemoRecipe] = {
    # picked by benchmarks/demo_study.py (docs/demo_study.md) as the recipe whose demo fits 90 s on 2 cores
    # with the best FD: 9.42 +- 1.13 over training seeds 0-8 (picked on seeds 0-2, confirmed on 3-8) against
    # the full recipe's 10.00 +- 1.96 on the same seeds. Per CPU second the narrower U-Net beat the preset's
    # (32, 64, 64), batch 64 beat 32 and 128, the cosine noise schedule beat the linear one; a doubled lr,
    # min-SNR-5 loss weighting, a cosine lr decay and longer EMAs did not pay. DPM-Solver++ needs
    # lambda_min_clipped on this schedule (unclipped FD ~176); -3 was best of -2 .. -5.1 on three weights.
    "quick": DemoRecipe("quick", train=dict(batch_size=64, steps=1500, schedule="cosine", save_every=500,
                                            unet={"block_out_channels": [24, 48, 48]}),
                        solver="dpmpp-2m", solver_options={"lambda_min_clipped": -3.0}, sample_steps=20,
                        clip_x0=False,
                        about="a 24-48-48 U-Net, 1,500 steps at batch 64, cosine noise schedule; 20 "
                              "DPM-Solver++ steps with lambda_min_clipped -3"),
    # the digits preset as it is (1,500 steps at batch 128, linear schedule) and 250 of the 1,000 DDPM steps
    "full": DemoRecipe("full", train={}, solver="ddpm", sample_steps=250, clip_x0=True,
                       about="the digits preset, 1,500 steps at batch 128; 250 of the 1,000 DDPM steps"),
}
DEFAULT_RECIPE = "quick"


@dataclass
class DemoResult:
    """What the demo produced: paths, the quality report (a dict) and timings in seconds."""

    out_dir: Path
    run_dir: Path
    samples_png: Path
    samples_npz: Path
    quality: dict
    train_seconds: float
    train_images_per_second: float
    sample_seconds: float
    total_seconds: float
    trained_steps: int
    recipe: str = DEFAULT_RECIPE
    timings: dict = field(default_factory=dict)  # seconds by stage: startup, train, sample, score, files, total


def process_age_seconds() -> float | None:
    """Seconds since this process started (Linux: /proc), or None where that cannot be read."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def run_demo(out_dir="ddpm_demo", *, recipe: str = DEFAULT_RECIPE, steps: int | None = None,
             num_samples: int | None = None, sample_steps: int | None = None, preset: str = "digits",
             seed: int = 0, device=None, compile: bool = False, progress: bool = True, echo=print) -> DemoResult:
    """Train, sample, write ``samples.png`` and report (see the module docstring).

    recipe: "quick" (the default: about 70 s on 2 CPU cores) or "full" (the digits preset with 250 DDPM
    steps, about 2.5 minutes; see :data:`RECIPES`, docs/demo_study.md and the README's measured figures).
    steps: training steps (default: the recipe's). num_samples: digits to sample (default 400; at least 2
    for the quality figure). sample_steps: sampler steps (default: the recipe's). preset: "digits" (or
    "tiny" for smoke tests). seed: the training seed (the samples are always seeds 0..num_samples-1).
    compile: torch.compile training and sampling on CUDA (off by default: compiling costs more than it
    saves on this small model). echo: where the report lines go.
    """
    startup = process_age_seconds()
    from .data import save_grid, to_uint8_nhwc
    from .distributed import resolve_device
    from .generate import generate, load_model_source, write_samples
    from .quality import digits_quality_report, format_quality_report
    from .solvers import solver_spec
    from .training import TrainConfig, train

    start = time.perf_counter()
    if recipe not in RECIPES:
        raise ValueError(f"unknown demo recipe {recipe!r}: use one of {', '.join(RECIPES)}")
    spec = RECIPES[recipe]
    out_dir = Path(out_dir)
    run_dir = out_dir / f"run-{recipe}"  # one run folder per recipe: a demo never resumes another recipe's run
    num_samples = DEMO_SAMPLES if num_samples is None else num_samples
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 (the quality figure needs a spread), got {num_samples}")
    sample_steps = spec.sample_steps if sample_steps is None else sample_steps
    device = resolve_device(device)

    # 1. train (resume=True: a second demo reuses the finished run, an interrupted one continues)
    fields = dict(spec.train) if preset == "digits" else {}
    if steps is not None:
        fields["steps"] = steps
    echo(f"[1/3] training the {preset} preset ({recipe} recipe) on the bundled 8x8 digits into {run_dir} ({device})")
    config = TrainConfig(**{**dict(data="digits", out=str(run_dir), preset=preset, seed=seed, device=str(device),
                                   compile=compile, progress=progress, resume=True, sample_every=0), **fields})
    t0 = time.perf_counter()
    run = train(config)
    train_wall = time.perf_counter() - t0
    if run.resumed_from is not None and run.resumed_from >= run.step:
        echo(f"      reused the finished run at {run_dir} (step {run.step}); delete it to train afresh")

    # 2. sample from the EMA weights
    what = f"{sample_steps} {spec.solver} steps" if spec.solver != "ddpm" else f"{sample_steps} of T DDPM steps"
    echo(f"[2/3] sampling {num_samples} digits ({what}, EMA weights)")
    model, schedule, _ = load_model_source(run_dir, device=device)
    t0 = time.perf_counter()
    images = generate(model, schedule, range(num_samples), steps=min(sample_steps, schedule.num_timesteps),
                      solver=solver_spec(spec.solver, **spec.solver_options), variance="fixed_large",
                      clip_x0=spec.clip_x0, device=device,
                      sampler_options={"compile": bool(compile)})
    sample_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    npz = write_samples(images, out_dir)["npz"]  # also grid.png with all samples
    samples_png = save_grid(to_uint8_nhwc(images[:DEMO_GRID]), out_dir / "samples.png", nrow=10,
                            scale=DEMO_SCALE, padding=4)
    files_seconds = time.perf_counter() - t0

    # 3. quality and timings
    echo("[3/3] measuring quality")
    t0 = time.perf_counter()
    quality = digits_quality_report(images)
    score_seconds = time.perf_counter() - t0
    total = time.perf_counter() - start + (startup or 0.0)
    echo("")
    echo(format_quality_report(quality))
    verdict = quality["fd_model"] < quality["fd_gaussian"]
    echo(f"the model {'beats' if verdict else 'does NOT beat'} the Gaussian baseline "
         f"({quality['fd_model']:.2f} vs {quality['fd_gaussian']:.2f}; floor {quality['fd_heldout_real']:.2f})")
    echo("")
    trained = run.step - (run.resumed_from or 0)
    setup = train_wall - run.train_seconds  # loading the digits, building the model, checkpoints
    timings = {"startup": startup, "train": run.train_seconds, "train_setup": setup, "sample": sample_seconds,
               "files": files_seconds, "score": score_seconds, "total": total}
    where = str(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    echo(f"where the time went ({where}; recipe {recipe}: {spec.about}):")
    if startup is not None:
        echo(f"  start-up (python, torch import)   {startup:6.1f} s")
    echo(f"  training                          {run.train_seconds:6.1f} s   {trained} steps, "
         f"{run.images_per_second:,.0f} images/s")
    echo(f"  data, model set-up, checkpoints   {setup:6.1f} s")
    echo(f"  sampling                          {sample_seconds:6.1f} s   {num_samples / sample_seconds:,.1f} images/s, "
         f"{sample_steps} steps")
    echo(f"  scoring (classifier + features)   {score_seconds:6.1f} s")
    echo(f"  writing files                     {files_seconds:6.1f} s")
    echo(f"  total                             {total:6.1f} s" + ("" if startup is not None else " (after start-up)"))
    echo(f"wrote {samples_png} ({min(DEMO_GRID, num_samples)} digits, {DEMO_SCALE}x) and {npz}; "
         f"the run is at {run_dir} (try: ddpm-fast sample {shlex.quote(str(run_dir))} --out "
         f"{shlex.quote(str(out_dir / 'more'))} --seeds 0-63 {spec.sample_flags(sample_steps)})")
    return DemoResult(out_dir, run_dir, samples_png, npz, quality, run.train_seconds, run.images_per_second,
                      sample_seconds, total, run.step, recipe, timings)
