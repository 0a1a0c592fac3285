"""Evaluate a run (torch) or any model package (through the runtime: ONNX, INT8, ...) on labeled images.

Per-class AUROC with a bootstrap 95% CI, average precision, ECE of the calibrated probabilities,
sensitivity / specificity at the model's thresholds; a JSON and a Markdown report and PNG plots
(ROC curves, reliability diagrams, training history).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cxr_edge.atomic import atomic_write, atomic_write_json
from cxr_edge.findings import sigmoid
from cxr_edge.labels import LABELS, NO_FINDING
from cxr_edge.metrics import (
    auroc, average_precision, bootstrap_auroc_ci, brier_score, decision_report, expected_calibration_error, roc_curve,
)

from .data import Split, SplitSpec, labels_of
from .tensors import input_items

log = logging.getLogger(__name__)


def _round(value) -> float | None:
    return None if value is None or np.isnan(value) else round(float(value), 4)


def metrics_report(labels: np.ndarray, logits: np.ndarray, temperatures: np.ndarray, thresholds: np.ndarray,
                   resamples: int = 1000, seed: int = 0) -> dict:
    probabilities = sigmoid(logits / temperatures)
    decided = decision_report(labels, probabilities, thresholds, np.array([label != NO_FINDING for label in LABELS]))
    per_class = {}
    for c, label in enumerate(LABELS):
        y, p = labels[:, c] > 0, probabilities[:, c]
        low, high = bootstrap_auroc_ci(y, logits[:, c], resamples, seed + c)
        sensitivity, specificity = decided["sensitivity"][c], decided["specificity"][c]
        per_class[label] = {
            "positives": int(y.sum()), "auroc": _round(auroc(y, logits[:, c])), "auroc_ci95": [_round(low), _round(high)],
            "average_precision": _round(average_precision(y, p)), "ece": _round(expected_calibration_error(y, p)),
            "brier": _round(brier_score(y, p)), "threshold": _round(thresholds[c]),
            "sensitivity": _round(sensitivity), "specificity": _round(specificity),
        }
    mean = lambda key: _round(np.nanmean([np.nan if v[key] is None else v[key] for v in per_class.values()]))  # noqa: E731
    findings = [v for k, v in per_class.items() if k != "No Finding"]
    return {
        "images": int(len(labels)),
        "mean_auroc": mean("auroc"),
        "mean_auroc_14_findings": _round(np.nanmean([np.nan if v["auroc"] is None else v["auroc"] for v in findings])),
        "mean_average_precision": mean("average_precision"),
        "mean_ece": mean("ece"),
        "bootstrap": {"resamples": resamples, "seed": seed, "level": 0.95, "unit": "image"},
        "per_class": per_class,
    }


def markdown_report(report: dict) -> str:
    lines = [f"# Evaluation: {report['model']['name']}", "",
             f"- model: `{report['model']['source']}` ({report['model']['kind']}, {report['model'].get('precision', 'fp32')})",
             f"- data: {report['data']}", f"- images: {report['metrics']['images']}"
             + (f" ({report['failed']} failed to decode and are left out)" if report.get("failed") else ""),
             f"- mean AUROC (15 labels): **{report['metrics']['mean_auroc']}**; 14 findings: "
             f"{report['metrics']['mean_auroc_14_findings']}; mean AP {report['metrics']['mean_average_precision']}; "
             f"mean ECE {report['metrics']['mean_ece']}", "",
             "| label | positives | AUROC | 95% CI | AP | ECE | threshold | sensitivity | specificity |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for label, m in report["metrics"]["per_class"].items():
        ci = "n/a" if m["auroc_ci95"][0] is None else f"{m['auroc_ci95'][0]:.3f}-{m['auroc_ci95'][1]:.3f}"
        lines.append(f"| {label} | {m['positives']} | {fmt(m['auroc'])} | {ci} | {fmt(m['average_precision'])} | "
                     f"{fmt(m['ece'])} | {fmt(m['threshold'])} | {fmt(m['sensitivity'])} | {fmt(m['specificity'])} |")
    lines += ["", "Plots: `roc.png` (ROC per class), `reliability.png` (15-bin reliability per class)"
              + (", `history.png` (training history)" if report.get("plots", {}).get("history") else "") + ".",
              "AUROC CIs are percentile bootstrap over images; classes with few positives have wide or no CIs.", ""]
    return "\n".join(lines)


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=80))
    plt.close(fig)


def plot_all(out: Path, labels: np.ndarray, logits: np.ndarray, temperatures: np.ndarray, history: list | None) -> dict:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    probabilities = sigmoid(logits / temperatures)
    plots = {}
    for kind in ("roc", "reliability"):
        fig, axes = plt.subplots(3, 5, figsize=(17, 10), sharex=True, sharey=True)
        for c, (label, ax) in enumerate(zip(LABELS, axes.ravel())):
            y = labels[:, c] > 0
            ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
            if kind == "roc" and 0 < y.sum() < len(y):
                fpr, tpr = roc_curve(y, logits[:, c])
                ax.plot(fpr, tpr, lw=1.5)
                ax.set_title(f"{label}\nAUROC {auroc(y, logits[:, c]):.3f} (n+={int(y.sum())})", fontsize=9)
            elif kind == "reliability":
                edges = np.linspace(0, 1, 16)
                index = np.clip(np.digitize(probabilities[:, c], edges[1:-1]), 0, 14)
                centers = [(probabilities[index == b, c].mean(), y[index == b].mean(), (index == b).sum())
                           for b in range(15) if (index == b).any()]
                if centers:
                    conf, acc, count = map(np.asarray, zip(*centers))
                    ax.scatter(conf, acc, s=8 + 60 * count / count.max())
                    ax.plot(conf, acc, lw=1)
                ax.set_title(f"{label}\nECE {expected_calibration_error(y, probabilities[:, c]):.3f}", fontsize=9)
            else:
                ax.set_title(f"{label}\n(no positives)", fontsize=9)
        fig.supxlabel("false positive rate" if kind == "roc" else "predicted probability (calibrated)")
        fig.supylabel("true positive rate" if kind == "roc" else "observed frequency")
        fig.tight_layout()
        save_figure(fig, out / f"{kind}.png")
        plots[kind] = f"{kind}.png"
    if history:
        fig, ax = plt.subplots(figsize=(7, 4))
        epochs = [h["epoch"] for h in history]
        ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
        ax2 = ax.twinx()
        ax2.plot(epochs, [h["val_mean_auroc"] for h in history], marker="s", color="C1", label="val mean AUROC")
        ax.set_xlabel("epoch")
        ax.set_ylabel("train loss")
        ax2.set_ylabel("validation mean AUROC")
        fig.legend(loc="upper right")
        fig.tight_layout()
        save_figure(fig, out / "history.png")
        plots["history"] = "history.png"
    return plots


def _is_package(path: Path) -> bool:
    return (path / "manifest.json").is_file()


class Scored(NamedTuple):
    """A model's logits on the images that decoded, and what the report needs besides."""

    logits: np.ndarray
    labels: np.ndarray
    temperatures: np.ndarray
    thresholds: np.ndarray
    history: list | None  # per-epoch training history, when known
    model_info: dict
    failed: int  # images left out because they did not decode


def logits_from_run(run: Path, records, cache: str | None, workers: int) -> Scored:
    from .dataset import make_dataset
    from .loop import predict_logits
    from .model import load_run_model, read_run_config

    cfg, params = read_run_config(run)
    dataset = make_dataset(records, params, cache, workers)  # decode (fork) first, then torch and its threads
    model, _, _ = load_run_model(run)
    calibration_path = run / "calibration.json"
    if calibration_path.is_file():
        calibration = json.loads(calibration_path.read_text())
        temperatures, thresholds = np.asarray(calibration["temperatures"]), np.asarray(calibration["thresholds"])
    else:
        log.warning("%s has no calibration.json: T = 1 and thresholds 0.5 (run `python -m train calibrate`)", run)
        temperatures, thresholds = np.ones(len(LABELS)), np.full(len(LABELS), 0.5)
    history = json.loads((run / "history.json").read_text())["epochs"] if (run / "history.json").is_file() else None
    model_info = {"name": run.name, "kind": "torch run", "arch": cfg["arch"], "source": str(run)}
    logits = predict_logits(model, dataset, 64, workers)
    return Scored(logits, dataset.labels, temperatures, thresholds, history, model_info, len(dataset.left_out))


def logits_from_package(root: Path, records, precision: str, workers: int) -> Scored:
    from cxr_edge.backends import create_backend, select_backend
    from cxr_edge.labeled import logits_for
    from cxr_edge.manifest import ModelPackage

    package = ModelPackage.load(root)
    items = input_items(records)
    selection = select_backend(package, "auto", precision)
    log.info("backend %s, artifact %s: %s", selection.backend, selection.artifact, selection.reason)
    runner = create_backend(package, selection.backend, precision, selection.artifact)  # inactive: logits_for
    logits, ok, failures = logits_for(items, package, runner, workers=workers)  # decodes, then activates it
    for item, reason in failures:
        log.error("%s: left out: %s", item.path, reason)
    model_info = {"name": f"{package.name} {package.version}", "kind": "model package", "precision": precision,
                  "artifact": selection.artifact, "backend": selection.backend,
                  "sha256": package.artifact(selection.artifact).sha256, "source": str(root)}
    history = package.section("provenance").get("history")
    return Scored(logits, labels_of(records)[ok], package.temperatures, package.thresholds, history, model_info,
                  len(failures))


def evaluate(model_path: str | Path, data: list[str], split: str, out: str | Path, precision: str = "fp32",
             split_seed: int | None = None, resamples: int = 1000, cache: str | None = "memory", workers: int = 2) -> dict:
    model_path, out = Path(model_path), Path(out)
    if not data:  # a run evaluates on its own held-out split by default
        if _is_package(model_path):
            raise ValueError("a model package needs --data (labeled images to evaluate on)")
        spec = SplitSpec.from_config(json.loads((model_path / "config.json").read_text()))
    else:
        spec = SplitSpec(tuple(data), split_seed or 0)
    splits = spec.splits()
    records = [r for part in splits.values() for r in part] if split == "all" else splits[Split(split)]
    if not records:
        raise ValueError(f"no images in split {split!r}")
    log.info("evaluating %s on %d images (%s)", model_path, len(records), split)
    if _is_package(model_path):
        scored = logits_from_package(model_path, records, precision, workers)
    else:
        scored = logits_from_run(model_path, records, cache, workers)
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": scored.model_info, "data": f"{', '.join(spec.data)}; split {split}", "failed": scored.failed,
              "metrics": metrics_report(scored.labels, scored.logits, scored.temperatures, scored.thresholds, resamples)}
    report["plots"] = plot_all(out, scored.labels, scored.logits, scored.temperatures, scored.history)
    atomic_write_json(out / "report.json", report)
    atomic_write(out / "report.md", markdown_report(report).encode())
    atomic_write(out / "logits.npz", lambda f: np.savez(f, logits=scored.logits, labels=scored.labels))
    log.info("mean AUROC %s; report in %s", report["metrics"]["mean_auroc"], out)
    return report
