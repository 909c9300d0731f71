"""The benchmark JSON rendered as Markdown: a header on the device and method, then one table per kind.

Ratios are only ever taken between cases of the same kind and batch size measured in the same run.
"""

from __future__ import annotations

from .cases import FULL_STEPS

BASELINES = ("diffusers", "diffusers-compiled")  # the ratio columns of the sampling tables


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _ratio(record: dict, baseline: dict | None) -> str:
    if not baseline or not record.get("images_per_s") or not baseline.get("images_per_s"):
        return "—"
    return f"{record['images_per_s'] / baseline['images_per_s']:.2f}x"


def _table(records: list[dict], baselines: list[str], index: dict, stepwise: bool = False) -> list[str]:
    """Markdown rows; ratios against each baseline at the same kind and batch (and, stepwise, the row above)."""
    header = ["impl", "batch", "images/s", "ms/step", "MFU", *(f"x vs {b}" for b in baselines)]
    if stepwise:
        header.append("x vs previous stage")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    previous = None
    for r in records:
        cells = [r["impl"], str(r["batch_size"])]
        if r.get("error"):
            cells += [f"error: {r['error'][:80]}", "—", "—", *("—" for _ in baselines)]
            if stepwise:
                cells.append("—")
        else:
            mfu = "—" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
            cells += [_fmt(r["images_per_s"]), _fmt(r["ms_per_step"]), mfu,
                      *(_ratio(r, index.get((r["kind"], b, r["batch_size"]))) for b in baselines)]
            if stepwise:
                cells.append(_ratio(r, previous))
        previous = r
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _first_run_table(records: list[dict]) -> list[str]:
    """Time to the first result of each case on a new shape: build, compile, capture, the first run."""
    lines = ["| impl | kind | batch | build s | warm-up s | first run s | startup s | first full-schedule batch s "
             "(1000 steps; a few-step solver's own steps) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r.get("first_run_s") is None or r.get("same_as"):
            continue
        lines.append(f"| {r['impl']} | {r['kind']} | {r['batch_size']} | {_fmt(r.get('build_s'), 3)} | "
                     f"{_fmt(r.get('warmup_s'), 3)} | {_fmt(r['first_run_s'], 3)} | {_fmt(r.get('startup_s'), 3)} | "
                     f"{_fmt(r.get('first_image_full_s'), 3)} |")
    return lines if len(lines) > 2 else []


def markdown_report(result: dict) -> str:
    """The benchmark JSON as Markdown: a header on the device and method, then one table per kind."""
    dev, sw = result.get("device", {}), result.get("software", {})
    ceilings = result.get("ceilings") or {}
    cases = result.get("cases", [])
    index = {(c["kind"], c["impl"], c["batch_size"]): c for c in cases if not c.get("error")}
    lines = [f"# ddpm-fast benchmark: {dev.get('name', '?')}", ""]
    if result.get("cpu_only"):
        lines += ["**CPU figures** (no GPU in this run): not comparable with GPU results; MFU not reported.", ""]
    lines += [
        f"- date: {result.get('created')}; command: `{result.get('command')}`",
        f"- torch {sw.get('torch')}, triton {sw.get('triton')}, CUDA {sw.get('cuda')}, diffusers {sw.get('diffusers')}, "
        f"driver {dev.get('driver_version')}",
    ]
    if ceilings.get("bf16_matmul_tflops"):
        lines.append(f"- measured in this run: bf16 matmul {ceilings['bf16_matmul_tflops']:.0f} TFLOP/s "
                     f"({ceilings.get('matmul_n')}^3), device copy {_fmt(ceilings.get('copy_tb_s'), 3)} TB/s")
    model = result.get("model", {})
    if model:
        lines.append(f"- model: {model.get('name')} U-Net, {model.get('parameters'):,} parameters, "
                     f"{_fmt(model.get('forward_gflop'))} GFLOP per image per forward")
    tele = result.get("telemetry") or {}
    if tele.get("available"):
        def span(key, unit):
            s = tele.get(key)
            return f"{key.rsplit('_', 1)[0]} {s['min']:.0f}/{s['mean']:.0f}/{s['max']:.0f} {unit}" if s else None

        parts = [span("sm_clock_mhz", "MHz"), span("power_w", "W"), span("temperature_c", "C"),
                 span("memory_used_mib", "MiB")]
        lines.append("- telemetry (min/mean/max): " + ", ".join(p for p in parts if p))
    elif tele:
        lines.append(f"- telemetry: none ({tele.get('reason')})")
    settings = result.get("settings", {})
    sampling = [c for c in cases if c["kind"] == "sampling" and not c["impl"].startswith("fast:")]
    ablation = [c for c in cases if c["kind"] == "sampling" and c["impl"].startswith("fast:")]
    training = [c for c in cases if c["kind"] == "training"]
    if sampling:
        solver = settings.get("solver") or "ddpm"
        if settings.get("steps_reported", FULL_STEPS) != FULL_STEPS:  # a few-step solver: as timed
            lines += ["", f"## Sampling with {solver}: images/s for {settings.get('steps_timed')}-step samples "
                          "(as timed)", ""]
        else:
            lines += ["", f"## Sampling ({solver}): images/s for {FULL_STEPS}-step samples "
                          f"(timed over {settings.get('steps_timed')} steps, per-step time x {FULL_STEPS})", ""]
        lines += _table(sampling, list(BASELINES), index)
    if ablation:
        lines += ["", f"## Ablation: one optimisation at a time (batch {ablation[0]['batch_size']})", ""]
        lines += _table(ablation, list(BASELINES), index, stepwise=True)
    if training:
        lines += ["", "## Training: one optimizer step (ms/step is per step)", ""]
        lines += _table(training, ["reference"], index)
    first = _first_run_table(cases)
    if first:
        lines += ["", "## Time to the first result on a new shape (build, compile, capture, first run)", "",
                  f"first run: build + warm-up + the first timed run of {settings.get('steps_timed')} steps when "
                  "the warm-up was partial (eager baselines warm up with 2 steps); startup: first run minus the "
                  f"median run; first {FULL_STEPS}-step batch: startup + {FULL_STEPS} x ms/step.", ""]
        lines += first
    lines += ["", f"Total wall time {_fmt(result.get('wall_s'), 3)} s."]
    return "\n".join(lines) + "\n"
