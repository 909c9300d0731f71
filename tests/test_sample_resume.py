"""``ddpm-fast sample`` survives preemption: SIGTERM, a second signal, kill -9 inside a flush, a dead rank
and a resume at another world size all end in the bytes of an uninterrupted run; settings that would change
the images, foreign or unwritable folders and disks too small are refused with one line.

Every multi-process or killed run is a subprocess bounded by a timeout, so a hang fails the test.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import ddpm_fast.generate as generate_module
from ddpm_fast import cli
from ddpm_fast.checkpoint import save_checkpoint
from ddpm_fast.generate import sample_to_folder
from ddpm_fast.sample_progress import Progress, SampleFolderError
from ddpm_fast.schedule import NoiseSchedule
from ddpm_fast.unet import UNet, UNetConfig
from cli_helpers import error_line

TINY = UNetConfig.tiny(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16))
T = 20
SEEDS = list(range(13))  # chunks of 3: 0-2, 3-5, 6-8, 9-11, 12
OPTS = dict(steps=4, batch_size=3, device="cpu", png_per_image=True)
TIMEOUT_S = 240
TESTS = Path(__file__).parent

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume") / "run"
    config = {"format": "ddpm-fast-run", "version": 1, "unet": TINY.to_dict(),
              "schedule": NoiseSchedule.linear(T).to_config(), "train": {}}
    root.mkdir()
    (root / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model, ema = UNet(TINY).state_dict(), UNet(TINY).state_dict()
    save_checkpoint(root, step=3, config=config, model=model, ema=ema, state={})
    return root


@pytest.fixture(scope="module")
def uninterrupted(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "s"
    result = sample_to_folder(run_dir, out, SEEDS, **OPTS)
    assert result.stopped_by is None and result.seeds_done == 13
    return out


def _files(folder: Path) -> dict:
    """Every file of a sample folder by relative path: bytes, with run.json's "sessions" left out."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "run.json":
                run = json.loads(data)
                assert run.pop("sessions")
                data = json.dumps(run, indent=2, sort_keys=True)
            out[str(p.relative_to(folder))] = data
    return out


def _signal_after(monkeypatch, calls: int, signum=signal.SIGTERM, times: int = 1):
    """Send ``signum`` to this process ``times`` times while the ``calls``-th chunk is being sampled."""
    original = generate_module._image_sampler

    def wrapped(*args, **kwargs):
        sample = original(*args, **kwargs)
        count = {"n": 0}

        def counted(chunk):
            count["n"] += 1
            if count["n"] == calls:
                for _ in range(times):
                    os.kill(os.getpid(), signum)
            return sample(chunk)

        return counted

    monkeypatch.setattr(generate_module, "_image_sampler", wrapped)


def test_sigterm_then_resume_gives_the_same_bytes(run_dir, uninterrupted, tmp_path, monkeypatch, capfd):
    out = tmp_path / "s"
    _signal_after(monkeypatch, 2)
    stopped = sample_to_folder(run_dir, out, SEEDS, **OPTS)
    # the round in flight (chunk 3-5) is finished and flushed, then the run stops
    assert stopped.stopped_by == "SIGTERM" and stopped.seeds_done == 6 and not (out / "run.json").exists()
    assert "SIGTERM: finishing this round" in capfd.readouterr().err
    record = Progress.load(out)
    assert record.done == {0, 1} and record.sessions[-1]["ended"] == "SIGTERM"
    assert len(list((out / "images").iterdir())) == 6
    monkeypatch.undo()
    resumed = sample_to_folder(run_dir, out, SEEDS, resume=True, progress=True, **{**OPTS, "batch_size": None})
    assert resumed.resumed_from == 6 and resumed.seeds_done == 13
    assert "6/13" in capfd.readouterr().err  # the bar starts at the seeds already done
    assert _files(out) == _files(uninterrupted)
    assert not (out / "unfinished").exists()
    sessions = json.loads((out / "run.json").read_text())["sessions"]
    assert [s["ended"] for s in sessions] == ["SIGTERM", "finished"]
    assert [s["seeds_done_before"] for s in sessions] == [0, 6]


def test_resume_on_a_finished_folder_rewrites_nothing(run_dir, uninterrupted, capsys):
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in uninterrupted.rglob("*") if p.is_file()}
    argv = ["sample", str(run_dir), "--out", str(uninterrupted), "--seeds", "0-12", "--steps", "4", "--resume",
            "--device", "cpu"]
    assert cli.main(argv) == 0
    assert "already finished: 13 images" in capsys.readouterr().out
    assert before == {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in uninterrupted.rglob("*") if p.is_file()}


def test_cli_stop_line_names_the_resume_command(run_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "s"
    _signal_after(monkeypatch, 1, signal.SIGINT, times=2)  # a repeat within 1 s is the same request
    argv = ["sample", str(run_dir), "--out", str(out), "--seeds", "0-12", "--steps", "4", "--batch-size", "3",
            "--device", "cpu", "--no-progress"]
    assert cli.main(argv) == 128 + signal.SIGINT
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"ddpm-fast: stopped by SIGINT after 3 of 13 images, progress kept in {out}; continue with: "
                       f"ddpm-fast sample {run_dir} --out {out} --seeds 0-12 --steps 4 --batch-size 3 --device cpu "
                       "--no-progress --resume")
    monkeypatch.undo()
    # the same command without --resume would start over on top of the progress: refused
    assert cli.main(argv) == 2
    assert "holds an unfinished run (3 of 13 seeds done): add --resume" in error_line(capsys)


@pytest.mark.parametrize("change, named", [
    (dict(steps=5), "steps"), (dict(seeds=list(range(14))), "seeds"), (dict(use_ema=False), "weights"),
    (dict(variance="fixed_small"), "variance"), (dict(clip_x0=False), "clip_x0"), (dict(solver="ddim"), "solver"),
    (dict(batch_size=4), "batch_size"), (dict(png_per_image=False), "png_per_image"),
    (dict(reference=True), "sampler"),
])
def test_resume_refuses_settings_that_change_the_images(run_dir, tmp_path, monkeypatch, change, named):
    out = tmp_path / "s"
    _signal_after(monkeypatch, 1)
    sample_to_folder(run_dir, out, SEEDS, **OPTS)
    monkeypatch.undo()
    kwargs = {**OPTS, "seeds": SEEDS, **change}
    with pytest.raises(SampleFolderError, match=rf"^--resume: {named} differs from the run in .*: resume with the "
                                                r"settings it was started with"):
        sample_to_folder(run_dir, out, kwargs.pop("seeds"), resume=True, **kwargs)


def test_resume_refuses_other_weights(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "s"
    _signal_after(monkeypatch, 1)
    sample_to_folder(run_dir, out, SEEDS, **OPTS)
    monkeypatch.undo()
    other = tmp_path / "other"  # a run trained on: the same settings, other weights
    torch.manual_seed(5)
    save_checkpoint(other, step=4, config=json.loads((run_dir / "config.json").read_text()),
                    model=UNet(TINY).state_dict(), ema=UNet(TINY).state_dict(), state={})
    with pytest.raises(SampleFolderError, match=r"weights_sha256 differs .*ema.safetensors\) there.*other"):
        sample_to_folder(other, out, SEEDS, resume=True, **OPTS)


def test_folders_that_cannot_take_the_run_are_refused(run_dir, tmp_path, monkeypatch, capsys):
    base = ["sample", str(run_dir), "--seeds", "0-3", "--steps", "2", "--device", "cpu", "--no-progress"]
    assert cli.main(base + ["--out", str(run_dir), "--resume"]) == 2  # a training run folder
    assert "was made by another command (it is a training run folder" in error_line(capsys)
    assert cli.main(base + ["--out", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "holds no unfinished sampling run: run without --resume" in error_line(capsys)
    (tmp_path / "file").write_text("x")
    assert cli.main(base + ["--out", str(tmp_path / "file" / "sub")]) == 2
    assert "cannot write to --out" in error_line(capsys)
    # a disk without room for the spool and samples.npz: refused before any sampling, nothing written
    monkeypatch.setattr("shutil.disk_usage", lambda path: type("U", (), {"free": 100})())
    assert cli.main(base + ["--out", str(tmp_path / "full")]) == 2
    assert "need" in error_line(capsys) and not (tmp_path / "full" / "unfinished").exists()


def test_a_model_whose_images_cannot_exist_is_refused(tmp_path, capsys):
    """A checkpoint claiming sample_size 10^9 used to end in '[Errno 22] Invalid argument'."""
    config = {"unet": {**TINY.to_dict(), "sample_size": 10**9}, "schedule": NoiseSchedule.linear(T).to_config()}
    torch.manual_seed(0)
    from safetensors.torch import save_file

    path = tmp_path / "huge.safetensors"
    save_file(UNet(TINY).state_dict(), str(path), metadata={"ddpm_fast_config": json.dumps(config)})
    assert cli.main(["sample", str(path), "--out", str(tmp_path / "s"), "--seeds", "0-1", "--device", "cpu"]) == 2
    line = error_line(capsys)
    assert "1000000000x1000000000x1" in line and "image size looks wrong" in line


def test_full_disk_while_sampling_keeps_the_progress(run_dir, uninterrupted, tmp_path, monkeypatch, capsys):
    out = tmp_path / "s"
    writes = {"n": 0}
    original = Progress.write

    def failing(self):
        writes["n"] += 1
        if writes["n"] == 4:  # the start, the session entry, chunk 0, then the disk is full
            raise OSError(28, "No space left on device", str(self.folder / "progress.json"))
        original(self)

    monkeypatch.setattr(Progress, "write", failing)
    argv = ["sample", str(run_dir), "--out", str(out), "--seeds", "0-12", "--steps", "4", "--batch-size", "3",
            "--device", "cpu", "--png-per-image", "--no-progress"]
    assert cli.main(argv) == 2
    line = error_line(capsys)
    assert "No space left on device while saving the progress (6 of 13 images kept" in line
    monkeypatch.undo()
    assert Progress.load(out).done == {0}  # the record names only what it had flushed
    assert cli.main(argv + ["--resume"]) == 0
    assert _files(out) == _files(uninterrupted)


_KILLED = textwrap.dedent("""
    import os, sys
    import numpy as np
    import ddpm_fast.sample_progress as sp
    import ddpm_fast.checkpoint as ck
    from ddpm_fast.generate import sample_to_folder
    where, run, out = sys.argv[1], sys.argv[2], sys.argv[3]
    count = {"n": 0}
    if where == "rename":  # killed inside the record's flush: its temporary file written, not yet renamed
        replace = os.replace
        def dying_replace(src, dst):
            if str(dst).endswith("progress.json"):
                count["n"] += 1
                if count["n"] == 5:  # the start, the session, chunks 0 and 1, then chunk 2
                    os._exit(137)
            return replace(src, dst)
        ck.os.replace = dying_replace
    elif where == "second-signal":  # SIGTERM, then another 1.5 s later (not a repeat): exit at once
        import signal, time
        import ddpm_fast.generate as g
        original = g._image_sampler
        def wrapped(*args, **kwargs):
            sample = original(*args, **kwargs)
            def counted(chunk):
                count["n"] += 1
                if count["n"] == 3:
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(1.5)
                    os.kill(os.getpid(), signal.SIGTERM)
                return sample(chunk)
            return counted
        g._image_sampler = wrapped
    else:  # killed after the rows reached the spool, before the record names them
        flush = np.memmap.flush
        def dying_flush(self):
            flush(self)
            count["n"] += 1
            if count["n"] == 3:
                os._exit(137)
        np.memmap.flush = dying_flush
    sample_to_folder(run, out, list(range(13)), steps=4, batch_size=3, device="cpu", png_per_image=True)
""")


@pytest.mark.parametrize("where, status", [("rename", 137), ("spool", 137), ("second-signal", 143)])
def test_kill_9_inside_a_flush_loses_at_most_the_round_in_flight(run_dir, uninterrupted, tmp_path, where, status):
    script = tmp_path / "killed.py"
    script.write_text(_KILLED)
    out = tmp_path / "s"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(script), where, str(run_dir), str(out)], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == status, done.stderr[-2000:]
    if where == "second-signal":
        assert "second SIGTERM: exiting at once" in done.stderr
    record = Progress.load(out)
    assert record.done == {0, 1} and record.sessions[-1]["ended"] is None
    resumed = sample_to_folder(run_dir, out, SEEDS, resume=True, **OPTS)
    assert resumed.resumed_from == 6
    assert _files(out) == _files(uninterrupted)
    sessions = json.loads((out / "run.json").read_text())["sessions"]
    assert sessions[0]["ended"].startswith("killed or failed") and sessions[1]["ended"] == "finished"


_RANKS = textwrap.dedent("""
    import os, signal, sys
    import ddpm_fast.generate as g
    from ddpm_fast import cli
    mode, argv = sys.argv[1], sys.argv[2:]
    original = g._image_sampler
    def wrapped(*args, **kwargs):
        sample, count = original(*args, **kwargs), {"n": 0}
        def counted(chunk):
            count["n"] += 1
            if os.environ.get("RANK") == "1" and count["n"] == 2:  # rank 1's second chunk: round 2
                if mode == "sigterm":
                    os.kill(os.getpid(), signal.SIGTERM)  # preempted: rank 0 gets no signal
                elif mode == "die":
                    os._exit(137)
            return sample(chunk)
        return counted
    g._image_sampler = wrapped
    sys.exit(cli.main(argv))
""")


def _ranks(tmp_path, mode, argv, nproc):
    script = tmp_path / "ranks.py"
    script.write_text(_RANKS)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DDPM_FAST_DIST_TIMEOUT="60")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(script), mode, *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.mark.parametrize("mode", ["sigterm", "die"])
def test_a_preempted_or_dead_rank_stops_the_job_and_any_world_size_resumes(run_dir, uninterrupted, tmp_path, mode):
    """Two gloo ranks; rank 1 alone is SIGTERMed (or dies) in round 2. Every rank stops after the same round
    (or the job ends with one line); one process resumes with the bytes of the uninterrupted process."""
    out = tmp_path / "s"
    argv = ["sample", str(run_dir), "--out", str(out), "--seeds", "0-12", "--steps", "4", "--batch-size", "3",
            "--device", "cpu", "--png-per-image", "--no-progress"]
    done = _ranks(tmp_path, mode, argv, 2)
    assert done.returncode != 0
    if mode == "sigterm":  # round 2 finished on both ranks, then both stopped: chunks 0-3 on disk
        assert done.stderr.count("continue with:") == 1, done.stderr[-3000:]
        assert "stopped by another process's signal after 12 of 13 images" in done.stderr
        assert Progress.load(out).done == {0, 1, 2, 3}
    else:  # rank 0 learns of the death at the next collective; round 1 stays on disk
        assert "another process died" in done.stderr or "exitcode" in done.stderr, done.stderr[-3000:]
        assert Progress.load(out).done >= {0, 1}
    assert cli.main(argv + ["--resume"]) == 0
    assert _files(out) == _files(uninterrupted)


def test_one_process_stopped_two_ranks_resume(run_dir, uninterrupted, tmp_path, monkeypatch):
    out = tmp_path / "s"
    _signal_after(monkeypatch, 1)
    assert sample_to_folder(run_dir, out, SEEDS, **OPTS).seeds_done == 3
    monkeypatch.undo()
    argv = ["sample", str(run_dir), "--out", str(out), "--seeds", "0-12", "--steps", "4", "--device", "cpu",
            "--png-per-image", "--no-progress", "--resume"]
    done = _ranks(tmp_path, "none", argv, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _files(out) == _files(uninterrupted)
    sessions = json.loads((out / "run.json").read_text())["sessions"]
    assert [s["world_size"] for s in sessions] == [1, 2]


def test_fid_after_a_resume_equals_the_uninterrupted_fid_exactly(run_dir, tmp_path, monkeypatch):
    """The FID is taken from the finished images in seed order and fixed batches, so a stopped and resumed
    run scores bit for bit what an uninterrupted one does (not merely within float64 rounding)."""
    import ddpm_fast.fid as fid_module
    from fid_helpers import TinyExtractor
    from ddpm_fast.fid_stats import save_stats

    monkeypatch.setattr(fid_module, "load_extractor", lambda weights=None, device=None: TinyExtractor())
    g = np.random.default_rng(0)
    ref = save_stats(tmp_path / "ref.npz", g.normal(size=8), np.cov(g.normal(size=(8, 40))))
    argv = ["sample", str(run_dir), "--seeds", "0-12", "--steps", "4", "--batch-size", "3", "--device", "cpu",
            "--no-progress", "--fid", str(ref)]
    assert cli.main(argv + ["--out", str(tmp_path / "whole")]) == 0
    _signal_after(monkeypatch, 3)
    assert cli.main(argv + ["--out", str(tmp_path / "cut")]) == 128 + signal.SIGTERM
    monkeypatch.setattr(generate_module, "_image_sampler", _ORIGINAL_SAMPLER)
    assert cli.main(argv + ["--out", str(tmp_path / "cut"), "--resume"]) == 0
    whole, cut = (json.loads((tmp_path / d / "run.json").read_text()) for d in ("whole", "cut"))
    assert np.isfinite(whole["fid"]) and whole["fid"] == cut["fid"] and whole["fid_num_samples"] == 13
    assert json.loads((tmp_path / "cut" / "fid.json").read_text())["fid"] == whole["fid"]
    files = [{k: v for k, v in _files(tmp_path / d).items() if k != "fid.json"} for d in ("whole", "cut")]
    assert files[0] == files[1]  # fid.json holds this session's timings


_ORIGINAL_SAMPLER = generate_module._image_sampler


def test_full_disk_at_the_end_keeps_every_image(run_dir, uninterrupted, tmp_path, monkeypatch, capsys):
    out = tmp_path / "s"

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(out / "samples.npz"))

    monkeypatch.setattr(generate_module, "_write_npz_from_spool", full)
    argv = ["sample", str(run_dir), "--out", str(out), "--seeds", "0-12", "--steps", "4", "--batch-size", "3",
            "--device", "cpu", "--png-per-image", "--no-progress"]
    assert cli.main(argv) == 2
    assert "No space left on device while writing the final files (all 13 images kept" in error_line(capsys)
    monkeypatch.undo()
    assert Progress.load(out).seeds_done() == 13
    assert cli.main(argv + ["--resume"]) == 0
    assert _files(out) == _files(uninterrupted)
