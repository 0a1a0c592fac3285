"""Daemon benchmark: file drop -> SR written latency at low load, and a 500-file burst vs `cxr-edge infer`.

usage: python benchmarks/daemon_latency.py [--dicom FILE] [--images DIR] [--drops 30] [--burst 500]
Prints JSON. Numbers, not a test: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.daemon_helpers import DaemonProcess, drop, wait_for  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def low_load(root: Path, dicom: Path, drops: int) -> dict:
    daemon = DaemonProcess(root).start()
    latencies = []
    for i in range(drops):
        sr = daemon.out / f"drop{i:04d}.dcm.sr.dcm"
        json_path = daemon.out / f"drop{i:04d}.dcm.json"
        started = time.perf_counter()
        drop(dicom, daemon.inbox, f"drop{i:04d}.dcm")
        wait_for(lambda: json_path.exists(), timeout=60, interval=0.002, what="the JSON")  # JSON is written after the SR
        latencies.append((time.perf_counter() - started) * 1e3)
        assert sr.exists()
    daemon.stop()
    return {"drops": drops, "p50_ms": round(percentile(latencies, 50), 1), "p99_ms": round(percentile(latencies, 99), 1),
            "min_ms": round(min(latencies), 1), "max_ms": round(max(latencies), 1)}


def burst(root: Path, images: list[Path]) -> dict:
    staging = root / "staging"
    staging.mkdir(parents=True)
    for i, image in enumerate(images):
        shutil.copyfile(image, staging / f"{i:04d}_{image.name}")
    daemon = DaemonProcess(root / "daemon").start()
    started = time.perf_counter()
    for path in sorted(staging.iterdir()):
        drop(path, daemon.inbox)
    wait_for(lambda: daemon.states().get("done", 0) + daemon.states().get("failed", 0) == len(images), timeout=1800,
             interval=0.05, what="the burst")
    daemon_seconds = time.perf_counter() - started
    daemon.stop()
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cxr_edge", "infer", str(staging), "--out", str(root / "infer-out")],
                   check=True, capture_output=True)
    infer_seconds = time.perf_counter() - started
    return {"files": len(images), "daemon_seconds": round(daemon_seconds, 2),
            "daemon_images_per_second": round(len(images) / daemon_seconds, 2),
            "infer_seconds_incl_startup": round(infer_seconds, 2),
            "infer_images_per_second_incl_startup": round(len(images) / infer_seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dicom", type=Path, default=REPO / "samples" / "dicom" / "rsna_cr_pa_jpeg_baseline_mono2.dcm")
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared" / "data" / "nih" / "images")
    parser.add_argument("--drops", type=int, default=30)
    parser.add_argument("--burst", type=int, default=500)
    args = parser.parse_args()
    images = sorted(args.images.glob("*.png"))
    images = (images * (args.burst // max(1, len(images)) + 1))[: args.burst]  # repeat under new names if needed
    with tempfile.TemporaryDirectory() as tmp:
        result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0))},
                  "low_load_drop_to_sr": low_load(Path(tmp) / "low", args.dicom, args.drops),
                  "burst": burst(Path(tmp) / "burst", images)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
