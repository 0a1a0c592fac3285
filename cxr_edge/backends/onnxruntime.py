"""ONNX Runtime on CPU: the backend that works everywhere."""

from __future__ import annotations

import os
import time

import numpy as np

from ..errors import ModelPackageError
from ..manifest import ModelPackage


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, package: ModelPackage, precision: str = "fp32", threads: int | None = None,
                 artifact: str | None = None):
        self.package = package
        self.precision = precision
        self.artifact_key = artifact or precision  # e.g. "int8" (Q/DQ) or "int8-dynamic" for precision int8
        self.threads = threads or len(os.sched_getaffinity(0))
        self.session = None
        self.last_timings_ms: dict = {}
        self.artifact_sha256 = package.artifact(self.artifact_key)["sha256"]

    def __enter__(self) -> "OnnxRuntimeBackend":
        import onnxruntime as ort

        # Verified bytes go straight to the session: the file cannot change between check and load.
        model_bytes = self.package.read_verified(self.artifact_key)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only; ORT warnings are noise for users
        # Idle ORT threads spin by default, burning the cores the decode workers need: measured
        # +8-12 % end to end on 2 cores with spinning off (README, `cxr-edge bench --mode e2e`).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelPackageError(f"{self.package.root}: ONNX Runtime cannot load {self.artifact_key}: {exc}") from exc
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        return self

    def __exit__(self, *exc) -> None:
        self.session = None

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if self.session is None:
            raise RuntimeError("backend not activated: use it as a context manager")
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        started = time.perf_counter()
        logits = self.session.run([self.output_name], {self.input_name: batch})[0]
        # host memory in and out: no copies to time (h2d / d2h are None)
        self.last_timings_ms = {"h2d": None, "compute": (time.perf_counter() - started) * 1e3, "d2h": None}
        return logits

    def describe(self) -> dict:
        import onnxruntime as ort

        return {
            "name": self.name,
            "provider": "CPUExecutionProvider",
            "precision": self.precision,
            "artifact": self.artifact_key,
            "threads": self.threads,
            "onnxruntime": ort.__version__,
        }
