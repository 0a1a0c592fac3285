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


def configs(package, backends, precisions, torch_on_cpu: bool = False) -> list[Config]:
    """Every artifact that can run here, plus a skipped entry (with the reason) for each
    backend x precision that cannot, so the report says why a row is missing. `precisions`:
    None for each backend's own (the package's artifacts; torch: FP32, FP16, BF16). torch runs
    on CPU only when `torch_on_cpu` (asked for by name): by default it is a GPU row."""
    from ..backends import RUNS_FORMAT, TORCH_PRECISIONS
    from ..backends.stamp import machine_facts, stamp_problem

    facts = machine_facts() if "tensorrt" in backends else None
    found = []
    for backend in backends:
        if backend == "torch":
            found.extend(torch_configs(package, precisions or TORCH_PRECISIONS, torch_on_cpu))
            continue
        for precision in precisions or sorted(package.precisions(), key=_precision_order):
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


def _precision_order(precision: str):
    from ..backends import PRECISIONS

    return (PRECISIONS.index(precision) if precision in PRECISIONS else len(PRECISIONS), precision)


def torch_configs(package, precisions, on_cpu: bool) -> list[Config]:
    from ..backends import TORCH_PRECISIONS, torch_weights_artifact
    from ..backends.torch_runner import cuda_problem, missing_modules
    from ..errors import ModelPackageError

    try:
        weights = torch_weights_artifact(package).key
    except ModelPackageError as exc:
        return [Config("torch", precision, None, str(exc)) for precision in precisions]
    problem = cuda_problem(device_node_first=not on_cpu)  # None: CUDA is there
    installed = not missing_modules()
    found = []
    for precision in precisions:
        if precision not in TORCH_PRECISIONS:
            found.append(Config("torch", precision, None, "the torch backend has no INT8 (onnxruntime and tensorrt have)"))
        elif problem is None or (on_cpu and precision == "fp32" and installed):
            found.append(Config("torch", precision, weights))
        elif on_cpu and installed:
            found.append(Config("torch", precision, None, f"{precision.upper()} runs on CUDA only: {problem}"))
        else:
            found.append(Config("torch", precision, None,
                                problem + ("; `--backend torch` runs FP32 on CPU" if installed else "")))
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
                            max_batch=batch_size, **runner_options(config.backend))
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
    if described.get("device") == "cuda":
        gemm_gflop_s = None  # the reference is a CPU GEMM
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
