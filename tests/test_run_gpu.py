"""The GPU run's machinery, checked on a CPU: run_gpu.sh's stages (dry run), the stage record, the kernel
table's and the bench's write-as-you-go files, time to the first result, and the sample check script.

Nothing here needs a GPU or times anything for real: these tests check that a stage plans what NOTES.md
says within its deadline, and that a stage or step killed half way leaves readable files.
"""

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddpm_fast import bench
from ddpm_fast.bench import run_loop as bench_run_loop

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "run_gpu.sh"
STAGES = ("first", "verify", "full", "full2", "full3")
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _load(name: str):
    """A script of benchmarks/ as a module (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location(f"_bench_script_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_script(*args, env=None, tmp_path=None):
    environ = {"PATH": "/usr/bin:/bin", "GPU_TAG": "h200", "PYTHON": sys.executable,
               "OUT": str(tmp_path / "out") if tmp_path else "/nonexistent/out", **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=environ, timeout=60,
                          cwd=ROOT)


# ---------------------------------------------------------------------------------------------------
# run_gpu.sh: dispatch and the dry run
# ---------------------------------------------------------------------------------------------------


@needs_bash
def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


@needs_bash
@pytest.mark.parametrize("args", [(), ("bogus",), ("first", "verify"), ("VERIFY",), ("headline",)])
def test_no_or_unknown_stage_prints_the_usage_and_exits_2(args, tmp_path):
    done = _run_script(*args, tmp_path=tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("usage: bash benchmarks/run_gpu.sh first|verify|full")
    assert not (tmp_path / "out").exists()  # nothing written


def _dry_run(stage, tmp_path, **env):
    done = _run_script(stage, env={"DRY_RUN": "1", **env}, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    steps = re.findall(r"^\[dry-run\] (\S+) \(cap (\d+) s\): (.*)$", done.stdout, flags=re.M)
    header = re.search(r"^\[dry-run\] stage (\S+): (\S+) .*budget (\d+) s, start-up (\d+) s, timeout_s (\d+); "
                       r"predicted (\d+) s .*deadline (\d+) s$", done.stdout, flags=re.M)
    assert header, done.stdout
    install = int(re.search(r"^\[dry-run\] install \(cap (\d+) s\)", done.stdout, flags=re.M)[1])
    return {name: (int(cap), cmd) for name, cap, cmd in steps if name != "install"}, header, install, done.stdout


@needs_bash
def test_first_stage_answers_correctness_and_speed_against_diffusers_at_64_and_512(tmp_path):
    steps, header, install, _ = _dry_run("first", tmp_path)
    assert list(steps) == ["verify-sample", "bench-first"]
    sample = steps["verify-sample"][1]
    assert "verify_sample.py --model cifar10 --batch 64" in sample and "--compile-mode default" in sample
    cap, cmd = steps["bench-first"]
    assert "-m ddpm_fast.bench" in cmd and "--impls diffusers,diffusers-compiled,ddpm_fast" in cmd
    assert "--batch-sizes 64,512" in cmd and "--fast-compile-mode default" in cmd and "--compile-mode default" in cmd
    assert "max-autotune" not in cmd
    budget = int(re.search(r"--time-budget (\d+)", cmd)[1])
    assert 0 < budget and cap - budget >= 100  # a case started at the budget (one default compile) still ends
    assert re.search(r"/\d{4}-\d\d-\d\d-h200-first\.json$", header[2])


@needs_bash
def test_verify_stage_plans_the_cuda_tests_and_the_kernel_tables(tmp_path):
    steps, _, _, _ = _dry_run("verify", tmp_path)
    assert list(steps) == ["pytest-cuda", "kernels-fp32", "kernels-bf16"]
    assert re.search(r"-m pytest -m cuda tests .*--junitxml \S+/pytest-cuda\.xml", steps["pytest-cuda"][1])
    for dtype in ("fp32", "bf16"):
        cmd = steps[f"kernels-{dtype}"][1]
        assert f"bench_kernels.py --dtype {dtype} --no-compile" in cmd  # no compiled baselines in verify


@needs_bash
@pytest.mark.parametrize("stage,wanted", [
    ("full", ["--compile-mode max-autotune", "--batch-sizes 64"]),
    ("full2", ["--batch-sizes 1", "ablation", "--ablation-batch 64", "reference"]),
    ("full3", ["--only training", "--benchmark-only", "--benchmark-json"]),
])
def test_full_stages_split_the_rest(stage, wanted, tmp_path):
    steps, _, _, _ = _dry_run(stage, tmp_path)
    text = " ".join(cmd for _, cmd in steps.values())
    for piece in wanted:
        assert piece in text


@needs_bash
def test_full_stage_fits_both_counted_max_autotune_compiles(tmp_path):
    """NOTES.md section 5 counts ~200 s per max-autotune compile of the CIFAR-10 U-Net (+ ~20 s of runs): the
    first case must end before the time budget (so the second starts), and a case started at the budget
    must still end inside the cap."""
    steps, _, install, _ = _dry_run("full", tmp_path)
    (cap, cmd), = steps.values()
    budget = int(re.search(r"--time-budget (\d+)", cmd)[1])
    one_case = 200 + 20
    assert budget >= 15 + one_case  # bench start-up (imports, ceilings) + ddpm_fast's case
    assert cap - budget >= one_case


@needs_bash
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("budget,warm", [("900", "0"), ("500", "1"), ("400", "0")])
def test_every_stage_fits_its_call_and_the_budget(stage, budget, warm, tmp_path):
    """The install and the steps at their caps end by the deadline; the deadline + 30 s is the call's
    timeout_s, at most 10 minutes; start-up, the call and 60 s for transfers fit the budget given."""
    done = _run_script(stage, env={"DRY_RUN": "1", "BUDGET_S": budget, "WARM": warm}, tmp_path=tmp_path)
    startup = 0 if warm == "1" else 120
    if done.returncode == 2:  # too little left for this stage: one line, nothing run
        assert "give the machine back" in done.stderr and int(budget) - startup - 60 < 60 + (240 if stage == "first" else 0)
        return
    steps, header, install, out = _dry_run(stage, tmp_path, BUDGET_S=budget, WARM=warm)
    timeout_s, predicted, deadline = int(header[5]), int(header[6]), int(header[7])
    assert timeout_s == deadline + 30 <= 600
    assert startup + timeout_s + 30 <= int(budget) - (240 if stage == "first" else 0)
    assert install + sum(cap for cap, _ in steps.values()) <= deadline
    if budget == "900":
        assert predicted <= deadline  # the prediction fits a fresh session's call
    assert f'command="BUDGET_S={budget}' in out and f"timeout_s={timeout_s})" in out


@needs_bash
def test_dry_run_of_the_pair_fits_a_fresh_15_minute_budget(tmp_path):
    done = _run_script("plan", env={"DRY_RUN": "1"}, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    first = re.search(r"call 1 \(first\): start-up (\d+) \+ timeout_s (\d+) \+ transfers (\d+) = (\d+) s at most; "
                      r"(\d+) s left of 900", out)
    assert first and int(first[1]) >= 60 and int(first[4]) == sum(int(first[i]) for i in (1, 2, 3))
    warm = re.search(r"call 2 \(verify\) at once.*timeout_s (\d+) \+ transfers (\d+) = (\d+) s; total (\d+) of 900", out)
    assert warm and int(warm[4]) <= 900 and int(warm[1]) >= 120  # pytest -m cuda gets a real slot
    cold = re.search(r"call 2 later, machine cold: idle (\d+) \+ start-up (\d+) .* total (\d+) of 900 s", out)
    assert cold and int(cold[3]) <= 900
    assert re.search(r'run\(carry=\["\.whl"\], command="BUDGET_S=900 OUT=\$OUT bash benchmarks/run_gpu.sh first", '
                     r"timeout_s=\d+\)", out)
    # not a dry run: plan refuses
    assert _run_script("plan", tmp_path=tmp_path).returncode == 2


@needs_bash
@pytest.mark.parametrize("env,match", [({"BUDGET_S": "lots"}, "BUDGET_S must be whole seconds"),
                                       ({"WARM": "yes"}, "WARM must be 0 or 1"),
                                       ({"BUDGET_S": "200"}, "give the machine back")])
def test_bad_or_spent_budget_is_one_line(env, match, tmp_path):
    done = _run_script("verify", env={"DRY_RUN": "1", **env}, tmp_path=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and match in lines[0] and done.stdout == ""


@needs_bash
def test_a_step_without_budget_is_recorded_as_skipped_and_the_install_falls_back(tmp_path):
    """A real (not dry) verify stage with a stand-in python: pip fails, so the editable install is
    unusable and the script falls back to the target install; a budget of 130 s (deadline 70 s) leaves
    pytest no room (and a kernel table none once its cap falls under 30 s): a step without budget is
    recorded as not started (exit 125), not silently dropped, and the stage still writes its record."""
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "calls.log"
    (fake / "python3").write_text(f"""#!/bin/bash
echo "$*" >> {calls}
case "$1 $2" in
  "-m pip") exit 1 ;;                        # both installs fail
  "-c import"*) exit 1 ;;                    # ddpm_fast.kernels does not import
  "-m pytest"|"benchmarks/bench_kernels.py "*) exit 0 ;;
esac
exec {sys.executable} "$@"
""")
    (fake / "python3").chmod(0o755)
    site = tmp_path / "site-ddpm"
    done = _run_script("verify", env={"PYTHON": str(fake / "python3"), "BUDGET_S": "130", "WARM": "1",
                                      "SITE_DDPM": str(site)}, tmp_path=tmp_path)
    log = calls.read_text()
    assert "-m pip install -q --no-deps --no-build-isolation -e ." in log
    assert f"--target {site} ." in log  # the fallback ran
    assert not [line for line in log.splitlines() if line.startswith("-m pytest")]  # never started
    record = json.loads(next((tmp_path / "out").glob("*-h200-verify.json")).read_text())
    steps = {s["name"]: s for s in record["steps"]}
    assert list(steps) == ["install", "pytest-cuda", "kernels-fp32", "kernels-bf16"]
    assert steps["install"]["rc"] != 0 and f"--target {site}" in steps["install"]["command"]
    assert steps["pytest-cuda"]["rc"] == 125 and steps["pytest-cuda"]["cap_s"] < 60  # 70 - 60 reserved
    for name in ("kernels-fp32", "kernels-bf16"):  # their caps depend on how long the install took here
        assert (steps[name]["rc"] == 125) == (steps[name]["cap_s"] < 30) and steps[name]["rc"] in (0, 125)
    md = next((tmp_path / "out").glob("*-h200-verify.md")).read_text()
    assert done.returncode == 1 and "| pytest-cuda | 125 (not started: budget spent) |" in md


# ---------------------------------------------------------------------------------------------------
# The stage record
# ---------------------------------------------------------------------------------------------------

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="3">
<testcase classname="tests.test_sampler" name="test_a" time="1.5"/>
<testcase classname="tests.test_sampler" name="test_b" time="0.1"><failure message="AssertionError: off by 0.3&#10;more">trace</failure></testcase>
<testcase classname="tests.test_kernels" name="test_c" time="0.0"><skipped message="needs CUDA"/></testcase>
</testsuite></testsuites>"""


def test_stage_record_keeps_each_step_and_survives_a_cut_pytest_run(tmp_path):
    stage = _load("gpu_stage")
    record_path = tmp_path / "2026-12-01-h200-verify.json"
    assert stage.main(["start", "--json", str(record_path), "--stage", "verify", "--predicted-s", "330",
                       "--compiles", "1 U-Net"]) == 0
    record = json.loads(record_path.read_text())
    assert record["steps"] == [] and record["environment"]["torch"] == torch.__version__
    assert "nvidia_smi" in record["environment"]

    xml = tmp_path / "pytest-cuda.xml"
    xml.write_text(JUNIT)
    assert stage.main(["step", "--json", str(record_path), "--name", "pytest-cuda", "--command", "pytest -m cuda",
                       "--cap", "190", "--rc", "1", "--wall", "42", "--elapsed", "60", "--kind", "pytest",
                       "--result", str(xml)]) == 0
    # a second run cut at its cap: no XML, only the streamed -v log
    log = tmp_path / "cut.log"
    log.write_text("tests/test_kernels.py::test_x[cuda] PASSED    [  1%]\n"
                   "tests/test_kernels.py::test_y[cuda] FAILED    [  2%]\n"
                   "tests/test_kernels.py::test_z[cuda] ")
    assert stage.main(["step", "--json", str(record_path), "--name", "pytest-cut", "--command", "pytest",
                       "--cap", "10", "--rc", "124", "--wall", "10", "--elapsed", "75", "--kind", "pytest",
                       "--result", str(tmp_path / "missing.xml"), "--log", str(log)]) == 0
    record = json.loads(record_path.read_text())
    full, cut = (s["result"] for s in record["steps"])
    assert full["complete"] and full["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert full["failed"] == ["tests.test_sampler::test_b"]
    assert full["tests"][1]["message"] == "AssertionError: off by 0.3"
    assert not cut["complete"] and cut["counts"] == {"passed": 1, "failed": 1}
    assert record["status"] == 1 and record["wall_s"] == 75
    md = record_path.with_suffix(".md").read_text()
    assert "| pytest-cut | 124 (cap hit) | 10 | 10 |" in md and "FAILED tests.test_sampler::test_b" in md
    assert "the run was cut" in md


def test_stage_record_step_without_a_start_is_one_line(tmp_path, capsys):
    stage = _load("gpu_stage")
    rc = stage.main(["step", "--json", str(tmp_path / "none.json"), "--name", "x", "--command", "x", "--cap", "1",
                     "--rc", "0", "--wall", "0", "--elapsed", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "run `start` first" in err[0]


# ---------------------------------------------------------------------------------------------------
# Write as you go: the kernel table after every row, the bench after every case
# ---------------------------------------------------------------------------------------------------


def test_kernel_table_is_on_disk_after_its_first_row(tmp_path, monkeypatch):
    kernels_bench = _load("bench_kernels")
    out = tmp_path / "kernels.json"
    seen = []
    real_write = kernels_bench.write_report

    class Killed(Exception):
        pass

    def write_then_maybe_die(path, report):
        real_write(path, report)
        seen.append(json.loads(Path(path).read_text()))  # what a kill right now would leave
        if len(report["results"]) == 1:
            raise Killed

    monkeypatch.setattr(kernels_bench, "write_report", write_then_maybe_die)
    with pytest.raises(Killed):
        kernels_bench.main(["--device", "cpu", "--cases", "q_sample,reverse_noise", "--iters", "1", "--no-compile",
                            "--out", str(out)])
    assert [len(s["results"]) for s in seen] == [0, 1]
    left = json.loads(out.read_text())
    assert left["complete"] is False and left["compiled_baselines"] is False
    row, = left["results"]
    assert row["case"] == "q_sample" and row["impls"]["kernel"]["us"] > 0 and "compiled" not in row["impls"]
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries

    monkeypatch.setattr(kernels_bench, "write_report", real_write)
    assert kernels_bench.main(["--device", "cpu", "--cases", "q_sample", "--iters", "1", "--out", str(out)]) == 0
    done = json.loads(out.read_text())
    assert done["complete"] is True and len(done["results"]) == 2  # both CPU shapes


def test_bench_rewrites_its_json_after_every_case_with_time_to_first_result(tmp_path, monkeypatch):
    def runner(case, ctx):
        # ddpm_fast: a slow full warm-up (compile + capture); reference: a quick partial warm-up
        if case.impl == "ddpm_fast":
            return bench.Runner(ctx.device, lambda: time.sleep(0.01), warmup=None)
        return bench.Runner(ctx.device, lambda: time.sleep(0.03), warmup=lambda: time.sleep(0.005))

    slow_warmup = bench.Runner.warmup

    def warmup(self):
        if self.warmup_is_full:
            time.sleep(0.2)  # stands for compilation and capture
        slow_warmup(self)

    monkeypatch.setattr(bench_run_loop, "make_runner", runner)
    monkeypatch.setattr(bench.Runner, "warmup", warmup)
    out = tmp_path / "bench.json"
    snapshots = []
    real_write = bench_run_loop._write

    def write(result, path):
        real_write(result, path)
        snapshots.append(json.loads(Path(path).read_text()))

    monkeypatch.setattr(bench_run_loop, "_write", write)
    rc = bench.main(["--device", "cpu", "--model", "tiny", "--only", "sampling", "--impls", "reference,ddpm_fast",
                     "--steps", "2", "--repeats", "2", "--out", str(out)])
    assert rc == 0
    assert [len(s["cases"]) for s in snapshots][:3] == [0, 1, 2]  # header, then after each case
    ref, fast = json.loads(out.read_text())["cases"]
    # partial warm-up: the first images come with the first timed run
    assert ref["first_run_s"] == pytest.approx(ref["build_s"] + ref["warmup_s"] + ref["seconds"][0])
    # full warm-up: it made the first images
    assert fast["first_run_s"] == pytest.approx(fast["build_s"] + fast["warmup_s"])
    assert fast["warmup_s"] >= 0.2 and fast["startup_s"] >= 0.19
    assert fast["first_image_full_s"] == pytest.approx(fast["startup_s"] + fast["median_s"] / 2 * bench.FULL_STEPS)
    assert "Time to the first result" in out.with_suffix(".md").read_text()


# ---------------------------------------------------------------------------------------------------
# The sample check
# ---------------------------------------------------------------------------------------------------


def _verify_sample(tmp_path, *extra):
    script = _load("verify_sample")
    out = tmp_path / "sample.json"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        rc = script.main(["--device", "cpu", "--model", "tiny", "--batch", "2", "--steps", "3",
                          "--compile-mode", "none", "--out", str(out), *extra])
    finally:
        torch.set_num_threads(threads)
    return rc, json.loads(out.read_text())


def test_verify_sample_bf16_fast_path_within_its_derived_tolerance(tmp_path):
    rc, result = _verify_sample(tmp_path, "--dtype", "bfloat16")
    assert rc == 0 and result["ok"] and result["within_tolerance"]
    assert result["sampler"]["dtype"] == "bfloat16" and result["steps"] == 3
    derivation = result["tolerance_derivation"]
    assert derivation["low_dtype"] == "bfloat16" and derivation["eps_max_abs_diff"] > 0
    # bf16 really moves the reference chain, and the tolerance is a few times that, far under the image range
    assert 0 < derivation["reference_low_max_abs_diff"] < 0.5
    assert result["tolerance"] == pytest.approx(derivation["safety"] * derivation["reference_low_max_abs_diff"]
                                                + derivation["fp32_floor"])
    assert derivation["fp32_floor"] < 0.01 * result["tolerance"]
    assert 0 < result["max_abs_diff"] <= result["tolerance"] < 2.0
    assert result["time_to_first_image_s"] > 0 and result["graph_captured"] is None  # no graphs on a CPU


def test_verify_sample_runs_its_fp32_reference_without_tf32(tmp_path, monkeypatch):
    """cuDNN's default TF32 would make the fp32 reference a 10-bit-mantissa one: off while the check runs,
    restored after."""
    from ddpm_fast import reference

    seen = []
    real = reference.sample

    def recording(*args, **kwargs):
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return real(*args, **kwargs)

    monkeypatch.setattr(reference, "sample", recording)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    rc, result = _verify_sample(tmp_path)
    assert rc == 0 and seen == [(False, False)] * 2 and result["tf32"] == {"cudnn": False, "matmul": False}
    assert torch.backends.cudnn.allow_tf32 is True


def test_verify_sample_fails_when_the_bound_is_too_tight(tmp_path):
    rc, result = _verify_sample(tmp_path, "--dtype", "bfloat16", "--safety", "1e-6")
    assert rc == 1 and not result["ok"] and result["max_abs_diff"] > result["tolerance"]


def test_verify_sample_fp32_fast_path_has_an_fp32_tolerance(tmp_path):
    rc, result = _verify_sample(tmp_path)  # FastSampler's CPU default: fp32
    derivation = result["tolerance_derivation"]
    assert derivation["low_dtype"] == "float32" and derivation["reference_low_max_abs_diff"] == 0
    assert rc == 0 and result["max_abs_diff"] <= result["tolerance"] == pytest.approx(derivation["fp32_floor"])
    assert result["tolerance"] < 1e-3


def test_verify_sample_eps_gain_bounds_a_perturbed_step():
    """sum |b_k| is a real bound: perturbing eps by d moves one clipped reverse step by at most |b_k| d."""
    from ddpm_fast import reference
    from ddpm_fast.schedule import NoiseSchedule

    script = _load("verify_sample")
    schedule = NoiseSchedule.linear(1000)
    steps = [999, 600, 300, 0]
    gains = script.eps_coefficients(schedule, steps)
    respaced = schedule.respaced(steps)
    g = torch.Generator().manual_seed(3)
    x, eps, z = (torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    d = 1e-3
    for k, gain in enumerate(gains.tolist()):
        j = len(steps) - 1 - k  # index of step k in the respaced (ascending) schedule
        t = torch.full((4,), j)
        a = reference.reverse_step(x, t, eps, respaced, z, clip_x0=True)
        b = reference.reverse_step(x, t, eps + d * torch.sign(torch.randn(eps.shape, generator=g, dtype=eps.dtype)),
                                   respaced, z, clip_x0=True)
        assert (a - b).abs().max().item() <= gain * d * (1 + 1e-9)


def test_verify_sample_bad_arguments_are_one_line(tmp_path, capsys):
    script = _load("verify_sample")
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--batch", "0", "--out", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert script.main(["--device", "cuda", "--out", str(tmp_path / "x.json")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no CUDA GPU" in err[0]


# ---------------------------------------------------------------------------------------------------
# fetch_wheels.sh: what the GPU image lacks, and nothing else (DRY_RUN: no network)
# ---------------------------------------------------------------------------------------------------


def _wheel(folder: Path, name: str, version: str, requires=()):
    import zipfile

    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        meta = "".join(f"Requires-Dist: {r}\n" for r in requires)
        z.writestr(f"{name}-{version}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{meta}")
    return path


@needs_bash
def test_fetch_wheels_walks_requirements_against_the_image_list(tmp_path):
    """Requirements the image has are left there, missing ones (markers for Python 3.12 on Linux, no
    extras) are fetched, a wheel nothing needs is removed, one already there is kept (idempotent)."""
    pytest.importorskip("packaging")
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    shutil.copy(ROOT / "benchmarks" / "fetch_wheels.sh", repo / "benchmarks")
    whl = repo / ".whl"
    whl.mkdir()
    _wheel(whl, "diffusers", "0.42.1", ["numpy", "importlib_metadata", "torch>=2; extra == 'torch'",
                                         "backport-only; python_version < '3.8'"])
    _wheel(whl, "stale", "1.0")
    kinds = tmp_path / "KINDS.md"
    kinds.write_text("Packages: numpy, torch, zipp.\n")
    done = subprocess.run(["bash", str(repo / "benchmarks" / "fetch_wheels.sh")], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "DRY_RUN": "1",
                               "KINDS_MD": str(kinds), "HOME": str(tmp_path)}, cwd=repo, timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "have diffusers-0.42.1-py3-none-any.whl" in out and "needs numpy: in the image" in out
    assert "would fetch importlib_metadata" in out
    assert "torch" not in out.replace("KINDS", "") and "backport-only" not in out  # extras and other Pythons
    assert "removing stale-1.0-py3-none-any.whl (not needed)" in out and "lists other packages" in out
    assert (whl / "stale-1.0-py3-none-any.whl").exists()  # a dry run removes nothing
