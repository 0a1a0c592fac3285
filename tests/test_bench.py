"""`cxr-edge bench`: the JSON report's fields on a tiny real run, FLOP counting on a graph with
known FLOPs, latency statistics, and the usual-way baseline loading the package's own weights."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cxr_edge.bench import SCHEMA, STAGES
from cxr_edge.bench.flops import model_gflops_per_image
from cxr_edge.bench.stats import instability_warning, summarize

from .conftest import REPO, SAMPLES

LATENCY_KEYS = {"count", "min", "mean", "p50", "p90", "p95", "p99", "max", "std", "cv"}


def assert_latency(summary: dict) -> None:
    assert set(summary) == LATENCY_KEYS
    assert 0 <= summary["min"] <= summary["p50"] <= summary["p90"] <= summary["p95"] <= summary["p99"] <= summary["max"]
    assert summary["min"] <= summary["mean"] <= summary["max"]


@pytest.mark.slow
def test_tiny_run_report_has_every_field(tmp_path):
    inputs = tmp_path / "inputs"
    shutil.copytree(SAMPLES / "nih", inputs / "nih")
    shutil.copy(SAMPLES / "dicom" / "rsna_cr_pa_jpeg_baseline_mono2.dcm", inputs)
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    proc = subprocess.run([sys.executable, "-m", "cxr_edge", "bench", str(inputs), "--batch-sizes", "1,2",
                           "--warmup", "1", "--iterations", "3", "--e2e-batch-size", "4", "--json", "-"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)

    assert report["schema"] == SCHEMA
    machine = report["machine"]
    assert machine["cpu"] and machine["usable_cpus"] >= 1 and machine["memory_gib"] > 0
    assert "gpu" in machine and machine["libraries"]["onnxruntime"] and machine["libraries"]["numpy"]
    assert machine["gpu"] or machine["gpu_unavailable_reason"]
    assert report["model"]["gflops_per_image"] > 1  # ViT-S/14 at 112 px: about 2.8 GFLOP
    assert report["gemm"]["gflop_s"] > 0

    runs = report["model_stage"]
    assert [(r["backend"], r["precision"], r["batch_size"]) for r in runs] == [("onnxruntime", "fp32", 1), ("onnxruntime", "fp32", 2)]
    for run in runs:
        assert run["iterations"] == 3 and run["warmup_iterations"] == 1 and run["throughput_img_s"] > 0
        assert_latency(run["latency_ms"])
        assert set(run["stages_ms"]) == {"h2d", "compute", "d2h"}
        assert run["stages_ms"]["h2d"] is None and run["stages_ms"]["d2h"] is None  # host memory on CPU
        assert_latency(run["stages_ms"]["compute"])
        assert run["stages_ms"]["compute"]["p50"] <= run["latency_ms"]["p50"]
        efficiency = run["efficiency"]
        assert efficiency["achieved_gflop_s"] == pytest.approx(run["throughput_img_s"] * report["model"]["gflops_per_image"], rel=0.01)
        assert 0 < efficiency["fraction_of_gemm"] < 5
        # a warning exactly when the latencies it reports vary more than the default --cv-threshold
        assert run["warnings"] == [w for w in [instability_warning("latency", run["latency_ms"], 0.10)] if w]

    [e2e] = report["end_to_end"]
    assert e2e["inputs"] == 8 and e2e["succeeded"] == 7 and e2e["failed"] == 1  # the broken PNG is not timed
    assert set(e2e["stages_ms"]) == set(STAGES)
    for stage in ("decode", "preprocess", "queue", "compute", "postprocess", "write"):
        assert_latency(e2e["stages_ms"][stage])
    assert e2e["stages_ms"]["h2d"] is None and e2e["stages_ms"]["d2h"] is None
    assert_latency(e2e["latency_ms"])
    assert e2e["latency_ms"]["max"] >= e2e["stages_ms"]["decode"]["max"]  # end to end contains decoding
    assert set(e2e["isolated_rates_img_s"]) == {"decode_preprocess", "model", "postprocess_write"}
    # the derived figures, recomputed from the rates and throughput the report gives
    rates = {stage: rate for stage, rate in e2e["isolated_rates_img_s"].items() if rate}
    assert set(rates) == set(e2e["isolated_rates_img_s"])  # on a CPU every stage has a rate
    assert e2e["slowest_stage"] == min(rates, key=rates.get)
    # every stage draws on the same cores: with perfect overlap, 1 / sum(1 / rate)
    assert e2e["shared_cpu_bound_img_s"] == pytest.approx(1 / sum(1 / rate for rate in rates.values()), rel=0.01)
    assert e2e["pipeline_efficiency"] == pytest.approx(e2e["throughput_img_s"] / rates[e2e["slowest_stage"]], rel=0.02)
    assert e2e["overlap_efficiency"] == pytest.approx(e2e["throughput_img_s"] / e2e["shared_cpu_bound_img_s"], rel=0.02)

    skipped = {(s["backend"], s["precision"]): s["reason"] for s in report["skipped"]}
    assert "no fp32 tensorrt artifact" in skipped[("tensorrt", "fp32")]
    if not glob.glob("/dev/nvidia[0-9]*"):  # by default torch is a GPU row: skipped, saying how to run it on CPU
        assert "no NVIDIA GPU device" in skipped[("torch", "fp32")] and "--backend torch" in skipped[("torch", "fp32")]


@pytest.mark.slow
def test_torch_rows_run_on_cpu_when_named(tmp_path):
    pytest.importorskip("timm", reason="the torch backend (gpu-torch or train extra)")
    import torch

    proc = subprocess.run([sys.executable, "-m", "cxr_edge", "bench", str(SAMPLES / "nih"), "--backend", "torch",
                           "--mode", "model", "--batch-sizes", "2", "--warmup", "1", "--iterations", "2", "--json", "-"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    skipped = {(s["backend"], s["precision"]): s["reason"] for s in report["skipped"]}
    if torch.cuda.is_available():
        assert {(r["precision"], r["backend_details"]["device"]) for r in report["model_stage"]} == \
            {("fp32", "cuda"), ("fp16", "cuda"), ("bf16", "cuda")}
        assert all(r["stages_ms"]["h2d"] and r["stages_ms"]["d2h"] for r in report["model_stage"])
        return
    [run] = report["model_stage"]
    assert (run["backend"], run["precision"], run["artifact"], run["batch_size"]) == ("torch", "fp32", "fp32", 2)
    assert run["backend_details"]["device"] == "cpu" and "CUDA is not available" in run["backend_details"]["fallback"]
    assert run["efficiency"]["fraction_of_gemm"] > 0  # on CPU the GEMM reference applies
    assert "FP16 runs on CUDA only" in skipped[("torch", "fp16")] and "BF16 runs on CUDA only" in skipped[("torch", "bf16")]


@pytest.mark.slow
def test_a_production_shape_is_built_once_and_runs_on_both_runners(tmp_path):
    pytest.importorskip("timm", reason="building a shape needs torch + timm + onnx (gpu-torch or train extra)")
    from cxr_edge.backends import create_backend
    from cxr_edge.bench import Shape
    from cxr_edge.bench.shapes import build_shape

    shape = Shape("vit_tiny_patch16_224", 64, "a tiny stand-in for the test")
    package = build_shape("tiny", shape, tmp_path)
    assert package.architecture_name == "vit_tiny_patch16_224" and package.preprocess_params.size == 64
    assert package.heatmap_spec.grid == (4, 4) and package.to_manifest()["description"].startswith("RANDOM WEIGHTS")
    manifest = package.root / "manifest.json"
    built = manifest.stat().st_mtime_ns
    assert build_shape("tiny", shape, tmp_path).root == package.root and manifest.stat().st_mtime_ns == built  # cached
    assert [p.name for p in tmp_path.iterdir()] == [package.root.name]  # no staging folder left
    x = np.random.default_rng(0).normal(0, 1, (3, 1, 64, 64)).astype(np.float32)
    with create_backend(package, "onnxruntime") as ort_runner:
        expected = ort_runner.infer(x)
    with create_backend(package, "torch", device="cpu") as torch_runner:
        assert np.abs(torch_runner.infer(x) - expected).max() < 1e-4  # every random weight found by name


@pytest.mark.slow
def test_bench_shape_from_the_command_line(tmp_path):
    pytest.importorskip("timm", reason="building a shape needs torch + timm + onnx (gpu-torch or train extra)")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    both = subprocess.run([sys.executable, "-m", "cxr_edge", "bench", str(SAMPLES / "nih"), "--shape", "vit-s16-224",
                           "--model", str(tmp_path)], capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert both.returncode == 2 and "--shape and --model" in both.stderr
    proc = subprocess.run([sys.executable, "-m", "cxr_edge", "bench", str(SAMPLES / "nih"), "--shape", "vit-s16-224",
                           "--backend", "onnxruntime", "--mode", "model", "--batch-sizes", "1", "--warmup", "0",
                           "--iterations", "2", "--json", "-"], capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["model"]["name"] == "bench-vit-s16-224" and report["model"]["input_shape"] == [1, 224, 224]
    assert 8 < report["model"]["gflops_per_image"] < 10  # ViT-S/16 at 224 px: about 9.2 GFLOP
    assert list((tmp_path / "cache" / "cxr-edge" / "shapes").iterdir())  # kept for the next run


def test_flops_are_counted_on_real_shapes(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    # x[B,2,8,8] -Conv(4 out, 3x3, pad 1)-> [B,4,8,8] -Reshape-> [B,4,64] -MatMul W[64,16]-> [B,4,16]
    # -Flatten-> [B,64] -Gemm W[64,10]-> [B,10]
    weights = {"conv_w": np.ones((4, 2, 3, 3), np.float32), "mm_w": np.ones((64, 16), np.float32),
               "gemm_w": np.ones((64, 10), np.float32), "shape": np.array([0, 4, 64], np.int64)}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "conv_w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Reshape", ["c", "shape"], ["r"]),
         helper.make_node("MatMul", ["r", "mm_w"], ["m"]),
         helper.make_node("Flatten", ["m"], ["f"]),
         helper.make_node("Gemm", ["f", "gemm_w"], ["y"])],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    counted = model_gflops_per_image(model.SerializeToString(), np.zeros((3, 2, 8, 8), np.float32))
    conv = 2 * (4 * 8 * 8) * (2 * 3 * 3)
    matmul = 2 * (4 * 16) * 64
    gemm = 2 * 10 * 64
    assert counted["flops_by_op"] == {"Conv": conv, "MatMul": matmul, "Gemm": gemm}
    assert counted["flops_per_image"] == conv + matmul + gemm


def test_latency_summary_and_instability_warning():
    summary = summarize([1.0, 2.0, 3.0, 4.0, None])  # None: a stage that does not apply
    assert summary["count"] == 4 and summary["min"] == 1 and summary["max"] == 4 and summary["mean"] == 2.5
    assert summary["p50"] == 2.5 and summary["cv"] == pytest.approx(np.std([1, 2, 3, 4]) / 2.5, abs=1e-4)
    assert summarize([None, None]) is None
    assert instability_warning("latency", summarize([10, 10.1, 9.9]), 0.1) is None
    assert "unstable" in instability_warning("latency", summary, 0.1)


@pytest.mark.train
@pytest.mark.slow
def test_usual_way_loads_the_packages_own_weights():
    pytest.importorskip("timm")
    sys.path.insert(0, str(REPO / "benchmarks"))
    from usual_way import weights_parity

    from cxr_edge.bench.run import sample_tensors
    from cxr_edge.manifest import ModelPackage
    from cxr_edge.sources import discover

    package = ModelPackage.load(None)
    items, _ = discover([str(SAMPLES / "nih")])
    assert weights_parity(package, sample_tensors(items, package, 4)) < 1e-4


@pytest.mark.train
@pytest.mark.slow
def test_compare_runs_in_one_command_and_prints_ratios(tmp_path):
    pytest.importorskip("timm")
    report_path = tmp_path / "compare.json"
    bundled = REPO / "cxr_edge" / "models" / "default"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compare.py"), "--images", str(SAMPLES / "nih"),
                           "--int8-model", str(bundled), "--passes", "1", "--work", str(tmp_path / "work"),
                           "--json", str(report_path)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["weights_max_abs_dlogit"] < 1e-4
    usual, *ours = report["rows"]
    # the table shows what was measured: the usual way's run and each end-to-end run of the bench
    assert usual["way"].startswith("usual:") and usual["throughput_img_s"] == report["usual_way"]["throughput_img_s"]
    assert [row["throughput_img_s"] for row in ours] == \
        [run["throughput_img_s"] for run in report["cxr_edge_bench"]["end_to_end"]]
    assert "cxr-edge onnxruntime fp32 (fp32)" in {row["way"].split(",")[0] for row in ours}
    for row in ours:
        assert row["vs_usual"] == pytest.approx(row["throughput_img_s"] / usual["throughput_img_s"], abs=0.01)
        assert f"{row['vs_usual']:8.2f}x" in proc.stdout  # and prints it
