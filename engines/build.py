"""`cxr-edge build-engine`: make FP16 / INT8 artifacts, gate each against FP32, register the good ones.

Every candidate is built in a staging folder, run on held-out real images next to FP32, and only
moved into the package (and its sha256 into the manifest) when it passes the gate. The JSON
report is written whatever happens.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxr_edge.backends import create_backend
from cxr_edge.errors import CxrEdgeError
from cxr_edge.manifest import ModelPackage

from .data import choose, list_source, load_tensors
from .gate import DEFAULT_TOLERANCES, Tolerance, compare, judge, tolerance_dict
from .quantize import DEFAULT_QUANTIZE_OPS

log = logging.getLogger(__name__)


@dataclass
class BuildOptions:
    fp16: bool = False
    int8: bool = False
    int8_dynamic: bool = True  # with --int8, also ORT's dynamic INT8 (CPU)
    calib: str | None = None
    calib_count: int = 500
    holdout: str | None = None  # default: other images of the calibration source
    holdout_count: int = 100
    seed: int = 0
    method: str = "entropy"
    quantize_ops: tuple[str, ...] | None = DEFAULT_QUANTIZE_OPS  # None: every op (the bad example)
    exclude_defaults: bool = True
    tensorrt: str = "auto"  # auto | skip | require
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    timing_cache: Path | None = None
    optimization_level: int = 3
    tolerances: dict[str, Tolerance] = field(default_factory=lambda: dict(DEFAULT_TOLERANCES))
    workers: int | None = None
    threads: int | None = None


def run_onnx(package: ModelPackage, key: str, images: np.ndarray, threads: int | None, batch: int = 8):
    """(logits, CPU ms per image at batch `batch`, after one warm-up batch)."""
    with create_backend(package, "onnxruntime", package.manifest["artifacts"][key]["precision"], key,
                        threads=threads) as runner:
        runner.infer(images[:batch])
        started = time.perf_counter()
        logits = np.concatenate([runner.infer(images[i : i + batch]) for i in range(0, len(images), batch)])
        ms = (time.perf_counter() - started) * 1e3 / len(images)
    return logits, ms


def _machine() -> dict:
    import onnxruntime

    from cxr_edge.backends.stamp import machine_facts

    facts = machine_facts()
    return {"cpu": platform.processor() or platform.machine(), "cpu_count": len(os.sched_getaffinity(0)),
            "onnxruntime": onnxruntime.__version__, "tensorrt": facts.tensorrt_version, "gpu": facts.gpu_name,
            "compute_capability": facts.compute_capability}


def _data(options: BuildOptions, params):
    if not options.calib:
        raise CxrEdgeError("--calib is required: a folder of real images or a labeled CSV")
    source = list_source(options.calib)
    if options.holdout:
        holdout = choose(list_source(options.holdout), options.holdout_count, options.seed + 1)
        calib = choose(source, options.calib_count, options.seed, exclude=set(holdout.paths))
    else:  # held-out images first, so a small source still leaves some for the gate
        if len(source.paths) < 2:
            raise CxrEdgeError(f"{options.calib}: {len(source.paths)} image(s); need some to calibrate and some to "
                               "hold out for the gate (or pass --holdout)")
        holdout = choose(source, min(options.holdout_count, len(source.paths) // 2), options.seed + 1)
        calib = choose(source, options.calib_count, options.seed, exclude=set(holdout.paths))
    if len(calib.paths) < options.calib_count:
        log.info("calibration: %d images (all that %s has besides the held-out ones)", len(calib.paths), options.calib)
    log.info("decoding %d calibration + %d held-out images", len(calib.paths), len(holdout.paths))
    x_calib, calib = load_tensors(calib, params, options.workers)
    x_hold, holdout = load_tensors(holdout, params, options.workers)
    return x_calib, calib, x_hold, holdout


def build(package_root: str | Path | None, options: BuildOptions, report_path: Path | None = None) -> dict:
    package = ModelPackage.load(package_root)
    report_path = report_path or package.root / "build-report.json"
    report = {"package": str(package.root), "model": {"name": package.name, "version": package.version},
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": _machine(), "artifacts": {}, "tensorrt": None, "passed": False}
    try:
        _build(package, options, report)
    finally:
        tmp = report_path.with_name(report_path.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
        os.replace(tmp, report_path)
        report["report_path"] = str(report_path)
    return report


def _build(package: ModelPackage, options: BuildOptions, report: dict) -> None:
    from .fp16 import fp16
    from .quantize import dynamic_int8, qdq_int8

    if not (options.fp16 or options.int8):
        raise CxrEdgeError("nothing to build: pass --int8 and/or --fp16")
    x_calib, calib, x_hold, holdout = _data(options, package.preprocess_params)
    report["calibration"] = {"source": options.calib, "images": len(calib.paths), "method": options.method,
                             "seed": options.seed}
    report["holdout"] = {"source": options.holdout or options.calib, "images": len(holdout.paths),
                         "labels": holdout.labels is not None}
    reference, fp32_ms = run_onnx(package, "fp32", x_hold, options.threads)
    report["fp32"] = {"cpu_ms_per_image": round(fp32_ms, 3)}

    with tempfile.TemporaryDirectory(prefix="cxr-edge-build-") as tmp:
        staging = Path(tmp)
        fp32_path = staging / "model.fp32.onnx"
        fp32_path.write_bytes(package.read_verified("fp32"))  # build from the verified bytes only
        candidates = []
        if options.fp16:
            candidates.append(("fp16", "fp16", lambda out: fp16(fp32_path, out)))
        if options.int8:
            candidates.append(("int8", "int8", lambda out: qdq_int8(
                fp32_path, out, x_calib, options.method, options.quantize_ops, options.exclude_defaults)))
            if options.int8_dynamic:
                candidates.append(("int8-dynamic", "int8", lambda out: dynamic_int8(fp32_path, out)))
        passed_onnx = {}
        for key, precision, make in candidates:
            filename = f"model.{key}.onnx"
            log.info("building %s", key)
            started = time.perf_counter()
            try:
                info = make(staging / filename)
            except Exception as exc:  # one failed build is reported; the others still run
                log.error("%s: build failed: %s: %s", key, type(exc).__name__, exc)
                report["artifacts"][key] = {"precision": precision, "format": "onnx", "passed": False,
                                            "registered": False, "reasons": [f"build failed: {type(exc).__name__}: {exc}"]}
                continue
            info["build_seconds"] = round(time.perf_counter() - started, 1)
            entry = _gate_and_register(package, key, precision, staging / filename, info, reference, x_hold,
                                       holdout.labels, options, report, fmt="onnx")
            if entry:
                passed_onnx[key] = package.root / filename
        _tensorrt_step(package, options, passed_onnx, reference, x_hold, holdout.labels, report)
    if any(a["registered"] for a in report["artifacts"].values()):
        package.save()  # one manifest write, and none when nothing passed
    report["passed"] = all(a["passed"] for a in report["artifacts"].values()) and not (report["tensorrt"] or {}).get("failed")


def _gate_and_register(package, key, precision, path: Path, info: dict, reference, x_hold, labels, options, report,
                       fmt: str, extra: dict | None = None) -> dict | None:
    tolerance = options.tolerances[precision]
    fields = {"format": fmt, "precision": precision, "build": info, **(extra or {})}
    trial = ModelPackage(path.parent, {**package.manifest, "artifacts": {}})  # the candidate, still in staging
    trial.add_artifact(key, path.name, **fields)
    if fmt == "onnx":
        logits, ms = run_onnx(trial, key, x_hold, options.threads)
    else:
        with create_backend(trial, "tensorrt", precision, key) as runner:
            started = time.perf_counter()
            logits = runner.infer(x_hold)
            ms = (time.perf_counter() - started) * 1e3 / len(x_hold)
    gate = compare(reference, logits, package.temperatures, package.thresholds, labels)
    reasons = judge(gate, tolerance)
    fp32_ms = report["fp32"]["cpu_ms_per_image"]
    timing = ({"cpu_ms_per_image": round(ms, 3), "cpu_speedup_vs_fp32": round(fp32_ms / ms, 2)} if fmt == "onnx"
              else {"gpu_ms_per_image_incl_copies": round(ms, 3)})
    report["artifacts"][key] = {"precision": precision, "format": fmt, "build": info, "gate": gate,
                                "tolerance": tolerance_dict(tolerance), "passed": not reasons, "reasons": reasons,
                                "registered": not reasons, **timing}
    if reasons:
        log.error("%s REFUSED by the accuracy gate: %s", key, "; ".join(reasons))
        return None
    shutil.move(str(path), package.root / path.name)
    summary = {k: gate[k] for k in ("images", "max_abs_dprob", "mean_abs_dprob", "flip_rate")}
    registered = package.add_artifact(key, path.name, **fields, gate=summary | {"max_auroc_drop": gate.get("max_auroc_drop")},
                                      **timing)
    log.info("%s passed the gate (max |dprob| %.4f, flips %.2f%%) and is registered", key, gate["max_abs_dprob"],
             100 * gate["flip_rate"])
    return registered


def _tensorrt_step(package, options, passed_onnx: dict, reference, x_hold, labels, report) -> None:
    from .tensorrt import Profile, build_engine, plan_name, tensorrt_unavailable

    if options.tensorrt == "skip":
        report["tensorrt"] = {"status": "skipped", "reason": "--tensorrt skip"}
        return
    reason = tensorrt_unavailable()
    if reason:
        report["tensorrt"] = {"status": "skipped", "reason": reason, "failed": options.tensorrt == "require"}
        log.warning("TensorRT step skipped: %s. The ONNX artifacts above are built and gated; run build-engine "
                    "again on the GPU machine to make engines.", reason)
        return
    profile = Profile(options.min_batch, options.opt_batch, options.max_batch)
    sample_shape = (package.preprocess_params.channels, package.preprocess_params.size, package.preprocess_params.size)
    report["tensorrt"] = {"status": "built", "engines": []}
    for source_key in ("fp16", "int8"):  # the Q/DQ ONNX, not the dynamic one (IntegerOps do not parse)
        if source_key not in passed_onnx:
            continue
        with tempfile.TemporaryDirectory(prefix="cxr-edge-trt-") as tmp:
            staging_plan = Path(tmp) / "engine.plan"
            started = time.perf_counter()
            stamp = build_engine(passed_onnx[source_key], staging_plan, sample_shape, profile, options.timing_cache,
                                 options.optimization_level)
            plan = Path(tmp) / plan_name(source_key, stamp)
            staging_plan.rename(plan)
            key = f"trt-{source_key}-sm{stamp['compute_capability'].replace('.', '')}"
            info = {"kind": "tensorrt", "from": passed_onnx[source_key].name,
                    "build_seconds": round(time.perf_counter() - started, 1)}
            entry = _gate_and_register(package, key, source_key, plan, info, reference, x_hold, labels, options, report,
                                       fmt="tensorrt", extra={"stamp": stamp, "profile": profile.__dict__})
            report["tensorrt"]["engines"].append({"key": key, "registered": entry is not None})
