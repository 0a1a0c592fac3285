"""The whole pipeline over real files, through the same Pipeline object `cxr-edge infer` runs,
plus each stage's isolated rate, so the report shows how well decode and inference overlap."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from . import STAGES
from .model_stage import Config, efficiency
from .stats import instability_warning, summarize


def decode_rate(items, pool, workers: int) -> dict:
    """Decode + preprocess alone, on the pipeline's worker pool: images per second."""
    list(pool.prepared(items[: min(len(items), 2 * workers)], window=2 * workers))  # warm the workers
    started = time.perf_counter()
    done = sum(1 for p in pool.prepared(items, window=4 * workers) if p is not None)
    elapsed = time.perf_counter() - started
    return {"images_per_second": round(done / elapsed, 2), "seconds": round(elapsed, 3), "workers": workers}


def bench_end_to_end(package, config: Config, items, *, pool, batch_size: int, workers: int, threads: int | None,
                     passes: int, warmup_items: int, write_sr: bool, cv_threshold: float,
                     model_rate: float | None, decode: dict, gflops_per_image: float | None,
                     gemm_gflop_s: float | None, heatmaps: bool | None = None) -> dict:
    """`pool`: the worker pool, its processes already forked (before any runner's threads).
    With heatmaps (None: when the model has class maps) every pass is also run without them,
    alternating, on the same runner and pool: `heatmap_cost` is the extra time they take."""
    from ..backends import create_backend
    from ..pipeline import Pipeline, heatmaps_wanted

    runner = create_backend(package, config.backend, config.precision, config.artifact, threads=threads,
                            max_batch=batch_size)
    records, elapsed, failed, pass_rates = [], 0.0, 0, []
    without_seconds, maps = 0.0, 0
    with runner, tempfile.TemporaryDirectory(prefix="cxr-edge-bench-") as out:
        with_maps = heatmaps_wanted(heatmaps, package, runner)
        pipeline = Pipeline(package, runner, Path(out), workers=workers, max_batch=batch_size, write_sr=write_sr,
                            heatmaps=with_maps)
        plain = Pipeline(package, runner, Path(out), workers=workers, max_batch=batch_size, write_sr=write_sr)
        pipeline.run(items[:warmup_items], pool=pool)
        for _ in range(passes):
            if with_maps:  # the same inputs without heatmaps, just before: the cost compares like with like
                started = time.perf_counter()
                plain.run(items, pool=pool)
                without_seconds += time.perf_counter() - started
            started = time.perf_counter()
            results = pipeline.run(items, pool=pool)
            took = time.perf_counter() - started
            elapsed += took
            pass_rates.append(len(items) / took)
            records += [r.record.to_json() for r in results if r.status == "ok"]
            failed += sum(r.status != "ok" for r in results)
            maps += sum(len(r.record.outputs.get("heatmaps", {}).get("maps", [])) for r in results if r.status == "ok")
        described = runner.describe()
    count = len(items) * passes
    throughput = count / elapsed
    stages = {stage: summarize(r["timings_ms"].get(stage) for r in records) for stage in STAGES}
    latency = summarize(r["timings_ms"].get("end_to_end") for r in records)
    # postprocess and JSON writes run on the main thread, one after another; SRs and heatmaps are
    # built in the worker pool, `workers` at a time
    writes = [(r["timings_ms"]["write"] / (workers if r["outputs"].get("sr") or r["outputs"].get("heatmaps") else 1))
              + r["timings_ms"].get("postprocess", 0.0) / r["timings_ms"]["batch_size"] for r in records]
    isolated = {
        "decode_preprocess": decode["images_per_second"],
        "model": round(model_rate, 2) if model_rate else None,
        "postprocess_write": round(1e3 * len(writes) / sum(writes), 2) if writes and sum(writes) > 0 else None,
    }
    rates = {k: v for k, v in isolated.items() if v}
    slowest = min(rates, key=rates.get) if rates else None
    # On a CPU every stage draws on the same cores, so they cannot all run at their isolated
    # rates at once: with perfect overlap the best possible is 1 / sum(1 / rate).
    on_cpu = config.backend == "onnxruntime" or described.get("device") == "cpu"  # torch without CUDA
    shared_bound = 1 / sum(1 / v for v in rates.values()) if rates and on_cpu else None
    return {
        "mode": "end_to_end",
        "backend": config.backend, "precision": config.precision, "artifact": config.artifact,
        "backend_details": described,
        "batch_size": batch_size, "workers": workers, "passes": passes, "inputs": len(items),
        "succeeded": len(records), "failed": failed,
        "seconds": round(elapsed, 3),
        "throughput_img_s": round(throughput, 2),
        "throughput_per_pass_img_s": [round(r, 2) for r in pass_rates],
        "latency_ms": latency,  # per input: decode start -> outputs written
        "stages_ms": stages,  # per input; batch stages (h2d, compute, d2h, postprocess) are the batch's time
        "isolated_rates_img_s": isolated,
        "slowest_stage": slowest,
        "pipeline_efficiency": round(throughput / rates[slowest], 3) if slowest else None,
        "shared_cpu_bound_img_s": round(shared_bound, 2) if shared_bound else None,
        "overlap_efficiency": round(throughput / shared_bound, 3) if shared_bound else None,
        "efficiency": efficiency(throughput, gflops_per_image, gemm_gflop_s if on_cpu else None),
        "heatmap_cost": heatmap_cost(with_maps, elapsed, without_seconds, maps, len(records)),
        # latency varies by design here (queueing, batching): stability is judged across passes
        "warnings": [w for w in [instability_warning("throughput across passes", summarize(pass_rates), cv_threshold)] if w],
    }


HEATMAP_GOAL = 0.20  # issue #13: at most 20 % more end-to-end time than without heatmaps


def heatmap_cost(on: bool, with_seconds: float, without_seconds: float, maps: int, images: int) -> dict:
    """What heatmaps add to the end-to-end time (same inputs, same runner, passes alternated)."""
    if not on:
        return {"heatmaps": False}
    extra = with_seconds / without_seconds - 1 if without_seconds > 0 else None
    return {"heatmaps": True, "maps_per_image": round(maps / images, 2) if images else None,
            "seconds_with": round(with_seconds, 3), "seconds_without": round(without_seconds, 3),
            "extra_time": round(extra, 3) if extra is not None else None, "goal": HEATMAP_GOAL,
            "within_goal": extra is not None and extra <= HEATMAP_GOAL}
