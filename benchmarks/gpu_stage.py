#!/usr/bin/env python3
"""The record of one ``benchmarks/run_gpu.sh`` stage: one JSON (and its Markdown) rewritten after every step.

    python3 benchmarks/gpu_stage.py start --json OUT/2026-12-01-h200-verify.json --stage verify \
        --predicted-s 330 --compiles "1 U-Net (default mode), ~120 Triton kernels"
    python3 benchmarks/gpu_stage.py step --json OUT/...json --name pytest-cuda --command "..." --cap 190 \
        --rc 0 --wall 143 --elapsed 170 --kind pytest --result OUT/pytest-cuda.xml --log OUT/pytest-cuda.log

``start`` records the machine (nvidia-smi, driver, python/torch/CUDA/triton/diffusers versions) and the
stage's predicted wall time; ``step`` appends one step (its exact command, time cap, exit status, wall
time) with what it produced folded in: a pytest summary (from the JUnit XML, or from the streamed
``-v -rA`` log when a killed run left no XML), a kernel table, the verify sample's figures, a
``ddpm-fast bench`` result or a pytest-benchmark file. Every write is atomic, so a stage killed at any
point leaves the record of the steps it finished. Bad input: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# run as a script from benchmarks/: the checkout itself, so a failed `pip install -e .` is recorded as a
# failed step instead of making the record unwritable
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ddpm_fast.checkpoint import atomic_write, write_json_atomic  # noqa: E402

FORMAT = "ddpm-fast-gpu-stage"
KINDS = ("pytest", "kernels", "sample", "bench", "pytest-benchmark", "none")
_OUTCOME = re.compile(r"^(?:(?P<id1>\S+::\S+) (?P<o1>PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b"
                      r"|(?P<o2>PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS) (?P<id2>\S+::\S+))")


def _run(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{cmd[0]} failed: {exc}"
    return (done.stdout + done.stderr).strip()


def environment() -> dict:
    """The machine and the software versions, read now (nothing here may fail the stage)."""
    env = {"hostname": platform.node(), "python": platform.python_version(), "platform": platform.platform()}
    env["nvidia_smi"] = _run(["nvidia-smi"])
    env["gpu_query"] = _run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,"
                             "power.draw,power.limit,temperature.gpu,memory.used,memory.total", "--format=csv"])
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        env["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception as exc:  # noqa: BLE001 - a broken torch is itself the finding
        env["torch"] = f"import failed: {exc}"
    for name in ("triton", "diffusers", "pytest_benchmark", "numpy"):
        try:
            env[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001
            env[name] = f"missing ({type(exc).__name__})"
    try:
        import pynvml

        pynvml.nvmlInit()
        env["nvml_driver"] = pynvml.nvmlSystemGetDriverVersion()
        pynvml.nvmlShutdown()
    except Exception as exc:  # noqa: BLE001
        env["nvml_driver"] = f"unavailable ({type(exc).__name__})"
    env["nproc"] = _run(["nproc"])
    return env


def pytest_summary(xml_path: Path | None, log_path: Path | None) -> dict:
    """Counts, failures and per-test times from the JUnit XML; from the streamed log if there is none."""
    if xml_path is not None and xml_path.is_file():
        try:
            return _junit_summary(xml_path)
        except ET.ParseError:
            pass  # a run killed while writing it: fall back to the log
    tests = {}
    if log_path is not None and log_path.is_file():
        for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            m = _OUTCOME.match(line.strip())
            if m:
                test_id, outcome = (m["id1"], m["o1"]) if m["id1"] else (m["id2"], m["o2"])
                tests[test_id] = outcome.lower()
    counts = {}
    for outcome in tests.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    return {"source": "log" if tests else "none", "complete": False, "counts": counts,
            "failed": sorted(t for t, o in tests.items() if o in ("failed", "error")),
            "tests": [{"id": t, "outcome": o} for t, o in tests.items()]}


def _junit_summary(path: Path) -> dict:
    root = ET.parse(path).getroot()
    tests, counts, failed = [], {}, []
    for case in root.iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            child = case.find(tag)
            if child is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (child.get("message") or "").splitlines()[0][:300] if child.get("message") else None
                break
        counts[outcome] = counts.get(outcome, 0) + 1
        tests.append({"id": test_id, "outcome": outcome, "time_s": float(case.get("time", 0) or 0),
                      **({"message": message} if message else {})})
        if outcome in ("failed", "error"):
            failed.append(test_id)
    return {"source": "junit", "complete": True, "counts": counts, "failed": failed, "tests": tests}


def _load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def step_result(kind: str, result: Path | None, log: Path | None) -> dict | None:
    """What a step produced, folded into the stage record (None when it left nothing readable)."""
    if kind == "pytest":
        return pytest_summary(result, log)
    if kind == "none" or result is None:
        return None
    data = _load_json(result)
    if data is None:
        return None
    if kind == "pytest-benchmark":  # the figures, not pytest-benchmark's machine dump
        return {"benchmarks": [{"name": b.get("name"), "median_s": b.get("stats", {}).get("median"),
                                "rounds": b.get("stats", {}).get("rounds"), "extra_info": b.get("extra_info")}
                               for b in data.get("benchmarks", [])]}
    return data


def markdown(record: dict) -> str:
    """The stage record as Markdown: the machine, each step, then each step's figures."""
    env = record.get("environment", {})
    lines = [f"# ddpm-fast GPU stage `{record['stage']}`: {env.get('device') or 'no CUDA device'}", "",
             f"- started {record['created']}; torch {env.get('torch')} (CUDA {env.get('cuda')}), triton "
             f"{env.get('triton')}, diffusers {env.get('diffusers')}, python {env.get('python')}, NVML driver "
             f"{env.get('nvml_driver')}",
             f"- predicted wall time {record['prediction'].get('wall_s')} s ({record['prediction'].get('compiles')}); "
             f"measured so far {record.get('wall_s')} s",
             "", "| step | exit | wall s | cap s | command |", "|---|---|---|---|---|"]
    for s in record["steps"]:
        note = " (cap hit)" if s["rc"] in (124, 137) else " (not started: budget spent)" if s["rc"] == 125 else ""
        lines.append(f"| {s['name']} | {s['rc']}{note} | {s['wall_s']} | "
                     f"{s['cap_s']} | `{s['command'][:200]}` |")
    for s in record["steps"]:
        lines += _step_markdown(s)
    return "\n".join(lines) + "\n"


def _step_markdown(step: dict) -> list[str]:
    res, kind = step.get("result"), step.get("kind")
    if not res:
        return []
    out = ["", f"## {step['name']}", ""]
    if kind == "pytest":
        counts = ", ".join(f"{n} {k}" for k, n in sorted(res["counts"].items())) or "no test ran (none selected?)"
        out.append(f"{counts} (from {'the JUnit XML' if res['complete'] else 'the streamed log: the run was cut'})")
        out += [f"- FAILED {t}" for t in res["failed"]]
    elif kind == "kernels":
        out += [f"{res.get('device')}, {res.get('dtype')}, peak copy {res.get('peak_copy_gbs')} GB/s, "
                f"compiled baselines {res.get('compiled_baselines')}, complete {res.get('complete')}", "",
                "| case | shape | kernel GB/s | copy GB/s | kernel/copy | x eager |", "|---|---|---|---|---|---|"]
        for r in res.get("results", []):
            out.append(f"| {r['case']} | {tuple(r['shape'])} | {r['impls']['kernel']['gbs']} | {r['copy_gbs']} | "
                       f"{r['kernel_vs_copy']} | {r['speedup_vs_eager']} |")
    elif kind == "sample":
        out.append(f"ok {res.get('ok')}: {res.get('model')} batch {res.get('batch')} x {res.get('steps')} steps, "
                   f"max |fast - reference| {_num(res.get('max_abs_diff'))} (tolerance {_num(res.get('tolerance'))}), "
                   f"rel L2 {_num(res.get('rel_l2'))}, graph captured {res.get('graph_captured')}, time to first image "
                   f"{_num(res.get('time_to_first_image_s'))} s, steady run {_num(res.get('steady_run_s'))} s")
    elif kind == "bench":
        from ddpm_fast.bench import markdown_report

        out.append(markdown_report(res))
    elif kind == "pytest-benchmark":
        out += ["| test | median s | images/s |", "|---|---|---|"]
        for b in res["benchmarks"]:
            ips = (b.get("extra_info") or {}).get("images_per_s")
            out.append(f"| {b['name']} | {_num(b['median_s'])} | {_num(ips)} |")
    return out


def _num(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "—"


def _write(path: Path, record: dict) -> None:
    write_json_atomic(path, record)
    text = markdown(record)
    atomic_write(path.with_suffix(".md"), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_stage.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    start = sub.add_parser("start", help="create the stage record with the machine's description")
    start.add_argument("--json", type=Path, required=True)
    start.add_argument("--stage", required=True)
    start.add_argument("--predicted-s", type=float, required=True)
    start.add_argument("--compiles", required=True, help="the compiles the prediction counts, in words")
    start.add_argument("--argv", default="", help="how run_gpu.sh was called")
    step = sub.add_parser("step", help="append one finished step")
    step.add_argument("--json", type=Path, required=True)
    step.add_argument("--name", required=True)
    step.add_argument("--command", required=True)
    step.add_argument("--cap", type=int, required=True)
    step.add_argument("--rc", type=int, required=True)
    step.add_argument("--wall", type=int, required=True)
    step.add_argument("--elapsed", type=int, required=True, help="seconds since the stage began")
    step.add_argument("--kind", choices=KINDS, default="none")
    step.add_argument("--result", type=Path, default=None)
    step.add_argument("--log", type=Path, default=None)
    args = parser.parse_args(argv)

    if args.verb == "start":
        record = {"format": FORMAT, "version": 1, "stage": args.stage,
                  "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  "invocation": args.argv, "environment": environment(),
                  "prediction": {"wall_s": args.predicted_s, "compiles": args.compiles},
                  "steps": [], "wall_s": 0, "status": 0}
    else:
        try:
            record = json.loads(args.json.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            print(f"gpu_stage.py: error: {args.json}: {exc} (run `start` first)", file=sys.stderr)
            return 2
        if record.get("format") != FORMAT:
            print(f"gpu_stage.py: error: {args.json} is not a {FORMAT} record", file=sys.stderr)
            return 2
        record["steps"].append({"name": args.name, "command": args.command, "cap_s": args.cap, "rc": args.rc,
                                "wall_s": args.wall, "kind": args.kind,
                                "result_file": args.result.name if args.result else None,
                                "result": step_result(args.kind, args.result, args.log)})
        record["wall_s"] = args.elapsed
        record["status"] = int(any(s["rc"] != 0 for s in record["steps"]))
    _write(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
