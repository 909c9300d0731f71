"""Start-up cost of the training data (issue 18): a folder of synthetic PNGs decoded by today's loader
(the single-process ``data.py`` of commit ef18338, unpacked with ``git archive``), by the first start
(parallel decode into the cache), by a second start (the cache found and memory-mapped), and the start-up
of a tiny dataset (the bundled digits); plus the parallel decode speed-up (prepare-data with 1 worker vs N).

Every measurement runs in a fresh Python process; "load s" is the loading call alone (imports excluded),
"process s" the whole process. Rounds interleave the variants, so a shared machine's load hits each alike.

    python benchmarks/data_startup.py --old /tmp/i18_old --images 20000 --size 128 --rounds 2 \
        --out benchmarks/results/data-startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from package_under_test import parse  # noqa: E402

_MEASURE = r"""
import json, os, resource, sys, time
t0 = time.perf_counter()
kind, folder, extra = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
if kind == "old":
    from ddpm_fast.data import load_dataset
    t1 = time.perf_counter(); ds = load_dataset(folder)
elif kind == "tiny_old" or kind == "tiny":
    from ddpm_fast.data import load_dataset
    t1 = time.perf_counter(); ds = load_dataset("digits")
elif kind == "cached":
    from ddpm_fast.data import cached_dataset
    t1 = time.perf_counter(); ds = cached_dataset(folder, progress=False, **extra)
elif kind == "prepare":
    from ddpm_fast.data import prepare_data, open_prepared
    t1 = time.perf_counter(); ds = open_prepared(prepare_data(folder, extra.pop("out"), progress=False, **extra))
t2 = time.perf_counter()
batch = ds.gather(list(range(0, len(ds), max(1, len(ds) // 64)))[:64])  # the first batch is served
t3 = time.perf_counter()
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"load_s": t2 - t1, "first_batch_s": t3 - t2, "import_s": t1 - t0,
                  "cpu_s": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
                  "n": len(ds), "shape": list(ds.shape), "maxrss_mb": me.ru_maxrss / 1024}))
"""


def make_pngs(folder: Path, n: int, size: int, workers: int) -> None:
    """n synthetic RGB PNGs (smooth gradients plus mild noise: they compress like photos, ~2-3x)."""
    if folder.is_dir() and len(list(folder.glob("*/*.png"))) == n:
        return
    shutil.rmtree(folder, ignore_errors=True)
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_make_chunk, [(folder, lo, min(n, lo + 500), size) for lo in range(0, n, 500)]))


def _make_chunk(args) -> None:
    import numpy as np
    from PIL import Image

    folder, lo, hi, size = args
    rng = np.random.default_rng(lo)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(lo, hi):
        a, b, c = rng.uniform(0, 255, 3)
        base = np.stack([a * xx + (255 - a) * yy, b * (1 - xx) * yy + c * xx, c * np.sin(6 * xx + i) ** 2], -1)
        img = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
        sub = folder / f"{i // 1000:05d}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(sub / f"img{i:08d}.png")


def run(kind: str, folder: Path, extra: dict, pythonpath: Path, env_extra: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _MEASURE, kind, str(folder), json.dumps(extra)], env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - t0
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    args = parse(p, "/tmp/i18_bench")

    folder = args.tmp / f"png{args.images}_{args.size}"
    t0 = time.perf_counter()
    make_pngs(folder, args.images, args.size, args.workers)
    print(f"{args.images} PNGs of {args.size}x{args.size} in {folder} "
          f"({sum(f.stat().st_size for f in folder.glob('*/*.png')) / 1e6:.0f} MB; made in {time.perf_counter() - t0:.0f} s)")
    rows = []
    for r in range(args.rounds):
        cache = args.tmp / f"cache-round{r}"
        shutil.rmtree(cache, ignore_errors=True)
        env = {"DDPM_FAST_DATA_CACHE": str(cache)}
        measured = {
            "today's loader (old data.py, one process)": run("old", folder, {}, args.old),
            "first start (decode in parallel, cache)": run("cached", folder, {"workers": args.workers}, REPO, env),
            "second start (cache found, memory-mapped)": run("cached", folder, {}, REPO, env),
            "tiny dataset (digits), today's loader": run("tiny_old", folder, {}, args.old),
            "tiny dataset (digits), new loader": run("tiny", folder, {}, REPO),
            "prepare-data, 1 worker": run("prepare", folder, {"out": str(args.tmp / "p1"), "workers": 1}, REPO),
            f"prepare-data, {args.workers} workers": run("prepare", folder,
                                                         {"out": str(args.tmp / "pN"), "workers": args.workers}, REPO),
        }
        for d in ("p1", "pN"):
            shutil.rmtree(args.tmp / d, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
        for name, m in measured.items():
            print(f"round {r}: {name:48s} load {m['load_s']:7.2f} s  process {m['process_s']:7.2f} s  "
                  f"cpu {m['cpu_s']:7.2f} s  first batch {m['first_batch_s'] * 1e3:6.1f} ms  rss {m['maxrss_mb']:7.0f} MB")
            rows.append({"round": r, "variant": name, **m})
    best = {}
    for row in rows:
        best[row["variant"]] = min(best.get(row["variant"], 1e9), row["load_s"])
    names = list(best)
    ratios = {"today / first start": best[names[0]] / best[names[1]],
              "today / second start": best[names[0]] / best[names[2]],
              "second start / tiny (new)": best[names[2]] / best[names[4]],
              "decode speed-up (1 worker / N workers)": best[names[5]] / best[names[6]]}
    for k, v in ratios.items():
        print(f"{k:45s} {v:8.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"images": args.images, "size": args.size, "workers": args.workers,
                                   "cpus": os.cpu_count(), "rows": rows, "best_load_s": best, "ratios": ratios,
                                   "note": "2-core machine shared with other sessions; best of the rounds"}, indent=1))
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
