"""TensorRT engine stamps: what an engine was built for, checked against this machine before loading.

A plan only runs on the TensorRT version and GPU architecture it was built with (TENSORRT.md
section 2). The stamp sits in the manifest beside the engine's sha256, so a mismatch is caught
with a clear message before TensorRT prints a serialization assertion.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

REBUILD_HINT = "rebuild it on this machine with `cxr-edge build-engine --model {package} {flag}`"


@dataclass(frozen=True)
class MachineFacts:
    tensorrt_version: str | None  # None: tensorrt not importable
    gpu_name: str | None  # None: no CUDA GPU
    compute_capability: str | None  # "8.9"
    reason: str = ""  # why tensorrt or the GPU is unavailable


def stamp_problem(stamp: dict, facts: MachineFacts) -> str | None:
    """Why an engine with this stamp cannot run here, or None if it can."""
    if facts.tensorrt_version is None or facts.gpu_name is None:
        return facts.reason or "TensorRT or a CUDA GPU is not available"
    built = stamp.get("tensorrt_version")
    if built != facts.tensorrt_version and not stamp.get("version_compatible"):
        return f"engine built with TensorRT {built}, this machine has TensorRT {facts.tensorrt_version}"
    if stamp.get("compute_capability") != facts.compute_capability and stamp.get("hardware_compatibility") in (None, "NONE"):
        return (f"engine built for compute capability {stamp.get('compute_capability')} ({stamp.get('gpu_name')}), "
                f"this GPU is {facts.compute_capability} ({facts.gpu_name})")
    return None


def machine_facts() -> MachineFacts:
    """TensorRT version and GPU 0, without torch; never raises."""
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or a broken CUDA library underneath
        return MachineFacts(None, None, None, f"tensorrt is not importable ({type(exc).__name__}: {exc})")
    if importlib.util.find_spec("polygraphy") is None:  # cxr-edge builds and runs TensorRT through it
        return MachineFacts(trt.__version__, None, None,
                            "polygraphy is not installed (pip install 'cxr-edge[gpu]')")
    try:
        from cuda.bindings import runtime as cudart
    except Exception as exc:
        return MachineFacts(trt.__version__, None, None, f"cuda-python (cuda.bindings) is not importable: {exc}")
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count == 0:
        return MachineFacts(trt.__version__, None, None, f"no CUDA GPU visible (cudaGetDeviceCount: {err}, {count})")
    err, props = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        return MachineFacts(trt.__version__, None, None, f"cudaGetDeviceProperties failed: {err}")
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return MachineFacts(trt.__version__, name, f"{props.major}.{props.minor}")
