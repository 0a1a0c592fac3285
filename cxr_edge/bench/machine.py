"""Machine facts printed with every benchmark: numbers mean little without the hardware."""

from __future__ import annotations

import os
import platform
from importlib import metadata

LIBRARIES = ("cxr-edge", "numpy", "onnxruntime", "opencv-python-headless", "pydicom", "pylibjpeg-openjpeg",
             "highdicom", "tensorrt", "torch", "timm")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_report() -> dict:
    """CPU, memory, GPU and library versions; never imports torch or tensorrt's CUDA stack twice."""
    from ..backends.stamp import machine_facts

    facts = machine_facts()
    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "memory_gib": _memory_gib(),
        "gpu": facts.gpu_name,
        "gpu_compute_capability": facts.compute_capability,
        "gpu_unavailable_reason": None if facts.gpu_name else facts.reason,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "libraries": {name: _version(name) for name in LIBRARIES},
    }
