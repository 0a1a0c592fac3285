"""Production-size models for `cxr-edge bench --shape`: choose hardware on a network the size a
site would deploy, not on the bundled 112 px demo.

A shape is a model package like any other (ONNX FP32 with class maps, the bundled package's
labels and preprocessing at the shape's size), with RANDOM weights: its findings mean nothing, its
timings are the real ones. It is built once with torch + timm + onnx (the train or gpu-torch
extra) and kept in a cache folder, keyed by the timm and torch versions that built it; every
later bench loads it through the manifest's sha256 like any package.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from . import SHAPES, Shape
from ..errors import CxrEdgeError
from ..manifest import MANIFEST_NAME, ArtifactFormat, ModelPackage, sha256_file
from ..preprocess import PreprocessParams


OPSET = 17  # as `python -m train export`


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cxr-edge" / "shapes"


def shape_package(name: str, cache: Path | None = None) -> ModelPackage:
    """The package for SHAPES[name], built into `cache` the first time."""
    if name not in SHAPES:
        raise CxrEdgeError(f"unknown shape {name!r}; available: {', '.join(SHAPES)}")
    return build_shape(name, SHAPES[name], cache or default_cache())


def build_shape(name: str, shape: Shape, cache: Path) -> ModelPackage:
    missing = [m for m in ("torch", "timm", "onnx") if importlib.util.find_spec(m) is None]
    if missing:
        raise CxrEdgeError(f"--shape builds its model with torch, timm and onnx: {', '.join(missing)} not installed "
                           "(pip install 'cxr-edge[gpu-torch]')")
    import timm
    import torch

    folder = Path(cache) / f"{name}-timm{timm.__version__}-torch{torch.__version__.split('+')[0]}"
    if (folder / MANIFEST_NAME).is_file():
        return ModelPackage.load(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # a staging folder of our own: two benches building the same shape do not share one
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        _write_package(staging, name, shape)
        try:
            staging.rename(folder)
        except OSError:  # another bench published it first: use theirs
            if not (folder / MANIFEST_NAME).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ModelPackage.load(folder)


def _write_package(staging: Path, name: str, shape: Shape) -> None:
    import timm
    import torch

    from ..atomic import atomic_write
    from ..engines.class_maps import CLASS_MAPS, with_maps

    bundled = ModelPackage.load()
    params = bundled.preprocess_params
    architecture = {"timm_name": shape.timm_name, "timm_kwargs": {"global_pool": "avg", "fc_norm": False},
                    "img_size": shape.size, "in_chans": params.channels, "num_classes": len(bundled.labels)}
    torch.manual_seed(0)
    model = timm.create_model(shape.timm_name, pretrained=False, num_classes=architecture["num_classes"],
                              in_chans=params.channels, img_size=shape.size, **architecture["timm_kwargs"]).eval()
    with torch.no_grad():
        # timm starts every bias at 0 and every norm at 1, and the exporter merges equal constants
        # into one, which would leave parameters without their names: no two alike
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    architecture["parameters"] = sum(p.numel() for p in model.parameters())
    dummy = torch.zeros(2, params.channels, shape.size, shape.size)
    onnx_path = staging / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on timm's Python branches: not the user's concern
        atomic_write(onnx_path, lambda f: torch.onnx.export(
            model, dummy, f, input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=OPSET, dynamo=False))
    manifest = bundled.to_manifest()
    manifest["preprocessing"] = {**manifest["preprocessing"], "size": shape.size}
    data, manifest["heatmaps"] = with_maps(onnx_path.read_bytes(), architecture,
                                           PreprocessParams.from_manifest(manifest["preprocessing"]))
    atomic_write(onnx_path, data)
    manifest.update({
        "name": f"bench-{name}", "version": "random-weights",
        "description": f"RANDOM WEIGHTS, for `cxr-edge bench --shape {name}` only: {shape.about}. Its findings mean "
                       "nothing; its timings are those of a model this size.",
        "architecture": architecture,
        "calibration": {"method": "temperature", "temperatures": [1.0] * len(bundled.labels),
                        "note": "random weights: nothing to calibrate"},
        "artifacts": {"fp32": {"file": "model.onnx", "sha256": sha256_file(onnx_path), "format": ArtifactFormat.ONNX.value,
                               "precision": "fp32", "input": "image", "output": "logits", "class_maps": CLASS_MAPS}},
        "provenance": {"weights": "random (torch.manual_seed(0))", "timm": timm.__version__, "torch": torch.__version__},
    })
    for informational in ("metrics", "export"):
        manifest.pop(informational, None)
    ModelPackage(staging, manifest).save()  # validated on construction and again on save
