"""Backends run a model package's artifact on a batch: float32 [B, C, H, W] -> logits [B, L].

`select_backend` picks the artifact, `create_backend` makes its runner (base.Runner: a context
manager with `infer`, after Polygraphy's runners). Heavy libraries are imported inside the
runner modules, never here.

Three runners: ONNX Runtime on CPU (every artifact of ONNX format), TensorRT (an engine built for
this GPU), and torch (the FP32 ONNX's weights in the manifest's timm architecture, on CUDA in
FP32/FP16/BF16, or on CPU in FP32 when there is no CUDA).
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
    "torch": "cxr_edge.backends.torch_runner:TorchRunner",
}
RUNS_FORMAT = {"onnxruntime": ArtifactFormat.ONNX, "tensorrt": ArtifactFormat.TENSORRT, "torch": ArtifactFormat.ONNX}
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
# torch computes in these from the FP32 weights; no artifact of its own per precision
TORCH_PRECISIONS = ("fp32", "fp16", "bf16")
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
                   facts: MachineFacts | None = None, cuda_problem=None) -> Selection:
    """auto: a matching TensorRT engine on a GPU, else torch on a CUDA GPU (when the gpu-torch extra
    is installed; never INT8), else ONNX Runtime on CPU with the ONNX artifact built for
    `precision` (the faster one measured at build time when there are two INT8 variants).
    `cuda_problem()`: why torch cannot use CUDA here, or None (tests pass their own)."""
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
    if backend == "torch":
        if precision not in TORCH_PRECISIONS:
            raise CxrEdgeError(f"--backend torch runs {', '.join(TORCH_PRECISIONS)}, not {precision} "
                               "(INT8 runs on onnxruntime or tensorrt)")
        return Selection("torch", precision, torch_weights_artifact(package).key,
                         f"torch, {precision.upper()} from the FP32 ONNX's weights (CUDA when available)")
    why_not_torch = None
    if backend == "auto" and precision in TORCH_PRECISIONS:
        if cuda_problem is None:
            from .torch_runner import cuda_problem  # imports torch only where an NVIDIA device exists
        why_not_torch = cuda_problem()
        if why_not_torch is None:
            return Selection("torch", precision, torch_weights_artifact(package).key,
                             f"torch on CUDA in {precision.upper()} ({why_not_trt})")
    if precision == "bf16":
        raise CxrEdgeError(f"BF16 runs on the torch backend on a CUDA GPU only"
                           f"{f': {why_not_torch}' if why_not_torch else ''}; use fp32, fp16 or int8")
    onnx = package.artifacts(precision=precision, format=ArtifactFormat.ONNX)
    if not onnx:
        has = ", ".join(a.key for a in package.artifacts())
        raise ModelPackageError(f"{package.root}: no {precision} ONNX artifact (has: {has}); " + _build_hint(package, precision))
    # fastest measured on CPU at build time; unmeasured ones last, then by name for a stable choice
    key = min(onnx, key=lambda a: (a.cpu_ms_per_image if a.cpu_ms_per_image is not None else float("inf"), a.key)).key
    not_gpu = "; ".join(why for why in (why_not_trt, why_not_torch and f"torch: {why_not_torch}") if why)
    reason = "ONNX Runtime on CPU" + (f" ({not_gpu})" if backend == "auto" and not_gpu else "")
    if len(onnx) > 1:
        reason += f"; {key} is the fastest {precision} artifact measured on CPU"
    return Selection("onnxruntime", precision, key, reason)


def torch_weights_artifact(package: ModelPackage):
    """The FP32 ONNX artifact the torch runner takes its weights from."""
    found = package.artifacts(precision="fp32", format=ArtifactFormat.ONNX)
    if not found:
        has = ", ".join(a.key for a in package.artifacts())
        raise ModelPackageError(f"{package.root}: the torch backend takes its weights from the FP32 ONNX artifact, "
                                f"and there is none (has: {has})")
    return next((a for a in found if a.key == "fp32"), found[0])


def create_backend(package: ModelPackage, name: str = "onnxruntime", precision: str = "fp32",
                   artifact: str | None = None, threads: int | None = None, max_batch: int | None = None,
                   **options) -> Runner:
    """An inactive runner for one artifact of `package` (activate it: `with runner:`).

    `options` go to the runner's constructor (TensorRT: `stage_timing`, `warmup`; torch: `device`,
    `cuda_graphs`); a TensorRT runner also gets the engine's stamp, checked before the engine is
    deserialized; a torch runner the architecture, the class maps, and `max_batch` (the largest
    batch the caller sends: CUDA graphs are captured up to it)."""
    if name not in REGISTRY:
        raise CxrEdgeError(f"unknown backend {name!r}; available: {', '.join(REGISTRY)}")
    if name == "torch":
        entry = package.artifact(artifact) if artifact else torch_weights_artifact(package)
        if entry.precision != "fp32":
            raise CxrEdgeError(f"{package.root}: the torch backend takes its weights from an FP32 ONNX artifact, "
                               f"not {entry.key!r} ({entry.precision})")
        spec = package.heatmap_spec
        options = {"architecture": package.section("architecture"),
                   "class_maps": (spec.output, spec.grid) if spec and entry.fields.get("class_maps") == spec.output else None,
                   **({"max_batch": max_batch} if max_batch else {}), **options}
    else:
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
