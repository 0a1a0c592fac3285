"""Backends run a model package's artifact on a batch: float32 [B, C, H, W] -> logits [B, L].

Each backend is a context manager (enter allocates, exit frees) with one `infer` method, like
Polygraphy's runners. Heavy libraries are imported inside the backend module, never here.
"""

from __future__ import annotations

import importlib
from typing import Protocol

import numpy as np

from ..errors import CxrEdgeError
from ..manifest import ModelPackage

# name -> "module:Class", imported only when chosen (keeps `import cxr_edge` light).
REGISTRY = {
    "onnxruntime": "cxr_edge.backends.onnxruntime:OnnxRuntimeBackend",
}
PRECISIONS = ("fp32",)


class Backend(Protocol):
    name: str
    precision: str
    artifact_sha256: str

    def __enter__(self) -> "Backend": ...
    def __exit__(self, *exc) -> None: ...
    def infer(self, batch: np.ndarray) -> np.ndarray: ...
    def describe(self) -> dict: ...


def create_backend(package: ModelPackage, name: str = "onnxruntime", precision: str = "fp32", **options) -> Backend:
    if name not in REGISTRY:
        raise CxrEdgeError(f"unknown backend {name!r}; available: {', '.join(REGISTRY)}")
    module_name, class_name = REGISTRY[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(package, precision=precision, **options)
