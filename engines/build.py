"""`cxr-edge build-engine`: make FP16 / INT8 artifacts, gate each against FP32, register the good ones.

Every candidate is built in a staging folder, run on held-out real images next to FP32 through
Polygraphy's Comparator (engines.holdout), and only written into the package (and its sha256
into the manifest) when it passes the gate: the bytes the gate ran are the bytes registered.
The JSON report is written whatever happens.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cxr_edge.atomic import atomic_write
from cxr_edge.errors import CxrEdgeError, ModelPackageError
from cxr_edge.manifest import ModelPackage, sha256_bytes

from .data import choose, list_source, load_tensors
from .gate import DEFAULT_TOLERANCES, GateCompareFunc, Tolerance, tolerance_dict
from .holdout import HoldoutRun, gate, onnxruntime_runner, run_holdout, tensorrt_runner
from .quantize import DEFAULT_QUANTIZE_OPS
from .tensorrt import BatchProfile, EngineBuildError, build_engine, plan_name, tensorrt_unavailable

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


@dataclass(frozen=True)
class Candidate:
    """A built artifact still in staging, waiting for the gate."""

    key: str
    precision: str
    format: str  # onnx | tensorrt
    path: Path
    info: dict  # how it was built
    fields: dict = field(default_factory=dict)  # more manifest fields (TensorRT: stamp, profile)


def _machine() -> dict:
    """The CPU side. The GPU side (CUDA starts threads) is added after the decode workers are gone."""
    import onnxruntime

    return {"cpu": platform.processor() or platform.machine(), "cpu_count": len(os.sched_getaffinity(0)),
            "onnxruntime": onnxruntime.__version__}


def _gpu() -> dict:
    from cxr_edge.backends.stamp import machine_facts

    facts = machine_facts()
    return {"tensorrt": facts.tensorrt_version, "gpu": facts.gpu_name, "compute_capability": facts.compute_capability}


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
        atomic_write(report_path, (json.dumps(report, indent=2, default=str) + "\n").encode())
        report["report_path"] = str(report_path)
    return report


def _build(package: ModelPackage, options: BuildOptions, report: dict) -> None:
    from .fp16 import fp16
    from .quantize import dynamic_int8, qdq_int8

    if not (options.fp16 or options.int8):
        raise CxrEdgeError("nothing to build: pass --int8 and/or --fp16")
    # Decoded first, in worker processes that are gone before any runner (or CUDA) starts threads.
    x_calib, calib, x_hold, holdout = _data(options, package.preprocess_params)
    report["machine"].update(_gpu())
    report["calibration"] = {"source": options.calib, "images": len(calib.paths), "method": options.method,
                             "seed": options.seed}
    report["holdout"] = {"source": options.holdout or options.calib, "images": len(holdout.paths),
                         "labels": holdout.labels is not None}
    try:
        reference = run_holdout(onnxruntime_runner("fp32", package.verified_loader("fp32"), options.threads), x_hold)
    except CxrEdgeError:  # the sha256 check
        raise
    except Exception as exc:  # ONNX Runtime refuses bytes whose sha256 matched (corrupt when packaged)
        raise ModelPackageError(f"{package.root}: the fp32 artifact does not run: {type(exc).__name__}: {exc}") from exc
    report["fp32"] = {"cpu_ms_per_image": round(reference.ms_per_image, 3)}

    with tempfile.TemporaryDirectory(prefix="cxr-edge-build-") as tmp:
        staging = Path(tmp)
        fp32_path = staging / "model.fp32.onnx"
        atomic_write(fp32_path, package.read_verified("fp32"))  # build from the verified bytes only
        builders = []
        if options.fp16:
            builders.append(("fp16", "fp16", lambda out: fp16(fp32_path, out)))
        if options.int8:
            builders.append(("int8", "int8", lambda out: qdq_int8(
                fp32_path, out, x_calib, options.method, options.quantize_ops, options.exclude_defaults)))
            if options.int8_dynamic:
                builders.append(("int8-dynamic", "int8", lambda out: dynamic_int8(fp32_path, out)))
        passed_onnx = set()
        for key, precision, make in builders:
            path = staging / f"model.{key}.onnx"
            log.info("building %s", key)
            started = time.perf_counter()
            try:
                info = make(path)
            except Exception as exc:  # one failed build is reported; the others still run
                _refused(report, key, precision, "onnx", f"build failed: {type(exc).__name__}: {exc}")
                continue
            info["build_seconds"] = round(time.perf_counter() - started, 1)
            if _gate_and_register(package, Candidate(key, precision, "onnx", path, info), reference, x_hold,
                                  holdout.labels, options, report):
                passed_onnx.add(key)
        _tensorrt_step(package, options, passed_onnx, reference, x_hold, holdout.labels, report)
    if any(a["registered"] for a in report["artifacts"].values()):
        package.save()  # one manifest write, and none when nothing passed
    report["passed"] = all(a["passed"] for a in report["artifacts"].values()) and not (report["tensorrt"] or {}).get("failed")


def _refused(report: dict, key: str, precision: str, fmt: str, reason: str) -> None:
    log.error("%s: %s", key, reason)
    report["artifacts"][key] = {"precision": precision, "format": fmt, "passed": False, "registered": False,
                                "reasons": [reason]}


def _gate_and_register(package: ModelPackage, candidate: Candidate, reference: HoldoutRun, x_hold, labels,
                       options: BuildOptions, report: dict, profile: BatchProfile | None = None):
    """Run the candidate on the held-out images, gate it against FP32, register it if it passes."""
    key, fmt = candidate.key, candidate.format
    data = candidate.path.read_bytes()  # these bytes are gated, and these bytes are registered
    load = lambda: data  # noqa: E731 (a loader, Polygraphy's habit)
    try:
        if fmt == "onnx":
            run = run_holdout(onnxruntime_runner(key, load, options.threads), x_hold)
        else:
            run = run_holdout(tensorrt_runner(key, load), x_hold, profile.opt_batch, profile.min_batch)
    except Exception as exc:  # a candidate its runtime refuses is refused, the others still run
        _refused(report, key, candidate.precision, fmt, f"cannot run: {type(exc).__name__}: {exc}")
        return None
    tolerance = options.tolerances[candidate.precision]
    verdict = gate(reference, run, GateCompareFunc(package.temperatures, package.thresholds, tolerance, labels))
    if fmt == "onnx":
        fp32_ms = report["fp32"]["cpu_ms_per_image"]
        timing = {"cpu_ms_per_image": round(run.ms_per_image, 3), "cpu_speedup_vs_fp32": round(fp32_ms / run.ms_per_image, 2)}
    else:  # TrtRunner's time includes its host <-> device copies
        timing = {"gpu_ms_per_image_incl_copies": round(run.ms_per_image, 3)}
    report["artifacts"][key] = {"precision": candidate.precision, "format": fmt, "build": candidate.info,
                                "gate": verdict.metrics, "tolerance": tolerance_dict(tolerance),
                                "passed": verdict.passed, "reasons": list(verdict.reasons),
                                "registered": verdict.passed, **timing}
    if not verdict:
        log.error("%s REFUSED by the accuracy gate: %s", key, "; ".join(verdict.reasons))
        return None
    name = candidate.path.name
    atomic_write(package.root / name, data)
    registered = package.add_artifact(key, name, format=fmt, precision=candidate.precision, build=candidate.info,
                                      **candidate.fields, gate=verdict.summary(), **timing)
    if registered.sha256 != sha256_bytes(data):
        raise CxrEdgeError(f"{package.root / name} changed while it was being registered; run build-engine again")
    log.info("%s passed the gate (max |dprob| %.4f, flips %.2f%%) and is registered", key,
             verdict.metrics["max_abs_dprob"], 100 * verdict.metrics["flip_rate"])
    return registered


def _tensorrt_step(package, options, passed_onnx: set, reference, x_hold, labels, report) -> None:
    if options.tensorrt == "skip":
        report["tensorrt"] = {"status": "skipped", "reason": "--tensorrt skip"}
        return
    reason = tensorrt_unavailable()
    if reason:
        report["tensorrt"] = {"status": "skipped", "reason": reason, "failed": options.tensorrt == "require"}
        log.warning("TensorRT step skipped: %s. The ONNX artifacts above are built and gated; run build-engine "
                    "again on the GPU machine to make engines.", reason)
        return
    profile = BatchProfile(options.min_batch, options.opt_batch, options.max_batch)
    params = package.preprocess_params
    sample_shape = (params.channels, params.size, params.size)
    report["tensorrt"] = {"status": "built", "engines": []}
    for source_key in ("fp16", "int8"):  # the Q/DQ ONNX, not the dynamic one (IntegerOps do not parse)
        if source_key not in passed_onnx:
            continue
        with tempfile.TemporaryDirectory(prefix="cxr-edge-trt-") as tmp:
            onnx_path = Path(tmp) / f"model.{source_key}.onnx"
            atomic_write(onnx_path, package.read_verified(source_key))  # build from the verified bytes only
            staging_plan = Path(tmp) / "engine.plan"
            started = time.perf_counter()
            try:
                stamp = build_engine(onnx_path, staging_plan, sample_shape, profile, options.timing_cache,
                                     options.optimization_level)
            except EngineBuildError as exc:
                key = f"trt-{source_key}"
                _refused(report, key, source_key, "tensorrt", f"build failed: {exc}")
                report["tensorrt"]["engines"].append({"key": key, "registered": False})
                continue
            plan = Path(tmp) / plan_name(source_key, stamp)
            staging_plan.rename(plan)
            key = f"trt-{source_key}-sm{stamp['compute_capability'].replace('.', '')}"
            info = {"kind": "tensorrt", "from": package.artifact(source_key).file,
                    "build_seconds": round(time.perf_counter() - started, 1)}
            candidate = Candidate(key, source_key, "tensorrt", plan, info, {"stamp": stamp, "profile": asdict(profile)})
            entry = _gate_and_register(package, candidate, reference, x_hold, labels, options, report, profile)
            report["tensorrt"]["engines"].append({"key": key, "registered": entry is not None})
