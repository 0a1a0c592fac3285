"""TensorRT engine build from an FP16 or Q/DQ ONNX: strongly typed, one batch profile, timing cache.

Written against the documented TensorRT 10.12+/11.x Python API (TENSORRT.md section 1):
precision comes from the ONNX, never from builder flags (11.x removed them; on 10.x they
conflict with strong typing). NOT RUN on a GPU yet: no GPU or tensorrt wheel was available where
it was written. No torch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cxr_edge.backends.stamp import machine_facts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Profile:
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32

    def check(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"batch profile needs 1 <= min <= opt <= max, got {self.min_batch}/{self.opt_batch}/{self.max_batch}")


def tensorrt_unavailable() -> str | None:
    """Why the TensorRT step cannot run here, or None."""
    facts = machine_facts()
    if facts.tensorrt_version and facts.gpu_name:
        return None
    return facts.reason or "TensorRT or a CUDA GPU is not available"


def _capturing_logger(trt):
    """A trt.ILogger that keeps messages: build errors only arrive through the logger."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages = []

        def log(self, severity, msg):
            self.messages.append((severity, msg))
            if severity <= trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)

    return Logger()


def build_engine(onnx_path: Path, plan_path: Path, sample_shape: tuple[int, ...], profile: Profile,
                 timing_cache: Path | None = None, optimization_level: int = 3, workspace_gib: float = 4.0) -> dict:
    """Write a serialized engine to `plan_path`; return its stamp."""
    import tensorrt as trt

    profile.check()
    logger = _capturing_logger(trt)
    builder = trt.Builder(logger)
    # The enum value differs between 10.x (1) and 11.x (0): never hard-code the bit.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT cannot parse {onnx_path.name}: {'; '.join(errors)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.builder_optimization_level = optimization_level
    input_name = network.get_input(0).name
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(input_name, (profile.min_batch, *sample_shape), (profile.opt_batch, *sample_shape),
                          (profile.max_batch, *sample_shape))
    if config.add_optimization_profile(opt_profile) < 0:
        raise RuntimeError(f"invalid optimization profile {profile}")
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)  # must outlive the build
    config.set_timing_cache(cache, False)  # a cache from another GPU is refused, not silently used
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        errors = [msg for severity, msg in logger.messages if severity <= trt.ILogger.Severity.ERROR]
        raise RuntimeError(f"TensorRT build failed: {'; '.join(errors) or 'no message'}")
    tmp = plan_path.with_name(plan_path.name + ".tmp")
    tmp.write_bytes(bytes(plan))
    os.replace(tmp, plan_path)
    if timing_cache:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = timing_cache.with_name(timing_cache.name + ".tmp")
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
        os.replace(tmp, timing_cache)
    facts = machine_facts()
    return {"tensorrt_version": trt.__version__, "gpu_name": facts.gpu_name,
            "compute_capability": facts.compute_capability, "hardware_compatibility": "NONE",
            "version_compatible": False, "optimization_level": optimization_level, "strongly_typed": True}


def plan_name(precision: str, stamp: dict) -> str:
    """e.g. model.int8.sm89.trt10.13.0.plan: readable at a glance, unique per GPU arch and version."""
    sm = (stamp.get("compute_capability") or "x").replace(".", "")
    return f"model.{precision}.sm{sm}.trt{stamp.get('tensorrt_version')}.plan"
