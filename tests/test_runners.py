"""The runner contract (Polygraphy's habit) on the real ONNX Runtime runner and the bundled model,
the TensorRT runner's refusals where there is no TensorRT, and how Polygraphy is called."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from cxr_edge.backends import create_backend
from cxr_edge.backends.base import Timings
from cxr_edge.backends.polygraphy_env import torch_hidden
from cxr_edge.backends.stamp import MachineFacts, machine_facts
from cxr_edge.errors import CxrEdgeError, ModelPackageError
from cxr_edge.labels import LABELS
from cxr_edge.manifest import DEFAULT_PACKAGE, ModelPackage
from cxr_edge.sources import discover
from cxr_edge.workers import tensors_for

from .conftest import REPO, SAMPLES

STAMP = {"tensorrt_version": "10.13.0.35", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
         "hardware_compatibility": "NONE", "version_compatible": False}


@pytest.fixture(scope="module")
def package():
    return ModelPackage.load()


@pytest.fixture(scope="module")
def images(package):
    """Real preprocessed X-rays (decoded in worker processes before any runner starts)."""
    items, _ = discover([str(SAMPLES / "nih")])
    return tensors_for(items[:3], package.preprocess_params, workers=1).tensors


# --- the contract, on ONNX Runtime -------------------------------------------------------------

def test_runner_lifecycle_and_typed_timings(package, images):
    runner = create_backend(package, "onnxruntime", "fp32", threads=1)
    assert not runner.is_active and runner.last_timings is None
    with pytest.raises(RuntimeError, match="not active"):
        runner.infer(images)
    with runner as active:
        assert active is runner and runner.is_active
        with pytest.raises(RuntimeError, match="already active"):
            runner.activate()
        logits = runner.infer(images)
        assert logits.shape == (len(images), len(LABELS)) and logits.dtype == np.float32
        assert np.isfinite(logits).all()
        timings = runner.last_timings
        assert isinstance(timings, Timings) and timings.compute_ms > 0
        assert timings.h2d_ms is None and timings.d2h_ms is None  # host memory: no copies on CPU
        assert timings.split() == {"compute": timings.compute_ms}
        assert runner.describe()["artifact"] == "fp32" and runner.describe()["threads"] == 1
    assert not runner.is_active and runner.session is None  # deactivating frees the session
    with pytest.raises(RuntimeError, match="not active"):
        runner.infer(images)
    runner.deactivate()  # a second deactivate is harmless
    with runner:  # and it activates again
        again = runner.infer(images)
    np.testing.assert_array_equal(again, logits)


def test_a_loader_that_refuses_leaves_the_runner_inactive(tmp_path, package):
    manifest = package.to_manifest()
    (tmp_path / "model.onnx").write_bytes(b"not the model")
    manifest["artifacts"]["fp32"]["file"] = "model.onnx"  # sha256 still the real model's
    broken = ModelPackage(tmp_path, manifest)
    runner = create_backend(broken, "onnxruntime", "fp32")
    with pytest.raises(ModelPackageError, match="sha256"):
        runner.activate()
    assert not runner.is_active


def test_timings_split_names_the_timed_stages():
    assert Timings(2.0, 0.5, 0.25).split() == {"h2d": 0.5, "compute": 2.0, "d2h": 0.25}
    assert Timings(2.0).split() == {"compute": 2.0}


def test_create_backend_refuses_an_artifact_of_the_other_format(tmp_path):
    engines = package_with_engine(tmp_path)
    with pytest.raises(CxrEdgeError, match="the onnxruntime backend runs onnx artifacts"):
        create_backend(engines, "onnxruntime", "int8", "trt-int8-sm90")
    with pytest.raises(CxrEdgeError, match="the tensorrt backend runs tensorrt artifacts"):
        create_backend(engines, "tensorrt", "fp32", "fp32")


# --- TensorRT, where there is none ---------------------------------------------------------------

def package_with_engine(tmp_path) -> ModelPackage:
    (tmp_path / "model.int8.sm90.plan").write_bytes(b"a plan that is never deserialized here")
    manifest = json.loads((DEFAULT_PACKAGE / "manifest.json").read_text())
    manifest["artifacts"] = {"fp32": manifest["artifacts"]["fp32"]}
    package = ModelPackage(tmp_path, manifest)
    package.add_artifact("trt-int8-sm90", "model.int8.sm90.plan", format="tensorrt", precision="int8", stamp=STAMP,
                         profile={"min_batch": 1, "opt_batch": 8, "max_batch": 32})
    return package


def tensorrt_runner(tmp_path, reads: list):
    """A TensorRT runner on a real (sha256-verified) loader that counts its reads."""
    from cxr_edge.backends.tensorrt import TensorRTRunner

    package = package_with_engine(tmp_path)
    verified = package.verified_loader("trt-int8-sm90")
    load = lambda: reads.append("read") or verified()  # noqa: E731
    entry = package.artifact("trt-int8-sm90")
    return TensorRTRunner(load, "int8", entry.key, entry.sha256, where=str(tmp_path), stamp=entry.stamp)


def test_create_backend_makes_a_tensorrt_runner_without_tensorrt(tmp_path):
    runner = create_backend(package_with_engine(tmp_path), "tensorrt", "int8", "trt-int8-sm90", stage_timing=True)
    assert type(runner).__name__ == "TensorRTRunner" and not runner.is_active
    assert runner.stamp == STAMP and runner.stage_timing  # the stamp from the manifest, options from the caller
    assert runner.describe() == {"name": "tensorrt", "precision": "int8", "artifact": "trt-int8-sm90",
                                 "tensorrt": "10.13.0.35", "gpu": "NVIDIA H100 80GB HBM3"}
    assert "tensorrt" not in sys.modules  # nothing imported until it is activated


def test_tensorrt_runner_without_tensorrt_is_one_clear_error(tmp_path):
    facts = machine_facts()
    if facts.tensorrt_version and facts.gpu_name:
        pytest.skip("TensorRT and a GPU are present here")
    reads = []
    runner = tensorrt_runner(tmp_path, reads)
    with pytest.raises(CxrEdgeError, match=r"TensorRT engine 'trt-int8-sm90' cannot run here: ") as caught:
        runner.activate()
    assert facts.reason in str(caught.value)
    assert not runner.is_active and reads == []  # refused before the engine was even read


def test_tensorrt_runner_refuses_an_engine_stamped_for_another_gpu(tmp_path, monkeypatch):
    from cxr_edge.backends import tensorrt

    monkeypatch.setattr(tensorrt, "machine_facts", lambda: MachineFacts("10.13.0.35", "NVIDIA L4", "8.9"))
    reads = []
    runner = tensorrt_runner(tmp_path, reads)
    with pytest.raises(ModelPackageError, match=r"refused: engine built for compute capability 9\.0 .*"
                                                r"rebuild it on this machine with `cxr-edge build-engine .* --int8`"):
        runner.activate()
    assert not runner.is_active and reads == []


def test_tensorrt_runner_whose_engine_does_not_load_says_so(tmp_path, monkeypatch):
    """The stamp fits, the bytes are verified, Polygraphy cannot load the engine (here: no
    tensorrt at all): a ModelPackageError naming the engine, the runner left inactive."""
    from cxr_edge.backends import tensorrt

    monkeypatch.setattr(tensorrt, "machine_facts", lambda: MachineFacts("10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0"))
    reads = []
    runner = tensorrt_runner(tmp_path, reads)
    with pytest.raises(CxrEdgeError, match="trt-int8-sm90"):
        runner.activate()
    assert not runner.is_active and reads == ["read"]


@pytest.mark.gpu
def test_tensorrt_runner_on_an_engine_built_here(tmp_path, images):
    """On a GPU: an FP32 engine of the bundled model built here through Polygraphy, run with
    and without stage timing, against ONNX Runtime on the same images."""
    facts = machine_facts()
    if facts.tensorrt_version is None or facts.gpu_name is None:
        pytest.skip(f"needs TensorRT and an NVIDIA GPU: {facts.reason}")
    from cxr_edge.engines.tensorrt import BatchProfile, build_engine

    package = ModelPackage(tmp_path, ModelPackage.load().to_manifest())
    (tmp_path / "model.onnx").write_bytes(ModelPackage.load().read_verified("fp32"))
    package.add_artifact("fp32", "model.onnx")
    params = package.preprocess_params
    profile = BatchProfile(1, 2, 4)
    stamp = build_engine(tmp_path / "model.onnx", tmp_path / "model.plan", (params.channels, params.size, params.size),
                         profile, timing_cache=tmp_path / "timing.cache")
    assert stamp["tensorrt_version"] == facts.tensorrt_version and (tmp_path / "timing.cache").is_file()
    package.add_artifact("trt-fp32", "model.plan", format="tensorrt", precision="fp32", stamp=stamp,
                         profile={"min_batch": 1, "opt_batch": 2, "max_batch": 4})
    batch = np.concatenate([images] * 3)  # 9 images: chunks of the profile's 4
    with create_backend(package, "onnxruntime", "fp32") as cpu:
        reference = cpu.infer(batch)
    for stage_timing in (False, True):
        with create_backend(package, "tensorrt", "fp32", "trt-fp32", stage_timing=stage_timing) as runner:
            logits = runner.infer(batch)
            timings = runner.last_timings
        assert logits.shape == reference.shape and np.abs(logits - reference).max() < 0.05  # TF32 allowed
        assert (timings.h2d_ms is not None) == stage_timing and (timings.d2h_ms is not None) == stage_timing


# --- Polygraphy, called our way --------------------------------------------------------------------

def test_torch_hidden_blocks_the_import_and_restores():
    if "torch" in sys.modules:
        pytest.skip("torch is already imported in this test process")
    with torch_hidden():
        with pytest.raises(ImportError):
            import torch  # noqa: F401
    assert "torch" not in sys.modules


def test_polygraphy_runs_the_gate_without_importing_torch_or_printing():
    """Polygraphy imports torch to ask whether an array is a torch tensor, and prints to stdout:
    neither happens the way cxr-edge calls it (DESIGN.md: the engines never import torch)."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed: nothing to keep out")
    pytest.importorskip("polygraphy", reason="the engines extra (polygraphy)")
    code = (
        "import sys, numpy as np\n"
        "from cxr_edge.manifest import ModelPackage\n"
        "from cxr_edge.engines.holdout import onnxruntime_runner, run_holdout\n"
        "p = ModelPackage.load()\n"
        "x = np.zeros((3, 1, p.preprocess_params.size, p.preprocess_params.size), np.float32)\n"
        "run = run_holdout(onnxruntime_runner('fp32', p.verified_loader('fp32'), 1), x, batch=2)\n"
        "print('torch' in sys.modules, run.logits.shape, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "False (3, 15)"
    assert proc.stdout == ""  # Polygraphy's log lines go to Python logging, not stdout
