"""The torch runner: the package's FP32 ONNX weights in its timm architecture, on CPU (always: the
parity with ONNX Runtime on real X-rays) and on CUDA (FP16/BF16, CUDA graphs, pinned copies: the
tests marked `cuda` run only where torch sees a GPU, and say so when they skip)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from cxr_edge.backends import create_backend, select_backend
from cxr_edge.errors import CxrEdgeError, ModelPackageError
from cxr_edge.findings import calibrated_probabilities
from cxr_edge.manifest import ModelPackage, write_package_copy
from cxr_edge.sources import discover
from cxr_edge.workers import tensors_for

from .conftest import REPO, SAMPLES

pytest.importorskip("torch", reason="the torch backend needs the gpu-torch (or train) extra")
pytest.importorskip("timm", reason="the torch backend needs the gpu-torch (or train) extra")
pytest.importorskip("onnx", reason="the torch backend reads the ONNX's weights with onnx")

CPU_TOLERANCE = 1e-5  # max |Δp| against ONNX Runtime FP32 (issue #15)
FP16_TOLERANCE = 1e-2
BF16_TOLERANCE = 3e-2  # 8 bits of mantissa against FP16's 11


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


NO_CUDA = ("no CUDA GPU on this machine: the CUDA FP16/BF16 parity, CUDA graphs and pinned copies were not run "
           "here (README, 'What has run on a GPU')")
needs_cuda = pytest.mark.skipif(not cuda_available(), reason=NO_CUDA)


@pytest.fixture(scope="module")
def package():
    return ModelPackage.load()


@pytest.fixture(scope="module")
def images(package):
    """Every real X-ray in samples/ (PNG, JPEG DICOM, J2K DICOM, MONOCHROME1), preprocessed in
    worker processes before torch starts its threads."""
    items, _ = discover([str(SAMPLES)])
    return tensors_for(items, package.preprocess_params, workers=1).tensors


@pytest.fixture(scope="module")
def reference(package, images):
    """ONNX Runtime FP32: logits and class maps."""
    with create_backend(package, "onnxruntime", "fp32") as runner:
        runner.maps_output = package.heatmap_spec.output
        logits = runner.infer(images)
        return logits, runner.last_maps


def max_dprob(package, a, b) -> float:
    return float(np.abs(calibrated_probabilities(a, package.temperatures)
                        - calibrated_probabilities(b, package.temperatures)).max())


# --- CPU: in CI -----------------------------------------------------------------------------------

def test_cpu_parity_with_onnxruntime_on_real_images(package, images, reference):
    assert len(images) >= 9  # 6 NIH PNGs and 3 DICOMs of three transfer syntaxes
    with create_backend(package, "torch", "fp32", device="cpu", max_batch=4) as runner:
        assert runner.provides("class_maps") and runner.output_shape("class_maps") == (None, 15, 8, 8)
        runner.maps_output = "class_maps"
        logits = runner.infer(images)  # more than max_batch: no chunking needed on CPU
        maps = runner.last_maps
        timings = runner.last_timings
        described = runner.describe()
    assert logits.shape == reference[0].shape and logits.dtype == np.float32
    assert max_dprob(package, logits, reference[0]) <= CPU_TOLERANCE
    assert np.abs(maps - reference[1]).max() < 1e-4  # the same class maps as the graph's output
    assert np.abs(maps.mean(axis=(2, 3)) - logits).max() < 1e-4  # the logit is the map's mean
    assert timings.compute_ms > 0 and timings.h2d_ms is None and timings.d2h_ms is None  # host memory
    assert described["device"] == "cpu" and described["precision"] == "fp32" and described["artifact"] == "fp32"


def test_without_cuda_it_says_why_and_runs_fp32_on_cpu(package, images, reference):
    if cuda_available():
        pytest.skip("this machine has CUDA: there is no fallback to see")
    runner = create_backend(package, "torch", "fp16")
    with runner:
        logits = runner.infer(images[:2])
        described = runner.describe()
    assert described["device"] == "cpu" and described["precision"] == "fp32"  # what ran, not what was asked
    assert "CUDA is not available" in described["fallback"] and "FP32 instead of FP16" in described["fallback"]
    assert max_dprob(package, logits, reference[0][:2]) <= CPU_TOLERANCE
    with runner:  # a second activation starts afresh: the same reason once, not twice
        assert runner.describe()["fallback"] == described["fallback"]


def test_asking_for_cuda_without_it_is_refused_with_the_reason(package):
    if cuda_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(CxrEdgeError, match="cannot use CUDA: torch .* sees no usable CUDA GPU"):
        with create_backend(package, "torch", "fp32", device="cuda"):
            pass


def test_selection_rules(package):
    with pytest.raises(CxrEdgeError, match="torch runs fp32, fp16, bf16, not int8"):
        select_backend(package, "torch", "int8")
    with pytest.raises(CxrEdgeError, match="BF16 runs on the torch backend on a CUDA GPU only: no GPU here"):
        select_backend(package, "auto", "bf16", cuda_problem=lambda: "no GPU here")
    with pytest.raises(CxrEdgeError, match="BF16 runs on the torch backend"):
        select_backend(package, "onnxruntime", "bf16")
    chosen = select_backend(package, "torch", "fp16")
    assert (chosen.backend, chosen.precision, chosen.artifact) == ("torch", "fp16", "fp32")  # the FP32 weights
    # auto: torch where CUDA is, ONNX Runtime (saying why not torch) where it is not
    assert select_backend(package, "auto", "fp16", cuda_problem=lambda: None).backend == "torch"
    cpu = select_backend(package, "auto", "fp32", cuda_problem=lambda: "no NVIDIA GPU device")
    assert cpu.backend == "onnxruntime" and "torch: no NVIDIA GPU device" in cpu.reason
    assert select_backend(package, "auto", "int8" if "int8" in package.precisions() else "fp32",
                          cuda_problem=lambda: None).backend == ("onnxruntime" if "int8" in package.precisions() else "torch")


def test_auto_never_imports_torch_without_an_nvidia_device():
    """The default runtime stays torch-free (docs/architecture.md): `infer` with --backend auto on
    a machine without /dev/nvidia* decides without importing torch."""
    import glob

    if glob.glob("/dev/nvidia[0-9]*"):
        pytest.skip("this machine has an NVIDIA device: auto asks torch about it")
    code = ("import sys\nfrom cxr_edge.manifest import ModelPackage\nfrom cxr_edge.backends import select_backend\n"
            "s = select_backend(ModelPackage.load(), 'auto', 'fp32')\nprint(s.backend, 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["onnxruntime", "False"]


def test_weights_that_do_not_fit_the_architecture_are_refused(package, tmp_path):
    manifest = package.to_manifest()
    manifest["architecture"]["timm_name"] = "vit_small_patch16_224"  # not the DINOv2 layout the weights have
    manifest["architecture"]["timm_kwargs"] = {"global_pool": "avg", "fc_norm": False}
    other = write_package_copy(package, tmp_path / "other", manifest)
    with pytest.raises(ModelPackageError, match="weights do not fit timm 'vit_small_patch16_224'"):
        with create_backend(other, "torch", "fp32", device="cpu"):
            pass
    manifest["architecture"]["timm_name"] = "no_such_model"
    unknown = write_package_copy(package, tmp_path / "unknown", manifest)
    with pytest.raises(ModelPackageError, match="timm cannot build architecture 'no_such_model'"):
        with create_backend(unknown, "torch", "fp32", device="cpu"):
            pass


def test_a_tampered_onnx_is_refused_before_torch_reads_it(package, tmp_path):
    copy = write_package_copy(package, tmp_path / "copy")
    onnx = copy.root / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    with pytest.raises(ModelPackageError, match="sha256"):
        with create_backend(copy, "torch", "fp32", device="cpu"):
            pass


@pytest.mark.slow
def test_infer_backend_torch_writes_the_same_findings(tmp_path):
    """`cxr-edge infer --backend torch` end to end on the samples: every record names the torch
    runner (and why it ran on CPU here), with the probabilities ONNX Runtime gives and heatmaps."""
    def infer(backend: str):
        out = tmp_path / backend
        proc = subprocess.run([sys.executable, "-m", "cxr_edge", "infer", str(SAMPLES), "--out", str(out),
                               "--backend", backend, "--batch-size", "4", "--no-sr"],
                              capture_output=True, text=True, timeout=300, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
        return {line["input"]: json.loads(open(line["outputs"]["json"]).read()) for line in lines}, proc.stderr

    torch_records, stderr = infer("torch")
    ort_records, _ = infer("onnxruntime")
    assert set(torch_records) == set(ort_records) and len(torch_records) >= 9
    for relative, record in torch_records.items():
        assert record["status"] == "ok", record
        assert record["backend"]["name"] == "torch"
        if not cuda_available():
            assert record["backend"]["device"] == "cpu" and "CUDA is not available" in record["backend"]["fallback"]
        ours = {f["label"]: f["probability"] for f in record["findings"]}
        theirs = {f["label"]: f["probability"] for f in ort_records[relative]["findings"]}
        assert max(abs(ours[k] - theirs[k]) for k in ours) <= CPU_TOLERANCE
        def drawn(r):  # which maps, and where their peak is
            return [(m["label"], m["peak"]) for m in r["outputs"]["heatmaps"]["maps"]]

        assert drawn(record) == drawn(ort_records[relative])
    if not cuda_available():
        assert "CUDA is not available" in stderr  # said once, as a warning


# --- CUDA: only where there is a GPU --------------------------------------------------------------

@pytest.mark.cuda
@needs_cuda
def test_cuda_fp16_bf16_fp32_parity_graphs_and_copies(package, images, reference):
    """On a GPU: FP16 within 1e-2 of ONNX Runtime FP32 in probability (BF16 within 3e-2, FP32 without
    TF32 within 1e-4), CUDA graphs equal to eager, every batch size up to past the max batch (padding
    and chunks), h2d / compute / d2h timed, class maps with the logits."""
    for precision, tolerance in (("fp16", FP16_TOLERANCE), ("bf16", BF16_TOLERANCE), ("fp32", 1e-4)):
        with create_backend(package, "torch", precision, device="cuda", max_batch=4) as runner:
            described = runner.describe()
            assert described["device"] == "cuda" and described["precision"] == precision and "fallback" not in described
            runner.maps_output = "class_maps"
            whole = runner.infer(images)  # more rows than max_batch: chunks of 4, the last one padded
            maps = runner.last_maps
            timings = runner.last_timings
            assert max_dprob(package, whole, reference[0]) <= tolerance, precision
            assert timings.h2d_ms > 0 and timings.compute_ms > 0 and timings.d2h_ms > 0
            assert maps.shape == reference[1].shape and np.abs(maps.mean(axis=(2, 3)) - whole).max() < 0.05
            for rows in (1, 2, 3):  # the graphs of sizes 1 and 2, and 3 padded up to 4
                assert max_dprob(package, runner.infer(images[:rows]), reference[0][:rows]) <= tolerance
        with create_backend(package, "torch", precision, device="cuda", max_batch=4, cuda_graphs=False) as eager:
            assert max_dprob(package, eager.infer(images), reference[0]) <= tolerance


@pytest.mark.slow
def test_watch_backend_torch_processes_studies(tmp_path):
    """`cxr-edge watch --backend torch`: the daemon warms the torch runner up before READY=1 and
    every dropped study gets a record naming it."""
    from .daemon_helpers import DaemonProcess, drop, kill_leftovers, records, wait_for

    daemon = DaemonProcess(tmp_path, "--backend", "torch", "--batch-size", "4").start()
    try:
        images = sorted((SAMPLES / "nih").glob("*.png"))[:3]
        for image in images:
            drop(image, daemon.inbox)
        wait_for(lambda: daemon.states().get("done", 0) == len(images), 180, what="every study done")
        found = records(daemon.out)
        assert len(found) == len(images)
        assert {(r["status"], r["backend"]["name"]) for r in found} == {("ok", "torch")}
        assert daemon.stop() == 0
    finally:
        kill_leftovers()
