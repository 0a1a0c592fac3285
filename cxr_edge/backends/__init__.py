"""Backends run a model package's artifact on a batch: float32 [B, C, H, W] -> logits [B, L].

`select_backend` picks the artifact, `create_backend` makes its runner (base.Runner: a context
manager with `infer`, after Polygraphy's runners). Heavy libraries are imported inside the
runner modules, never here.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from ..errors import CxrEdgeError, ModelPackageError
from ..manifest import ArtifactFormat, ModelPackage
from .base import Runner, Timings
from .stamp import REBUILD_HINT, MachineFacts, machine_facts, stamp_problem

log = logging.getLogger(__name__)

# name -> "module:Class", imported only when chosen (keeps `import cxr_edge` light).
REGISTRY = {
    "onnxruntime": "cxr_edge.backends.onnxruntime:OnnxRuntimeRunner",
    "tensorrt": "cxr_edge.backends.tensorrt:TensorRTRunner",
}
RUNS_FORMAT = {"onnxruntime": ArtifactFormat.ONNX, "tensorrt": ArtifactFormat.TENSORRT}
PRECISIONS = ("fp32", "fp16", "int8")
BACKEND_CHOICES = ("auto", *REGISTRY)


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
    engines = package.artifacts(precision=precision, format=ArtifactFormat.TENSORRT)
    why_not_trt = "no TensorRT engine for this precision in the package"
    if backend in ("auto", "tensorrt") and engines:
        facts = facts or machine_facts()
        problems = {engine.key: stamp_problem(engine.stamp, facts) for engine in engines}
        usable = [key for key, problem in problems.items() if problem is None]
        if usable:
            return Selection("tensorrt", precision, usable[0],
                             f"TensorRT engine {usable[0]} matches this GPU ({facts.gpu_name}) and TensorRT {facts.tensorrt_version}")
        why_not_trt = "; ".join(f"{key}: {problem}" for key, problem in problems.items())
    if backend == "tensorrt":
        hint = REBUILD_HINT.format(package=package.root, flag=f"--{precision}") if engines else _build_hint(package, precision)
        raise CxrEdgeError(f"--backend tensorrt: {why_not_trt}; {hint}")
    onnx = package.artifacts(precision=precision, format=ArtifactFormat.ONNX)
    if not onnx:
        has = ", ".join(a.key for a in package.artifacts())
        raise ModelPackageError(f"{package.root}: no {precision} ONNX artifact (has: {has}); " + _build_hint(package, precision))
    # fastest measured on CPU at build time; unmeasured ones last, then by name for a stable choice
    key = min(onnx, key=lambda a: (a.cpu_ms_per_image if a.cpu_ms_per_image is not None else float("inf"), a.key)).key
    reason = "ONNX Runtime on CPU" + (f" ({why_not_trt})" if backend == "auto" and why_not_trt else "")
    if len(onnx) > 1:
        reason += f"; {key} is the fastest {precision} artifact measured on CPU"
    return Selection("onnxruntime", precision, key, reason)


def create_backend(package: ModelPackage, name: str = "onnxruntime", precision: str = "fp32",
                   artifact: str | None = None, threads: int | None = None, **options) -> Runner:
    """An inactive runner for one artifact of `package` (activate it: `with runner:`).

    `options` go to the runner's constructor (TensorRT: `stage_timing`, `warmup`); a TensorRT
    runner also gets the engine's stamp, checked before the engine is deserialized."""
    if name not in REGISTRY:
        raise CxrEdgeError(f"unknown backend {name!r}; available: {', '.join(REGISTRY)}")
    entry = package.artifact(artifact or precision)
    runs = RUNS_FORMAT[name]
    if entry.format != runs:
        raise CxrEdgeError(f"{package.root}: artifact {entry.key!r} is a {entry.format} artifact; "
                           f"the {name} backend runs {runs} artifacts")
    if entry.format == ArtifactFormat.TENSORRT:
        options = {"stamp": entry.stamp, **options}
    module_name, class_name = REGISTRY[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(package.verified_loader(entry.key), precision, entry.key, entry.sha256, threads=threads,
               where=str(package.root), **options)
