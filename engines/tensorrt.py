"""TensorRT engine build from an FP16 or Q/DQ ONNX, through Polygraphy: strongly typed, one batch
profile, timing cache. What is ours is the configuration and the engine's stamp.

Precision comes from the ONNX, never from builder flags: 11.x removed them and on 10.x they
conflict with strong typing (TENSORRT.md section 1). Written against Polygraphy 0.53 and
TensorRT 10.12+/11.x. NOT RUN on a GPU yet. No torch.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cxr_edge.atomic import atomic_write
from cxr_edge.backends.polygraphy_env import error_text, polygraphy_calls
from cxr_edge.backends.stamp import machine_facts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchProfile:
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32

    def check(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"batch profile needs 1 <= min <= opt <= max, got {self.min_batch}/{self.opt_batch}/{self.max_batch}")

    def shapes(self, sample_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        """(min, opt, max) input shapes."""
        return tuple((batch, *sample_shape) for batch in (self.min_batch, self.opt_batch, self.max_batch))


class EngineBuildError(RuntimeError):
    """TensorRT refused the ONNX or the build failed; the message carries TensorRT's reasons."""


def tensorrt_unavailable() -> str | None:
    """Why the TensorRT step cannot run here, or None."""
    facts = machine_facts()
    if facts.tensorrt_version and facts.gpu_name:
        return None
    return facts.reason or "TensorRT or a CUDA GPU is not available"


def build_config(trt, input_name: str, sample_shape: tuple[int, ...], profile: BatchProfile,
                 timing_cache: Path | None, optimization_level: int, workspace_gib: float):
    """Polygraphy's CreateConfig with cxr-edge's choices (a loader: called with builder, network)."""
    from polygraphy.backend.trt import CreateConfig, Profile

    low, opt, high = profile.shapes(sample_shape)
    return CreateConfig(
        profiles=[Profile().add(input_name, min=low, opt=opt, max=high)],
        tf32=True,  # TensorRT's own default, which Polygraphy turns off; FP32 parts of the ONNX may use it
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(workspace_gib * (1 << 30))},
        builder_optimization_level=optimization_level,
        # a cache from another GPU is refused, not silently used (Polygraphy: ignore_mismatch=False)
        load_timing_cache=str(timing_cache) if timing_cache and timing_cache.is_file() else None,
        profiling_verbosity=trt.ProfilingVerbosity.LAYER_NAMES_ONLY,  # TensorRT's default
    )


def build_engine(onnx_path: Path, plan_path: Path, sample_shape: tuple[int, ...], profile: BatchProfile,
                 timing_cache: Path | None = None, optimization_level: int = 3, workspace_gib: float = 4.0) -> dict:
    """Write a serialized engine to `plan_path` (and the updated timing cache), atomically;
    return the engine's stamp. Raises EngineBuildError with TensorRT's reasons."""
    import tensorrt as trt
    from polygraphy.backend.trt import engine_bytes_from_network, network_from_onnx_path

    profile.check()
    with polygraphy_calls() as errors, tempfile.TemporaryDirectory(prefix="cxr-edge-trt-cache-") as tmp:
        staged_cache = Path(tmp) / "timing.cache"  # Polygraphy writes here; ours is replaced atomically
        try:
            # parse_from_file: weights stored beside the ONNX are found too
            builder, network, parser = network_from_onnx_path(str(onnx_path), strongly_typed=True)
            config = build_config(trt, network.get_input(0).name, sample_shape, profile, timing_cache,
                                  optimization_level, workspace_gib)
            plan = engine_bytes_from_network((builder, network, parser), config=config,
                                             save_timing_cache=str(staged_cache) if timing_cache else None)
        except Exception as exc:  # Polygraphy raises PolygraphyException; TensorRT's reasons were logged
            raise EngineBuildError(f"TensorRT cannot build {onnx_path.name}: {error_text(exc, errors)}") from exc
        atomic_write(plan_path, lambda f: f.write(plan))
        if timing_cache:
            atomic_write(timing_cache, staged_cache.read_bytes())
    facts = machine_facts()
    return {"tensorrt_version": trt.__version__, "gpu_name": facts.gpu_name,
            "compute_capability": facts.compute_capability, "hardware_compatibility": "NONE",
            "version_compatible": False, "optimization_level": optimization_level, "strongly_typed": True}


def plan_name(precision: str, stamp: dict) -> str:
    """e.g. model.int8.sm89.trt10.13.0.plan: readable at a glance, unique per GPU arch and version."""
    sm = (stamp.get("compute_capability") or "x").replace(".", "")
    return f"model.{precision}.sm{sm}.trt{stamp.get('tensorrt_version')}.plan"
