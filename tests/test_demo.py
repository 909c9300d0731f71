"""The demo's recipes (quick by default, --full for the digits preset's), its --seed, the sample command it
prints, and the training options the demo study measures (a cosine lr decay, off by default)."""

import json
import math
import shlex

import pytest

from ddpm_fast.cli import main
from ddpm_fast.demo import DEFAULT_RECIPE, RECIPES
from ddpm_fast.solvers import solver_spec
from ddpm_fast.errors import DDPMFastError
from ddpm_fast.training import PRESETS, TrainConfig, Trainer, train
from test_run_gpu import _load  # a script of benchmarks/ as a module

CPU = ["--device", "cpu"]
SMALL = {"block_out_channels": [8, 16], "norm_num_groups": 4}

pytestmark = pytest.mark.usefixtures("single_thread")


def _config(tmp_path, **kw):
    base = dict(data="digits", out=str(tmp_path / "run"), preset="tiny", steps=10, batch_size=8, save_every=5,
                log_every=5, progress=False, unet=SMALL, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_cosine_lr_decay_follows_half_a_cosine_after_the_warmup(tmp_path):
    lr, warmup, steps = 1e-3, 2, 10
    trainer = Trainer(_config(tmp_path, lr=lr, warmup=warmup, steps=steps, lr_decay="cosine"))
    got = [trainer.lr_at(s) for s in range(steps)]
    # warmup: lr/2, lr; then lr * (1 + cos(pi * k / 9)) / 2 for k = 1..8 (k = 9 would be step 10, past the run)
    want = [lr / 2, lr] + [lr * (1 + math.cos(math.pi * k / (steps + 1 - warmup))) / 2 for k in range(1, 9)]
    assert got == pytest.approx(want, rel=1e-12)
    assert all(a > b for a, b in zip(got[1:], got[2:])) and 0 < got[-1] < 0.05 * lr
    constant = Trainer(_config(tmp_path, lr=lr, warmup=warmup, steps=steps))
    assert constant.config.lr_decay == "none" and [constant.lr_at(s) for s in range(2, steps)] == [lr] * 8


def test_lr_decay_is_off_in_every_preset_and_checked(tmp_path):
    for preset in PRESETS:
        assert TrainConfig(data="digits", preset=preset, device="cpu").resolved().lr_decay == "none"
    with pytest.raises(ValueError, match="lr_decay must be one of 'none', 'cosine'"):
        _config(tmp_path, lr_decay="linear").resolved()


def test_a_resumed_run_keeps_its_lr_decay(tmp_path):
    train(_config(tmp_path, steps=2, save_every=2, lr_decay="cosine"))
    plain = tmp_path / "plain"
    train(_config(tmp_path, out=str(plain), steps=2, save_every=2))
    with pytest.raises(DDPMFastError, match="keeps the run's lr_decay='none'"):
        train(_config(tmp_path, out=str(plain), steps=4, resume=True, lr_decay="cosine"))
    resumed = train(_config(tmp_path, steps=3, resume=True))  # not given: the stored decay goes on
    assert resumed.step == 3
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["lr_decay"] == "cosine"


def test_the_recipes_resolve_and_full_is_the_digits_preset():
    for recipe in RECIPES.values():
        config = TrainConfig(data="digits", preset="digits", device="cpu", **recipe.train).resolved()
        assert config.steps >= 1 and recipe.sample_steps >= 1
        solver_spec(recipe.solver, **recipe.solver_options)  # a valid sampler
    full = RECIPES["full"]
    assert full.train == {} and (full.solver, full.sample_steps, full.clip_x0) == ("ddpm", 250, True)
    assert DEFAULT_RECIPE == "quick"
    quick = RECIPES["quick"]
    assert quick.solver == "dpmpp-2m" and quick.sample_steps <= 25 and not quick.clip_x0
    assert quick.solver_options["lambda_min_clipped"] > -math.inf  # the cosine schedule needs it
    assert TrainConfig(data="digits", preset="digits", device="cpu", **quick.train).resolved().schedule == "cosine"


def test_demo_quick_by_default_full_and_seed_at_a_tiny_size(tmp_path, capsys):
    """The default (quick) recipe samples with DPM-Solver++ into DIR/run-quick; --seed reaches the run's
    config; --full samples with DDPM into DIR/run-full; the printed sample command runs."""
    out = tmp_path / "demo"
    tiny = ["--preset", "tiny", "--steps", "2", "--num-samples", "4", "--sample-steps", "2", "--no-progress", *CPU]
    assert main(["demo", "--out", str(out), "--seed", "3", *tiny]) == 0
    printed = capsys.readouterr().out
    assert "quick recipe" in printed and "2 dpmpp-2m steps" in printed and "where the time went" in printed
    assert json.loads((out / "run-quick" / "config.json").read_text())["train"]["seed"] == 3
    hint = printed.split("(try: ", 1)[1].rsplit(")", 1)[0]
    assert "--lambda-min-clipped -3" in hint and "--steps 2 " in hint  # the steps this demo sampled with
    args = shlex.split(hint)[1:] + ["--device", "cpu"]
    args[args.index("--steps") + 1] = "3"
    assert main(args) == 0
    run = json.loads((out / "more" / "run.json").read_text())
    assert run["sampling"]["solver"]["lambda_min_clipped"] == -3.0
    assert main(["demo", "--out", str(out), "--full", *tiny]) == 0
    printed = capsys.readouterr().out
    assert "full recipe" in printed and "2 of T DDPM steps" in printed and (out / "run-full" / "config.json").is_file()
    assert json.loads((out / "run-full" / "config.json").read_text())["train"]["seed"] == 0


def test_train_cli_takes_the_recipe_options(tmp_path):
    """The quick recipe's training options from the command line: --schedule, --lr-decay, --snr-gamma reach
    config.json, and a resume without them keeps them."""
    out = tmp_path / "run"
    base = ["train", "--data", "digits", "--out", str(out), "--preset", "tiny", "--batch-size", "8",
            "--save-every", "2", "--no-progress", "--unet-channels", "8,16", *CPU]
    assert main([*base, "--steps", "2", "--schedule", "cosine", "--lr-decay", "cosine", "--snr-gamma", "5"]) == 0
    train_cfg = json.loads((out / "config.json").read_text())["train"]
    assert (train_cfg["schedule"], train_cfg["lr_decay"], train_cfg["snr_gamma"]) == ("cosine", "cosine", 5.0)
    assert main([*base, "--steps", "3", "--resume"]) == 0
    train_cfg = json.loads((out / "config.json").read_text())["train"]
    assert (train_cfg["schedule"], train_cfg["snr_gamma"], train_cfg["steps"]) == ("cosine", 5.0, 3)


def test_study_sampler_labels_name_the_clipped_solver():
    study = _load("demo_study")
    spec, steps = study._parse_sampler("dpmpp-2m-l3-20")
    assert (spec.name, spec.lambda_min_clipped, steps) == ("dpmpp-2m", -3.0, 20)
    assert study._parse_sampler("ddim-50") == ("ddim", 50)
    assert study._parse_sampler("dpmpp-2m-20") == ("dpmpp-2m", 20)
    quick = RECIPES["quick"]  # the study's label for the demo's sampler is the demo's sampler
    label = f"{quick.solver}-l{-quick.solver_options['lambda_min_clipped']:g}-{quick.sample_steps}"
    assert label in study.MAIN_SAMPLERS


def test_demo_wall_times_a_whole_demo_and_reads_its_report(tmp_path):
    """demo_wall.py runs the executable it is given as a user would and keeps the FD and the time report."""
    import sys

    wall = _load("demo_wall")
    fake = tmp_path / "ddpm-fast"
    fake.write_text(f"#!{sys.executable}\n" + '''import sys
assert sys.argv[1:4] == ["demo", "--seed", "4"] and "--full" in sys.argv
print("Frechet distance ...\\n  samples (this model)          8.25   (n=400)\\n")
print("where the time went (cpu, 2 threads; recipe full: ...):")
print("\\n".join(f"  line {i}" for i in range(8)))
''')
    fake.chmod(0o755)
    run = wall.one_demo(str(fake), 4, ["--full"], tmp_path)
    assert run["fd"] == 8.25 and run["wall_s"] > 0 and run["seed"] == 4
    silent = tmp_path / "silent"
    silent.write_text(f"#!{sys.executable}\nprint('hello')\n")
    silent.chmod(0o755)
    with pytest.raises(SystemExit, match="printed no quality table"):
        wall.one_demo(str(silent), 4, ["--full"], tmp_path)
    assert run["where_the_time_went"][0].startswith("where the time went (cpu") and len(run["where_the_time_went"]) == 9
