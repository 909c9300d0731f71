"""The benchmark JSON's schema: its version number and the validator every writer and reader checks against.
"""

from __future__ import annotations

import math

from ..solvers import MULTISTEP_SOLVERS
from .cases import FULL_STEPS

SCHEMA_VERSION = 1


def validate_result(result: dict) -> None:
    """Check a benchmark JSON document's schema; raises ValueError listing every problem found."""
    problems = []

    def need(obj, key, types, where):
        if not isinstance(obj, dict) or key not in obj:
            problems.append(f"{where}: missing {key!r}")
            return None
        if not isinstance(obj[key], types):
            problems.append(f"{where}.{key}: expected {types}, got {type(obj[key]).__name__}")
        return obj[key]

    need(result, "schema_version", int, "result")
    device = need(result, "device", dict, "result")
    cpu_only = need(result, "cpu_only", bool, "result")
    if isinstance(device, dict):
        name = need(device, "name", str, "device")
        if cpu_only and isinstance(name, str) and not name.startswith("CPU: "):
            problems.append(f"device.name must start with 'CPU: ' on a CPU-only run, got {name!r}")
    need(result, "software", dict, "result")
    need(result, "command", str, "result")
    cases = need(result, "cases", list, "result") or []
    number = (int, float)
    for i, case in enumerate(cases if isinstance(cases, list) else []):
        where = f"cases[{i}]"
        for key in ("kind", "impl"):
            need(case, key, str, where)
        need(case, "batch_size", int, where)
        need(case, "steps", int, where)
        error = need(case, "error", (str, type(None)), where)
        for key in ("images_per_s", "ms_per_step", "mfu"):
            value = need(case, key, (*number, type(None)), where)
            if error is None and key != "mfu" and (value is None or not (isinstance(value, number) and value > 0
                                                                         and math.isfinite(value))):
                problems.append(f"{where}.{key}: a case without error needs a positive finite number, got {value!r}")
        if cpu_only and case.get("mfu") is not None:
            problems.append(f"{where}.mfu must be null on a CPU-only run")
        if error is None and case.get("kind") == "sampling":
            # DDPM figures are for the full schedule; a few-step solver's are for the steps it ran
            few_step = (result.get("settings") or {}).get("solver") in MULTISTEP_SOLVERS
            want = case.get("steps_timed") if few_step else FULL_STEPS
            if not isinstance(case.get("steps_timed"), int) or case.get("steps_reported") != want:
                problems.append(f"{where}: sampling cases need steps_timed and steps_reported="
                                f"{'steps_timed' if few_step else FULL_STEPS}")
    if problems:
        raise ValueError("invalid benchmark result: " + "; ".join(problems))
