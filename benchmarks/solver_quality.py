"""Few-step solvers against 1000-step DDPM on the bundled digits: quality (digits Frechet distance) and CPU time.

    python benchmarks/solver_quality.py RUN_FOLDER --out docs/solver_quality

RUN_FOLDER is a digits run (``ddpm-fast train --data digits`` or ``ddpm-fast demo``'s DIR/run); its EMA
weights sample N digits (seeds 0..N-1, the same x_T for every sampler) with DDPM at 1000 steps and with
each solver at 5, 10, 20 and 50 steps; ``ddpm_fast.quality.digits_quality_report`` scores each set. Writes
OUT.json (every figure and the settings), OUT.md (the table) and OUT.png (the plot).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from ddpm_fast.checkpoint import atomic_write
from ddpm_fast.generate import load_model_source
from ddpm_fast.quality import digits_quality_report
from ddpm_fast.sampler import FastSampler

SOLVERS = ("ddpm", "ddim", "dpmpp-2m", "dpmpp-3m", "dpmpp-2m-sde", "unipc")
STEPS = (5, 10, 20, 50)
COLOURS = {"ddpm": (120, 120, 120), "ddim": (31, 119, 180), "dpmpp-2m": (255, 127, 14), "dpmpp-3m": (44, 160, 44),
           "dpmpp-2m-sde": (214, 39, 40), "unipc": (148, 103, 189)}


def measure(model, schedule, solver: str, steps: int, seeds: list[int], batch_size: int) -> dict:
    """Sample one digit per seed with ``solver`` at ``steps`` steps; FD and seconds per image."""
    clip = solver in ("ddpm", "ddim")  # ddpm-fast runs' default; the multistep schedulers do not clip
    sampler = FastSampler(model, schedule, solver=solver, timesteps=steps, clip_x0=clip, device="cpu")
    sampler.sample(seeds=seeds[:2], batch_size=2)  # warm-up: buffers, first-call costs
    start = time.perf_counter()
    images = sampler.sample(seeds=seeds, batch_size=batch_size)
    seconds = time.perf_counter() - start
    report = digits_quality_report(images)
    return {"solver": solver, "steps": steps, "fd": report["fd_model"], "seconds_per_image": seconds / len(seeds),
            "fd_heldout_real": report["fd_heldout_real"], "settings": sampler.settings}


def plot(rows: list[dict], baseline: dict, path: Path) -> None:
    """FD against steps (log axis), one line per solver, the 1000-step DDPM figure and its +10 % band."""
    from PIL import Image, ImageDraw

    W, H, left, right, top, bottom = 900, 560, 80, 200, 40, 70
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    import math

    fds = [r["fd"] for r in rows if r["solver"] != "ddpm"] + [baseline["fd"] * 1.1]
    y_max = min(max(fds) * 1.05, max(4 * baseline["fd"], baseline["fd"] + 10))
    y_min = 0.0

    def x_of(steps):
        lo, hi = math.log(STEPS[0]), math.log(STEPS[-1])
        return left + (math.log(steps) - lo) / (hi - lo) * (W - left - right)

    def y_of(fd):
        fd = min(fd, y_max)
        return top + (1 - (fd - y_min) / (y_max - y_min)) * (H - top - bottom)

    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for s in STEPS:
        d.line([x_of(s), H - bottom, x_of(s), H - bottom + 5], fill="black")
        d.text((x_of(s) - 6, H - bottom + 8), str(s), fill="black")
    for k in range(6):
        v = y_min + k * (y_max - y_min) / 5
        d.line([left - 5, y_of(v), left, y_of(v)], fill="black")
        d.text((left - 45, y_of(v) - 6), f"{v:.1f}", fill="black")
    d.text((left + 180, H - 30), "sampling steps (log scale)", fill="black")
    d.text((10, top - 30), "digits Frechet distance (lower is better); values above the top are drawn at the top",
           fill="black")
    band_top, base = y_of(baseline["fd"] * 1.1), y_of(baseline["fd"])
    d.rectangle([left + 1, band_top, W - right - 1, base], fill=(230, 230, 230))
    d.line([left, base, W - right, base], fill="black", width=2)
    legend_y = top
    d.text((W - right + 10, legend_y), f"DDPM 1000 steps: {baseline['fd']:.2f}", fill="black")
    d.text((W - right + 10, legend_y + 14), "(grey: within +10 %)", fill="black")
    for i, solver in enumerate(SOLVERS):
        pts = [(x_of(r["steps"]), y_of(r["fd"])) for r in rows if r["solver"] == solver]
        if not pts:
            continue
        colour = COLOURS[solver]
        d.line(pts, fill=colour, width=3)
        for x, y in pts:
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        ly = legend_y + 40 + 18 * i
        d.line([W - right + 10, ly + 6, W - right + 30, ly + 6], fill=colour, width=3)
        d.text((W - right + 35, ly), solver, fill="black")
    img.save(path)


def markdown(rows: list[dict], baseline: dict, meta: dict) -> str:
    lines = [f"Digits Frechet distance (lower is better) of {meta['num_samples']} samples, seeds 0..{meta['num_samples'] - 1}; "
             f"1000-step DDPM: **{baseline['fd']:.2f}** ({1e3 * baseline['seconds_per_image']:.1f} ms/image); "
             f"held-out real digits (the floor): {baseline['fd_heldout_real']:.2f}.", "",
             "| solver | " + " | ".join(f"{s} steps" for s in STEPS) + " |", "|---|" + "---|" * len(STEPS)]
    for solver in SOLVERS:
        cells = []
        for s in STEPS:
            r = next((r for r in rows if r["solver"] == solver and r["steps"] == s), None)
            cells.append("—" if r is None else f"{r['fd']:.2f} ({1e3 * r['seconds_per_image']:.2f} ms)")
        lines.append(f"| {solver} | " + " | ".join(cells) + " |")
    lines += ["", "Each cell: Frechet distance (CPU milliseconds per image, " + meta["timing"] + ")."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a digits run folder or checkpoint")
    parser.add_argument("--out", default="docs/solver_quality", help="output path without suffix")
    parser.add_argument("--num-samples", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, schedule, meta = load_model_source(args.run)
    seeds = list(range(args.num_samples))
    baseline = measure(model, schedule, "ddpm", schedule.num_timesteps, seeds, args.batch_size)
    print(f"ddpm 1000: FD {baseline['fd']:.2f}, {1e3 * baseline['seconds_per_image']:.1f} ms/image", flush=True)
    rows = []
    for solver in SOLVERS:
        for steps in STEPS:
            rows.append(measure(model, schedule, solver, steps, seeds, args.batch_size))
            print(f"{solver} {steps}: FD {rows[-1]['fd']:.2f}, {1e3 * rows[-1]['seconds_per_image']:.2f} ms/image",
                  flush=True)
    info = {"num_samples": args.num_samples, "run": str(meta["path"]), "step": meta.get("step"),
            "weights": meta["weights"], "threads": args.threads, "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "timing": f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch_size}, wall clock on a "
                      "shared CPU: compare within the table"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"meta": info, "ddpm_1000": baseline, "rows": rows}, indent=1, default=str) + "\n"
    atomic_write(out.with_suffix(".json"), lambda tmp: tmp.write_text(text))
    table = markdown(rows, baseline, info) + "\n"
    atomic_write(out.with_suffix(".md"), lambda tmp: tmp.write_text(table))
    plot(rows, baseline, out.with_suffix(".png"))
    best = min((r for r in rows if r["steps"] == 20), key=lambda r: r["fd"])
    print(f"best at 20 steps: {best['solver']} FD {best['fd']:.2f} = {100 * (best['fd'] / baseline['fd'] - 1):+.1f} % "
          f"vs 1000-step DDPM {baseline['fd']:.2f}")
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
