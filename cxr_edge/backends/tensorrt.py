"""TensorRT on a GPU, through Polygraphy: `EngineFromBytes` deserializes, `TrtRunner` runs
(context, stream, input copies, output allocation).

What is ours is configuration: the stamp check before anything is deserialized (a clear refusal
instead of TensorRT's serialization assertion), the sha256-verified loader, batches run in
chunks the engine's profile accepts, and typed timings. With `stage_timing` (cxr-edge bench)
the input is copied to the GPU apart and the output read back apart, with Polygraphy's CUDA
wrapper, so h2d / compute / d2h are timed separately as trtexec does; without it one
`TrtRunner.infer` runs per chunk and its time (copies included) is the compute time.

Written against Polygraphy 0.53 and TensorRT 10.12+/11.x. NOT RUN on a GPU yet.
"""

from __future__ import annotations

import time

import numpy as np

from ..errors import CxrEdgeError, ModelPackageError
from .base import Outputs, Runner, Timings
from .polygraphy_env import error_text, polygraphy_calls, torch_hidden
from .stamp import REBUILD_HINT, machine_facts, stamp_problem


class TensorRTRunner(Runner):
    name = "tensorrt"

    def __init__(self, load_bytes, precision: str, artifact_key: str, artifact_sha256: str,
                 threads: int | None = None, where: str = "the model package", stamp: dict | None = None,
                 stage_timing: bool = False, warmup: int = 3):
        """`load_bytes`: a loader returning the engine's sha256-verified bytes; `stamp`: what the
        engine was built for (the manifest's, checked against this machine first). `threads` is
        accepted for create_backend's sake: the GPU does the work."""
        super().__init__(precision, artifact_key, artifact_sha256)
        self.load_bytes, self.where = load_bytes, where
        self.stamp = dict(stamp or {})
        self.stage_timing, self.warmup = stage_timing, warmup
        self._trt = self._stream = self._device_input = None

    # --- lifecycle ------------------------------------------------------------------------------
    def activate_impl(self) -> None:
        self._refuse_unless_it_fits()
        plan = self.load_bytes()  # sha256-verified; read once, deserialized from memory
        with polygraphy_calls() as errors:
            try:
                self._start(plan)
            except Exception as exc:  # Polygraphy's "could not deserialize", CUDA errors, ...
                self.deactivate_impl()
                raise ModelPackageError(f"{self.where}: TensorRT cannot load engine {self.artifact_key!r}: "
                                        + error_text(exc, errors)) from exc

    def _refuse_unless_it_fits(self) -> None:
        facts = machine_facts()
        problem = stamp_problem(self.stamp, facts)
        if problem is None:
            return
        if facts.tensorrt_version is None or facts.gpu_name is None:
            raise CxrEdgeError(f"{self.where}: TensorRT engine {self.artifact_key!r} cannot run here: {problem}")
        raise ModelPackageError(f"{self.where}: TensorRT engine {self.artifact_key!r} refused: {problem}; "
                                + REBUILD_HINT.format(package=self.where, flag=f"--{self.precision}"))

    def _start(self, plan: bytes) -> None:
        import tensorrt as trt
        from polygraphy import cuda
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        self._trt = TrtRunner(EngineFromBytes(plan), name=self.artifact_key)
        self._trt.activate()
        engine = self._trt.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_name = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.output_name = "logits" if "logits" in outputs else outputs[0]  # class_maps may come too
        low, _, high = engine.get_tensor_profile_shape(self.input_name, 0)  # the build's batch profile
        self.min_batch, self.max_batch, self.sample_shape = int(low[0]), int(high[0]), tuple(int(d) for d in high[1:])
        if self.stage_timing:
            self._stream = cuda.Stream()
            self._device_input = cuda.DeviceArray(shape=(self.max_batch, *self.sample_shape))
        for _ in range(self.warmup):  # first runs pay for lazy initialisation; keep them out of latency
            self._run_chunk(np.zeros((self.min_batch, *self.sample_shape), np.float32))

    def deactivate_impl(self) -> None:
        with torch_hidden():
            if self._trt is not None and self._trt.is_active:
                self._trt.deactivate()
        for resource in (self._device_input, self._stream):
            if resource is not None:
                resource.free()
        self._trt = self._stream = self._device_input = None

    # --- inference ------------------------------------------------------------------------------
    def output_shape(self, output: str) -> tuple | None:
        import tensorrt as trt

        engine = self._trt.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        if output not in names or engine.get_tensor_mode(output) != trt.TensorIOMode.OUTPUT:
            return None
        return tuple(d if d >= 0 else None for d in engine.get_tensor_shape(output))

    def infer_impl(self, batch: np.ndarray) -> Outputs:
        logits, maps, timings = [], [], []
        with torch_hidden():
            for start in range(0, len(batch), self.max_batch):  # larger batches: profile-sized chunks
                part = batch[start : start + self.max_batch]
                out, part_maps, timing = self._run_chunk(_pad_to(part, self.min_batch))
                logits.append(out[: len(part)])
                if part_maps is not None:
                    maps.append(part_maps[: len(part)])
                timings.append(timing)
        return Outputs(np.concatenate(logits), _total(timings), np.concatenate(maps) if maps else None)

    def _run_chunk(self, part: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, Timings]:
        # check_inputs off: the shape is the profile's and the dtype float32 (Runner.infer), and
        # Polygraphy's check rereads the engine's metadata on every call
        if not self.stage_timing:
            outputs = self._trt.infer({self.input_name: part}, check_inputs=False)
            # output buffers are reused by the next call: copy; TrtRunner's time includes the copies
            maps = outputs[self.maps_output].copy() if self.maps_output else None
            return outputs[self.output_name].copy(), maps, Timings(self._trt.last_inference_time() * 1e3)
        started = time.perf_counter()
        self._device_input.resize(part.shape)
        self._device_input.copy_from(part, self._stream)
        self._stream.synchronize()
        copied_in = time.perf_counter()
        outputs = self._trt.infer({self.input_name: self._device_input}, check_inputs=False, copy_outputs_to_host=False)
        computed = time.perf_counter()  # TrtRunner synchronizes its stream before returning
        logits = outputs[self.output_name].numpy()  # a synchronous copy to a new host array
        maps = outputs[self.maps_output].numpy() if self.maps_output else None
        copied_out = time.perf_counter()
        return logits, maps, Timings(compute_ms=(computed - copied_in) * 1e3, h2d_ms=(copied_in - started) * 1e3,
                               d2h_ms=(copied_out - computed) * 1e3)

    def describe(self) -> dict:
        return {**super().describe(), "tensorrt": self.stamp.get("tensorrt_version"), "gpu": self.stamp.get("gpu_name")}


def _pad_to(part: np.ndarray, rows: int) -> np.ndarray:
    """At least `rows` rows (the profile's minimum batch), repeating the last image; the extra
    outputs are dropped."""
    if len(part) >= rows:
        return part
    return np.concatenate([part, np.repeat(part[-1:], rows - len(part), axis=0)])


def _total(timings: list[Timings]) -> Timings:
    def add(values):
        return None if any(v is None for v in values) else sum(values)

    return Timings(sum(t.compute_ms for t in timings), add([t.h2d_ms for t in timings]), add([t.d2h_ms for t in timings]))
