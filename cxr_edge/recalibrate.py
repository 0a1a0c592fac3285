"""`cxr-edge calibrate` as a function: a site's labeled images -> a new package with re-fitted
temperatures and thresholds (no torch; nothing leaves the machine)."""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from pathlib import Path

from .errors import CxrEdgeError

log = logging.getLogger(__name__)


@dataclass
class Recalibration:
    report: dict  # what the command prints (--json)
    fit: dict  # calibration.fit_calibration's result
    failures: list  # [(item, reason)]: images left out


def recalibrate(inputs: list[str], labels_csv: str, model_dir: str | None, out_dir: str, policy: str,
                new_version: str | None, precision: str, batch_size: int, workers: int | None,
                threads: int | None) -> Recalibration:
    """Raises CxrEdgeError (or ValueError for a bad policy) for usage and configuration problems."""
    from .backends import create_backend, select_backend
    from .calibration import fit_calibration
    from .labeled import logits_for, match_labels
    from .manifest import ModelPackage, write_package_copy
    from .operating_points import Policy

    Policy.parse(policy)
    package = ModelPackage.load(model_dir)
    labeled = match_labels(list(inputs), labels_csv)
    if Path(out_dir).exists():
        raise CxrEdgeError(f"{out_dir}: already exists; choose a new folder for the new package")
    selection = select_backend(package, "onnxruntime", precision)
    runner = create_backend(package, "onnxruntime", precision, selection.artifact, threads=threads)
    log.info("calibrating %s %s (%s) on %d labeled images", package.name, package.version, precision, len(labeled.items))
    logits, ok, failures = logits_for(labeled.items, package, runner, batch_size, workers)
    for item, reason in failures:
        log.error("%s: left out of calibration: %s", item.path, reason)
    labels = labeled.labels[ok]
    if len(labels) < 2:
        raise CxrEdgeError("fewer than 2 images decoded; nothing to calibrate on")
    fit = fit_calibration(labels, logits, policy)
    today = datetime.date.today().strftime("%Y%m%d")
    version = new_version or f"{package.version.split('+')[0]}+site.{today}"
    fitted_on = f"site data: {len(labels)} labeled images ({Path(labels_csv).name}), {precision} logits"
    try:
        new = write_package_copy(package, out_dir, package.recalibrated(fit, fitted_on, version))
    except (CxrEdgeError, OSError) as exc:
        raise CxrEdgeError(f"cannot write {out_dir}: {exc}") from exc
    report = {"package": str(new.root), "version": new.version, "images": len(labels), "failed": len(failures),
              "unlabeled_images_ignored": labeled.unlabeled, "policy": fit["threshold_policy"],
              "temperatures": dict(zip(new.labels, fit["temperatures"])),
              "thresholds": dict(zip(new.labels, fit["thresholds"])),
              "operating_points": dict(zip(new.labels, fit["operating_points"])),
              "temperature_fitted": fit["temperature_fitted"], "positives": fit["positives"],
              "mean": fit["report"]["mean"]}
    return Recalibration(report, fit, failures)
