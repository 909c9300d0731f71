"""Issue 17's must-show: ``ddpm-fast sample`` stopped and resumed gives the bytes of an uninterrupted run.

On a trained digits run (``ddpm-fast train --data digits --out RUN``), N seeds at all 1000 steps:

* A: one uninterrupted process;
* B: one process SIGTERMed once about 30 % of the seeds are on disk, resumed by one process and kill -9'd
  at about 60 %, resumed by ``torchrun`` (``python -m torch.distributed.run``) with 2 gloo processes;

then samples.npz's sha256 (and grid.png, run.json but for its "sessions") of A and B compared, the time
the progress writes took as a fraction of sampling (from run.json's sessions), a checkpoint with 8 flipped
bits in ema.safetensors' payload sampled (must be refused with one line), and the time the sha256 check
adds to loading the CIFAR-10 U-Net (random weights, saved by ``save_checkpoint``).

Usage: ``python benchmarks/sample_resume.py RUN OUT.json [--seeds 0-1999] [--batch-size 100]``. A and B run
side by side, one torch thread each (OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _sha(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _sample_cmd(run, out, args, nproc=1) -> list[str]:
    cli = ["-m", "ddpm_fast.cli", "sample", str(run), "--out", str(out), "--seeds", args.seeds,
           "--batch-size", str(args.batch_size), "--device", "cpu", "--no-progress"]
    cli += ["--steps", str(args.steps)] if args.steps else []
    if nproc == 1:
        return [sys.executable, *cli]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *cli]


def _done(out: Path) -> int:
    try:
        return json.loads((out / "unfinished" / "progress.json").read_text())["seeds_done"]
    except (OSError, ValueError, KeyError):
        return 0


def _until(proc, out: Path, seeds: int, sig, log: list, what: str) -> int:
    """Wait until ``seeds`` images are on disk, then send ``sig``; returns the exit status."""
    while proc.poll() is None:
        if _done(out) >= seeds:
            at = _done(out)
            proc.send_signal(sig)
            log.append({"event": what, "seeds_done_when_sent": at})
            break
        time.sleep(0.2)
    _, err = proc.communicate()
    log.append({"event": f"{what} exit", "status": proc.returncode, "seeds_done": _done(out),
                "stderr_tail": err.strip().splitlines()[-2:]})
    return proc.returncode


def _run_json_without_sessions(path: Path) -> str:
    run = json.loads(path.read_text())
    run.pop("sessions")
    return json.dumps(run, sort_keys=True)


def _bit_flip(run: Path, work: Path) -> dict:
    """Copy the latest checkpoint, record its sha256s (as save_checkpoint now does), flip 8 bits in the
    payload of ema.safetensors and sample from it."""
    from ddpm_fast.checkpoint import EMA_FILE, MODEL_FILE, STATE_FILE, CONFIG_FILE, find_latest_checkpoint, write_sums

    ckpt = work / "flipped" / "step"
    shutil.copytree(find_latest_checkpoint(run), ckpt)
    write_sums(ckpt, [MODEL_FILE, EMA_FILE, CONFIG_FILE, STATE_FILE])
    data = bytearray((ckpt / EMA_FILE).read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    payload = len(data) - header
    positions = [header + (payload * k) // 9 for k in range(1, 9)]
    for k, p in enumerate(positions):
        data[p] ^= 1 << (k % 8)
    (ckpt / EMA_FILE).write_bytes(bytes(data))
    cmd = [sys.executable, "-m", "ddpm_fast.cli", "sample", str(ckpt), "--out", str(work / "flipped_out"),
           "--seeds", "0-3", "--steps", "2", "--device", "cpu", "--no-progress"]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    return {"flipped_byte_offsets": positions, "status": done.returncode, "stderr": done.stderr.strip(),
            "wrote_samples": (work / "flipped_out" / "samples.npz").exists()}


def _load_cost(work: Path, repeats: int = 9) -> dict:
    """load_model_source on the CIFAR-10 U-Net's checkpoint without the sha256 check, with it after the
    safetensors parse and with it beside the parse (a thread: what load_weights_file does), interleaved."""
    import torch

    import ddpm_fast.checkpoint as ck
    from ddpm_fast.generate import load_model_source
    from ddpm_fast.integrity import file_sha256
    from ddpm_fast.schedule import NoiseSchedule
    from ddpm_fast.unet import UNet, UNetConfig

    config = UNetConfig.cifar10()
    model = UNet(config)
    run_config = {"format": "ddpm-fast-run", "version": 1, "unet": config.to_dict(),
                  "schedule": NoiseSchedule.linear(1000).to_config(), "train": {}}
    run = work / "cifar_run"
    t0 = time.perf_counter()
    folder = ck.save_checkpoint(run, step=1, config=run_config, model=model.state_dict(), ema=model.state_dict(),
                                state={})
    save_s = time.perf_counter() - t0
    del model
    verify, threaded = ck.verify_file, ck.load_weights_file

    def unchecked(path):
        ck.verify_file = lambda p: None
        try:
            return threaded(path)
        finally:
            ck.verify_file = verify

    def sequential(path):  # the check after the parse instead of beside it
        out = unchecked(path)
        verify(path)
        return out

    times: dict = {"without_check": [], "check_after_parse": [], "check_beside_parse": []}
    for _ in range(repeats):
        for name, load in (("without_check", unchecked), ("check_after_parse", sequential),
                           ("check_beside_parse", threaded)):
            ck.load_weights_file = load
            t0 = time.perf_counter()
            load_model_source(run)
            times[name].append(time.perf_counter() - t0)
    ck.load_weights_file = threaded
    with_check, without = times["check_beside_parse"], times["without_check"]
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    t0 = time.perf_counter()
    file_sha256(folder / ck.EMA_FILE)
    hash_s = time.perf_counter() - t0
    return {"params": sum(v.numel() for v in ck.load_weights_file(folder / ck.EMA_FILE)[0].values()),
            "file_bytes": sizes, "torch_threads": torch.get_num_threads(), "repeats": repeats,
            "load_with_check_s": {"median": statistics.median(with_check), "min": min(with_check)},
            "load_without_check_s": {"median": statistics.median(without), "min": min(without)},
            "added_s_median": statistics.median(with_check) - statistics.median(without),
            "check_after_parse_s": {"median": statistics.median(times["check_after_parse"]),
                                    "min": min(times["check_after_parse"])},
            "sha256_of_ema_s": hash_s, "sha256_GB_per_s": sizes[ck.EMA_FILE] / hash_s / 1e9,
            "save_checkpoint_s": save_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--seeds", default="0-1999")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: all 1000; fewer for a smoke run)")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--load-cost-only", action="store_true", help="only the CIFAR-10 load-time figure")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.load_cost_only:
        with tempfile.TemporaryDirectory() as work:
            result = {"cifar10_load_check": _load_cost(Path(work)), "host": os.uname().nodename,
                      "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return
    from ddpm_fast.generate import parse_seeds

    n = len(parse_seeds(args.seeds))
    work = args.work or Path(tempfile.mkdtemp(prefix="sample_resume_"))
    a, b = work / "A", work / "B"
    for folder in (a, b):
        shutil.rmtree(folder, ignore_errors=True)
    result = {"run": str(args.run), "seeds": args.seeds, "batch_size": args.batch_size,
              "steps": args.steps or "all (1000)",
              "threads": "OMP_NUM_THREADS=1 per process", "host": os.uname().nodename,
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    log: list = []
    t0 = time.perf_counter()
    proc_a = subprocess.Popen(_sample_cmd(args.run, a, args), env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    proc_b = subprocess.Popen(_sample_cmd(args.run, b, args), env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    _until(proc_b, b, int(0.25 * n), signal.SIGTERM, log, "B session 1: SIGTERM")
    proc_b = subprocess.Popen(_sample_cmd(args.run, b, args) + ["--resume"], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    _until(proc_b, b, int(0.6 * n), signal.SIGKILL, log, "B session 2: kill -9")
    proc_b = subprocess.Popen(_sample_cmd(args.run, b, args, nproc=2) + ["--resume"], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out_b, err_b = proc_b.communicate()
    log.append({"event": "B session 3: torchrun 2 gloo processes --resume", "status": proc_b.returncode,
                "stdout": out_b.strip().splitlines()[-2:], "stderr_tail": err_b.strip().splitlines()[-2:]})
    out_a, err_a = proc_a.communicate()
    log.append({"event": "A uninterrupted", "status": proc_a.returncode, "stdout": out_a.strip().splitlines()[-2:],
                "stderr_tail": err_a.strip().splitlines()[-2:]})
    result["sampling_wall_s"] = time.perf_counter() - t0
    result["log"] = log
    if proc_a.returncode == 0 and proc_b.returncode == 0:
        run_a, run_b = json.loads((a / "run.json").read_text()), json.loads((b / "run.json").read_text())
        result["samples_sha256"] = {"A": _sha(a / "samples.npz"), "B": _sha(b / "samples.npz")}
        result["samples_equal"] = result["samples_sha256"]["A"] == result["samples_sha256"]["B"]
        result["grid_equal"] = (a / "grid.png").read_bytes() == (b / "grid.png").read_bytes()
        result["run_json_equal_but_sessions"] = _run_json_without_sessions(a / "run.json") == \
            _run_json_without_sessions(b / "run.json")
        result["run_json_samples_sha256"] = {"A": run_a["samples_sha256"], "B": run_b["samples_sha256"]}
        result["sessions_B"] = run_b["sessions"]
        s = run_a["sessions"][0]
        result["progress_writes_A"] = {"sampling_s": s["sampling_seconds"],
                                       "progress_write_s": s["progress_write_seconds"],
                                       "fraction": s["progress_write_seconds"] / s["sampling_seconds"],
                                       "rounds": -(-n // args.batch_size)}
    result["bit_flip"] = _bit_flip(args.run, work)
    result["cifar10_load_check"] = _load_cost(work)
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(json.dumps({k: result.get(k) for k in ("samples_equal", "grid_equal", "run_json_equal_but_sessions",
                                                  "progress_writes_A")}, indent=2))


if __name__ == "__main__":
    main()
