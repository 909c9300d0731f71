"""`ddpm-fast sample --solver ...` end to end on a tiny run: the fast path equals the oracle on the same
seeds, the options reach the sampler, and bad combinations are one-line errors."""

import json

import numpy as np
import pytest

from ddpm_fast.cli import main
from test_cli import _error_line, trained_run  # noqa: F401 - the tiny trained run fixture and the error-line check

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("solver,extra", [("dpmpp-2m", []), ("unipc", ["--solver-order", "3", "--solver-type", "bh1"]),
                                          ("dpmpp-2m-sde", ["--timestep-spacing", "trailing"])])
def test_sample_with_a_solver_equals_the_oracle(trained_run, tmp_path, capsys, solver, extra):
    args = ["sample", str(trained_run), "--seeds", "0-2", "--solver", solver, "--steps", "4", "--device", "cpu", *extra]
    assert main([*args, "--out", str(tmp_path / "fast")]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert f"with FastSampler, {solver}" in line and "4 steps" in line and "clip off" in line
    assert main([*args, "--out", str(tmp_path / "ref"), "--reference"]) == 0
    fast = np.load(tmp_path / "fast" / "samples.npz")["arr_0"].astype(int)
    ref = np.load(tmp_path / "ref" / "samples.npz")["arr_0"].astype(int)
    assert fast.shape == (3, 8, 8, 1)
    record = json.loads((tmp_path / "fast" / "run.json").read_text())["sampling"]
    assert record["solver"]["solver"] == solver and record["steps"] == 4 and record["clip_x0"] is False
    # uint8 pixels from float32 vs float64 updates: at most one rounding step apart
    assert np.abs(fast - ref).max() <= 1 and fast.std() > 5


def test_solver_errors_are_one_line(trained_run, tmp_path, capsys):
    base = ["sample", str(trained_run), "--out", str(tmp_path / "x"), "--seeds", "0", "--device", "cpu"]
    assert main([*base, "--solver", "dpmpp-2m", "--clip"]) == 2
    assert "clip_x0 is not available with dpmpp-2m" in _error_line(capsys)
    assert main([*base, "--solver", "dpmpp-2m", "--solver-type", "bh2"]) == 2
    assert "solver_type 'bh2' does not fit dpmpp-2m" in _error_line(capsys)
    assert main([*base, "--solver-order", "3"]) == 2
    assert "need a solver" in _error_line(capsys)
    assert main([*base, "--solver", "ddpm", "--no-corrector"]) == 2
    assert "corrector" in _error_line(capsys)
