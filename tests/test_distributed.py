"""Many processes on the CPU with gloo: torchrun training equals one process up to float reduction order,
sharded sampling equals one process bit for bit, SIGTERM stops with a checkpoint and a resume continues
exactly, a dead rank ends the job with one line, and a global batch that does not divide is refused.

Every multi-process run is a subprocess bounded by a timeout, so a hang fails the test instead of CI.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm_fast import cli
from ddpm_fast.checkpoint import load_checkpoint
from ddpm_fast.data import to_uint8_nhwc
from ddpm_fast.distributed import Group, deal
from ddpm_fast.generate import format_seeds, parse_seeds, sample_to_folder
from ddpm_fast.preemption import StopSignals
from ddpm_fast.training import TrainConfig, Trainer, train

pytestmark = pytest.mark.usefixtures("single_thread")

TIMEOUT_S = 240  # per subprocess: far above the few seconds each takes, far below CI's limit
# The run: the tiny preset on the digits, 50 steps at a global batch of 16.
TRAIN_ARGS = ["--data", "digits", "--preset", "tiny", "--steps", "50", "--batch-size", "16", "--device", "cpu",
              "--no-progress"]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # a test run under a launcher must not leak its place into the children
    env.update(extra)
    return env


def _torchrun(*args, nproc=2):
    """``torchrun --standalone --nproc-per-node N -m ddpm_fast.cli ARGS`` as a subprocess (CompletedProcess)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "ddpm_fast.cli", *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)


def _config(out, **kw):
    base = dict(data="digits", out=str(out), preset="tiny", steps=50, batch_size=16, device="cpu", progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    diffs = [(a[k].double() - b[k].double()).abs().max().item() for k in a]
    assert all(np.isfinite(diffs))  # NaN never passes
    return max(diffs)


# --------------------------------------------------------------------------------------------------
# pieces


@pytest.mark.parametrize("num, batch, world", [(32, 256, 2), (1, 4, 3), (1000, 64, 4), (17, 5, 2)])
def test_deal_gives_every_seed_once_in_equal_batch_counts(num, batch, world):
    per_rank = [deal(num, batch, world, r) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # the same number of batches: per-batch collectives stay in step
    positions = sorted(p for batches in per_rank for b in batches for p in b)
    assert positions == list(range(num))
    assert max(len(b) for batches in per_rank for b in batches) <= batch


def test_format_seeds_inverts_parse_seeds():
    for text in ["0-63", "1,5,9", "0-3,10", "7", "0-49999"]:
        assert format_seeds(parse_seeds(text)) == text


def test_a_second_signal_exits_at_once_but_a_forwarded_copy_does_not():
    exits, now = [], [100.0]
    stop = StopSignals(announce=False, grace_s=1.0, exit=exits.append, clock=lambda: now[0])
    assert not stop.requested
    stop.handle(signal.SIGINT)
    assert stop.requested and stop.signal_name == "SIGINT" and exits == []
    now[0] += 0.2
    stop.handle(signal.SIGTERM)  # torchrun forwarding the same request: no exit
    assert exits == []
    now[0] += 5.0
    stop.handle(signal.SIGTERM)
    assert exits == [128 + signal.SIGTERM]


@pytest.mark.parametrize("rank", [0, 1])
def test_a_global_batch_that_does_not_divide_is_one_line_from_rank_0(tmp_path, capsys, monkeypatch, rank):
    # torchrun's environment for 3 processes; the check runs before any process group is joined
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "3")
    status = cli.main(["train", *TRAIN_ARGS, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert status == 2
    if rank == 0:
        assert err == ("ddpm-fast: error: --batch-size 16 is the global batch and must divide by the 3 "
                       "processes: use 15 or 18")
    else:
        assert err == ""  # every rank fails the same way; rank 0 says it once
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------------------------------
# two processes against one


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "R2"
    done = _torchrun("train", *TRAIN_ARGS, "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained" in done.stdout and done.stdout.count("trained") == 1  # rank 0 alone reports
    return out


def _fp64_twin(config: TrainConfig) -> dict:
    """The same 50 steps in float64: as near exact arithmetic as the CPU gets."""
    trainer = Trainer(config)
    trainer.model.double()
    trainer.ema.double()
    batches = trainer.stream

    class Double:
        def __next__(self):
            return next(batches).double()

    trainer.stream = Double()
    while trainer.step < config.steps:
        trainer.train_step()
    return trainer.model.state_dict()


def test_two_processes_train_to_the_weights_of_one_up_to_float_order(two_process_run, tmp_path):
    one = train(_config(tmp_path / "R1"))
    w1 = load_checkpoint(one.run_dir)
    w2 = load_checkpoint(two_process_run)
    assert w1.step == w2.step == 50

    start = [json.loads(x) for x in (two_process_run / "log.jsonl").read_text().splitlines()][0]
    assert start["event"] == "start" and start["world_size"] == 2

    # The two runs differ only in the order of float sums (each rank's half-batch mean, then the
    # all-reduce). Each is a float32 evaluation of the same arithmetic, about as far from exact as the
    # other, so their distance is at most twice the one-process float32 error, measured against a
    # float64 twin of the same run.
    fp32_error = _max_diff(w1.model, _fp64_twin(_config(tmp_path / "unused")))
    moved = _max_diff(w1.model, Trainer(_config(tmp_path / "unused")).model.state_dict())
    difference = _max_diff(w1.model, w2.model)
    assert 0 < fp32_error < 0.01 * moved  # sanity: rounding is a small fraction of the training motion
    assert difference <= 2 * fp32_error, (difference, fp32_error)
    # the EMA follows the weights: the same bound, with the EMA's own float32 error no larger
    assert _max_diff(w1.ema, w2.ema) <= 2 * fp32_error
    # every logged loss is the global batch's mean: equal to one process's up to the same rounding
    losses = [{r["step"]: r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
               if "loss" in r} for run in (one.run_dir, two_process_run)]
    assert losses[0].keys() == losses[1].keys()
    for step in losses[0]:
        assert losses[0][step] == pytest.approx(losses[1][step], rel=1e-4)


def test_two_process_sampling_writes_the_one_process_bytes(two_process_run, tmp_path):
    # One torchrun job, one process group, does both: the command (rank 0 writes the npz, each rank its
    # own PNGs), then generate() from Python (every rank gets all images back, in seed order).
    out2 = tmp_path / "S2"
    script = tmp_path / "sample_two.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch
        from ddpm_fast import cli
        from ddpm_fast.distributed import process_group
        from ddpm_fast.generate import generate, load_model_source
        with process_group("cpu") as group:  # the command finds this group and uses it
            status = cli.main(["sample", {str(two_process_run)!r}, "--seeds", "0-31", "--steps", "20", "--out",
                               {str(out2)!r}, "--device", "cpu", "--png-per-image", "--no-progress"])
            if status:
                sys.exit(status)
            model, schedule, _ = load_model_source({str(two_process_run)!r})
            images = generate(model, schedule, range(5, 12), steps=20, batch_size=2)
            torch.save(images, {str(tmp_path)!r} + f"/generate_rank{{group.rank}}.pt")
    """))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("sampled 32 images") == 1  # rank 0 alone reports

    one = sample_to_folder(two_process_run, tmp_path / "S1", parse_seeds("0-31"), steps=20, device="cpu",
                           png_per_image=True)
    assert (out2 / "samples.npz").read_bytes() == one.paths["npz"].read_bytes()
    pngs1 = sorted(p.name for p in (tmp_path / "S1" / "images").iterdir())
    pngs2 = sorted(p.name for p in (out2 / "images").iterdir())
    assert pngs1 == pngs2 and len(pngs2) == 32  # every rank wrote its own seeds' files
    for name in pngs1:
        assert (out2 / "images" / name).read_bytes() == (tmp_path / "S1" / "images" / name).read_bytes()
    run = json.loads((out2 / "run.json").read_text())
    session = run["sessions"][-1]  # how the folder was made: the only part that depends on the world size
    assert session["world_size"] == 2 and session["backend"] == "gloo" and run["seeds"] == "0-31"
    assert run["checkpoint_step"] == 50 and run["ema"] is True and run["sampling"]["steps"] == 20
    assert json.loads((tmp_path / "S1" / "run.json").read_text())["sessions"][-1]["world_size"] == 1

    # generate() under the group: seeds 5..11 dealt in batches of 2, the same images on both ranks as
    # one process makes (images 5..11 of the 32 above, since image i depends on seed i alone)
    expected = np.load(one.paths["npz"])["arr_0"][5:12]
    for rank in range(2):
        images = torch.load(tmp_path / f"generate_rank{rank}.pt")
        assert images.shape == (7, 1, 8, 8) and images.dtype == torch.float32
        assert np.array_equal(to_uint8_nhwc(images), expected)


# --------------------------------------------------------------------------------------------------
# preemption


def _start_and_signal(cmd, run: Path, env) -> tuple[subprocess.CompletedProcess, int]:
    """Start a long training command, send SIGTERM once it has logged step 3, wait for it to end."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT_S
    log = run / "log.jsonl"
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if log.is_file() and any(json.loads(x).get("step", 0) >= 3 and "loss" in x
                                     for x in log.read_text().splitlines()):
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), load_checkpoint(run, with_state=False).step


def test_sigterm_stops_with_a_checkpoint_and_resume_equals_uninterrupted(tmp_path):
    run = tmp_path / "run"
    args = ["--data", "digits", "--preset", "tiny", "--steps", "100000", "--batch-size", "8", "--device", "cpu",
            "--save-every", "0", "--no-progress", "--seed", "3"]
    cmd = [sys.executable, "-m", "ddpm_fast.cli", "train", *args, "--out", str(run)]
    done, stopped_at = _start_and_signal(cmd, run, _env())
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last == (f"ddpm-fast: stopped by SIGTERM after step {stopped_at}: checkpoint "
                    f"{run}/checkpoints/step_{stopped_at:06d}; continue with: ddpm-fast train --out {run} --resume")
    assert "Traceback" not in done.stderr and 3 <= stopped_at < 100000

    end = stopped_at + 3
    resumed = train(_config(run, steps=end, batch_size=8, seed=3, save_every=0, resume=True))
    straight = train(_config(tmp_path / "straight", steps=end, batch_size=8, seed=3, save_every=0))
    assert resumed.resumed_from == stopped_at and resumed.step == straight.step == end
    a, b = load_checkpoint(run), load_checkpoint(straight.run_dir)
    for name in a.model:
        assert torch.equal(a.model[name], b.model[name]), name
        assert torch.equal(a.ema[name], b.ema[name]), name


def test_two_processes_agree_on_the_stop_and_resume_at_another_world_size(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "ddpm_fast.cli", "train", "--data", "digits", "--preset", "tiny", "--steps", "100000", "--batch-size",
           "8", "--device", "cpu", "--save-every", "0", "--no-progress", "--out", str(run)]
    done, stopped_at = _start_and_signal(cmd, run, _env())
    assert done.returncode != 0  # torchrun reports the signal it got
    assert done.stderr.count("ddpm-fast: stopped by SIGTERM") == 1, done.stderr[-3000:]  # rank 0 alone
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert {"event": "stopped", "signal": "SIGTERM", "step": stopped_at}.items() <= records[-2].items()
    state = load_checkpoint(run).state
    assert len(state["rank_rng"]) == 2  # both ranks' dropout streams are kept

    # one process continues the two-process run: same global batch, same data stream position
    resumed = train(_config(run, steps=stopped_at + 2, batch_size=8, save_every=0, resume=True))
    assert resumed.resumed_from == stopped_at and resumed.step == stopped_at + 2
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r for r in records if r.get("event") == "resume"][-1]["world_size"] == 1


# --------------------------------------------------------------------------------------------------
# a dead rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_that_dies_ends_the_job_with_one_line_not_a_hang(tmp_path):
    # Two processes started by hand (no torchrun agent to kill the survivor): rank 1 dies after two
    # steps, rank 0 must notice in its next collective and fail with one line.
    script = textwrap.dedent(f"""
        import os, sys
        from ddpm_fast import cli, training
        step = training.Trainer.train_step
        def dying_step(self):
            if self.group.rank == 1 and self.step == 2:
                os._exit(3)
            return step(self)
        training.Trainer.train_step = dying_step
        sys.exit(cli.main(["train", "--data", "digits", "--preset", "tiny", "--steps", "20", "--batch-size", "8",
                           "--device", "cpu", "--no-progress", "--out", {str(tmp_path / "run")!r}]))
    """)
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                                  DDPM_FAST_DIST_TIMEOUT="30"))
             for r in range(2)]
    try:
        results = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[1].returncode == 3
    assert procs[0].returncode == 2, results[0][1][-3000:]
    err = results[0][1].strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddpm-fast: error: rank 0: "), err
    assert "another process died or stopped answering" in err[0]


def test_one_process_uses_no_torch_distributed(tmp_path):
    result = train(_config(tmp_path / "r", steps=2, save_every=0))
    assert result.world_size == 1 and not torch.distributed.is_initialized()
    assert Group().active is False and Group().any(True) is True


def test_an_input_error_every_rank_hits_is_one_line_under_torchrun(tmp_path):
    """Sources and data are read before the ranks join, so every rank fails the same way before any
    group exists and rank 0 alone says it (not one line per rank)."""
    done = _torchrun("sample", str(tmp_path / "missing"), "--out", str(tmp_path / "s"), "--device", "cpu")
    lines = [line for line in done.stderr.splitlines() if line.startswith("ddpm-fast: error:")]
    assert done.returncode != 0 and len(lines) == 1 and "does not exist" in lines[0], done.stderr[-2000:]
    done = _torchrun("train", "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "r"), "--preset", "tiny",
                     "--device", "cpu", "--no-progress")
    lines = [line for line in done.stderr.splitlines() if line.startswith("ddpm-fast: error:")]
    assert done.returncode != 0 and len(lines) == 1 and "does not exist" in lines[0], done.stderr[-2000:]
    assert not (tmp_path / "r").exists() and not (tmp_path / "s").exists()
