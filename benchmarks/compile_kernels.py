"""Compile every Triton kernel specialisation that ddpm-fast's public entry points launch, for real GPUs,
on a machine without one; report registers, spills and vectorised memory access.

Triton's interpreter (TRITON_INTERPRET=1, what the CPU test suite runs) accepts code that Triton's compiler
rejects, so interpreter tests alone prove nothing about a GPU. This script:

1. calls the public wrappers (``ddpm_fast.kernels.q_sample / reverse_update / seeded_randn``) on CPU
   tensors with every argument combination that ``ddpm_fast.ops``, the sampler and training pass: each
   dtype, both layouts, every noise mode, clip on and off, per-sample rows and steps, odd sizes;
2. records each launch instead of running it, and derives its specialisation (pointer dtypes and
   alignment, integer divisibility, constexprs, num_warps) with Triton's own argument binder, exactly as a
   launch on a GPU would;
3. compiles each distinct specialisation with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (H100,
   H200) and ``("cuda", 80, 32)`` (A100): ptxas and cuobjdump ship inside the triton wheel, no driver needed;
4. reads registers, stack and local memory from ``cuobjdump -res-usage`` (a register spill lands in local
   memory) and the global load/store widths from the PTX.

    python benchmarks/compile_kernels.py --out kernel-compile.json [--markdown kernel-compile.md]

Exit status 0 when every specialisation compiled, nothing spilled and the sampler's hot path is vectorised;
1 otherwise (the JSON says which). Run it without TRITON_INTERPRET. ``tests/test_kernel_compile.py`` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import triton

TARGETS = {"sm_90": ("cuda", 90, 32), "sm_80": ("cuda", 80, 32)}
KERNEL_MODULES = ("ddpm_fast.kernels.noising", "ddpm_fast.kernels.reverse_update")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HOT_PATH = "sampler: x fp32 CL, eps bf16 CL, seeded noise"  # must compile to vectorised loads and stores


# -- 1. the launches -----------------------------------------------------------------------------------

def _image(shape, dtype, channels_last: bool) -> torch.Tensor:
    x = torch.randn(shape).to(DTYPES[dtype])
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _launch_cases():
    """(label, thunk) pairs: each thunk calls one public wrapper the way a caller in the package does.

    The CIFAR-10 geometry (3, 32, 32) is the hot one; (1, 5, 7) covers odd sizes (no 16-divisibility,
    a one-channel layout) and (3, 1, 1) a 1x1 image (HW == 1 specialises as a constant).
    """
    from ddpm_fast import kernels
    from ddpm_fast.kernels import NUM_COLUMNS

    batch = 4
    table = torch.rand(10, NUM_COLUMNS)
    counter = torch.zeros(1, dtype=torch.int64)  # the sampler's step counter: one row for the batch
    rows = torch.zeros(batch, dtype=torch.int64)  # ops: a row per sample
    seeds = torch.arange(batch, dtype=torch.int64)
    sqrt_ab, sqrt_1mab = torch.rand(1000), torch.rand(1000)
    t = torch.zeros(batch, dtype=torch.int64)
    cases = []

    def add(label, fn):
        cases.append((label, fn))

    # The sampler (FastSampler._step): x fp32 in place, eps in the model's autocast dtype, one row.
    for layout in ("CL", "NCHW"):
        cl = layout == "CL"
        for eps_dtype in DTYPES:
            for noise in ("seeded", "generator"):
                for clip in (None, 1.0):
                    def sampler_step(cl=cl, eps_dtype=eps_dtype, noise=noise, clip=clip):
                        x = _image((batch, 3, 32, 32), "fp32", cl)
                        z = _image((batch, 3, 32, 32), "fp32", cl) if noise == "generator" else None
                        kernels.reverse_update(x, _image((batch, 3, 32, 32), eps_dtype, cl), table, counter,
                                               out=x, seeds=seeds if z is None else None, noise=z, clip=clip)
                    add(f"sampler: x fp32 {layout}, eps {eps_dtype} {layout}, {noise} noise, clip {clip}",
                        sampler_step)
    # ops.reverse_step / ddim_step / reverse_step_seeded: one dtype throughout, a row per sample.
    for dtype in DTYPES:
        for noise in ("none", "given", "seeded"):
            for clip in (None, 1.0):
                def ops_step(dtype=dtype, noise=noise, clip=clip):
                    x = _image((batch, 3, 32, 32), dtype, False)
                    z = _image((batch, 3, 32, 32), dtype, False) if noise == "given" else None
                    kernels.reverse_update(x, torch.randn_like(x), table, rows, noise=z,
                                           seeds=seeds if noise == "seeded" else None, clip=clip)
                add(f"ops reverse step: {dtype} NCHW, {noise} noise, clip {clip}", ops_step)
    # Mixed layouts, odd sizes, batch 1, int32 rows.
    for shape in ((1, 1, 5, 7), (1, 3, 1, 1)):
        def odd(shape=shape):
            x = _image(shape, "fp32", False)
            kernels.reverse_update(x, _image(shape, "bf16", True), table, counter[:1].int(), out=torch.empty_like(x),
                                   seeds=seeds[:1], clip=1.0)
        add(f"reverse update: odd size {shape[1:]}, batch 1, int32 row, mixed layouts", odd)
    add("reverse update: x NCHW, eps CL, z CL, out CL", lambda: kernels.reverse_update(
        _image((batch, 3, 32, 32), "fp32", False), _image((batch, 3, 32, 32), "fp16", True), table, rows,
        out=_image((batch, 3, 32, 32), "fp32", True), noise=_image((batch, 3, 32, 32), "bf16", True)))

    # q_sample: training (seeded eps, a step for the batch) and ops.q_sample (eps given), every dtype/layout.
    for dtype in DTYPES:
        for layout in ("CL", "NCHW"):
            cl = layout == "CL"
            add(f"q_sample: {dtype} {layout}, eps given", lambda dtype=dtype, cl=cl: kernels.q_sample(
                _image((batch, 3, 32, 32), dtype, cl), t, sqrt_ab, sqrt_1mab, _image((batch, 3, 32, 32), dtype, cl)))
            for per_sample in (False, True):
                step = torch.arange(batch, dtype=torch.int64) if per_sample else torch.ones(1, dtype=torch.int64)
                add(f"q_sample: {dtype} {layout}, seeded eps, step {'per sample' if per_sample else 'shared'}",
                    lambda dtype=dtype, cl=cl, step=step: kernels.q_sample(
                        _image((batch, 3, 32, 32), dtype, cl), t, sqrt_ab, sqrt_1mab, seeds=seeds, noise_step=step))
    add("q_sample: odd size (1, 5, 7), batch 1, int32 t, x CL, eps NCHW, out NCHW", lambda: kernels.q_sample(
        _image((1, 1, 5, 7), "bf16", True), t[:1].int(), sqrt_ab, sqrt_1mab, _image((1, 1, 5, 7), "fp32", False),
        out=_image((1, 1, 5, 7), "fp32", False)))
    add("q_sample: seeded, x NCHW, noise_out CL, out CL", lambda: kernels.q_sample(
        _image((batch, 3, 32, 32), "fp32", False), t, sqrt_ab, sqrt_1mab, seeds=seeds, noise_step=3,
        out=_image((batch, 3, 32, 32), "fp32", True), noise_out=_image((batch, 3, 32, 32), "bf16", True)))

    # seeded_randn: the sampler's x_T (fp32, its layout) and ops.seeded_noise (any dtype, NCHW).
    for dtype in DTYPES:
        for layout in ("CL", "NCHW"):
            for per_sample in (False, True):
                step = torch.arange(batch, dtype=torch.int64) if per_sample else 1000
                add(f"seeded_randn: {dtype} {layout}, step {'per sample' if per_sample else 'shared'}",
                    lambda dtype=dtype, layout=layout, step=step: kernels.seeded_randn(
                        seeds, step, (3, 32, 32), out=_image((batch, 3, 32, 32), dtype, layout == "CL")))
    add("seeded_randn: odd size (1, 5, 7), batch 1", lambda: kernels.seeded_randn(seeds[:1], 7, (1, 5, 7)))
    return cases


def _record_launches():
    """Run every case with the kernels' launch replaced by a recorder; returns (label, fn, args, kwargs)."""
    import importlib

    import triton.runtime.jit as jit

    recorded = []
    kernels = [obj for name in KERNEL_MODULES for obj in vars(importlib.import_module(name)).values()
               if isinstance(obj, jit.JITFunction) and obj.__name__.endswith("_kernel")]
    current = {}

    def recorder(fn):
        def run(*args, grid, warmup, **kwargs):
            recorded.append((current["label"], fn, args, kwargs))
        return run

    for fn in kernels:
        fn.run = recorder(fn)  # JITFunction.__getitem__ calls self.run: the wrapper's launch lands here
    for label, thunk in _launch_cases():
        current["label"] = label
        before = len(recorded)
        thunk()
        if len(recorded) == before:
            raise RuntimeError(f"case {label!r} launched no kernel")
    return recorded, sorted(fn.__name__ for fn in kernels)


def _specialisation(fn, args, kwargs, target):
    """(signature, constexprs, attrs, options) for one launch, from Triton's own binder for ``target``."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


# -- 2. compiling one specialisation (in a worker process) ---------------------------------------------

def _cuobjdump() -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def _resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {k.lower(): int(v) for k, v in usage.items()}


def _ptxas_report(ptx: str, capability: int) -> dict:
    """Registers, stack frame and spill bytes from ``ptxas -v`` (the ptxas Triton itself uses for this
    target). cuobjdump's STACK counts the frame, which can be non-zero without a single spill (libdevice's
    cosf keeps a small array for its huge-argument reduction on some ptxas versions); spills are what cost."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        result = subprocess.run([get_ptxas(capability).path, "-v", f"--gpu-name={sm_arch_from_capability(capability)}",
                                 str(source), "-o", str(Path(tmp) / "kernel.cubin")],
                                capture_output=True, text=True, check=True)
    text = result.stderr + result.stdout
    stack, spill_stores, spill_loads = (int(v) for v in re.search(
        r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text).groups())
    return {"stack_frame": stack, "spill_stores": spill_stores, "spill_loads": spill_loads}


def _memory_ops(ptx: str) -> dict:
    """Global load/store instructions of the PTX by width: {"ld": {"v4.b32": n, ...}, "st": {...}}."""
    ops = {"ld": {}, "st": {}}
    for kind, width in re.findall(r"\b(ld|st)\.global(?:\.\w+)*?\.((?:v[248]\.)?b\d+)\b", ptx):
        ops[kind][width] = ops[kind].get(width, 0) + 1
    return ops


def _compile_one(job):
    """Compile one (kernel, specialisation, target); returns its report row (never raises)."""
    module, name, target_name, signature, constexprs, attrs, options = job
    import importlib

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(module), name)
    row = {"kernel": name, "target": target_name}
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget(*TARGETS[target_name]),
                                  options=options)
        row.update(_resource_usage(compiled.asm["cubin"]))
        row.update(_ptxas_report(compiled.asm["ptx"], TARGETS[target_name][1]))
        row["memory_ops"] = _memory_ops(compiled.asm["ptx"])
        row["ok"] = True
    except Exception as err:  # a compile error is the finding: report it, keep compiling the rest
        row["ok"] = False
        row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row


# -- 3. the run ----------------------------------------------------------------------------------------

def _jobs(recorded):
    """Distinct (kernel, specialisation, target) compile jobs and, per job, the cases that launch it."""
    from triton.backends.compiler import GPUTarget

    jobs, cases = {}, {}
    for label, fn, args, kwargs in recorded:
        for target_name, target in TARGETS.items():
            signature, constexprs, attrs, options = _specialisation(fn, args, kwargs, GPUTarget(*target))
            options = {k: v for k, v in vars(options).items()}
            key = json.dumps([fn.__name__, target_name, signature, repr(sorted(constexprs.items())),
                              repr(sorted(attrs.items())), repr(sorted(options.items()))])
            jobs.setdefault(key, (fn.__module__, fn.__name__, target_name, signature, constexprs, attrs, options))
            cases.setdefault(key, []).append(label)
    return jobs, cases


def _named(signature: dict, constexprs: dict, fn_params) -> tuple[dict, dict]:
    """({pointer argument: element type}, {constexpr name: value}) of one specialisation."""
    names = [p.name for p in fn_params]
    pointers = {k.removesuffix("_ptr"): v[1:] for k, v in signature.items() if v.startswith("*")}
    return pointers, {names[path[0]]: value for path, value in sorted(constexprs.items())}


def run(workers: int) -> dict:
    """Record, compile and check everything; returns the report (see the module docstring)."""
    started = time.perf_counter()
    recorded, kernel_names = _record_launches()
    jobs, cases = _jobs(recorded)
    keys = list(jobs)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        rows = list(pool.map(_compile_one, [jobs[k] for k in keys], chunksize=4))
    params = {fn.__name__: fn.params for _, fn, _, _ in recorded}
    for key, row in zip(keys, rows):
        _, name, _, signature, constexprs, _, options = jobs[key]
        row["cases"] = cases[key]
        row["pointers"], row["constexprs"] = _named(signature, constexprs, params[name])
        row["num_warps"] = options.get("num_warps")
        row["block"] = row["constexprs"]["BLOCK"]
        row["spill_bytes"] = row["spill_stores"] + row["spill_loads"] + row["local"] if row["ok"] else None
    failures = [r for r in rows if not r["ok"]]
    spills = [r for r in rows if r["ok"] and r["spill_bytes"]]
    hot = [r for r in rows if r["ok"] and any(c.startswith(HOT_PATH) for c in r["cases"])]
    unvectorised = [r for r in hot if not _vectorised(r)]
    return {
        "triton": triton.__version__, "torch": torch.__version__, "targets": list(TARGETS),
        "kernels": kernel_names, "cases": len({label for label, *_ in recorded}), "launches": len(recorded),
        "specialisations": len(rows), "compile_failures": len(failures), "spilling": len(spills),
        "hot_path": HOT_PATH, "hot_path_specialisations": len(hot), "hot_path_unvectorised": len(unvectorised),
        "seconds": round(time.perf_counter() - started, 1), "rows": rows,
    }


def _vectorised(row: dict) -> bool:
    """Whether a hot-path kernel moves its images with 128-bit instructions only.

    Each thread owns BLOCK / (32 num_warps) consecutive elements (8 for CIFAR's BLOCK 1024 and 4 warps):
    fully vectorised, x (fp32) takes 8 * 4 / 16 = 2 v4.b32 loads, eps (bf16) 8 * 2 / 16 = 1, and the fp32
    store 2 v4.b32 stores. Scalar b32 loads are the table's coefficients, b64 the row and the seed.
    """
    per_thread = row["block"] // (32 * row["num_warps"])
    want_loads = per_thread * 4 // 16 + per_thread * 2 // 16
    want_stores = per_thread * 4 // 16
    ops = row["memory_ops"]
    return ops["ld"].get("v4.b32", 0) >= want_loads and ops["st"].get("v4.b32", 0) >= want_stores


def summary_table(report: dict) -> str:
    """Markdown: one line per (kernel, target) with specialisations, register range and spills."""
    lines = [f"Triton {report['triton']}: {report['specialisations']} specialisations "
             f"({report['cases']} launch cases), {report['compile_failures']} failed to compile, "
             f"{report['spilling']} spill; hot path vectorised: "
             f"{report['hot_path_specialisations'] - report['hot_path_unvectorised']}/{report['hot_path_specialisations']}.",
             "", "| kernel | target | specialisations | compiled | registers (min-max) | spills + local bytes | stack frame bytes |",
             "|---|---|---|---|---|---|---|"]
    groups = {}
    for row in report["rows"]:
        groups.setdefault((row["kernel"], row["target"]), []).append(row)
    for (kernel, target), rows in sorted(groups.items()):
        ok = [r for r in rows if r["ok"]]
        regs = [r["reg"] for r in ok]
        reg_text = f"{min(regs)}-{max(regs)}" if regs else "-"
        spill = max((r["spill_bytes"] for r in ok), default=0)
        stack = max((r["stack_frame"] for r in ok), default=0)
        lines.append(f"| `{kernel}` | {target} | {len(rows)} | {len(ok)} | {reg_text} | {spill} | {stack} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON report")
    parser.add_argument("--markdown", type=Path, help="also write the summary table here")
    parser.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                        help="compile processes (default: the cores, at most 4)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("TRITON_INTERPRET is set: unset it (this script compiles for a GPU; the interpreter compiles nothing)")
    report = run(args.workers)
    from ddpm_fast.checkpoint import write_json_atomic

    write_json_atomic(args.out, report)
    table = summary_table(report)
    if args.markdown:
        args.markdown.write_text(table)
    print(table, end="")
    for row in report["rows"]:
        if not row["ok"]:
            print(f"FAILED {row['kernel']} {row['target']} [{row['cases'][0]}]: {row['error']}")
    bad = report["compile_failures"] or report["spilling"] or report["hot_path_unvectorised"]
    return 1 if bad or not report["hot_path_specialisations"] else 0


if __name__ == "__main__":
    sys.exit(main())
