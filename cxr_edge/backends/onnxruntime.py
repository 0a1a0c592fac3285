"""ONNX Runtime on CPU: the runner that works everywhere, and its session loader."""

from __future__ import annotations

import time

import numpy as np

from ..errors import ModelPackageError
from ..limits import usable_cpus
from .base import Outputs, Runner, Timings


def cpu_session(model_bytes: bytes, threads: int | None = None):
    """An ONNX Runtime CPU session with cxr-edge's options (a loader's work: the runner and the
    build-engine gate use the same one, so the gate measures what users run)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or usable_cpus()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only; ORT warnings are noise for users
    # Idle ORT threads spin by default, burning the cores the decode workers need: measured
    # +8-12 % end to end on 2 cores with spinning off (README, `cxr-edge bench --mode e2e`).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"

    def __init__(self, load_bytes, precision: str, artifact_key: str, artifact_sha256: str,
                 threads: int | None = None, where: str = "the model package"):
        """`load_bytes`: a loader returning the artifact's sha256-verified bytes."""
        super().__init__(precision, artifact_key, artifact_sha256)
        self.load_bytes, self.where = load_bytes, where
        self.threads = threads or usable_cpus()
        self.session = None

    def activate_impl(self) -> None:
        # Verified bytes go straight to the session: the file cannot change between check and load.
        model_bytes = self.load_bytes()
        try:
            self.session = cpu_session(model_bytes, self.threads)
        except Exception as exc:
            raise ModelPackageError(f"{self.where}: ONNX Runtime cannot load {self.artifact_key}: {exc}") from exc
        self.input_name = self.session.get_inputs()[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = "logits" if "logits" in outputs else outputs[0]  # class_maps may come too

    def deactivate_impl(self) -> None:
        self.session = None

    def output_shape(self, output: str) -> tuple | None:
        for o in self.session.get_outputs():
            if o.name == output:
                return tuple(d if isinstance(d, int) else None for d in o.shape)
        return None

    def infer_impl(self, batch: np.ndarray) -> Outputs:
        started = time.perf_counter()
        fetch = [self.output_name] + ([self.maps_output] if self.maps_output else [])
        found = self.session.run(fetch, {self.input_name: batch})
        # host memory in and out: no copies to time
        return Outputs(found[0], Timings(compute_ms=(time.perf_counter() - started) * 1e3),
                       found[1] if self.maps_output else None)

    def describe(self) -> dict:
        import onnxruntime as ort

        return {**super().describe(), "provider": "CPUExecutionProvider", "threads": self.threads,
                "onnxruntime": ort.__version__}
