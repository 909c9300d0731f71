"""Every Triton kernel specialisation the public entry points launch compiles for a real GPU (sm_90, sm_80).

The rest of the suite runs the kernels through Triton's interpreter, which accepts code the compiler
rejects (module globals annotated ``tl.constexpr``, for one). ``benchmarks/compile_kernels.py`` records the
launches of ``ddpm_fast.kernels.*`` made the way ``ops``, the sampler and training make them, and compiles
each distinct specialisation with ``triton.compile`` (ptxas and cuobjdump ship in the triton wheel: no GPU,
no driver). It runs in a subprocess without TRITON_INTERPRET and with an empty Triton cache, so every
specialisation really is compiled here.

Against Triton 3.6 (the GPU image's): ``python -m venv v36 && v36/bin/pip install torch==2.13.0
triton==3.6.0 pytest && v36/bin/pip install -e .`` then ``v36/bin/python -m pytest tests/test_kernel_compile.py``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "compile_kernels.py"
sys.path.insert(0, str(SCRIPT.parent))
import compile_kernels  # noqa: E402  (the pure helpers; the compile itself runs in the subprocess)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "triton-cache")  # cold: nothing is taken from an earlier run
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences its warning)
    out = tmp / "report.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--markdown", str(tmp / "table.md")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.is_file(), f"compile_kernels.py wrote no report (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    data = json.loads(out.read_text())
    data["exit_code"], data["stdout"] = proc.returncode, proc.stdout
    return data


def test_every_specialisation_compiles_for_sm90_and_sm80(report):
    failed = [f"{r['kernel']} {r['target']} [{r['cases'][0]}]: {r['error']}" for r in report["rows"] if not r["ok"]]
    assert not failed, "\n".join(failed)
    assert report["exit_code"] == 0, report["stdout"]
    by_kernel = {}
    for row in report["rows"]:
        by_kernel.setdefault(row["kernel"], set()).add(row["target"])
    assert by_kernel == {name: {"sm_90", "sm_80"} for name in report["kernels"]}
    assert set(report["kernels"]) == {"_q_sample_kernel", "_reverse_update_kernel", "_seeded_randn_kernel"}


def test_no_register_spills_and_no_local_memory(report):
    for row in report["rows"]:
        where = f"{row['kernel']} {row['target']} [{row['cases'][0]}]"
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0, f"{where} spills registers"
        assert row["local"] == 0, f"{where} uses local memory"
        assert row["reg"] <= 255


def test_the_sampler_hot_path_is_vectorised(report):
    hot = [r for r in report["rows"] if any(c.startswith(compile_kernels.HOT_PATH) for c in r["cases"])]
    assert {r["target"] for r in hot} == {"sm_90", "sm_80"}
    for row in hot:
        assert row["pointers"]["x"] == "fp32" and row["pointers"]["eps"] == "bf16"
        assert row["constexprs"]["NOISE"] == 2 and row["constexprs"]["OUT_CL"] and row["constexprs"]["E_CL"]
        assert compile_kernels._vectorised(row), row["memory_ops"]
    assert report["hot_path_unvectorised"] == 0


def test_the_launches_cover_every_dtype_layout_noise_mode_clip_and_row_kind(report):
    seen = {}
    for row in report["rows"]:
        for name, value in [*row["constexprs"].items(), *(("*" + k, v) for k, v in row["pointers"].items())]:
            seen.setdefault((row["kernel"], name), set()).add(value)
    update, noising, randn = "_reverse_update_kernel", "_q_sample_kernel", "_seeded_randn_kernel"
    dtypes = {"fp32", "bf16", "fp16"}
    assert seen[(update, "NOISE")] == {0, 1, 2}
    assert seen[(update, "CLIP")] == seen[(update, "ROW_PER_SAMPLE")] == {False, True}
    for flag in ("OUT_CL", "X_CL", "E_CL", "Z_CL"):
        assert seen[(update, flag)] == {False, True}
    assert seen[(update, "*x")] == seen[(update, "*eps")] == dtypes
    assert seen[(update, "*row")] == {"i32", "i64"}
    assert seen[(noising, "NOISE")] == {1, 2} and seen[(noising, "STEP_PER_SAMPLE")] == {False, True}
    for flag in ("OUT_CL", "X_CL", "N_CL", "NO_CL"):
        assert seen[(noising, flag)] == {False, True}
    assert seen[(noising, "*x0")] == seen[(noising, "*out")] == dtypes and seen[(noising, "*t")] == {"i32", "i64"}
    assert seen[(randn, "OUT_CL")] == seen[(randn, "STEP_PER_SAMPLE")] == {False, True}
    assert seen[(randn, "*out")] == dtypes
    # odd sizes (C = 1, 5 x 7) besides CIFAR's C = 3; block sizes from the smallest to the largest
    assert {1, 3} <= seen[(update, "C")] and {128, 1024} <= seen[(update, "BLOCK")]


def test_memory_op_parser_and_vector_rule():
    ptx = "\tld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];\n\tld.global.nc.b32 %r5, [%rd2];\n" \
          "\tld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd3];\n\tst.global.v2.b32 [%rd4], {%r1, %r2};\n"
    ops = compile_kernels._memory_ops(ptx)
    assert ops == {"ld": {"v4.b32": 2, "b32": 1}, "st": {"v2.b32": 1}}
    # BLOCK 1024 over 4 warps: 8 elements a thread -> x 2 + eps 1 v4 loads, 2 v4 stores
    row = {"block": 1024, "num_warps": 4, "memory_ops": ops}
    assert not compile_kernels._vectorised(row)  # 2 v4 loads < 3, v2 stores are not 128-bit
    row["memory_ops"] = {"ld": {"v4.b32": 3, "b32": 15}, "st": {"v4.b32": 2}}
    assert compile_kernels._vectorised(row)
