"""Wall time and FD of whole ``ddpm-fast demo`` runs, as a new user runs them: one after another, each a fresh
process in its own empty folder, timed from outside (start-up and imports included).

    python benchmarks/demo_wall.py OUT.json --ddpm-fast VENV/bin/ddpm-fast --seeds 0,1,2 [--args "--full"]

Run it on an idle machine: the demo uses every core it finds, and another job halves its speed. Each run's
"where the time went" lines and the quality table's FD are kept, with the CPU's name, the torch version and
the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ddpm_fast.telemetry import cpu_model_name


def one_demo(exe: str, seed: int, extra: list[str], root: Path) -> dict:
    """Run ``exe demo --seed SEED --out root/seedS --no-progress EXTRA``; wall seconds, FD and the report."""
    out = root / f"seed{seed}"
    cmd = [exe, "demo", "--seed", str(seed), "--out", str(out), "--no-progress", *extra]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    found = re.search(r"samples \(this model\)\s+([0-9.]+)", proc.stdout)
    if found is None or "where the time went" not in proc.stdout:
        raise SystemExit(f"{shlex.join(cmd)} printed no quality table or time report: is it ddpm-fast demo?")
    fd = float(found.group(1))
    where = proc.stdout.split("where the time went", 1)[1].splitlines()
    return {"seed": seed, "wall_s": wall, "fd": fd, "command": shlex.join(cmd), "load_before": load_before,
            "load_after": os.getloadavg(), "where_the_time_went": ["where the time went" + where[0], *where[1:9]]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON file to write")
    parser.add_argument("--ddpm-fast", default="ddpm-fast", help="the ddpm-fast executable (of the venv to time)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--args", default="", help="extra demo arguments, e.g. '--full'")
    parser.add_argument("--label", default="", help="what is being timed (for the JSON)")
    parser.add_argument("--keep", help="run the demos in this (new) folder and keep their outputs")
    args = parser.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory(prefix="demo-wall-") as tmp:
        root = Path(args.keep or tmp)
        if args.keep and root.exists() and any(root.iterdir()):
            parser.error(f"--keep {root} is not empty: the demo would reuse the runs in it")
        for seed in [int(s) for s in args.seeds.split(",")]:
            run = one_demo(args.ddpm_fast, seed, shlex.split(args.args), root)
            print(f"seed {seed}: {run['wall_s']:.1f} s, FD {run['fd']:.2f}", flush=True)
            runs.append(run)
    walls, fds = [r["wall_s"] for r in runs], [r["fd"] for r in runs]
    exe = shutil.which(args.ddpm_fast)  # the python beside the executable is the environment being timed
    python = Path(exe).with_name("python") if exe else None
    version = (subprocess.run([str(python), "-c", "import torch; print(torch.__version__)"], capture_output=True,
                              text=True) if python and python.exists() else None)
    result = {"label": args.label, "args": args.args, "cpu": cpu_model_name(), "cores": os.cpu_count(),
              "torch": (version.stdout.strip() or None) if version else None, "python": sys.version.split()[0], "time": time.time(),
              "wall_s": {"mean": statistics.fmean(walls), "sd": statistics.stdev(walls) if len(walls) > 1 else None,
                         "min": min(walls), "max": max(walls)},
              "fd": {"mean": statistics.fmean(fds), "sd": statistics.stdev(fds) if len(fds) > 1 else None,
                     "min": min(fds), "max": max(fds)},
              "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.label or args.args or 'demo'}: wall {result['wall_s']['mean']:.1f} s "
          f"(min {min(walls):.1f}, max {max(walls):.1f}); FD {result['fd']['mean']:.2f}"
          + (f" ± {result['fd']['sd']:.2f}" if result['fd']['sd'] is not None else "")
          + f" ({', '.join(f'{x:.2f}' for x in fds)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
