"""TensorRT backend: a stamped, sha256-verified engine; pinned host buffers, async copies, one stream.

Written against the documented TensorRT 10.12+/11.x Python API and cuda-python's
`cuda.bindings.runtime` (TENSORRT.md section 2). NOT RUN on a GPU yet: no GPU or tensorrt wheel
was available where it was written. No torch.
"""

from __future__ import annotations

import ctypes
import logging
import time

import numpy as np

from ..errors import ModelPackageError
from ..manifest import ModelPackage
from .stamp import REBUILD_HINT, machine_facts, stamp_problem

log = logging.getLogger(__name__)


def _check(result):
    """cuda-python returns (err, *values); raise on an error code."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return values[0] if len(values) == 1 else values


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, package: ModelPackage, precision: str = "fp16", artifact: str | None = None,
                 threads: int | None = None, warmup: int = 3):
        self.package, self.precision = package, precision
        self.artifact_key = artifact or precision
        entry = package.artifact(self.artifact_key)
        self.artifact_sha256, self.stamp, self.warmup = entry["sha256"], entry.get("stamp", {}), warmup
        self.max_batch = int(entry.get("profile", {}).get("max_batch", 1))
        self.engine = self.context = self.stream = None
        self._buffers: list = []
        # True (cxr-edge bench): synchronize after each copy and the compute to time them apart,
        # as trtexec's H2D / GPU compute / D2H split. Off in production: one sync per batch.
        self.stage_timing = False
        self.last_timings_ms: dict = {}

    def __enter__(self) -> "TensorRTBackend":
        import tensorrt as trt
        from cuda.bindings import runtime as cudart

        problem = stamp_problem(self.stamp, machine_facts())
        if problem:
            flag = "--int8" if self.precision == "int8" else "--fp16"
            raise ModelPackageError(f"{self.package.root}: TensorRT engine {self.artifact_key!r} refused: {problem}; "
                                    + REBUILD_HINT.format(package=self.package.root, flag=flag))
        plan = self.package.read_verified(self.artifact_key)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self._logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise ModelPackageError(f"{self.package.root}: TensorRT could not deserialize {self.artifact_key!r} "
                                    "(see the TensorRT log above)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        in_shape = tuple(self.engine.get_tensor_profile_shape(self.input_name, 0)[2])  # the profile's max
        self.max_batch = in_shape[0]
        self.sample_shape = in_shape[1:]
        n_out = int(self.engine.get_tensor_shape(self.output_name)[-1])
        self.host_in = self._pinned((self.max_batch, *self.sample_shape), np.float32)
        self.host_out = self._pinned((self.max_batch, n_out), np.float32)
        self.dev_in = _check(cudart.cudaMalloc(self.host_in.nbytes))
        self.dev_out = _check(cudart.cudaMalloc(self.host_out.nbytes))
        self._buffers += [("device", self.dev_in), ("device", self.dev_out)]
        self.stream = _check(cudart.cudaStreamCreate())
        self.context.set_tensor_address(self.input_name, int(self.dev_in))
        self.context.set_tensor_address(self.output_name, int(self.dev_out))
        for _ in range(self.warmup):  # first runs pay for lazy initialisation; keep them out of latency
            self.infer(np.zeros((1, *self.sample_shape), np.float32))
        return self

    def _pinned(self, shape, dtype) -> np.ndarray:
        from cuda.bindings import runtime as cudart

        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        pointer = _check(cudart.cudaMallocHost(nbytes))
        self._buffers.append(("host", pointer))
        raw = (ctypes.c_uint8 * nbytes).from_address(int(pointer))
        return np.frombuffer(raw, dtype=np.uint8).view(dtype).reshape(shape)

    def __exit__(self, *exc) -> None:
        from cuda.bindings import runtime as cudart

        if self.stream is not None:
            cudart.cudaStreamDestroy(self.stream)
        for kind, pointer in self._buffers:
            (cudart.cudaFreeHost if kind == "host" else cudart.cudaFree)(pointer)
        self._buffers, self.context, self.engine, self.stream = [], None, None, None

    def infer(self, batch: np.ndarray) -> np.ndarray:
        from cuda.bindings import runtime as cudart

        outputs = []
        timings = {"h2d": 0.0, "compute": 0.0, "d2h": 0.0}
        for start in range(0, len(batch), self.max_batch):  # larger batches run in profile-sized chunks
            part = batch[start : start + self.max_batch]
            n = len(part)
            self.host_in[:n] = part
            if not self.context.set_input_shape(self.input_name, (n, *self.sample_shape)):
                raise RuntimeError(f"TensorRT refused input shape {(n, *self.sample_shape)}")
            kind = cudart.cudaMemcpyKind
            t0 = time.perf_counter()
            _check(cudart.cudaMemcpyAsync(self.dev_in, self.host_in.ctypes.data, self.host_in[:n].nbytes,
                                          kind.cudaMemcpyHostToDevice, self.stream))
            t1 = self._mark()
            if not self.context.execute_async_v3(self.stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            t2 = self._mark()
            _check(cudart.cudaMemcpyAsync(self.host_out.ctypes.data, self.dev_out, self.host_out[:n].nbytes,
                                          kind.cudaMemcpyDeviceToHost, self.stream))
            _check(cudart.cudaStreamSynchronize(self.stream))
            t3 = time.perf_counter()
            outputs.append(self.host_out[:n].copy())
            if self.stage_timing:
                timings["h2d"] += (t1 - t0) * 1e3
                timings["compute"] += (t2 - t1) * 1e3
                timings["d2h"] += (t3 - t2) * 1e3
            else:  # one sync per batch: the split is unknown, the total is not
                timings["compute"] += (t3 - t0) * 1e3
        self.last_timings_ms = timings if self.stage_timing else {"h2d": None, "compute": timings["compute"], "d2h": None}
        return np.concatenate(outputs)

    def _mark(self) -> float:
        if self.stage_timing:
            from cuda.bindings import runtime as cudart

            _check(cudart.cudaStreamSynchronize(self.stream))
        return time.perf_counter()

    def describe(self) -> dict:
        return {"name": self.name, "precision": self.precision, "artifact": self.artifact_key,
                "tensorrt": self.stamp.get("tensorrt_version"), "gpu": self.stamp.get("gpu_name")}
