"""``ddpm-fast demo``: the whole pipeline on data that ships with the install, in a few CPU minutes.

1. train the digits preset on scikit-learn's 1,797 bundled 8x8 digits into ``DIR/run`` (a normal run
   folder: ``ddpm-fast sample DIR/run ...`` works on it; running the demo again reuses or continues it);
2. sample digits from the EMA weights with FastSampler;
3. write ``DIR/samples.png`` (8x upscaled so a person sees the digits) and ``DIR/samples.npz``;
4. print the quality figure (``ddpm_fast.quality``: Frechet distance in a digit classifier's feature
   space, next to the held-out-real floor and a Gaussian baseline, plus the spread over the ten digits)
   and the timings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["run_demo", "DemoResult", "DEMO_SAMPLES", "DEMO_SAMPLE_STEPS"]

DEMO_SAMPLES = 400  # the quality figure needs a few hundred samples to be stable
DEMO_GRID = 100  # the first 100 go into samples.png (10 x 10)
DEMO_SAMPLE_STEPS = 250  # of T = 1000 (leading spacing): a quarter of the cost, FD still near the floor
DEMO_SCALE = 8


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


def run_demo(out_dir="ddpm_demo", *, steps: int | None = None, num_samples: int | None = None,
             sample_steps: int | None = None, preset: str = "digits", device=None, compile: bool = False,
             progress: bool = True, echo=print) -> DemoResult:
    """Train, sample, write ``samples.png`` and report (see the module docstring).

    steps: training steps (default: the digits preset's). num_samples: digits to sample (default 400;
    at least 2 for the quality figure). sample_steps: sampler steps (default 250 of T = 1000). preset:
    "digits" (or "tiny" for smoke tests). compile: torch.compile training and sampling on CUDA (off by
    default: compiling costs more than it saves on this small model). echo: where the report lines go.
    """
    from .data import save_grid, to_uint8_nhwc
    from .distributed import resolve_device
    from .generate import generate, load_model_source, write_samples
    from .quality import digits_quality_report, format_quality_report
    from .training import TrainConfig, train

    start = time.perf_counter()
    out_dir = Path(out_dir)
    run_dir = out_dir / "run"
    num_samples = DEMO_SAMPLES if num_samples is None else num_samples
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 (the quality figure needs a spread), got {num_samples}")
    sample_steps = DEMO_SAMPLE_STEPS if sample_steps is None else sample_steps
    device = resolve_device(device)

    # 1. train (resume=True: a second demo reuses the finished run, an interrupted one continues)
    echo(f"[1/3] training the {preset} preset on the bundled 8x8 digits into {run_dir} ({device})")
    config = TrainConfig(data="digits", out=str(run_dir), preset=preset, steps=steps, device=str(device),
                         compile=compile, progress=progress, resume=True, sample_every=0)
    run = train(config)
    if run.resumed_from is not None and run.resumed_from >= run.step:
        echo(f"      reused the finished run at {run_dir} (step {run.step}); delete it to train afresh")

    # 2. sample from the EMA weights
    echo(f"[2/3] sampling {num_samples} digits ({sample_steps} of T steps, EMA weights)")
    model, schedule, _ = load_model_source(run_dir, device=device)
    t0 = time.perf_counter()
    images = generate(model, schedule, range(num_samples), steps=min(sample_steps, schedule.num_timesteps),
                      variance="fixed_large", clip_x0=True, device=device,
                      sampler_options={"compile": bool(compile)})
    sample_seconds = time.perf_counter() - t0
    npz = write_samples(images, out_dir)["npz"]  # also grid.png with all samples
    samples_png = save_grid(to_uint8_nhwc(images[:DEMO_GRID]), out_dir / "samples.png", nrow=10,
                            scale=DEMO_SCALE, padding=4)

    # 3. quality and timings
    echo("[3/3] measuring quality")
    quality = digits_quality_report(images)
    total = time.perf_counter() - start
    echo("")
    echo(format_quality_report(quality))
    verdict = quality["fd_model"] < quality["fd_gaussian"]
    echo(f"the model {'beats' if verdict else 'does NOT beat'} the Gaussian baseline "
         f"({quality['fd_model']:.2f} vs {quality['fd_gaussian']:.2f}; floor {quality['fd_heldout_real']:.2f})")
    echo("")
    train_note = (f"{run.train_seconds:.1f} s for {run.step - (run.resumed_from or 0)} steps "
                  f"({run.images_per_second:,.0f} images/s)")
    where = str(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    echo(f"timings ({where}): train {train_note}; sample {sample_seconds:.1f} s "
         f"({num_samples / sample_seconds:,.1f} images/s, {sample_steps} steps); total {total:.1f} s")
    echo(f"wrote {samples_png} ({min(DEMO_GRID, num_samples)} digits, {DEMO_SCALE}x) and {npz}; "
         f"the run is at {run_dir} (try: ddpm-fast sample {run_dir} --out {out_dir / 'more'} --seeds 0-63)")
    return DemoResult(out_dir, run_dir, samples_png, npz, quality, run.train_seconds, run.images_per_second,
                      sample_seconds, total, run.step)
