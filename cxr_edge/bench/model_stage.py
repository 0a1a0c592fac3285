"""The model stage alone, per backend x precision x batch size: warm-up, then timed iterations on
real preprocessed images, with the backend's host-to-device / compute / device-to-host split."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .stats import instability_warning, summarize


@dataclass(frozen=True)
class Config:
    backend: str
    precision: str
    artifact: str | None  # None: nothing to run (see `skipped`)
    skipped: str | None = None


def configs(package, backends, precisions) -> list[Config]:
    """Every artifact that can run here, plus a skipped entry (with the reason) for each
    backend x precision that cannot, so the report says why a row is missing."""
    from ..backends import RUNS_FORMAT
    from ..backends.stamp import machine_facts, stamp_problem

    facts = machine_facts() if "tensorrt" in backends else None
    found = []
    for backend in backends:
        for precision in precisions:
            fmt = RUNS_FORMAT[backend]
            artifacts = package.artifacts(precision=precision, format=fmt)
            if not artifacts:
                hint = "" if precision == "fp32" else f"; build it with `cxr-edge build-engine --{precision}`"
                found.append(Config(backend, precision, None, f"the package has no {precision} {fmt} artifact{hint}"))
                continue
            for artifact in artifacts:
                problem = stamp_problem(artifact.stamp, facts) if backend == "tensorrt" else None
                found.append(Config(backend, precision, artifact.key if problem is None else None, problem))
    return found


def runner_options(backend: str) -> dict:
    """Constructor options for a timed runner: TensorRT times its copies and compute apart
    (a sync between them, as trtexec does); ONNX Runtime has no copies to time."""
    return {"stage_timing": True} if backend == "tensorrt" else {}


def bench_model(package, config: Config, batch_size: int, tensors: np.ndarray, *, warmup: int,
                iterations: int, duration: float | None, threads: int | None, cv_threshold: float,
                gflops_per_image: float | None, gemm_gflop_s: float | None) -> dict:
    from ..backends import create_backend

    batch = np.stack([tensors[i % len(tensors)] for i in range(batch_size)])  # real images, repeated
    runner = create_backend(package, config.backend, config.precision, config.artifact, threads=threads,
                            **runner_options(config.backend))
    latencies, split = [], {"h2d": [], "compute": [], "d2h": []}
    with runner:
        for _ in range(warmup):
            runner.infer(batch)
        started = time.perf_counter()
        deadline = started + duration if duration else None
        while (len(latencies) < iterations) if deadline is None else (time.perf_counter() < deadline or len(latencies) < 2):
            t0 = time.perf_counter()
            runner.infer(batch)
            latencies.append((time.perf_counter() - t0) * 1e3)
            timed = runner.last_timings.split()
            for stage in split:
                split[stage].append(timed.get(stage))
        elapsed = time.perf_counter() - started
        described = runner.describe()
    throughput = batch_size * len(latencies) / elapsed
    latency = summarize(latencies)
    result = {
        "mode": "model",
        "backend": config.backend, "precision": config.precision, "artifact": config.artifact,
        "backend_details": described,
        "batch_size": batch_size, "warmup_iterations": warmup, "iterations": len(latencies),
        "seconds": round(elapsed, 3),
        "throughput_img_s": round(throughput, 2),
        "latency_ms": latency,  # per batch, like trtexec's per-query latency
        "latency_per_image_ms": round(latency["mean"] / batch_size, 4),
        "stages_ms": {stage: summarize(values) for stage, values in split.items()},
        "efficiency": efficiency(throughput, gflops_per_image, gemm_gflop_s),
        "warnings": [w for w in [instability_warning("latency", latency, cv_threshold)] if w],
    }
    return result


def efficiency(images_per_second: float, gflops_per_image: float | None, gemm_gflop_s: float | None) -> dict:
    achieved = images_per_second * gflops_per_image if gflops_per_image else None
    return {
        "achieved_gflop_s": round(achieved, 2) if achieved is not None else None,
        "gemm_gflop_s": gemm_gflop_s,
        "fraction_of_gemm": round(achieved / gemm_gflop_s, 3) if achieved and gemm_gflop_s else None,
    }
