"""build-engine: INT8 (Q/DQ + dynamic) and FP16 artifacts on real images, the accuracy gate,
engine stamps and backend selection. TensorRT tests run only where TensorRT and a GPU exist."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cxr_edge.backends import Selection, select_backend
from cxr_edge.backends.stamp import MachineFacts, machine_facts, stamp_problem
from cxr_edge.errors import CxrEdgeError, ModelPackageError
from cxr_edge.manifest import DEFAULT_PACKAGE, ModelPackage

from .conftest import NIH_TINY64, SAMPLES

onnx = pytest.importorskip("onnx", reason="build-engine needs the engines extra (onnx)")
pytest.importorskip("polygraphy", reason="build-engine needs the engines extra (polygraphy)")

GPU_FACTS = MachineFacts("10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0")
NO_TRT = MachineFacts(None, None, None, "tensorrt is not importable (ModuleNotFoundError)")
STAMP = {"tensorrt_version": "10.13.0.35", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
         "hardware_compatibility": "NONE", "version_compatible": False}


# Runs the CLI in a fresh interpreter and says on stderr whether torch got imported on the way.
CLI = ("import sys\nfrom cxr_edge.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n"
       "    print('TORCH_IMPORTED' if 'torch' in sys.modules else 'NO_TORCH', file=sys.stderr)\n    raise\n")


def cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-c", CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def copy_package(tmp_path, name="pkg"):
    target = tmp_path / name
    shutil.copytree(DEFAULT_PACKAGE, target, ignore=shutil.ignore_patterns("build-report.json", "model.*.onnx"))
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["artifacts"] = {"fp32": manifest["artifacts"]["fp32"]}  # only what was copied
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


# percentile: what the README recommends for the bundled model (minmax sits at the AUROC-drop limit on these 60 thumbnails)
BUILD = ["--calib", None, "--calib-count", 48, "--holdout-count", 60, "--calib-method", "percentile"]


def build_args(package, *extra):
    args = list(BUILD)
    args[1] = NIH_TINY64 / "labels.csv"
    return ["build-engine", "--model", package, *args, *extra]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The bundled model with INT8 (Q/DQ + dynamic) and FP16 built and gated once for the module."""
    package = copy_package(tmp_path_factory.mktemp("built"))
    proc = cli(*build_args(package, "--int8", "--fp16"))
    return package, proc, json.loads((package / "build-report.json").read_text())


@pytest.mark.slow
def test_int8_and_fp16_pass_the_gate_and_are_registered(built):
    package, proc, report = built
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NO_TORCH" in proc.stderr  # the engines never import torch (docs/architecture.md)
    assert set(report["artifacts"]) == {"fp16", "int8", "int8-dynamic"}
    manifest = ModelPackage.load(package).to_manifest()
    for key, entry in report["artifacts"].items():
        assert entry["passed"] and entry["registered"], (key, entry["reasons"])
        gate, tolerance = entry["gate"], entry["tolerance"]
        assert gate["images"] == 60 and gate["max_abs_dprob"] <= tolerance["max_abs_dprob"]
        assert gate["flip_rate"] <= tolerance["flip_rate"] and "auroc_fp32" in gate  # labeled holdout
        assert manifest["artifacts"][key]["sha256"] and (package / manifest["artifacts"][key]["file"]).is_file()
    # On this machine there is no TensorRT: said plainly, not an error
    assert report["tensorrt"]["status"] == "skipped" and report["tensorrt"]["reason"]
    assert "TensorRT step skipped" in proc.stderr
    # calibration and held-out images never overlap (disjoint by construction, checked by count here)
    assert report["calibration"]["images"] == 48 and report["holdout"]["images"] == 60


@pytest.mark.slow
def test_qdq_model_is_what_tensorrt_accepts(built):
    package, _, _ = built
    model = onnx.load(str(package / "model.int8.onnx"))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert quantize, "no Q/DQ nodes"
    for node in quantize:  # symmetric signed INT8: zero points all 0, dtype int8
        zero_point = inits[node.input[2]]
        assert zero_point.dtype == np.int8 and not zero_point.any(), node.name
    consumers_of_dq = {}
    for node in model.graph.node:
        for name in node.input:
            producer = producers.get(name)
            if producer is not None and producer.op_type == "DequantizeLinear":
                consumers_of_dq.setdefault(node.op_type, 0)
                consumers_of_dq[node.op_type] += 1
    # Q/DQ feed only MatMul/Gemm/Conv: LayerNorm, Softmax, GELU (Erf) and residual Adds stay float
    assert set(consumers_of_dq) <= {"MatMul", "Gemm", "Conv"}, consumers_of_dq
    # no int32 bias DequantizeLinear (TensorRT cannot parse it)
    assert all(inits[n.input[0]].dtype != np.int32 for n in model.graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] in inits)


@pytest.mark.slow
def test_fp16_model_keeps_layernorm_softmax_and_io_in_fp32(built):
    package, _, _ = built
    model = onnx.load(str(package / "model.fp16.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    fp16_inits = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert len(fp16_inits) > 50  # the weights really are FP16
    casts_to_fp32 = {o for n in model.graph.node if n.op_type == "Cast" for o in n.output
                     if any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in n.attribute)}
    for node in model.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax"):
            assert node.input[0] in casts_to_fp32, f"{node.name} does not run in FP32"


@pytest.mark.slow
def test_infer_with_precision_int8_uses_the_gated_artifact(built, tmp_path):
    package, _, report = built
    proc = cli("infer", SAMPLES / "nih", "--out", tmp_path / "out", "--model", package, "--precision", "int8", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    backend = json.loads(proc.stdout)["backend"]
    assert backend["precision"] == "int8" and backend["artifact"] in ("int8", "int8-dynamic")
    faster = min(("int8", "int8-dynamic"), key=lambda k: (report["artifacts"][k]["cpu_ms_per_image"], k))
    assert backend["artifact"] == faster  # the faster gated INT8 on this CPU
    assert "backend onnxruntime, int8 artifact" in proc.stderr  # one line that says which and why
    record = json.loads((tmp_path / "out" / "nih" / "00000100_000.png.json").read_text())
    assert record["backend"]["artifact"] == faster and len(record["findings"]) == 14


@pytest.mark.slow
def test_gate_refuses_a_model_with_every_op_quantized(tmp_path):
    """LayerNorm, Softmax, GELU, residual adds all in INT8: the drift is caught, nothing registered."""
    package = copy_package(tmp_path)
    before = (package / "manifest.json").read_bytes()
    proc = cli(*build_args(package, "--int8", "--no-int8-dynamic", "--quantize-ops", "all"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = json.loads((package / "build-report.json").read_text())
    entry = report["artifacts"]["int8"]
    assert not entry["passed"] and not entry["registered"] and entry["reasons"]
    assert entry["build"]["quantized_op_types"] == "all"
    assert "int8 refused" in proc.stderr
    assert (package / "manifest.json").read_bytes() == before  # not registered, not even rewritten
    assert not (package / "model.int8.onnx").exists()
    proc = cli("infer", SAMPLES / "nih", "--out", tmp_path / "out", "--model", package, "--precision", "int8")
    assert proc.returncode == 2 and "build-engine" in proc.stderr


def test_build_engine_usage_errors(tmp_path):
    package = copy_package(tmp_path)
    proc = cli("build-engine", "--model", package, "--int8")
    assert proc.returncode == 2 and "--calib is required" in proc.stderr
    proc = cli("build-engine", "--model", package, "--calib", SAMPLES / "nih")
    assert proc.returncode == 2 and "nothing to build" in proc.stderr
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(SAMPLES / "nih" / "00000100_000.png", one)
    proc = cli("build-engine", "--model", package, "--int8", "--calib", one)
    assert proc.returncode == 2 and "need some to calibrate and some to hold out" in proc.stderr
    proc = cli("build-engine", "--model", package, "--int8", "--calib", SAMPLES / "nih", "--batch-profile", "8,1")
    assert proc.returncode == 2 and "MIN,OPT,MAX" in proc.stderr


# --- the gate, through Polygraphy's Comparator, on real sessions and real images ----------------

@pytest.fixture(scope="module")
def holdout():
    """The bundled model's FP32 run over real preprocessed X-rays (decoded before any runner)."""
    from cxr_edge.sources import discover
    from cxr_edge.workers import tensors_for
    from cxr_edge.engines.holdout import onnxruntime_runner, run_holdout

    package = ModelPackage.load()
    items, _ = discover([str(SAMPLES / "nih")])
    images = tensors_for(items, package.preprocess_params, workers=1).tensors
    return package, images, run_holdout(onnxruntime_runner("fp32", package.verified_loader("fp32"), 1), images)


def shifted(model_bytes: bytes, shift: float) -> bytes:
    """The same model with `shift` added to every logit (a candidate that drifts)."""
    from onnx import helper, numpy_helper

    model = onnx.load_from_string(model_bytes)
    output = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [f"{name}_raw" if name == output else name for name in node.output]
    model.graph.initializer.append(numpy_helper.from_array(np.array([shift], np.float32), "shift"))
    model.graph.node.append(helper.make_node("Add", [f"{output}_raw", "shift"], [output]))
    return model.SerializeToString()


@pytest.mark.parametrize("shift,passes,reason", [
    (0.0, True, None),
    (1.5, False, "max_abs_dprob"),
    (float("nan"), False, "max_abs_dprob nan > 0.1"),  # NaN outputs are refused, not waved through
])
def test_gate_is_a_comparator_result(holdout, shift, passes, reason):
    from cxr_edge.engines.gate import DEFAULT_TOLERANCES, GateCompareFunc, GateResult
    from cxr_edge.engines.holdout import gate, onnxruntime_runner, run_holdout

    package, images, reference = holdout
    model = shifted(package.read_verified("fp32"), shift)
    candidate = run_holdout(onnxruntime_runner("int8", lambda: model, 1), images)
    assert candidate.logits.shape == reference.logits.shape == (len(images), 15) and candidate.ms_per_image > 0
    verdict = gate(reference, candidate, GateCompareFunc(package.temperatures, package.thresholds,
                                                         DEFAULT_TOLERANCES["int8"], labels=None))
    assert isinstance(verdict, GateResult) and bool(verdict) is passes and verdict.passed is passes
    assert verdict.metrics["images"] == len(images) and "auroc_fp32" not in verdict.metrics  # no labels given
    if passes:
        assert verdict.reasons == () and verdict.metrics["max_abs_dprob"] == 0.0
        assert verdict.summary()["flip_rate"] == 0.0
    else:
        assert any(r.startswith(reason) for r in verdict.reasons), verdict.reasons


def test_holdout_batches_pad_to_the_profile_minimum_and_drop_the_padding(holdout):
    from cxr_edge.engines.holdout import onnxruntime_runner, run_holdout

    package, images, reference = holdout
    assert len(images) % 4  # a short last batch, padded to 4 by repeating its last image
    padded = run_holdout(onnxruntime_runner("fp32-by-4", package.verified_loader("fp32"), 1), images, batch=4, min_batch=4)
    np.testing.assert_allclose(padded.logits, reference.logits, atol=1e-4)


def test_batch_profile():
    from cxr_edge.engines.tensorrt import BatchProfile

    assert BatchProfile(1, 8, 32).shapes((1, 112, 112)) == ((1, 1, 112, 112), (8, 1, 112, 112), (32, 1, 112, 112))
    with pytest.raises(ValueError, match="min <= opt <= max"):
        BatchProfile(8, 1, 32).check()


def test_build_engine_with_an_fp32_that_does_not_run_fails_in_one_line(tmp_path):
    from cxr_edge.manifest import sha256_file

    package = copy_package(tmp_path)
    manifest = json.loads((package / "manifest.json").read_text())
    model = package / manifest["artifacts"]["fp32"]["file"]
    model.write_bytes(b"not an ONNX model")  # corrupt when packaged: its sha256 matches
    manifest["artifacts"]["fp32"]["sha256"] = sha256_file(model)
    (package / "manifest.json").write_text(json.dumps(manifest))
    proc = cli("build-engine", "--model", package, "--int8", "--calib", SAMPLES / "nih", "--workers", 1)
    assert proc.returncode == 2 and "the fp32 artifact does not run: InvalidProtobuf" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- stamps and selection: pure logic on manifests and machine facts ---------------------------

@pytest.mark.parametrize("facts,stamp,problem", [
    (GPU_FACTS, STAMP, None),
    (NO_TRT, STAMP, "tensorrt is not importable"),
    (MachineFacts("10.12.0.36", "NVIDIA H100 80GB HBM3", "9.0"), STAMP, "built with TensorRT 10.13.0.35, this machine has TensorRT 10.12.0.36"),
    (MachineFacts("10.13.0.35", "NVIDIA L4", "8.9"), STAMP, "compute capability 9.0"),
    (MachineFacts("10.13.0.35", "NVIDIA H200", "9.0"), STAMP, None),  # same architecture: TensorRT allows it
    (MachineFacts("10.12.0.36", "NVIDIA H100 80GB HBM3", "9.0"), {**STAMP, "version_compatible": True}, None),
])
def test_stamp_problem(facts, stamp, problem):
    found = stamp_problem(stamp, facts)
    if problem is None:
        assert found is None
    else:
        assert found and problem in found


def package_with(tmp_path, artifacts: dict) -> ModelPackage:
    manifest = json.loads((DEFAULT_PACKAGE / "manifest.json").read_text())
    manifest["artifacts"] = {"fp32": manifest["artifacts"]["fp32"], **artifacts}
    return ModelPackage(tmp_path, manifest)


ENGINE = {"file": "model.int8.sm90.plan", "sha256": "0" * 64, "format": "tensorrt", "precision": "int8", "stamp": STAMP}
QDQ = {"file": "model.int8.onnx", "sha256": "1" * 64, "format": "onnx", "precision": "int8", "cpu_ms_per_image": 12.0}
DYNAMIC = {"file": "model.int8-dynamic.onnx", "sha256": "2" * 64, "format": "onnx", "precision": "int8", "cpu_ms_per_image": 9.0}


def test_selection_prefers_a_matching_engine(tmp_path):
    package = package_with(tmp_path, {"trt-int8-sm90": ENGINE, "int8": QDQ})
    chosen = select_backend(package, "auto", "int8", GPU_FACTS)
    assert chosen == Selection("tensorrt", "int8", "trt-int8-sm90", chosen.reason) and "matches this GPU" in chosen.reason


def test_selection_falls_back_to_cpu_and_says_why(tmp_path):
    package = package_with(tmp_path, {"trt-int8-sm90": ENGINE, "int8": QDQ, "int8-dynamic": DYNAMIC})
    chosen = select_backend(package, "auto", "int8", MachineFacts("10.13.0.35", "NVIDIA L4", "8.9"))
    assert chosen.backend == "onnxruntime" and chosen.artifact == "int8-dynamic"  # the faster on CPU
    assert "compute capability 9.0" in chosen.reason and "fastest" in chosen.reason


def test_explicit_tensorrt_refuses_a_foreign_engine_with_a_rebuild_hint(tmp_path):
    package = package_with(tmp_path, {"trt-int8-sm90": ENGINE})
    with pytest.raises(CxrEdgeError, match=r"TensorRT 10\.13\.0\.35.*cxr-edge build-engine"):
        select_backend(package, "tensorrt", "int8", MachineFacts("10.12.0.36", "NVIDIA H100 80GB HBM3", "9.0"))
    with pytest.raises(CxrEdgeError, match="no TensorRT engine"):
        select_backend(package_with(tmp_path, {}), "tensorrt", "fp16", GPU_FACTS)


def test_missing_precision_says_how_to_build_it(tmp_path):
    with pytest.raises(ModelPackageError, match="build-engine --model .* --fp16"):
        select_backend(package_with(tmp_path, {}), "auto", "fp16", NO_TRT)
    assert select_backend(package_with(tmp_path, {}), "auto", "fp32", NO_TRT).artifact == "fp32"


def test_infer_backend_tensorrt_without_tensorrt_is_a_usage_error(tmp_path):
    proc = cli("infer", SAMPLES / "nih", "--out", tmp_path / "o", "--backend", "tensorrt")
    assert proc.returncode == 2 and "--backend tensorrt" in proc.stderr


# --- TensorRT itself: only where it exists ---------------------------------------------------

def _need_tensorrt():
    facts = machine_facts()
    if facts.tensorrt_version is None or facts.gpu_name is None:
        pytest.skip(f"needs TensorRT and an NVIDIA GPU: {facts.reason}")
    return facts


@pytest.mark.gpu
def test_tensorrt_fp16_and_int8_engines_build_gate_and_run(built, tmp_path):
    facts = _need_tensorrt()
    package = copy_package(tmp_path)
    cache = tmp_path / "timing.cache"
    proc = cli(*build_args(package, "--int8", "--fp16", "--tensorrt", "require", "--timing-cache", cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((package / "build-report.json").read_text())
    engines = [k for k in report["artifacts"] if k.startswith("trt-")]
    assert engines and all(report["artifacts"][k]["registered"] for k in engines) and cache.is_file()
    stamp = ModelPackage.load(package).to_manifest()["artifacts"][engines[0]]["stamp"]
    assert stamp["tensorrt_version"] == facts.tensorrt_version and stamp["compute_capability"] == facts.compute_capability
    proc = cli("infer", SAMPLES / "nih", "--out", tmp_path / "o", "--model", package, "--precision", "fp16", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["backend"]["name"] == "tensorrt"
