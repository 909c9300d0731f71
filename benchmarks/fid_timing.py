"""Time ``ddpm-fast sample --fid``: sampling and Inception features separately (issue 11's device check).

    python benchmarks/fid_timing.py --num 10000 --out gpu_out/fid-timing      # on a GPU machine
    python benchmarks/fid_timing.py --num 8 --steps 2 --out /tmp/fid-timing     # a CPU smoke run

Everything is made here, nothing is downloaded: the CIFAR-10 U-Net (35.7M parameters) with random weights
saved as a diffusers folder, and, unless --inception-weights names the real file, torch-fidelity's Inception
with random weights (the timing does not depend on the weight values). The reference statistics come from
random uint8 images. Needs torch-fidelity (``pip install -e ".[fid]"`` with a matching torchvision).
Writes OUT/fid.json (from the command) and OUT/timing.json: images, steps, batch size, device, sampling
seconds, feature seconds, and images/s of each.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ddpm_fast.checkpoint import write_json_atomic

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=10000, help="images to sample (default 10000)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default all 1000)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--inception-weights", help="the real weights file (default: random weights made here)")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from fid_helpers import random_inception_weights
    from random_weights import randomise

    from ddpm_fast import UNet, UNetConfig, save_diffusers_unet
    from ddpm_fast.cli import main as cli
    from ddpm_fast.fid_stats import save_stats

    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    model = UNet(UNetConfig.cifar10())
    randomise(model, 0)
    save_diffusers_unet(model, work / "unet")
    weights = Path(args.inception_weights) if args.inception_weights else random_inception_weights(work / "inc.pth")
    # reference: random images' statistics would need an Inception pass; mu/sigma of the right shape suffice
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2048, 64))
    save_stats(work / "ref.npz", rng.random(2048), a @ a.T / 64 + 1e-3 * np.eye(2048))

    seeds = f"0-{args.num - 1}"
    argv = ["sample", str(work / "unet"), "--out", str(out / "samples"), "--seeds", seeds,
            "--batch-size", str(args.batch_size), "--fid", str(work / "ref.npz"), "--inception-weights", str(weights)]
    if args.steps:
        argv += ["--steps", str(args.steps)]
    start = time.perf_counter()
    status = cli(argv)
    wall = time.perf_counter() - start
    if status != 0:
        return status
    record = json.loads((out / "samples" / "fid.json").read_text())
    timing = {"images": args.num, "steps": record["steps"], "batch_size": args.batch_size, "device": record["device"],
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "torch": torch.__version__, "sample_seconds": record["sample_seconds"],
              "feature_seconds": record["feature_seconds"], "command_wall_seconds": wall,
              "sample_images_per_s": args.num / record["sample_seconds"],
              "feature_images_per_s": args.num / record["feature_seconds"],
              "inception_weights": "given" if args.inception_weights else "random (same cost)",
              "command": "ddpm-fast " + " ".join(argv)}
    write_json_atomic(out / "timing.json", timing)
    print(json.dumps(timing, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
