"""Memory of two training processes on one machine (issue 18): torchrun with 2 gloo processes on a uint8
``.npy`` of at least 2 GB, today's loader (commit ef18338: every process decodes the whole file into its
own memory) against the prepared cache (memory-mapped: the processes share the page cache).

The sum of the processes' proportional set sizes (``Pss`` in ``/proc/PID/smaps_rollup``: a page shared by
k processes counts 1/k to each) is sampled every 0.1 s; the peak is reported. Two runs per loader:

- ``train``: ``ddpm-fast train`` itself (tiny model, a few steps): what a user sees, start-up included;
- ``epoch``: each process builds the dataset as train does, joins the gloo group and then reads every
  image once (a full epoch at world size 1, i.e. every page, as a long run does over its epochs); the
  sum is taken after both have finished reading.

    python benchmarks/data_pss.py --old /tmp/i18_old --images 44000 --out benchmarks/results/data-pss.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from package_under_test import parse  # noqa: E402

_EPOCH_WORKER = r"""
import os, sys, time
import torch, torch.distributed as dist
torch.set_num_threads(1)
variant, data, flag = sys.argv[1], sys.argv[2], sys.argv[3]
if variant == "cache":
    from ddpm_fast.training import TrainConfig, training_dataset
    ds = training_dataset(TrainConfig(data=data, preset="tiny", device="cpu", progress=False).resolved())
else:
    from ddpm_fast.data import load_dataset
    ds = load_dataset(data)
dist.init_process_group("gloo")
from ddpm_fast.data import BatchStream
stream = BatchStream(ds, 64, 0)
for _ in range(len(ds) // 64):
    next(stream)
dist.barrier()
if dist.get_rank() == 0:
    open(flag, "w").close()
while os.path.exists(flag):
    time.sleep(0.05)
dist.destroy_process_group()
"""


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _monitor(proc: subprocess.Popen, flag: Path | None) -> dict:
    peak, at_flag, samples = 0, None, []
    stop = threading.Event()

    def sample():
        nonlocal peak, at_flag
        while not stop.is_set():
            workers = _children(proc.pid)
            total = sum(_pss_kb(w) for w in workers)
            if len(workers) == 2:
                peak = max(peak, total)
                samples.append(total)
                if flag is not None and flag.exists() and at_flag is None:
                    time.sleep(0.3)
                    at_flag = sum(_pss_kb(w) for w in _children(proc.pid))
                    flag.unlink()
            time.sleep(0.1)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    proc.wait()
    stop.set()
    t.join()
    return {"peak_sum_pss_gb": peak / 1e6 * 1.024, "after_epoch_sum_pss_gb": None if at_flag is None
            else at_flag / 1e6 * 1.024, "returncode": proc.returncode}


def _torchrun(args: list[str], pythonpath: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=44_000)
    p.add_argument("--size", type=int, default=128)
    args = parse(p, "/tmp/i18_pss")
    sys.path.insert(0, str(REPO))
    args.tmp.mkdir(parents=True, exist_ok=True)
    npy = args.tmp / "big.npy"
    shape = (args.images, args.size, args.size, 3)
    if not npy.exists() or np.load(npy, mmap_mode="r").shape != shape:
        arr = np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=shape)
        rng = np.random.default_rng(0)
        for lo in range(0, args.images, 2000):
            arr[lo:lo + 2000] = rng.integers(0, 256, arr[lo:lo + 2000].shape, dtype=np.uint8)
        arr.flush()
        del arr
    size_gb = npy.stat().st_size / 1e9
    cache = args.tmp / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    from ddpm_fast.data import cached_dataset

    t0 = time.perf_counter()
    prepared = cached_dataset(npy, cache_root=cache, progress=False)
    prepare_s = time.perf_counter() - t0
    cache_gb = Path(prepared.mapped).stat().st_size / 1e9
    print(f"{npy}: {size_gb:.2f} GB; prepared once into {prepared.mapped} ({cache_gb:.2f} GB) in {prepare_s:.1f} s")
    del prepared
    results = {"npy_gb": size_gb, "cache_gb": cache_gb, "prepare_s": prepare_s, "runs": {}}
    for variant, pythonpath in (("cache", REPO), ("today", args.old)):
        env = {**os.environ, "PYTHONPATH": str(pythonpath), "OMP_NUM_THREADS": "1", "DDPM_FAST_DATA_CACHE": str(cache)}
        run = args.tmp / f"run-{variant}"
        shutil.rmtree(run, ignore_errors=True)
        train = _torchrun(["-m", "ddpm_fast.cli", "train", "--data", str(npy), "--out", str(run), "--preset", "tiny",
                           "--steps", "4", "--batch-size", "4", "--save-every", "0", "--sample-every", "0",
                           "--device", "cpu", "--no-progress", "--unet-channels", "8,16"], pythonpath, cache)
        t0 = time.perf_counter()
        m_train = _monitor(subprocess.Popen(train, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
                           None)
        m_train["seconds"] = time.perf_counter() - t0
        flag = args.tmp / f"flag-{variant}"
        flag.unlink(missing_ok=True)
        script = args.tmp / "epoch_worker.py"
        script.write_text(_EPOCH_WORKER)
        t0 = time.perf_counter()
        m_epoch = _monitor(subprocess.Popen(_torchrun([str(script), variant, str(npy), str(flag)], pythonpath, cache),
                                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), flag)
        m_epoch["seconds"] = time.perf_counter() - t0
        results["runs"][variant] = {"train": m_train, "epoch": m_epoch}
        for what, m in (("train (4 steps)", m_train), ("read every image", m_epoch)):
            after = m["after_epoch_sum_pss_gb"]
            print(f"{variant:6s} {what:17s} peak sum Pss {m['peak_sum_pss_gb']:6.2f} GB "
                  f"({m['peak_sum_pss_gb'] / cache_gb:4.2f}x the cache)"
                  + (f", after the epoch {after:6.2f} GB ({after / cache_gb:4.2f}x)" if after else "")
                  + f"; {m['seconds']:.0f} s, exit {m['returncode']}", flush=True)
        shutil.rmtree(run, ignore_errors=True)
    if args.out:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
