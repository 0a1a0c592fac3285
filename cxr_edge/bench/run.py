"""Runs a whole benchmark: model stage for every backend x precision x batch size, then the
pipeline end to end; returns the report (see README "cxr-edge bench" for its JSON fields)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import SCHEMA
from .end_to_end import bench_end_to_end, decode_rate
from .flops import gemm_rate, model_gflops_per_image
from .machine import machine_report
from .model_stage import bench_model, configs


@dataclass
class Settings:
    backends: tuple[str, ...] = ("onnxruntime", "tensorrt", "torch")
    precisions: tuple[str, ...] | None = None  # None: each backend's own (model_stage.configs)
    torch_on_cpu: bool = False  # torch asked for by name: run it on CPU too, where there is no CUDA
    batch_sizes: tuple[int, ...] = (1, 8)
    warmup: int = 5
    iterations: int = 30
    duration: float | None = None
    mode: str = "all"  # model | e2e | all
    e2e_batch_size: int = 8
    workers: int | None = None
    threads: int | None = None
    passes: int = 1
    write_sr: bool = True
    heatmaps: bool | None = None  # None: when the model has class maps (their cost is measured too)
    cv_threshold: float = 0.10
    sample_images: int = 16


def sample_tensors(items, package, count: int, pool=None) -> np.ndarray:
    """Real preprocessed images for the model stage: the first `count` that decode, decoded in
    crash-isolated worker processes (workers.tensors_for; `pool`: the bench's own)."""
    from ..workers import tensors_for

    tensors = []
    for start in range(0, len(items), count):
        tensors.extend(tensors_for(items[start : start + count], package.preprocess_params, pool=pool).tensors)
        if len(tensors) >= count:
            break
    if not tensors:
        raise ValueError("none of the inputs could be decoded, so there is nothing to benchmark")
    return np.stack(tensors[:count])


def run_bench(package, items, settings: Settings, progress=lambda message: None) -> dict:
    from ..workers import WorkerPool, default_workers

    workers = settings.workers or default_workers()
    # One pool for the whole run, its workers forked by the first decode, before any runner
    # (or CUDA) starts threads; decode_rate and the pipeline runs reuse it.
    pool = WorkerPool(workers, package.preprocess_params)
    try:
        return _run_bench(package, items, settings, progress, pool, workers)
    finally:
        pool.close()


def _run_bench(package, items, settings: Settings, progress, pool, workers: int) -> dict:
    progress("decoding sample images")
    tensors = sample_tensors(items, package, settings.sample_images, pool)
    progress("counting model FLOPs and measuring the GEMM reference")
    onnx = package.artifacts(format="onnx")
    reference = next((a.key for a in onnx if a.precision == "fp32"), onnx[0].key if onnx else package.artifacts()[0].key)
    flops = model_gflops_per_image(package.read_verified(reference), tensors)
    gemm = gemm_rate()
    per_image = flops["gflops_per_image"]

    def cpu_gemm(config):  # the reference is a CPU GEMM: meaningless for a GPU (bench_model drops it for torch on CUDA)
        return gemm["gflop_s"] if config.backend != "tensorrt" else None

    report = {
        "schema": SCHEMA,
        "machine": machine_report(),
        "model": {"name": package.name, "version": package.version, "path": str(package.root),
                  "architecture": package.architecture_name,
                  "input_shape": list(tensors.shape[1:]), **flops},
        "gemm": gemm,
        "settings": {**settings.__dict__, "workers": workers, "inputs": len(items)},
        "model_stage": [], "end_to_end": [], "skipped": [],
    }
    runnable = []
    for config in configs(package, settings.backends, settings.precisions, settings.torch_on_cpu):
        if config.artifact is None:
            report["skipped"].append({"backend": config.backend, "precision": config.precision, "reason": config.skipped})
        else:
            runnable.append(config)

    model_rates = {}
    if settings.mode in ("model", "all"):
        for config in runnable:
            for batch_size in settings.batch_sizes:
                progress(f"model stage: {config.backend} {config.artifact}, batch {batch_size}")
                result = bench_model(package, config, batch_size, tensors, warmup=settings.warmup,
                                     iterations=settings.iterations, duration=settings.duration,
                                     threads=settings.threads, cv_threshold=settings.cv_threshold,
                                     gflops_per_image=per_image, gemm_gflop_s=cpu_gemm(config))
                report["model_stage"].append(result)
                model_rates[(config, batch_size)] = result["throughput_img_s"]

    if settings.mode in ("e2e", "all"):
        progress("decode + preprocess alone")
        decode = decode_rate(items, pool, workers)
        for config in runnable:
            if (config, settings.e2e_batch_size) not in model_rates:  # the model's isolated rate at this batch size
                quick = bench_model(package, config, settings.e2e_batch_size, tensors, warmup=3, iterations=10,
                                    duration=None, threads=settings.threads, cv_threshold=settings.cv_threshold,
                                    gflops_per_image=per_image, gemm_gflop_s=cpu_gemm(config))
                model_rates[(config, settings.e2e_batch_size)] = quick["throughput_img_s"]
            progress(f"end to end: {config.backend} {config.artifact}, {len(items)} inputs x {settings.passes}")
            report["end_to_end"].append(bench_end_to_end(
                package, config, items, pool=pool, batch_size=settings.e2e_batch_size, workers=workers,
                threads=settings.threads, passes=settings.passes, warmup_items=min(len(items), 2 * settings.e2e_batch_size),
                write_sr=settings.write_sr, heatmaps=settings.heatmaps, cv_threshold=settings.cv_threshold,
                model_rate=model_rates[(config, settings.e2e_batch_size)], decode=decode,
                gflops_per_image=per_image, gemm_gflop_s=cpu_gemm(config)))
    return report
