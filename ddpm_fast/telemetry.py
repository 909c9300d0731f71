"""What a benchmark ran on: the device, the software, and the GPU's state sampled during the run.

Two jobs: ``describe_device`` / ``describe_software`` say what the numbers were measured on (a CPU run is
labelled as one: ``name`` "CPU: <model>" and ``cpu_only`` True), and ``GpuSampler`` polls NVML
(nvidia-ml-py's ``pynvml``) from a background thread so that clocks, power, temperature and memory can be
summarised min/mean/max for the whole run or for any window of it. A machine without NVML (no GPU, no
driver, no pynvml) is not an error: the sampler reports ``available: False`` with the reason.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

# NVML field -> (unit suffix used in the JSON keys, reader). Readers take (pynvml, handle) and return a float.
_METRICS = {
    "sm_clock_mhz": lambda nv, h: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
    "mem_clock_mhz": lambda nv, h: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM),
    "power_w": lambda nv, h: nv.nvmlDeviceGetPowerUsage(h) / 1000.0,  # NVML reports milliwatts
    "temperature_c": lambda nv, h: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU),
    "memory_used_mib": lambda nv, h: nv.nvmlDeviceGetMemoryInfo(h).used / 2**20,
    "gpu_util_pct": lambda nv, h: nv.nvmlDeviceGetUtilizationRates(h).gpu,
}


def exact_command() -> str:
    """The command line that started this process, shell-quoted so it can be pasted back."""
    # orig_argv (3.10+) keeps the interpreter and "-m module" as typed; sys.argv loses them
    argv = list(getattr(sys, "orig_argv", None) or sys.argv)
    return shlex.join(argv)


def cpu_model_name() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else whatever ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _nvml():
    """Import and initialise pynvml; returns the module or raises with the reason NVML is unusable."""
    import pynvml  # nvidia-ml-py

    pynvml.nvmlInit()
    return pynvml


def _nvml_handle(nv, device: torch.device):
    """NVML handle of a CUDA device: matched by PCI address (CUDA_VISIBLE_DEVICES may reorder), else by index."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    # torch exposes the PCI address as ints (pci_domain_id, pci_bus_id, pci_device_id) on recent versions
    parts = [getattr(props, name, None) for name in ("pci_domain_id", "pci_bus_id", "pci_device_id")]
    if all(isinstance(p, int) for p in parts):
        address = f"{parts[0]:08X}:{parts[1]:02X}:{parts[2]:02X}.0"
        try:
            return nv.nvmlDeviceGetHandleByPciBusId(address.encode())
        except Exception:  # noqa: BLE001 - NVML's errors are many small classes; the index still works
            pass
    return nv.nvmlDeviceGetHandleByIndex(index)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def describe_device(device: torch.device | str) -> dict:
    """A JSON-able description of the device the benchmark runs on.

    Always has ``name`` (the GPU name, or "CPU: <model>"), ``type`` ("cuda"/"cpu"), ``cpu_only`` and
    ``nvml`` (whether NVML answered; ``nvml_error`` holds the reason when it did not). CUDA adds the
    compute capability, SM count and memory from torch, and the driver version from NVML when available.
    """
    device = torch.device(device)
    info: dict = {
        "type": device.type,
        "cpu_only": device.type != "cuda",
        "cpu_model": cpu_model_name(),
        "cpu_threads_torch": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "nvml": False,
        "nvml_error": None,
        "driver_version": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name,
            compute_capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            memory_total_mib=round(props.total_memory / 2**20),
        )
    else:
        info["name"] = f"CPU: {info['cpu_model']}"
    try:
        nv = _nvml()
    except Exception as exc:  # noqa: BLE001 - ImportError or any NVMLError subclass: no NVML here
        info["nvml_error"] = f"{type(exc).__name__}: {exc}"
        return info
    try:
        info["nvml"] = True
        info["driver_version"] = _text(nv.nvmlSystemGetDriverVersion())
        if device.type == "cuda":
            handle = _nvml_handle(nv, device)
            info["nvml_name"] = _text(nv.nvmlDeviceGetName(handle))
            info["max_sm_clock_mhz"] = nv.nvmlDeviceGetMaxClockInfo(handle, nv.NVML_CLOCK_SM)
            info["max_mem_clock_mhz"] = nv.nvmlDeviceGetMaxClockInfo(handle, nv.NVML_CLOCK_MEM)
            info["power_limit_w"] = nv.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0
    except Exception as exc:  # noqa: BLE001 - a partial description beats none
        info["nvml_error"] = f"{type(exc).__name__}: {exc}"
    finally:
        try:
            nv.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass
    return info


def describe_software() -> dict:
    """Versions of everything that shapes the numbers: Python, torch, CUDA/cuDNN, triton, diffusers."""
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    for name in ("triton", "diffusers", "ddpm_fast"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - an absent optional package is recorded as None
            info[name] = None
    return info


def summarise(values) -> dict | None:
    """{min, mean, max} of a sequence of numbers (None for an empty one)."""
    values = [float(v) for v in values]
    if not values:
        return None
    return {"min": min(values), "mean": sum(values) / len(values), "max": max(values)}


@dataclass
class GpuSampler:
    """Background NVML poller: ``with GpuSampler(device) as s: ...`` then ``s.summary()``.

    Samples every ``interval_s`` (default 0.1 s) into ``samples`` (a list of dicts with a ``time`` key from
    ``time.perf_counter`` and one key per metric). ``summary(start, end)`` gives min/mean/max of each
    metric over the samples in [start, end] (the whole run when omitted). On a CPU device, or when NVML
    cannot be initialised, nothing is sampled and ``reason`` says why.
    """

    device: torch.device | str = "cuda"
    interval_s: float = 0.1
    samples: list = field(default_factory=list)
    reason: str | None = None
    available: bool = False

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nv = None
        self._handle = None

    def start(self) -> "GpuSampler":
        if self.device.type != "cuda":
            self.reason = "no GPU: running on the CPU"
            return self
        try:
            self._nv = _nvml()
            self._handle = _nvml_handle(self._nv, self.device)
        except Exception as exc:  # noqa: BLE001 - no NVML is a normal outcome, not a failure
            self.reason = f"NVML unavailable: {type(exc).__name__}: {exc}"
            self._nv = None
            return self
        self.available = True
        self._thread = threading.Thread(target=self._loop, name="ddpm-fast-nvml", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> dict:
        row = {"time": time.perf_counter()}
        for key, reader in _METRICS.items():
            try:
                row[key] = float(reader(self._nv, self._handle))
            except Exception:  # noqa: BLE001 - a metric this GPU does not report stays absent
                pass
        return row

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._read())
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5 * self.interval_s + 1.0)
            self._thread = None
        if self._nv is not None:
            try:
                self._nv.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass
            self._nv = None

    def __enter__(self) -> "GpuSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def summary(self, start: float | None = None, end: float | None = None) -> dict:
        """min/mean/max of every metric over samples taken in [start, end] (perf_counter times)."""
        rows = [
            r for r in list(self.samples)
            if (start is None or r["time"] >= start) and (end is None or r["time"] <= end)
        ]
        out: dict = {"available": self.available, "interval_ms": round(self.interval_s * 1000), "samples": len(rows)}
        if not self.available:
            out["reason"] = self.reason
            return out
        for key in _METRICS:
            out[key] = summarise(r[key] for r in rows if key in r)
        return out
