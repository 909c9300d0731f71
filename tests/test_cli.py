"""The ddpm-fast command end to end at a tiny size: train, resume, sample, demo, and one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import error_line as _error_line
from ddpm_fast.cli import build_parser, main

# --device cpu everywhere: these are CPU tests (the default would train compiled in bf16 on a GPU)
CPU = ["--device", "cpu"]
TINY = ["--preset", "tiny", "--unet-channels", "8,16", "--batch-size", "8", "--no-progress", *CPU]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--data", "digits", "--out", str(run), "--steps", "4", "--save-every", "2", *TINY]) == 0
    return run



def test_train_writes_a_run_folder(trained_run, capsys):
    assert (trained_run / "config.json").is_file() and (trained_run / "log.jsonl").is_file()
    assert (trained_run / "checkpoints" / "latest").read_text().strip() == "step_000004"
    config = json.loads((trained_run / "config.json").read_text())
    assert config["train"]["batch_size"] == 8 and config["unet"]["block_out_channels"] == [8, 16]


def test_train_on_an_image_folder_of_mixed_sizes(tmp_path, capsys):
    """Mixed sizes need --image-size; with it the folder trains (resized, center-cropped, grayscale)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images" / "nested"
    folder.mkdir(parents=True)
    for i, (h, w) in enumerate([(12, 10), (9, 16), (20, 20), (10, 10)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    base = ["train", "--data", str(tmp_path / "images"), "--steps", "2", "--save-every", "0", "--preset", "tiny",
            "--unet-channels", "8,16", "--batch-size", "2", "--no-progress", *CPU]
    assert main([*base, "--out", str(tmp_path / "r1")]) == 2
    assert "--image-size" in _error_line(capsys)  # the message names the fix
    assert main([*base, "--out", str(tmp_path / "r2"), "--image-size", "8", "--channels", "1"]) == 0
    config = json.loads((tmp_path / "r2" / "config.json").read_text())
    assert config["unet"]["sample_size"] == 8 and config["unet"]["in_channels"] == 1
    assert config["train"]["image_size"] == 8 and config["train"]["channels"] == 1


def test_resume_continues_and_refuses_to_overwrite(trained_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert main(["train", "--out", str(run), "--steps", "6", *TINY]) == 2
    assert "already holds a training run: pass --resume" in _error_line(capsys)
    assert main(["train", "--out", str(run), "--steps", "6", "--resume", *TINY]) == 0
    assert "resumed from step 4" in capsys.readouterr().out
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000006"
    assert main(["train", "--out", str(run), "--steps", "8", "--resume", "--lr", "0.5", *TINY]) == 2
    assert "--resume keeps the run's lr" in _error_line(capsys)


def test_sample_from_run_folder(trained_run, tmp_path, capsys):
    out = tmp_path / "samples"
    argv = ["sample", str(trained_run), "--out", str(out), "--seeds", "0-4,9", "--steps", "4", "--png-per-image", *CPU]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "sampled 6 images" in printed and "ema weights" in printed and "FastSampler" in printed
    with np.load(out / "samples.npz") as data:
        arr = data["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (6, 8, 8, 1)
    assert Image.open(out / "grid.png").mode == "L"
    assert (out / "images" / "000009.png").is_file()
    # the same seeds at another batch size, through the oracle: the same images (to uint8 rounding)
    ref_out = tmp_path / "ref"
    assert main(["sample", str(trained_run), "--out", str(ref_out), "--seeds", "0-4,9", "--steps", "4",
                 "--reference", "--batch-size", "4", *CPU]) == 0
    with np.load(ref_out / "samples.npz") as data:
        assert np.abs(data["arr_0"].astype(int) - arr.astype(int)).max() <= 1


def test_sample_options(trained_run, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sample", str(trained_run / "checkpoints" / "step_000004" / "model.safetensors"), "--out",
                 str(out), "--seeds", "3", "--steps", "2", "--variance", "fixed_small", "--no-clip", *CPU]) == 0
    printed = capsys.readouterr().out
    assert "fixed_small" in printed and "clip off" in printed and "model weights" in printed


def test_demo_at_a_tiny_size(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--preset", "tiny", "--steps", "3", "--num-samples", "12",
            "--sample-steps", "3", "--no-progress", *CPU]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for needle in ("Frechet distance", "held-out real digits", "Gaussian fit to pixels", "samples per digit",
                   "where the time went", "training", "sampling", "scoring", "images/s", "samples.png"):
        assert needle in printed, needle
    png = Image.open(out / "samples.png")
    assert png.size[0] >= 8 * 8 * 10  # 10 digits per row, upscaled 8x
    with np.load(out / "samples.npz") as data:
        assert data["arr_0"].shape == (12, 8, 8, 1)
    assert (out / "run-quick" / "checkpoints" / "latest").is_file()
    # the kept run samples through the normal command
    assert main(["sample", str(out / "run-quick"), "--out", str(tmp_path / "more"), "--seeds", "0-1", "--steps", "2",
                 *CPU]) == 0
    # a second demo reuses the finished run instead of failing on it
    assert main(argv) == 0
    assert "reused the finished run" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["sample", "{missing}", "--out", "{tmp}/o"], "does not exist"),
    (["sample", "{bad}", "--out", "{tmp}/o"], "truncated or not a safetensors file"),
    (["sample", "{run}", "--out", "{tmp}/o", "--seeds", "9-1"], "runs backwards"),
    (["train", "--data", "{missing}", "--out", "{tmp}/r", "--preset", "tiny"], "does not exist"),
    (["train", "--data", "digits", "--out", "{tmp}/r", "--preset", "tiny", "--batch-size", "100000"],
     "fewer than one batch"),
    (["train", "--out", "{tmp}/r", "--preset", "cifar10"], "needs training data"),
    (["sample", "{run}", "--out", "{tmp}/o", "--device", "nonsense"], "unknown device"),
])
def test_bad_input_is_one_line_and_exit_2(trained_run, tmp_path, capsys, argv, needle):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    subs = {"{missing}": str(tmp_path / "missing"), "{bad}": str(bad), "{tmp}": str(tmp_path),
            "{run}": str(trained_run)}
    for key, value in subs.items():
        argv = [a.replace(key, value) for a in argv]
    assert main(argv) == 2
    assert needle in _error_line(capsys)


@pytest.mark.parametrize("argv", [["train", "--out", "x", "--bogus"], ["sample"], ["train", "--out", "x",
                                   "--steps", "-3"], ["sample", "x", "--out", "y", "--variance", "huge"], []])
def test_argparse_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err


def test_parser_has_every_subcommand():
    parser = build_parser()
    choices = next(a for a in parser._actions if a.dest == "command").choices
    assert {"train", "sample", "demo"} <= set(choices)
    args = parser.parse_args(["sample", "src", "--out", "o"])
    assert args.seeds == "0-63" and args.clip is None and args.ema and not args.reference


def test_console_entry_point_prints_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ddpm_fast.cli", "sample", str(tmp_path / "nothing"), "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("ddpm-fast: error: ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
