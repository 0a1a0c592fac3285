"""Backends run a model package's artifact on a batch: float32 [B, C, H, W] -> logits [B, L].

Each backend is a context manager (enter allocates, exit frees) with one `infer` method, like
Polygraphy's runners. Heavy libraries are imported inside the backend module, never here.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..errors import CxrEdgeError, ModelPackageError
from ..manifest import ModelPackage
from .stamp import REBUILD_HINT, MachineFacts, machine_facts, stamp_problem

log = logging.getLogger(__name__)

# name -> "module:Class", imported only when chosen (keeps `import cxr_edge` light).
REGISTRY = {
    "onnxruntime": "cxr_edge.backends.onnxruntime:OnnxRuntimeBackend",
    "tensorrt": "cxr_edge.backends.tensorrt:TensorRTBackend",
}
PRECISIONS = ("fp32", "fp16", "int8")
BACKEND_CHOICES = ("auto", *REGISTRY)


class Backend(Protocol):
    name: str
    precision: str
    artifact_sha256: str

    def __enter__(self) -> "Backend": ...
    def __exit__(self, *exc) -> None: ...
    def infer(self, batch: np.ndarray) -> np.ndarray: ...
    def describe(self) -> dict: ...


@dataclass(frozen=True)
class Selection:
    backend: str
    precision: str
    artifact: str  # key in the manifest's artifacts
    reason: str


def _build_hint(package: ModelPackage, precision: str) -> str:
    return f"build it with `cxr-edge build-engine --model {package.root} --{precision}`"


def select_backend(package: ModelPackage, backend: str = "auto", precision: str = "fp32",
                   facts: MachineFacts | None = None) -> Selection:
    """A matching TensorRT engine on a GPU, else ONNX Runtime on CPU with the ONNX artifact built
    for `precision` (the faster one measured at build time when there are two INT8 variants)."""
    if backend not in BACKEND_CHOICES:
        raise CxrEdgeError(f"unknown backend {backend!r}; available: {', '.join(BACKEND_CHOICES)}")
    if precision not in PRECISIONS:
        raise CxrEdgeError(f"unknown precision {precision!r}; available: {', '.join(PRECISIONS)}")
    artifacts = package.manifest["artifacts"]
    engines = {k: v for k, v in artifacts.items() if v.get("format") == "tensorrt" and v.get("precision") == precision}
    why_not_trt = "no TensorRT engine for this precision in the package"
    if backend in ("auto", "tensorrt") and engines:
        facts = facts or machine_facts()
        problems = {key: stamp_problem(entry.get("stamp", {}), facts) for key, entry in engines.items()}
        usable = [key for key, problem in problems.items() if problem is None]
        if usable:
            return Selection("tensorrt", precision, usable[0],
                             f"TensorRT engine {usable[0]} matches this GPU ({facts.gpu_name}) and TensorRT {facts.tensorrt_version}")
        why_not_trt = "; ".join(f"{key}: {problem}" for key, problem in problems.items())
    if backend == "tensorrt":
        hint = REBUILD_HINT.format(package=package.root, flag=f"--{precision}") if engines else _build_hint(package, precision)
        raise CxrEdgeError(f"--backend tensorrt: {why_not_trt}; {hint}")
    onnx = {k: v for k, v in artifacts.items() if v.get("format", "onnx") == "onnx" and v.get("precision", k) == precision}
    if not onnx:
        raise ModelPackageError(f"{package.root}: no {precision} ONNX artifact (has: {', '.join(sorted(artifacts))}); "
                                + _build_hint(package, precision))
    # fastest measured on CPU at build time; unmeasured ones last, then by name for a stable choice
    key = min(onnx, key=lambda k: (onnx[k].get("cpu_ms_per_image", float("inf")), k))
    reason = "ONNX Runtime on CPU" + (f" ({why_not_trt})" if backend == "auto" and why_not_trt else "")
    if len(onnx) > 1:
        reason += f"; {key} is the fastest {precision} artifact measured on CPU"
    return Selection("onnxruntime", precision, key, reason)


def create_backend(package: ModelPackage, name: str = "onnxruntime", precision: str = "fp32",
                   artifact: str | None = None, **options) -> Backend:
    if name not in REGISTRY:
        raise CxrEdgeError(f"unknown backend {name!r}; available: {', '.join(REGISTRY)}")
    module_name, class_name = REGISTRY[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(package, precision=precision, artifact=artifact, **options)
