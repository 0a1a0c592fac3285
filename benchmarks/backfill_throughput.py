"""Throughput of `cxr-edge infer` against `cxr-edge backfill` (Ray Data) on this machine, on one
core and on two, plus a re-run over finished inputs (what resuming costs: hashing only).

    python benchmarks/backfill_throughput.py ../shared/data/nih/images [--passes 2]

`pipeline img/s` is the command's own timing of its pipeline (the inputs over the seconds from the
first decode to the last record; for backfill, after Ray started); `wall img/s` counts the whole
command (Python start, the model load, Ray's start and stop). One core: `taskset -c 0`; Ray then
still gets 2 logical CPUs (the model replica reserves one, the decode and write tasks need one).
Same settings everywhere: bundled model, ONNX Runtime FP32, heatmaps on, SR for DICOM.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(command: list[str], cores: str | None) -> tuple[dict, float]:
    if cores is not None:
        command = ["taskset", "-c", cores, *command]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode not in (0, 1):
        sys.exit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--passes", type=int, default=2, help="runs of each setting; the best is reported")
    args = parser.parse_args()
    cli = [sys.executable, "-m", "cxr_edge", "-q"]
    settings = [
        ("infer, 1 core", ["infer", "--workers", "1", "--threads", "1"], "0"),
        ("backfill (Ray), 1 core", ["backfill", "--cpus", "2"], "0"),
        ("infer, 2 cores", ["infer"], None),
        ("backfill (Ray), 2 cores", ["backfill", "--cpus", "2"], None),
    ]
    print(f"{os.cpu_count()} CPUs; inputs: {args.folder}")
    print(f"{'setting':30} {'inputs':>6} {'pipeline img/s':>15} {'wall img/s':>11} {'wall s':>7}")
    for name, command, cores in settings:
        best = None
        for _ in range(args.passes):
            out = Path(tempfile.mkdtemp(prefix="cxr-bench-"))
            try:
                summary, wall = run([*cli, *command, args.folder, "--out", str(out), "--json"], cores)
                if command[0] == "backfill" and cores is None and best is None:
                    again, again_wall = run([*cli, *command, args.folder, "--out", str(out), "--json"], cores)
                    resume = (again["already_done"], again["seconds"], again_wall)
            finally:
                shutil.rmtree(out, ignore_errors=True)
            n = summary["inputs"]
            row = (n, n / summary["seconds"], n / wall, wall)
            best = row if best is None or row[1] > best[1] else best
        print(f"{name:30} {best[0]:6d} {best[1]:15.1f} {best[2]:11.1f} {best[3]:7.1f}")
    done, seconds, wall = resume
    print(f"{'backfill re-run, all done':30} {done:6d} {done / seconds:15.1f} {done / wall:11.1f} {wall:7.1f}"
          "   (hashed and skipped, not decoded)")


if __name__ == "__main__":
    main()
