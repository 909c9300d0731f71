"""The weights do not depend on how the data was fed (issue 18): 50 training steps (tiny preset, CPU) from
the prepared cache (memory-mapped), from memory (``--data-cache off``), with today's loader (the package
of commit ef18338), and a cache run killed with SIGKILL mid-epoch and resumed with ``--resume``; every
model and EMA tensor is compared bit for bit. Then an EDM-format zip (``00000/img00000000.png`` ... and
``dataset.json`` labels, as EDM's ``dataset_tool.py`` writes) is prepared and trained on.

    python benchmarks/data_weights.py --old /tmp/i18_old --out benchmarks/results/data-weights.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from package_under_test import parse  # noqa: E402
STEPS, BATCH, N_IMAGES = 50, 16, 232  # 14 batches per epoch: step 20 is mid-epoch 1, and so is the kill


def _cmd(data, out, *extra) -> list[str]:
    return [sys.executable, "-m", "ddpm_fast.cli", "train", "--data", str(data), "--out", str(out), "--preset",
            "tiny", "--steps", str(STEPS), "--batch-size", str(BATCH), "--save-every", "10", "--sample-every", "0",
            "--device", "cpu", "--no-progress", "--unet-channels", "16,32", *extra]


def _env(pythonpath: Path, cache: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(pythonpath), "OMP_NUM_THREADS": "1", "DDPM_FAST_DATA_CACHE": str(cache)}


def _weights(run: Path) -> dict:
    from safetensors.numpy import load_file

    step = sorted((run / "checkpoints").iterdir())[-1]
    return {f"{kind}/{k}": v for kind in ("model", "ema")
            for k, v in load_file(str(next(step.glob(f"{kind}*.safetensors")))).items()}


def _kill_mid_epoch(cmd, env, run: Path, at_step: int) -> int:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = run / "log.jsonl"
    while proc.poll() is None:
        if log.exists():
            steps = [json.loads(x).get("step", 0) for x in log.read_text().splitlines() if x.strip()]
            if steps and max(steps) >= at_step:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return max(steps)
        time.sleep(0.05)
    raise SystemExit(f"the run ended before step {at_step}: {proc.stderr.read()[-2000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args = parse(p, "/tmp/i18_weights")
    shutil.rmtree(args.tmp, ignore_errors=True)
    args.tmp.mkdir(parents=True)
    data = args.tmp / "images.npy"
    np.save(data, np.random.default_rng(0).integers(0, 256, (N_IMAGES, 16, 16, 3), dtype=np.uint8))
    cache = args.tmp / "cache"
    runs, times = {}, {}
    for name, pythonpath, extra in [("cache (memory-mapped)", REPO, ()), ("memory (--data-cache off)", REPO,
                                                                            ("--data-cache", "off")),
                                    ("today's loader (ef18338)", args.old, ())]:
        out = args.tmp / name.split()[0].replace("'", "")
        t0 = time.perf_counter()
        done = subprocess.run(_cmd(data, out, *extra), env=_env(pythonpath, cache),
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        runs[name], times[name] = out, time.perf_counter() - t0
    killed = args.tmp / "killed"
    cmd = _cmd(data, killed)
    killed_at = _kill_mid_epoch(cmd, _env(REPO, cache), killed, 25)  # the log has every 5th step
    done = subprocess.run(cmd + ["--resume"], env=_env(REPO, cache), capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    runs[f"cache, SIGKILL at step {killed_at}, resumed"] = killed
    weights = {name: _weights(run) for name, run in runs.items()}
    first = next(iter(weights.values()))
    equal = {name: all(np.array_equal(first[k], w[k]) for k in first) and w.keys() == first.keys()
             for name, w in weights.items()}
    resume_line = [json.loads(x) for x in (killed / "log.jsonl").read_text().splitlines() if "resume" in x]
    for name, ok in equal.items():
        print(f"{name:45s} {STEPS} steps: weights {'EQUAL' if ok else 'DIFFERENT'} to the cache run "
              f"({len(first)} tensors)")
    print(f"resumed from step {resume_line[-1]['step']} (checkpoints every 10; {N_IMAGES // BATCH} batches "
          f"per epoch, so mid-epoch)")

    # an EDM dataset_tool zip: images 00000/img00000000.png ..., labels in dataset.json
    zpath = args.tmp / "edm.zip"
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, 40)
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_STORED) as z:
        from PIL import Image

        names = []
        for i in range(40):
            name = f"{i // 1000:05d}/img{i:08d}.png"
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
            z.writestr(name, buf.getvalue())
            names.append(name)
        z.writestr("dataset.json", json.dumps({"labels": [[n, int(c)] for n, c in zip(names, labels)]}))
    done = subprocess.run([sys.executable, "-m", "ddpm_fast.cli", "prepare-data", str(zpath), "--out",
                           str(args.tmp / "edm-prepared"), "--no-progress"], env=_env(REPO, cache),
                          capture_output=True, text=True)
    print(done.stdout.strip() or done.stderr.strip())
    stored = np.load(args.tmp / "edm-prepared" / "labels.npy")
    edm = {"prepare_data_output": done.stdout.strip(), "labels_equal": bool(np.array_equal(stored, labels))}
    print(f"EDM zip labels read back equal to dataset.json: {edm['labels_equal']}")
    if args.out:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"steps": STEPS, "batch": BATCH, "images": N_IMAGES, "equal": equal,
                                   "run_seconds": times, "killed_at": killed_at,
                                   "resumed_from": resume_line[-1]["step"], "edm_zip": edm}, indent=1))
        os.replace(tmp, args.out)
    shutil.rmtree(args.tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
