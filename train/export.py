"""Export a trained run to an ONNX model package, with parity against torch checked.

The package is built in a staging folder and published whole (cxr_edge.atomic): `--out` is the
old package or the new one, never half of one, also when the export fails or is killed.
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch

from cxr_edge.atomic import atomic_write, publish_dir, staging_dir
from cxr_edge.engines.class_maps import CLASS_MAPS, with_maps
from cxr_edge.errors import ModelPackageError
from cxr_edge.findings import calibrated_probabilities
from cxr_edge.labels import LABELS
from cxr_edge.manifest import MANIFEST_FORMAT, MANIFEST_FORMAT_VERSION, ArtifactFormat, ModelPackage, Precision, sha256_file
from cxr_edge.preprocess import PreprocessParams

from .data import Split, SplitSpec
from .tensors import load_tensors
from .model import load_run_model, read_run_config

log = logging.getLogger(__name__)
PARITY_TOLERANCE = 1e-4
OPSET = 17  # LayerNormalization is one node from opset 17 (TensorRT keeps it in FP32 cleanly)


TRAINING_KEYS = ("recipe", "epochs", "batch_size", "accum_steps", "lr", "layer_decay", "weight_decay", "warmup_epochs",
                 "loss", "pos_weight", "sampler", "amp", "seed", "temperature", "alpha", "img_size", "frozen_blocks",
                 "views", "other_views", "strength", "folds", "probe_epochs", "probe_lr", "ema_decay", "drop_path")


def describe_split(cfg: dict) -> str:
    if cfg.get("test_data"):
        return (f"patient-wise: test = {cfg.get('test_fraction', 0.3):.0%} of the patients of {cfg['test_data']} "
                f"(their images from it only), seed {cfg['split_seed']}; no image of a test patient is trained on")
    if cfg.get("test_list"):
        return (f"official test list {Path(cfg['test_list']).name}; validation {cfg.get('val_fraction', 0.1):.0%} of "
                f"the train_val patients, seed {cfg['split_seed']}")
    return f"patient-wise 70/15/15, seed {cfg['split_seed']}"


def parity_tensors(cfg: dict, params: PreprocessParams, count: int) -> np.ndarray:
    """Real held-out images: the first `count` of the run's test split that decode."""
    test = SplitSpec.from_config(cfg).splits()[Split.TEST][:count]
    decoded = load_tensors(test, params)
    for path, reason in decoded.left_out:
        log.warning("%s: not used for the parity check: %s", path, reason)
    return decoded.images


def run_summary(run_dir: str | Path) -> dict:
    """How a calibrated run was made and what it scored on its test split: for a manifest that
    names the runs it was chosen among."""
    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    calibration = json.loads((run_dir / "calibration.json").read_text())
    history = json.loads((run_dir / "history.json").read_text())
    test = calibration["test"]
    return {
        "run": run_dir.name, "model_sha256": sha256_file(run_dir / "model.safetensors"),
        "arch": cfg["arch"], "img_size": cfg["preprocessing"]["size"],
        "distilled_from": (cfg.get("distilled_from") or {}).get("run"),
        "training": {k: cfg[k] for k in TRAINING_KEYS if k in cfg},
        "validation_mean_auroc": history.get("best_val_mean_auroc"), "validation": calibration["validation"].get("described"),
        "test": {k: test[k] for k in ("n", "mean_auroc", "mean_auroc_ci95", "mean_sensitivity", "mean_specificity",
                                      "flagged_per_image", "true_per_image") if k in test},
        "threshold_policy": calibration["threshold_policy"],
    }


def export_onnx(model, params: PreprocessParams, path: Path) -> None:
    dummy = torch.zeros(2, params.channels, params.size, params.size)
    atomic_write(path, lambda f: torch.onnx.export(
        model, dummy, f, input_names=["image"], output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=OPSET, dynamo=False,
    ))


def check_parity(model, onnx_path: Path, x: np.ndarray, temperatures: np.ndarray) -> dict:
    import onnxruntime as ort

    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ort_logits = session.run(None, {"image": x})[0]
    delta = np.abs(calibrated_probabilities(torch_logits, temperatures) - calibrated_probabilities(ort_logits, temperatures))
    return {"images": int(len(x)), "max_abs_dprob": float(delta.max()), "max_abs_dlogit": float(np.abs(torch_logits - ort_logits).max()),
            "tolerance": PARITY_TOLERANCE}


def export_package(run_dir: str | Path, out: str | Path, name: str, version: str, description: str,
                   parity_images: int = 16, extra: dict | None = None) -> ModelPackage:
    """Write the package to `out`, replacing a package already there only once the new one is whole."""
    run_dir, out = Path(run_dir), Path(out)
    cfg, params = read_run_config(run_dir)
    parity_x = parity_tensors(cfg, params, parity_images)  # decode (fork) before torch starts its threads
    model, _, _ = load_run_model(run_dir)
    calibration = json.loads((run_dir / "calibration.json").read_text())
    history = json.loads((run_dir / "history.json").read_text())
    staging = staging_dir(out)
    try:
        export_onnx(model, params, staging / "model.onnx")
        parity = check_parity(model, staging / "model.onnx", parity_x, np.asarray(calibration["temperatures"]))
        log.info("parity torch vs ONNX Runtime: %s", parity)
        if parity["max_abs_dprob"] > PARITY_TOLERANCE:
            raise RuntimeError(f"ONNX export drifts from torch: max |dprob| {parity['max_abs_dprob']:.2e} > {PARITY_TOLERANCE}")
        manifest = package_manifest(cfg, params, model, calibration, history, parity, name, version, description, extra)
        artifact = {"file": "model.onnx", "format": ArtifactFormat.ONNX.value, "precision": Precision.FP32.value,
                    "input": "image", "output": "logits"}
        try:  # heatmaps: the class maps as a second output, where the head makes them exact
            data, manifest["heatmaps"] = with_maps((staging / "model.onnx").read_bytes(), manifest["architecture"], params)
            atomic_write(staging / "model.onnx", data)
            artifact["class_maps"] = CLASS_MAPS
        except ModelPackageError as exc:
            log.info("no class maps (no heatmaps) for this model: %s", exc)
        manifest["artifacts"]["fp32"] = {**artifact, "sha256": sha256_file(staging / "model.onnx")}
        ModelPackage(staging, manifest).save()  # validated on construction and again on save
        publish_dir(staging, out, replace=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ModelPackage.load(out)


def package_manifest(cfg: dict, params: PreprocessParams, model, calibration: dict, history: dict, parity: dict,
                     name: str, version: str, description: str, extra: dict | None) -> dict:
    """A fresh manifest for the run (artifacts are added by the caller)."""
    init = cfg.get("init")
    return {
        "format": MANIFEST_FORMAT, "format_version": MANIFEST_FORMAT_VERSION,
        "name": name, "version": version, "description": description,
        "labels": list(LABELS),
        "architecture": {"timm_name": cfg["arch"], **({"timm_kwargs": cfg["model_kwargs"]} if cfg.get("model_kwargs") else {}),
                         "img_size": params.size, "in_chans": params.channels,
                         "num_classes": len(LABELS), "parameters": sum(p.numel() for p in model.parameters())},
        "preprocessing": params.to_manifest(),
        "calibration": {"method": "temperature", "temperatures": calibration["temperatures"],
                        **({"logit_shifts_in_model": calibration["logit_shifts"],
                            "note": "Platt scaling: the per-class logit shifts are folded into the head's bias, "
                                    "the runtime divides by the temperatures"}
                           if any(calibration.get("logit_shifts") or []) else {}),
                        "fitted_on": calibration["validation"].get("described")
                                     or f"validation split ({calibration['validation']['n']} images)",
                        "positives": calibration["validation"]["positives"],
                        "temperature_fitted": calibration["validation"]["temperature_fitted"],
                        **calibration["validation"]["report"]},
        "thresholds": {"policy": calibration["threshold_policy"], "values": calibration["thresholds"],
                       "chosen_on": calibration["validation"].get("described") or "validation split",
                       **({"operating_points": calibration["operating_points"]} if "operating_points" in calibration else {})},
        "metrics": {"test": calibration["test"], "best_val_mean_auroc": history["best_val_mean_auroc"]},
        "artifacts": {},
        "provenance": {
            "training_data": cfg["data"], "split": describe_split(cfg),
            "initial_weights": ({"file": Path(init).name, "sha256": sha256_file(init)} if init else None),
            "training": {k: cfg[k] for k in TRAINING_KEYS if k in cfg},
            "distilled_from": cfg.get("distilled_from"),
            "history": history["epochs"],
            "torch": torch.__version__, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **(extra or {}),
        },
        "export": {"opset": OPSET, "parity_vs_torch": parity},
    }
